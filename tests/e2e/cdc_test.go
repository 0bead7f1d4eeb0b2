package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/cdc"
	dstl "github.com/dstl-dev/dstl/sdk/go"
)

// cdcNodeArgs make a node materialize every second, adopt snapshots
// (truncate) and collect garbage every second, segments included (a tiny
// GC grace: the tests know no upload is in flight when it matters).
var cdcNodeArgs = []string{
	"--materialize-interval", "1s", "--materialize-jitter", "0",
	"--gc-interval", "1s", "--snapshot-gc-grace", "1s", "--gc-grace", "1s",
}

// TestCDCSnapshotAcrossTruncation: a stream of a few thousand keys over
// several checkpoints, materialized, its log truncated and its first
// segments collected. An unregistered subscription from the earliest
// position (retract form, 50 events a message) must start with a reset and
// a snapshot of the newest checkpoint. A third of the way into the scan the
// node is SIGKILLed and restarted on the same disk and blob store; the scan
// resumed from the last event's token (a mid-snapshot token) continues
// with exactly the rows an uninterrupted scan of the restarted node
// delivers after that point: no duplicate, no gap, same order, and the
// rows equal the model. The same subscription then follows three new
// checkpoints of the resumed writer (with overwrites, deletes, merges and a
// clear), and the consumer's table equals the model at every
// checkpoint-complete marker.
func TestCDCSnapshotAcrossTruncation(t *testing.T) {
	t.Parallel()
	began := time.Now()
	rng := e2eRand(t)
	blobDir := filepath.Join(t.TempDir(), "blobs")
	blob := "file://" + blobDir
	dataDir := t.TempDir()
	n := startNode(t, "node", nodeConfig{dataDir: dataDir, blob: blob, args: cdcNodeArgs})
	const stream = "cdcsnap"
	createStream(t, n.clients("connect"), stream)
	w := newCDCWriter(t, n.clients("connect"), stream, rng)
	for round := range 6 {
		w.appendRandom(1000, fmt.Sprintf("r%d", round), round == 3)
		w.ckpt()
	}
	waitSnapshotOf(t, n, stream, w.cp, 30*time.Second)
	part := w.waitTruncated(n, 0, 30*time.Second)
	w.waitEarlyCollected(n, blobDir, part.GetLogId(), 30*time.Second)
	snapCP, want := w.cp, w.m.clone()
	t.Logf("checkpoint %d: %d keys; log %s truncated before SQN %d, its first segments collected", snapCP, len(want), part.GetLogId(), part.GetTruncatedBefore())
	if len(want) < 1000 {
		t.Fatalf("only %d keys in the model; the workload should make a few thousand", len(want))
	}

	// The scan, interrupted by a SIGKILL a third of the way through.
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	c1 := dialSDK(t, n.URL, dstl.WithRetries(0))
	opts := dstl.SubscribeOptions{Form: dstl.FormRetract, MaxEvents: 50}
	killAt := len(want) / 3
	var pre []dstl.Event
	var resume dstl.Token
	sawReset := false
	for ev, err := range c1.Subscribe(ctx, stream, opts).Changes() {
		if err != nil {
			t.Fatalf("subscription from the earliest position, after %d rows: %v", len(pre), err)
		}
		if !sawReset {
			if ev.Kind != dstl.EventReset || ev.Checkpoint != snapCP || !ev.Snapshot {
				t.Fatalf("subscription from the earliest position of a truncated stream: first event %s of checkpoint %d (snapshot %v), want RESET of checkpoint %d (the newest) with snapshot set", ev.Kind, ev.Checkpoint, ev.Snapshot, snapCP)
			}
			sawReset = true
			continue
		}
		if ev.Kind != dstl.EventInsert || !ev.Snapshot || ev.Checkpoint != snapCP {
			t.Fatalf("row %d of the snapshot: %s of checkpoint %d (snapshot %v), want +I of checkpoint %d's snapshot", len(pre), ev.Kind, ev.Checkpoint, ev.Snapshot, snapCP)
		}
		pre = append(pre, ev)
		if len(pre) == killAt {
			resume = ev.Token()
			if stores := feedStores(t, dataDir); len(stores) != 1 {
				t.Errorf("while one subscription is served: feed stores %v under %s/cdc, want one", stores, dataDir)
			}
			n.Kill()
			break
		}
	}
	if resume.IsZero() {
		t.Fatalf("the subscription ended after %d rows without reaching row %d", len(pre), killAt)
	}
	tok, err := cdc.DecodeToken(resume.Bytes())
	if err != nil {
		t.Fatalf("token of row %d: %v", killAt, err)
	}
	if !tok.Snapshot || tok.Checkpoint != snapCP || tok.Ordinal != uint64(killAt) {
		t.Errorf("token of row %d: %+v; want a position inside the snapshot of checkpoint %d after %d rows", killAt, tok, snapCP, killAt)
	}
	t.Logf("SIGKILLed the node after %d of %d snapshot rows", killAt, len(want))

	n2 := startNode(t, "node-restarted", nodeConfig{dataDir: dataDir, blob: blob, args: cdcNodeArgs})
	if stores := feedStores(t, dataDir); len(stores) != 0 {
		t.Errorf("after the restart: feed stores %v of the killed node left under %s/cdc", stores, dataDir)
	}
	c2 := dialSDK(t, n2.URL)

	// What an uninterrupted scan of the restarted node delivers.
	var full []dstl.Event
	for ev, err := range c2.Subscribe(ctx, stream, dstl.SubscribeOptions{Form: dstl.FormRetract, MaxEvents: 50, NoFollow: true}).Changes() {
		if err != nil {
			t.Fatalf("uninterrupted subscription on the restarted node: %v", err)
		}
		if !ev.Kind.IsMarker() {
			full = append(full, ev)
		}
	}
	fullTable := &cdcTable{t: t, what: "uninterrupted scan", rows: model{}}
	for _, ev := range full {
		fullTable.apply(ev)
	}
	checkModel(t, fmt.Sprintf("uninterrupted scan of checkpoint %d", snapCP), fullTable.rows, want)

	// Resume mid-snapshot, then follow new checkpoints of the resumed
	// writer.
	w.resume(n2.clients("connect"))
	table := &cdcTable{t: t, what: "resumed subscription", rows: model{}}
	for _, ev := range pre {
		table.apply(ev)
	}
	var post []dstl.Event
	const rounds = 3
	done := 0
	opts.From = resume
	for ev, err := range c2.Subscribe(ctx, stream, opts).Changes() {
		if err != nil {
			t.Fatalf("resumed subscription, %d rows after the resume: %v", len(post), err)
		}
		if ev.Kind == dstl.EventReset {
			t.Fatalf("resumed subscription: a RESET of checkpoint %d after %d rows (a mid-snapshot token must resume the scan)", ev.Checkpoint, len(post))
		}
		if ev.Snapshot && !ev.Kind.IsMarker() {
			post = append(post, ev)
		}
		table.apply(ev)
		if ev.Kind != dstl.EventCheckpointComplete {
			continue
		}
		if ev.Snapshot {
			if ev.Checkpoint != snapCP {
				t.Fatalf("resumed subscription: snapshot of checkpoint %d complete, want %d", ev.Checkpoint, snapCP)
			}
			checkSeam(t, pre, post, full)
			checkModel(t, fmt.Sprintf("table after the resumed snapshot of checkpoint %d", snapCP), table.rows, want)
		} else {
			m, ok := w.models[ev.Checkpoint]
			if !ok || ev.Checkpoint <= snapCP {
				t.Fatalf("resumed subscription: checkpoint %d complete; want the next new one after %d", ev.Checkpoint, snapCP)
			}
			checkModel(t, fmt.Sprintf("table at checkpoint %d (followed)", ev.Checkpoint), table.rows, m)
			if done++; done == rounds {
				break
			}
		}
		if t.Failed() {
			t.FailNow()
		}
		// A new checkpoint while the subscription follows.
		w.appendRandom(400, fmt.Sprintf("follow%d", done), done == 1)
		w.ckpt()
	}
	if done != rounds {
		t.Fatalf("the resumed subscription ended after %d of %d followed checkpoints", done, rounds)
	}
	t.Logf("snapshot across a truncation with a crash mid-scan took %v", time.Since(began).Round(time.Millisecond))
}

// checkSeam: the rows before the kill and after the resume are exactly the
// rows of the uninterrupted scan, in the same order.
func checkSeam(t *testing.T, pre, post, full []dstl.Event) {
	t.Helper()
	got := append(append([]dstl.Event(nil), pre...), post...)
	seen := map[string]int{}
	for i, ev := range got {
		k := fmt.Sprintf("%d/%s/%s", ev.KeyGroup, ev.State, ev.Key)
		if j, dup := seen[k]; dup {
			t.Errorf("snapshot row %d (%s) repeats row %d (%d before the kill)", i, k, j, len(pre))
		}
		seen[k] = i
	}
	if len(got) != len(full) {
		t.Errorf("interrupted scan: %d rows before the kill + %d after the resume = %d; the uninterrupted scan has %d", len(pre), len(post), len(got), len(full))
	}
	bad := 0
	for i := range min(len(got), len(full)) {
		g, f := got[i], full[i]
		if g.Kind != f.Kind || g.KeyGroup != f.KeyGroup || g.State != f.State || string(g.Key) != string(f.Key) || string(g.Value) != string(f.Value) {
			t.Errorf("snapshot row %d (%d before the kill): %s %d/%s/%s=%q; the uninterrupted scan has %s %d/%s/%s=%q",
				i, len(pre), g.Kind, g.KeyGroup, g.State, g.Key, g.Value, f.Kind, f.KeyGroup, f.State, f.Key, f.Value)
			if bad++; bad == 5 {
				return
			}
		}
	}
}

// TestCDCFencedWriterNeverAppears: writer A checkpoints twice, then appends
// and persists changes with distinctive values (ZOMBIE) after its last
// checkpoint; writer B opens the same key groups from checkpoint 2 (fencing
// A, whose next append and checkpoint fail) and checkpoints other changes
// twice, some on the keys A's zombie changes touched. A subscription that
// was following since before the zombie changes, and subscriptions from the
// earliest position afterwards (retract and upsert forms), never show a
// zombie change or a before-image of one, and their tables equal the model
// at every checkpoint-complete marker.
func TestCDCFencedWriterNeverAppears(t *testing.T) {
	t.Parallel()
	rng := e2eRand(t)
	n := startNode(t, "node", nodeConfig{dataDir: t.TempDir()})
	c := n.clients("connect")
	const stream = "cdcfence"
	createStream(t, c, stream)
	a := newCDCWriter(t, c, stream, rng)
	a.appendRandom(400, "a1", false)
	a.ckpt()
	a.appendRandom(400, "a2", true)
	a.ckpt()
	const last = 4 // B checkpoints 3 and 4

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	sdk := dialSDK(t, n.URL)
	type result struct {
		events []dstl.Event
		err    error
	}
	following := make(chan result, 1)
	caughtUp := make(chan struct{}) // the follower delivered checkpoint 2
	go func() {
		var r result
		defer func() { following <- r }()
		for ev, err := range sdk.Subscribe(ctx, stream, dstl.SubscribeOptions{Form: dstl.FormRetract, MaxEvents: 100}).Changes() {
			if err != nil {
				r.err = err
				return
			}
			r.events = append(r.events, ev)
			if ev.Kind == dstl.EventCheckpointComplete && ev.Checkpoint == 2 {
				close(caughtUp)
			}
			if ev.Kind == dstl.EventCheckpointComplete && ev.Checkpoint >= last {
				return
			}
		}
	}()
	select {
	case <-caughtUp: // the follower waits for checkpoint 3 from here
	case r := <-following:
		t.Fatalf("the following subscription ended before checkpoint 2 (%d events): %v", len(r.events), r.err)
	}

	// A's zombie changes: overwrites and deletes of its keys, new keys, a
	// merge; persisted (durable in the changelog), never checkpointed.
	var zombie []*dstlv1.Change
	for i := range 150 {
		key := fmt.Sprintf("k-%04d", i)
		zombie = append(zombie, put("count", key, "ZOMBIE-"+key), change(dstlv1.Op_OP_DELETE, "name", key, ""))
		zombie = append(zombie, put("zombie", fmt.Sprintf("z-%03d", i), "ZOMBIE-new"))
	}
	zombie = append(zombie, change(dstlv1.Op_OP_MERGE, "list", "m-00", "+ZOMBIE"))
	a.last = appendBatch(t, c, a.id, dstlv1.Durability_DURABILITY_BUFFERED, a.last, zombie)
	persist(t, c, a.id)

	bResp := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream, FromCheckpoint: 2})
	if bResp.GetEpoch() <= a.epoch {
		t.Fatalf("writer B: epoch %d, want above A's %d", bResp.GetEpoch(), a.epoch)
	}
	b := &cdcWriter{matWriter: &matWriter{t: t, c: c, stream: stream, rng: rng, id: bResp.GetWriterId(), epoch: bResp.GetEpoch(), last: bResp.GetLastSqn(), cp: 2, m: a.models[2].clone()}, models: a.models}
	_, err := c.writers.Append(ctxT(t), connect.NewRequest(&dstlv1.AppendRequest{WriterId: a.id, Changes: []*dstlv1.Change{put("count", "k-0000", "ZOMBIE-after-fence")}}))
	if err == nil {
		t.Errorf("Append of fenced writer %s succeeded", a.id)
	}
	_, err = c.writers.Checkpoint(ctxT(t), connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: a.id, CheckpointId: 3}))
	if err == nil {
		t.Errorf("Checkpoint 3 of fenced writer %s succeeded", a.id)
	}
	// B overwrites some of the keys the zombie changes touched: the
	// before-images must be checkpoint 2's values.
	var over []*dstlv1.Change
	for i := range 100 {
		key := fmt.Sprintf("k-%04d", 2*i)
		over = append(over, put("count", key, "B-"+key), put("name", key, "B-"+key))
	}
	b.last = appendBatch(t, c, b.id, dstlv1.Durability_DURABILITY_BUFFERED, b.last, over)
	for _, ch := range over {
		b.m.apply(ch)
	}
	b.appendRandom(400, "b3", false)
	b.ckpt()
	b.appendRandom(400, "b4", true)
	b.ckpt()
	if b.cp != last {
		t.Fatalf("B's newest checkpoint is %d, want %d", b.cp, last)
	}

	check := func(what string, events []dstl.Event) {
		t.Helper()
		table := &cdcTable{t: t, what: what, rows: model{}}
		var cps []uint64
		for _, ev := range events {
			if strings.Contains(string(ev.Value), "ZOMBIE") || ev.State == "zombie" {
				t.Errorf("%s: event %s %s/%s=%q of checkpoint %d shows a change of the fenced writer", what, ev.Kind, ev.State, ev.Key, ev.Value, ev.Checkpoint)
			}
			if ev.Kind == dstl.EventReset {
				t.Errorf("%s: a RESET of checkpoint %d (nothing is truncated)", what, ev.Checkpoint)
			}
			table.apply(ev)
			if ev.Kind == dstl.EventCheckpointComplete {
				cps = append(cps, ev.Checkpoint)
				checkModel(t, fmt.Sprintf("%s: table at checkpoint %d", what, ev.Checkpoint), table.rows, b.models[ev.Checkpoint])
			}
		}
		if fmt.Sprint(cps) != "[1 2 3 4]" {
			t.Errorf("%s: checkpoints %v complete, want [1 2 3 4]", what, cps)
		}
	}
	r := <-following
	if r.err != nil {
		t.Fatalf("the following subscription: %v", r.err)
	}
	check("subscription following through the fencing (retract)", r.events)
	for _, form := range []dstl.Form{dstl.FormRetract, dstl.FormUpsert} {
		var events []dstl.Event
		for ev, err := range sdk.Subscribe(ctx, stream, dstl.SubscribeOptions{Form: form, NoFollow: true, MaxEvents: 77}).Changes() {
			if err != nil {
				t.Fatalf("subscription (%s) from the earliest position: %v", form, err)
			}
			events = append(events, ev)
		}
		check(fmt.Sprintf("subscription from the earliest position afterwards (%s)", form), events)
	}
}

// TestCDCRetention: a node with --cdc-max-hold 15s that materializes and
// truncates every second. A registered subscription created at the
// earliest position before the first checkpoint never commits. Within the
// cap: the stream's log is not truncated although its newest checkpoint
// has a snapshot and the node truncates a control stream meanwhile, and
// subscribing by name replays from checkpoint 1 without a reset (the table
// equals the model at every checkpoint); GetSubscription and /metrics
// (dstl_cdc_subscription_lag_checkpoints) show its lag. Once the cap has
// passed: GetSubscription says expired, the log is truncated and its first
// segments collected, Subscribe by name fails with ErrResnapshot
// (FAILED_PRECONDITION), and an unregistered subscription from the earliest
// position starts with a reset and a snapshot of the newest checkpoint.
func TestCDCRetention(t *testing.T) {
	t.Parallel()
	rng := e2eRand(t)
	const maxHold = 15 * time.Second
	blobDir := filepath.Join(t.TempDir(), "blobs")
	args := append([]string{"--cdc-max-hold", maxHold.String()}, cdcNodeArgs...)
	n := startNode(t, "node", nodeConfig{dataDir: t.TempDir(), blob: "file://" + blobDir, args: args})
	c := n.clients("connect")
	const stream, control, name = "cdcheld", "cdcfree", "held"
	createStream(t, c, stream)
	createStream(t, c, control)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	sdk := dialSDK(t, n.URL)
	info, err := sdk.CreateSubscription(ctx, stream, name, dstl.CreateSubscriptionOptions{Start: dstl.StartEarliest})
	if err != nil {
		t.Fatalf("CreateSubscription %s: %v", name, err)
	}
	if info.Checkpoint != 0 || info.Expired {
		t.Fatalf("CreateSubscription %s at the earliest position: %+v", name, info)
	}

	w := newCDCWriter(t, c, stream, rng)
	first := time.Now() // checkpoint 1 completes after this
	for round := range 4 {
		w.appendRandom(500, fmt.Sprintf("r%d", round), round == 2)
		w.ckpt()
	}
	waitSnapshotOf(t, n, stream, w.cp, maxHold)
	// The node truncates in the meantime: a control stream's log is.
	cw := newCDCWriter(t, c, control, rng)
	cw.appendRandom(500, "c", false)
	cw.ckpt()
	cw.waitTruncated(n, 0, maxHold)
	w.appendRandom(10, "held", false)
	w.ckpt()
	cp := getCheckpointCLI(t, n.URL, stream, w.cp)
	if p := cp.GetParts(); len(p) != 1 || p[0].GetTruncatedBefore() > 1 {
		t.Errorf("checkpoint %d of %s, held by subscription %s since before checkpoint 1: parts %v; want the log kept from SQN 1", w.cp, stream, name, p)
	}
	heldNewest := w.cp

	// Subscribing by name replays everything from checkpoint 1.
	table := &cdcTable{t: t, what: "registered subscription within the cap", rows: model{}}
	var cps []uint64
	firstEvent := true
	for ev, err := range sdk.Subscribe(ctx, stream, dstl.SubscribeOptions{Name: name, Form: dstl.FormRetract, NoFollow: true}).Changes() {
		if err != nil {
			t.Fatalf("Subscribe %s within the cap: %v", name, err)
		}
		if firstEvent {
			if ev.Kind == dstl.EventReset || ev.Snapshot || ev.Checkpoint != 1 {
				t.Errorf("Subscribe %s within the cap: first event %s of checkpoint %d (snapshot %v), want a change of checkpoint 1", name, ev.Kind, ev.Checkpoint, ev.Snapshot)
			}
			firstEvent = false
		}
		table.apply(ev)
		if ev.Kind == dstl.EventCheckpointComplete {
			cps = append(cps, ev.Checkpoint)
			checkModel(t, fmt.Sprintf("registered subscription: table at checkpoint %d", ev.Checkpoint), table.rows, w.models[ev.Checkpoint])
		}
	}
	if len(cps) != int(heldNewest) || cps[0] != 1 || cps[len(cps)-1] != heldNewest {
		t.Errorf("Subscribe %s within the cap: checkpoints %v complete, want 1..%d", name, cps, heldNewest)
	}
	info, err = sdk.GetSubscription(ctx, stream, name)
	if err != nil {
		t.Fatalf("GetSubscription %s: %v", name, err)
	}
	if info.Expired || info.Checkpoint != 0 || info.LagCheckpoints != heldNewest {
		t.Errorf("GetSubscription %s within the cap: %+v; want not expired, at checkpoint 0, %d checkpoints behind", name, info, heldNewest)
	}
	lag := subscriptionMetric(t, n.URL, "dstl_cdc_subscription_lag_checkpoints", stream, name)
	if lag != float64(heldNewest) {
		t.Errorf("dstl_cdc_subscription_lag_checkpoints of %s = %v, want %d", name, lag, heldNewest)
	}
	if d := time.Since(first); d >= maxHold {
		t.Fatalf("the checks within the cap took %v, longer than the cap %v: they proved nothing (raise maxHold)", d.Round(time.Millisecond), maxHold)
	} else {
		t.Logf("checks within the cap done %v after checkpoint 1 (cap %v)", d.Round(time.Millisecond), maxHold)
	}

	// Past the cap.
	poll(t, maxHold+30*time.Second, fmt.Sprintf("subscription %s expired", name), func() (bool, string) {
		info, err := sdk.GetSubscription(ctx, stream, name)
		if err != nil {
			t.Fatalf("GetSubscription %s: %v", name, err)
		}
		return info.Expired, fmt.Sprintf("%+v", info)
	})
	part := w.waitTruncated(n, 0, 30*time.Second)
	w.waitEarlyCollected(n, blobDir, part.GetLogId(), 30*time.Second)
	var subErr error
	for ev, err := range sdk.Subscribe(ctx, stream, dstl.SubscribeOptions{Name: name, Form: dstl.FormRetract, NoFollow: true}).Changes() {
		if err == nil {
			t.Errorf("Subscribe %s past the cap: event %s of checkpoint %d, want ErrResnapshot", name, ev.Kind, ev.Checkpoint)
			break
		}
		subErr = err
	}
	var de *dstl.Error
	if !errors.Is(subErr, dstl.ErrResnapshot) || !errors.As(subErr, &de) || de.Code != connect.CodeFailedPrecondition {
		t.Errorf("Subscribe %s past the cap: %v; want ErrResnapshot (FAILED_PRECONDITION)", name, subErr)
	}
	snapTable := &cdcTable{t: t, what: "unregistered subscription past the cap", rows: model{}}
	firstEvent = true
	completes := 0
	for ev, err := range sdk.Subscribe(ctx, stream, dstl.SubscribeOptions{Form: dstl.FormRetract, NoFollow: true}).Changes() {
		if err != nil {
			t.Fatalf("unregistered Subscribe from the earliest position past the cap: %v", err)
		}
		if firstEvent {
			if ev.Kind != dstl.EventReset || ev.Checkpoint != w.cp {
				t.Errorf("unregistered Subscribe from the earliest position of a truncated log: first event %s of checkpoint %d, want RESET of checkpoint %d", ev.Kind, ev.Checkpoint, w.cp)
			}
			firstEvent = false
		}
		snapTable.apply(ev)
		if ev.Kind == dstl.EventCheckpointComplete {
			completes++
			checkModel(t, fmt.Sprintf("unregistered subscription: table at checkpoint %d", ev.Checkpoint), snapTable.rows, w.models[ev.Checkpoint])
		}
	}
	if completes != 1 {
		t.Errorf("unregistered Subscribe from the earliest position: %d checkpoints complete, want 1 (the snapshot of the newest)", completes)
	}
}

// cdcWriter is a matWriter that keeps the model at each checkpoint.
type cdcWriter struct {
	*matWriter
	models map[uint64]model
}

func newCDCWriter(t *testing.T, c *apiClients, stream string, rng *rand.Rand) *cdcWriter {
	t.Helper()
	return &cdcWriter{matWriter: newMatWriter(t, c, stream, rng), models: map[uint64]model{}}
}

// ckpt completes the next checkpoint and records its model.
func (w *cdcWriter) ckpt() {
	w.t.Helper()
	w.checkpoint()
	w.models[w.cp] = w.m.clone()
}

// resume reattaches the writer's epoch on a restarted node.
func (w *cdcWriter) resume(c *apiClients) {
	w.t.Helper()
	res := openWriter(w.t, c, &dstlv1.OpenWriterRequest{Stream: w.stream, ResumeEpoch: w.epoch})
	if res.GetEpoch() != w.epoch || res.GetLastSqn() != w.last {
		w.t.Fatalf("resume epoch %d of %s: epoch %d, last SQN %d; want %d", w.epoch, w.stream, res.GetEpoch(), res.GetLastSqn(), w.last)
	}
	w.c, w.id = c, res.GetWriterId()
}

// waitTruncated is matWriter.waitTruncated recording the models of the
// checkpoints it makes.
func (w *cdcWriter) waitTruncated(n *node, after uint64, timeout time.Duration) *dstlv1.CheckpointPart {
	w.t.Helper()
	return waitPartTruncated(w.t, n, w.stream, w.epoch, after, timeout, func() uint64 {
		w.appendRandom(1, "poll", false)
		w.ckpt()
		return w.cp
	})
}

// waitEarlyCollected checkpoints until no segment on the blob store holds
// the first change of log: the beginning of the changelog is gone.
func (w *cdcWriter) waitEarlyCollected(n *node, blobDir, log string, timeout time.Duration) {
	w.t.Helper()
	poll(w.t, timeout, fmt.Sprintf("the collection of the first segments of log %s", log), func() (bool, string) {
		w.appendRandom(1, "poll", false)
		w.ckpt()
		segs := logSegments(w.t, blobDir, log)
		lowest := uint64(0)
		for _, s := range segs {
			if lowest == 0 || s.FirstSQN < lowest {
				lowest = s.FirstSQN
			}
		}
		return lowest > 1, fmt.Sprintf("%d segments, the lowest SQN %d", len(segs), lowest)
	})
}

// cdcTable is a consumer's table: the events applied to a model, checking
// that every retraction matches the table (a -U or -D carries the row's
// current value, a +I is of an absent key, a +U follows its -U).
type cdcTable struct {
	t       *testing.T
	what    string
	rows    model
	pending *dstl.Event // a -U waiting for its +U
	errs    int
}

func (tb *cdcTable) errorf(format string, args ...any) {
	tb.t.Helper()
	if tb.errs++; tb.errs <= 10 {
		tb.t.Errorf(tb.what+": "+format, args...)
	}
}

func (tb *cdcTable) apply(ev dstl.Event) {
	tb.t.Helper()
	k := stateKey{ev.State, string(ev.Key)}
	cur, ok := tb.rows[k]
	if tb.pending != nil && ev.Kind != dstl.EventUpdateAfter {
		tb.errorf("-U of %s/%s not followed by its +U (but by %s)", tb.pending.State, tb.pending.Key, ev.Kind)
		tb.pending = nil
	}
	switch ev.Kind {
	case dstl.EventReset:
		tb.rows = model{}
	case dstl.EventCheckpointComplete:
	case dstl.EventPut:
		tb.rows[k] = string(ev.Value)
	case dstl.EventInsert:
		if ok {
			tb.errorf("+I %s/%s=%q of checkpoint %d: the row exists (%q)", k.state, k.key, ev.Value, ev.Checkpoint, cur)
		}
		tb.rows[k] = string(ev.Value)
	case dstl.EventUpdateBefore:
		if !ok || cur != string(ev.Value) {
			tb.errorf("-U %s/%s=%q of checkpoint %d: the row is %q (exists %v)", k.state, k.key, ev.Value, ev.Checkpoint, cur, ok)
		}
		tb.pending = &ev
	case dstl.EventUpdateAfter:
		if tb.pending == nil || tb.pending.State != ev.State || string(tb.pending.Key) != string(ev.Key) {
			tb.errorf("+U %s/%s of checkpoint %d without its -U", k.state, k.key, ev.Checkpoint)
		}
		tb.pending = nil
		tb.rows[k] = string(ev.Value)
	case dstl.EventDelete:
		if len(ev.Value) > 0 && (!ok || cur != string(ev.Value)) {
			tb.errorf("-D %s/%s=%q of checkpoint %d: the row is %q (exists %v)", k.state, k.key, ev.Value, ev.Checkpoint, cur, ok)
		}
		delete(tb.rows, k)
	default:
		tb.errorf("event of unknown kind %v", ev.Kind)
	}
}

// feedStores lists the feed stores under the node's data directory
// (docs/cdc.md: <data-dir>/cdc/, one per subscription being served).
func feedStores(t *testing.T, dataDir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dataDir, "cdc"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// dialSDK returns a Go SDK client of the node at url, closed when the test
// ends.
func dialSDK(t *testing.T, url string, opts ...dstl.Option) *dstl.Client {
	t.Helper()
	c, err := dstl.Dial(t.Context(), url, opts...)
	if err != nil {
		t.Fatalf("Dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// subscriptionMetric returns the value of metric name for subscription sub
// of stream on url/metrics (it fails the test if there is none).
func subscriptionMetric(t *testing.T, url, name, stream, sub string) float64 {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, url+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s/metrics: %v", url, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	var lines []string
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		lines = append(lines, line)
		labels := line[len(name)+1 : strings.LastIndex(line, "}")]
		if !strings.Contains(labels, strconv.Quote(stream)) || !strings.Contains(labels, strconv.Quote(sub)) {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(line[strings.LastIndex(line, "}")+1:]), 64)
		if err != nil {
			t.Fatalf("/metrics line %q: %v", line, err)
		}
		return v
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read %s/metrics: %v", url, err)
	}
	t.Fatalf("%s/metrics: no %s of subscription %s of stream %s; its lines: %q", url, name, sub, stream, lines)
	return 0
}
