package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/protobuf/encoding/protojson"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/internal/s3server"
)

// envE2ESeed fixes the workload of the materializer tests.
const envE2ESeed = "DSTL_E2E_SEED"

// TestMaterializerInProcess: `dstl serve` with its in-process materializer
// (1 s interval, no jitter, node GC every second) on a file blob store. A
// writer makes ~2k keys with overwrites, deletes, merges and a clear over
// several checkpoints. The test waits (deadline, polling) until `dstl
// checkpoint get` says the newest checkpoint restores from its own snapshot,
// until a later checkpoint's part is truncated (the node adopted the
// snapshot) and lists only the segments after the truncation point (`dstl
// segment ls` still shows the older ones: the node's segment GC grace is 10
// minutes), and until /metrics counts the snapshots. Then the node is
// SIGKILLed, its data directory deleted, and a node on an empty disk with the
// same blob store serves the newest checkpoint (from the snapshot plus the
// tail) and restores a writer from it, both equal to the model.
func TestMaterializerInProcess(t *testing.T) {
	t.Parallel()
	began := time.Now()
	rng := e2eRand(t)
	blobDir := filepath.Join(t.TempDir(), "blobs")
	blob := "file://" + blobDir
	args := []string{
		"--materialize-interval", "1s", "--materialize-jitter", "0",
		"--gc-interval", "1s", "--snapshot-gc-grace", "1s",
	}
	dataDir := t.TempDir()
	n := startNode(t, "node", nodeConfig{dataDir: dataDir, blob: blob, args: args})
	c := n.clients("connect")
	const stream = "mat"
	createStream(t, c, stream)
	w := newMatWriter(t, c, stream, rng)

	// Five checkpoints of 500 changes each (a clear in the third).
	for round := range 5 {
		w.appendRandom(500, fmt.Sprintf("r%d", round), round == 2)
		w.checkpoint()
	}
	newest := w.cp
	cp := waitSnapshotOf(t, n, stream, newest, 20*time.Second)
	if m := cp.GetMaterialization(); m.GetTailChanges() != 0 || m.GetSnapshots() == 0 {
		t.Errorf("checkpoint %d restores from its own snapshot but: %v; want no tail and ≥ 1 snapshot record", newest, m)
	}
	if out := cliOK(t, "--server="+n.URL, "checkpoint", "get", stream, fmt.Sprint(newest)); !strings.Contains(out, fmt.Sprintf("snapshot of checkpoint %d", newest)) {
		t.Errorf("dstl checkpoint get %s %d does not name its snapshot:\n%s", stream, newest, out)
	}

	// The node adopts the snapshot at its next GC: later parts of the
	// writer's log start after the truncation point.
	part := w.waitTruncated(n, 0, 20*time.Second)
	t.Logf("checkpoint %d: part truncated before SQN %d (up to %d), %d segments", w.cp, part.GetTruncatedBefore(), part.GetUpToSqn(), part.GetSegments())
	cp = getCheckpointCLI(t, n.URL, stream, w.cp)
	if m := cp.GetMaterialization(); m.GetSnapshotCheckpoint() == 0 || m.GetTailChanges() >= w.last {
		t.Errorf("checkpoint %d of a truncated log: materialization %v; want a snapshot and a tail shorter than the log (%d)", w.cp, m, w.last)
	}

	// The part lists exactly the segments holding its log from the
	// truncation point on; the blob store still has the older ones (the
	// node's segment GC grace is 10 minutes), which no part lists any more.
	segs := logSegments(t, blobDir, part.GetLogId())
	var below, listed int
	for _, s := range segs {
		switch {
		case s.LastSQN < part.GetTruncatedBefore():
			below++
		case s.FirstSQN <= part.GetUpToSqn():
			listed++
		}
	}
	if below == 0 || int(part.GetSegments()) != listed {
		t.Errorf("log %s: %d segments on the blob store, %d wholly below the truncation point %d, %d holding SQNs %d..%d; the part lists %d (want exactly those %d, and some below)",
			part.GetLogId(), len(segs), below, part.GetTruncatedBefore(), listed, part.GetTruncatedBefore(), part.GetUpToSqn(), part.GetSegments(), listed)
	}

	waitMetric(t, n.URL, "dstl_materializer_snapshots_total", 10*time.Second, func(v float64) bool { return v > 0 })

	// A little more after the truncation, then a crash and an empty disk.
	w.appendRandom(200, "after", false)
	w.checkpoint()
	final := w.cp
	want := w.m.clone()
	n.Kill()
	if err := os.RemoveAll(dataDir); err != nil {
		t.Fatal(err)
	}
	t.Logf("SIGKILLed the node and deleted %s; %d keys at checkpoint %d (SQN %d)", dataDir, len(want), final, w.last)

	n2 := startNode(t, "node-empty-disk", nodeConfig{dataDir: dataDir, blob: blob, args: args})
	checkRestored(t, n2, stream, final, w.last, want, fmt.Sprintf("md-%d", final))
	t.Logf("in-process materializer scenario took %v", time.Since(began).Round(time.Millisecond))
}

// TestMaterializerRemoteS3: `dstl serve --materialize=false` on the real S3
// server (versitygw), and the materializer as separate processes reading only
// the bucket. `dstl materialize --once` prints a line per stream (a full
// snapshot each, then "up to date"); a `dstl materialize` daemon publishes
// snapshots the serving node adopts (a later part is truncated); the daemon
// is SIGKILLed once while it materializes a new checkpoint (ideally between
// uploading the snapshot's files and publishing its record) and restarted on
// the same directory, where it must carry on (a snapshot of a newer
// checkpoint, and the files of the killed round collected). Finally the node
// is SIGKILLed, its data directory deleted, and a node on an empty disk
// restores both streams from the snapshots plus the tails, equal to the
// models.
func TestMaterializerRemoteS3(t *testing.T) {
	t.Parallel()
	began := time.Now()
	rng := e2eRand(t)
	s3 := s3server.Start(t)
	const prefix = "dstl/mat"
	blob := s3.URL(prefix)
	env := []string{
		"AWS_ACCESS_KEY_ID=" + s3.AccessKey,
		"AWS_SECRET_ACCESS_KEY=" + s3.SecretKey,
		"AWS_EC2_METADATA_DISABLED=true",
	}
	nodeArgs := []string{"--materialize=false", "--gc-interval", "1s"}
	dataDir := t.TempDir()
	n := startNode(t, "node", nodeConfig{dataDir: dataDir, blob: blob, env: env, args: nodeArgs})
	c := n.clients("connect")
	streams := []string{"orders", "audit"}
	writers := map[string]*matWriter{}
	for _, s := range streams {
		createStream(t, c, s)
		writers[s] = newMatWriter(t, c, s, rng)
	}
	for round := range 3 {
		for _, s := range streams {
			writers[s].appendRandom(400, fmt.Sprintf("r%d", round), round == 1 && s == "orders")
			writers[s].checkpoint()
		}
	}

	// One-shot: a full snapshot of each stream's newest checkpoint.
	matDir := t.TempDir()
	once := cliEnvOK(t, env, "materialize", "--blob", blob, "--data-dir", matDir, "--once", "--log-level", "warn")
	for _, s := range streams {
		if !hasLine(once, fmt.Sprintf("%s: snapshot of checkpoint %d (full)", s, writers[s].cp)) {
			t.Errorf("dstl materialize --once: no line for stream %s's full snapshot of checkpoint %d:\n%s", s, writers[s].cp, once)
		}
		if cp := getCheckpointCLI(t, n.URL, s, writers[s].cp); cp.GetMaterialization().GetSnapshotCheckpoint() != writers[s].cp {
			t.Errorf("after dstl materialize --once: checkpoint %d of %s: %v", writers[s].cp, s, cp.GetMaterialization())
		}
	}
	again := cliEnvOK(t, env, "materialize", "--blob", blob, "--data-dir", matDir, "--once", "--log-level", "warn")
	for _, s := range streams {
		if !hasLine(again, s+": up to date") {
			t.Errorf("dstl materialize --once with nothing new: no %q line:\n%s", s+": up to date", again)
		}
	}
	if t.Failed() {
		return
	}

	// The daemon.
	matArgs := []string{"--blob", blob, "--data-dir", matDir, "--materialize-interval", "1s", "--materialize-jitter", "0",
		"--gc-interval", "1s", "--snapshot-gc-grace", "1s", "--snapshot-round-lease", "1s"}
	mat := startMaterializer(t, "materializer", env, matArgs)
	for _, s := range streams {
		writers[s].appendRandom(300, "r3", false)
		writers[s].checkpoint()
	}
	for _, s := range streams {
		waitSnapshotOf(t, n, s, writers[s].cp, 20*time.Second)
	}
	// The serving node adopts the remote snapshots.
	for _, s := range streams {
		p := writers[s].waitTruncated(n, 0, 20*time.Second)
		t.Logf("%s: checkpoint %d: part truncated before SQN %d (up to %d)", s, writers[s].cp, p.GetTruncatedBefore(), p.GetUpToSqn())
	}

	// SIGKILL the daemon while it materializes a bigger checkpoint: watch
	// the bucket for the round's first file and kill it then, ideally
	// before it publishes the record. The window is a few milliseconds:
	// if the record beat the kill, restart it and try again (a few times;
	// every try is a kill and a restart the daemon must survive).
	ow := writers["orders"]
	var orphans []string
	const tries = 4
	for try := 1; ; try++ {
		ow.appendRandom(3000, fmt.Sprintf("big%d", try), false)
		ow.checkpoint()
		var caught bool
		orphans, caught = killDuringRound(t, s3, prefix, "orders", ow.cp, mat, 15*time.Second)
		if caught || try == tries {
			if !caught {
				t.Logf("no kill of %d landed between a file upload and the record (timing); the restarts are still checked", tries)
			}
			break
		}
		mat = startMaterializer(t, fmt.Sprintf("materializer-try-%d", try+1), env, matArgs)
	}

	mat2 := startMaterializer(t, "materializer-restarted", env, matArgs)
	r5 := map[string]uint64{} // the writers' last SQN at checkpoint r5
	for _, s := range streams {
		writers[s].appendRandom(200, "r5", false)
		writers[s].checkpoint()
		r5[s] = writers[s].last
	}
	for _, s := range streams {
		waitSnapshotOf(t, n, s, writers[s].cp, 20*time.Second)
	}
	waitMetric(t, mat2.URL, "dstl_materializer_snapshots_total", 10*time.Second, func(v float64) bool { return v > 0 })
	if len(orphans) > 0 {
		// Unreferenced files of the killed round: collected after two
		// sightings a grace (1 s) apart.
		waitCollected(t, s3, prefix, "orders", orphans, 20*time.Second)
	}
	// The node adopts the restarted daemon's snapshots too.
	for _, s := range streams {
		p := writers[s].waitTruncated(n, r5[s]-1, 20*time.Second)
		t.Logf("%s: checkpoint %d: part truncated before SQN %d (up to %d)", s, writers[s].cp, p.GetTruncatedBefore(), p.GetUpToSqn())
	}

	// Crash the node, lose its disk, restore from the bucket.
	want := map[string]model{}
	for _, s := range streams {
		want[s] = writers[s].m.clone()
	}
	n.Kill()
	if err := os.RemoveAll(dataDir); err != nil {
		t.Fatal(err)
	}
	n2 := startNode(t, "node-empty-disk", nodeConfig{dataDir: dataDir, blob: blob, env: env, args: nodeArgs})
	for _, s := range streams {
		checkRestored(t, n2, s, writers[s].cp, writers[s].last, want[s], fmt.Sprintf("md-%d", writers[s].cp))
	}
	if code := mat2.Terminate(time.Minute); code != 0 {
		t.Errorf("dstl materialize exited %d after SIGTERM, want 0", code)
	}
	t.Logf("remote materializer scenario on S3 took %v", time.Since(began).Round(time.Millisecond))
}

// e2eRand returns the tests' random source, seeded from envE2ESeed or the
// clock; the seed is logged.
func e2eRand(t *testing.T) *rand.Rand {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(envE2ESeed); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", envE2ESeed, s, err)
		}
	}
	t.Logf("seed %d (%s=%d to reproduce the workload)", seed, envE2ESeed, seed)
	return rand.New(rand.NewPCG(seed, 0xe2e))
}

// matWriter is one writer of a stream over the generated Connect clients,
// with the model of the stream's state.
type matWriter struct {
	t      *testing.T
	c      *apiClients
	stream string
	rng    *rand.Rand
	id     string
	epoch  uint64
	last   uint64 // last SQN appended
	cp     uint64 // newest checkpoint id
	m      model
}

// matKeys is the size of the key pool of each state.
const matKeys = 2000

func newMatWriter(t *testing.T, c *apiClients, stream string, rng *rand.Rand) *matWriter {
	t.Helper()
	w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream})
	return &matWriter{t: t, c: c, stream: stream, rng: rng, id: w.GetWriterId(), epoch: w.GetEpoch(), last: w.GetLastSqn(), m: model{}}
}

// appendRandom appends n random changes (puts over a pool of matKeys keys
// of two states, so most overwrite, deletes, merges; a clear of one key
// group of state "name" if clear), buffered, in batches.
func (w *matWriter) appendRandom(n int, tag string, clear bool) {
	w.t.Helper()
	states := []string{"count", "name"}
	var batch []*dstlv1.Change
	flush := func() {
		if len(batch) == 0 {
			return
		}
		w.last = appendBatch(w.t, w.c, w.id, dstlv1.Durability_DURABILITY_BUFFERED, w.last, batch)
		for _, ch := range batch {
			w.m.apply(ch)
		}
		batch = batch[:0]
	}
	for i := range n {
		if clear && i == n/2 {
			batch = append(batch, &dstlv1.Change{KeyGroup: 3, State: "name", Op: dstlv1.Op_OP_CLEAR})
		}
		st := states[w.rng.IntN(len(states))]
		key := fmt.Sprintf("k-%04d", w.rng.IntN(matKeys))
		var ch *dstlv1.Change
		switch r := w.rng.IntN(100); {
		case r < 75:
			pad := strings.Repeat("x", w.rng.IntN(80))
			ch = put(st, key, fmt.Sprintf("%s/%s/%s/%d%s", st, key, tag, i, pad))
		case r < 92:
			ch = change(dstlv1.Op_OP_DELETE, st, key, "")
		default:
			ch = change(dstlv1.Op_OP_MERGE, "list", fmt.Sprintf("m-%02d", w.rng.IntN(20)), fmt.Sprintf("+%s.%d", tag, i))
		}
		batch = append(batch, ch)
		if len(batch) >= 250 {
			flush()
		}
	}
	flush()
}

// checkpoint completes the next checkpoint, with metadata "md-<id>".
func (w *matWriter) checkpoint() {
	w.t.Helper()
	w.cp++
	checkpoint(w.t, w.c, w.id, w.cp, fmt.Sprintf("md-%d", w.cp))
}

// waitTruncated checkpoints (a change and a checkpoint per try) until a
// checkpoint's part of the writer's log is truncated after SQN `after`
// (truncated_before > after+1: the node adopted a snapshot covering it),
// and returns that part.
func (w *matWriter) waitTruncated(n *node, after uint64, timeout time.Duration) *dstlv1.CheckpointPart {
	w.t.Helper()
	return waitPartTruncated(w.t, n, w.stream, w.epoch, after, timeout, func() uint64 {
		w.appendRandom(1, "poll", false)
		w.checkpoint()
		return w.cp
	})
}

// waitPartTruncated runs step (a change and a checkpoint of the only
// writer, epoch; it returns the checkpoint's id) until the checkpoint's
// part is truncated after SQN after, and returns that part.
func waitPartTruncated(t *testing.T, n *node, stream string, epoch, after uint64, timeout time.Duration, step func() uint64) *dstlv1.CheckpointPart {
	t.Helper()
	var part *dstlv1.CheckpointPart
	poll(t, timeout, fmt.Sprintf("a checkpoint of %s whose part of epoch %d is truncated after SQN %d", stream, epoch, after), func() (bool, string) {
		id := step()
		cp := getCheckpointCLI(t, n.URL, stream, id)
		parts := cp.GetParts()
		if len(parts) != 1 || parts[0].GetEpoch() != epoch {
			t.Fatalf("checkpoint %d of %s: parts %v, want one of epoch %d", id, stream, parts, epoch)
		}
		part = parts[0]
		return part.GetTruncatedBefore() > after+1, fmt.Sprintf("checkpoint %d: part %v; materialization %v", id, part, cp.GetMaterialization())
	})
	return part
}

// poll calls f every 200 ms until it reports done, and fails the test with
// f's last status once timeout has passed.
func poll(t *testing.T, timeout time.Duration, what string, f func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	start := time.Now()
	for {
		done, status := f()
		if done {
			t.Logf("%s: after %v", what, time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: not within %v; last: %s", what, timeout, status)
		}
		select {
		case <-t.Context().Done():
			t.Fatalf("waiting for %s: %v", what, t.Context().Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// getCheckpointCLI runs `dstl --json checkpoint get STREAM ID` and parses
// its protojson.
func getCheckpointCLI(t *testing.T, server, stream string, id uint64) *dstlv1.Checkpoint {
	t.Helper()
	out := cliOK(t, "--server="+server, "--json", "checkpoint", "get", stream, fmt.Sprint(id))
	var resp dstlv1.GetCheckpointResponse
	if err := protojson.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("dstl --json checkpoint get %s %d: %v\n%s", stream, id, err, out)
	}
	if resp.GetCheckpoint().GetId() != id || resp.GetCheckpoint().GetMaterialization() == nil {
		t.Fatalf("dstl --json checkpoint get %s %d: %s", stream, id, out)
	}
	return resp.GetCheckpoint()
}

// waitSnapshotOf waits until `dstl checkpoint get` says checkpoint id of
// stream restores from a snapshot of itself.
func waitSnapshotOf(t *testing.T, n *node, stream string, id uint64, timeout time.Duration) *dstlv1.Checkpoint {
	t.Helper()
	var cp *dstlv1.Checkpoint
	poll(t, timeout, fmt.Sprintf("a snapshot of checkpoint %d of %s", id, stream), func() (bool, string) {
		cp = getCheckpointCLI(t, n.URL, stream, id)
		m := cp.GetMaterialization()
		return m.GetSnapshotCheckpoint() == id, fmt.Sprintf("materialization %v", m)
	})
	return cp
}

// metricSum fetches url/metrics and sums the samples of the metric name
// (every label set); found says whether it had any.
func metricSum(ctx context.Context, url, name string) (sum float64, found bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/metrics", nil)
	if err != nil {
		return 0, false, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, false, fmt.Errorf("GET %s/metrics: %s", url, resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name)
		if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		// The value follows the labels, if any (an unlabelled sample is
		// "name value").
		fields := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			return 0, false, fmt.Errorf("/metrics line %q: %w", line, err)
		}
		sum, found = sum+v, true
	}
	return sum, found, sc.Err()
}

// waitMetric polls url/metrics until the sum of metric name satisfies ok.
func waitMetric(t *testing.T, url, name string, timeout time.Duration, ok func(float64) bool) {
	t.Helper()
	poll(t, timeout, fmt.Sprintf("%s on %s/metrics", name, url), func() (bool, string) {
		v, found, err := metricSum(ctxT(t), url, name)
		if err != nil {
			return false, err.Error()
		}
		return found && ok(v), fmt.Sprintf("found %v, sum %v", found, v)
	})
}

// segLog is one log's entry in one segment of `dstl segment ls --json`.
type segLog struct {
	Key               string
	FirstSQN, LastSQN uint64
}

// logSegments lists (with `dstl --json segment ls`) the segments holding
// blocks of log.
func logSegments(t *testing.T, blobDir, log string) []segLog {
	t.Helper()
	out := cliOK(t, "--json", "segment", "ls", "--blob", blobDir)
	var segs []segLog
	for line := range strings.Lines(out) {
		var seg struct {
			Key  string `json:"key"`
			Logs []struct {
				Log      string `json:"log"`
				FirstSQN uint64 `json:"first_sqn"`
				LastSQN  uint64 `json:"last_sqn"`
			} `json:"logs"`
			Error string `json:"error"`
		}
		if err := json.Unmarshal([]byte(line), &seg); err != nil {
			t.Fatalf("dstl segment ls --json line %q: %v", line, err)
		}
		if seg.Error != "" {
			t.Errorf("dstl segment ls: %s", line)
		}
		for _, l := range seg.Logs {
			if l.Log == log {
				segs = append(segs, segLog{seg.Key, l.FirstSQN, l.LastSQN})
			}
		}
	}
	return segs
}

// checkRestored checks a node on an empty disk: checkpoint id restores from
// a snapshot and a tail shorter than the log (of lastSQN changes), Scan and
// Get without a writer serve it, and a writer opened from it gets its
// metadata and state, appends and checkpoints again.
func checkRestored(t *testing.T, n *node, stream string, id, lastSQN uint64, want model, metadata string) {
	t.Helper()
	cp := getCheckpointCLI(t, n.URL, stream, id)
	if m := cp.GetMaterialization(); m.GetSnapshotCheckpoint() == 0 || m.GetTailChanges() >= lastSQN {
		t.Errorf("checkpoint %d of %s on the empty node: materialization %v; want a snapshot and a tail shorter than the log (%d changes)", id, stream, m, lastSQN)
	}
	c := n.clients("grpc")
	checkModel(t, fmt.Sprintf("%s: scan without a writer (checkpoint %d) on an empty disk", stream, id), scanAll(t, c, stream, 0), want)
	checkGets(t, c, stream, want, stateKey{"nope", "k-0000"})
	if t.Failed() {
		return
	}
	// An open from a given checkpoint first waits for the garbage
	// collection rounds in progress: a round of the killed node (it
	// collects every second here) counts until it is older than
	// GCMaxRound + the clock-skew margin (3 min), since nothing tells this
	// node that the other one is dead.
	began := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	res, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: stream, FromCheckpoint: id}))
	if err != nil {
		t.Fatalf("OpenWriter %s from checkpoint %d: %v", stream, id, err)
	}
	w := res.Msg
	if d := time.Since(began); d > 10*time.Second {
		t.Logf("OpenWriter %s from checkpoint %d waited %v (a garbage collection round of the killed node)", stream, id, d.Round(time.Second))
	}
	if md := w.GetRestoredMetadata(); len(md) != 1 || string(md[0]) != metadata {
		t.Errorf("OpenWriter %s from checkpoint %d: restored_metadata %q, want [%s]", stream, id, md, metadata)
	}
	checkModel(t, fmt.Sprintf("%s: scan of a writer restored from checkpoint %d", stream, id), scanAll(t, c, stream, 97), want)
	appendBatch(t, c, w.GetWriterId(), dstlv1.Durability_DURABILITY_BUFFERED, w.GetLastSqn(), []*dstlv1.Change{put("count", "k-0000", "restored")})
	checkpoint(t, c, w.GetWriterId(), id+1, "after-restore")
	got := getCheckpointCLI(t, n.URL, stream, id+1)
	if parts := got.GetParts(); len(parts) != 1 || parts[0].GetEpoch() != w.GetEpoch() || parts[0].GetFromCheckpoint() != id {
		t.Errorf("checkpoint %d after the restore: parts %v, want one of epoch %d from checkpoint %d", id+1, parts, w.GetEpoch(), id)
	}
}

// hasLine reports whether out has a line starting with prefix.
func hasLine(out, prefix string) bool {
	for line := range strings.Lines(out) {
		if strings.HasPrefix(line, prefix) {
			return true
		}
	}
	return false
}

// cliEnvOK runs the CLI with extra environment (e.g. AWS credentials) and
// fails the test unless it exits 0.
func cliEnvOK(t *testing.T, env []string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, dstlBin, args...)
	cmd.Env = append(childEnv(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("dstl %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	t.Logf("dstl %s (%v):\n%s", args[0], time.Since(start).Round(time.Millisecond), stdout.String())
	return stdout.String()
}

// startMaterializer starts `dstl materialize` with its /metrics on a free
// loopback port and waits until /healthz answers. The process is killed
// when the test ends and its log printed if the test failed.
func startMaterializer(t *testing.T, name string, env, args []string) *node {
	t.Helper()
	var lastErr error
	for range 3 {
		n, err := launchMaterializer(t, name, env, args)
		if err == nil {
			return n
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("start %s: %v", name, lastErr)
	return nil
}

func launchMaterializer(t *testing.T, name string, env, args []string) (*node, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
	cmd := exec.Command(dstlBin, append([]string{"materialize", "--listen", addr}, args...)...)
	cmd.Env = append(childEnv(), env...)
	n := &node{t: t, name: name, Addr: addr, URL: "http://" + addr, cmd: cmd, log: &logBuffer{}, done: make(chan struct{})}
	for i, a := range args {
		if a == "--data-dir" && i+1 < len(args) {
			n.cfg.dataDir = args[i+1]
		}
	}
	cmd.Stdout, cmd.Stderr = n.log, n.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	n.began = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", dstlBin, err)
	}
	go func() {
		n.waitErr = cmd.Wait()
		close(n.done)
	}()
	t.Cleanup(func() {
		n.Kill()
		if t.Failed() {
			t.Logf("---- log of %s (%s, data %s):\n%s", n.name, n.Addr, n.cfg.dataDir, n.log.String())
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, n.URL+"/healthz", nil)
		resp, err := hc.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Logf("%s: up at %s in %v", name, addr, time.Since(n.began).Round(time.Millisecond))
				return n, nil
			}
		}
		select {
		case <-n.done:
			return nil, fmt.Errorf("%s exited before it served /healthz (%v): %s", name, n.waitErr, n.log.String())
		case <-ctx.Done():
			n.Kill()
			return nil, fmt.Errorf("%s: no /healthz at %s (last: %v): %s", name, n.URL, err, n.log.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// s3Keys lists the keys under prefix in the test's bucket.
// streamKeys returns where the objects of the stream's (only) incarnation
// live: "<prefix>/streams/<stream>/<incarnation>/", read off a listing.
func streamKeys(ctx context.Context, s3 *s3server.Server, prefix, stream string) (string, error) {
	base := fmt.Sprintf("%s/streams/%s/", prefix, stream)
	keys, err := s3Keys(ctx, s3, base)
	if err != nil {
		return "", err
	}
	if len(keys) == 0 {
		return "", fmt.Errorf("no object under %s", base)
	}
	inc, _, _ := strings.Cut(strings.TrimPrefix(keys[0], base), "/")
	return base + inc + "/", nil
}

func s3Keys(ctx context.Context, s3 *s3server.Server, prefix string) ([]string, error) {
	cl := s3.Client()
	var keys []string
	p := awss3.NewListObjectsV2Paginator(cl, &awss3.ListObjectsV2Input{Bucket: aws.String(s3.Bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", prefix, err)
		}
		for _, o := range page.Contents {
			keys = append(keys, aws.ToString(o.Key))
		}
	}
	return keys, nil
}

// killDuringRound watches the bucket for the files of a snapshot of
// checkpoint id of stream and SIGKILLs mat as soon as one appears. caught:
// the snapshot's record was not published then (mid-round: files
// uploaded, no record); orphans are the files of the killed round then.
func killDuringRound(t *testing.T, s3 *s3server.Server, prefix, stream string, id uint64, mat *node, timeout time.Duration) (orphans []string, caught bool) {
	t.Helper()
	ctx := ctxT(t)
	keys, err := streamKeys(ctx, s3, prefix, stream)
	if err != nil {
		t.Fatal(err)
	}
	files := fmt.Sprintf("%ssst/%020d-", keys, id)
	record := fmt.Sprintf("%ssnapshots/%020d", keys, id)
	deadline := time.Now().Add(timeout)
	// Files go up before the record: listing only the files (as fast as
	// the server answers) is enough to know the round reached its upload.
	for {
		keys, err := s3Keys(ctx, s3, files)
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no file of a snapshot of checkpoint %d of %s within %v", id, stream, timeout)
		}
	}
	mat.Kill()
	rec, err := s3Keys(ctx, s3, record)
	if err != nil {
		t.Fatal(err)
	}
	after, err := s3Keys(ctx, s3, files)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec) > 0 {
		t.Logf("SIGKILLed %s just after it published the snapshot of checkpoint %d", mat.name, id)
		return nil, false
	}
	t.Logf("SIGKILLed %s mid-round: %d file(s) of checkpoint %d's snapshot uploaded, its record not published", mat.name, len(after), id)
	return after, true
}

// waitCollected waits until each of the killed round's files is deleted
// or referenced by a snapshot record (the round's own record, if its PUT
// was already on its way when the process died: then the files are not
// garbage).
func waitCollected(t *testing.T, s3 *s3server.Server, prefix, stream string, keys []string, timeout time.Duration) {
	t.Helper()
	referenced := map[string]string{}
	poll(t, timeout, fmt.Sprintf("the collection of the killed round's %d files", len(keys)), func() (bool, string) {
		ctx := ctxT(t)
		var left []string
		for _, k := range keys {
			got, err := s3Keys(ctx, s3, k)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) == 0 {
				continue
			}
			rec, err := recordReferencing(ctx, s3, prefix, stream, strings.TrimPrefix(k, prefix+"/"))
			if err != nil {
				t.Fatal(err)
			}
			if rec != "" {
				referenced[k] = rec
				continue
			}
			left = append(left, k)
		}
		sk, err := streamKeys(ctx, s3, prefix, stream)
		if err != nil {
			t.Fatal(err)
		}
		recs, err := s3Keys(ctx, s3, sk+"snapshots/")
		if err != nil {
			t.Fatal(err)
		}
		return len(left) == 0, fmt.Sprintf("unreferenced and still there: %v; snapshot records: %v", left, recs)
	})
	for k, rec := range referenced {
		t.Logf("file %s of the killed round is referenced by %s (its record landed after the kill)", k, rec)
	}
}

// recordReferencing returns the key of a snapshot record of stream whose
// manifest names file (a key inside the blob store), or "".
func recordReferencing(ctx context.Context, s3 *s3server.Server, prefix, stream, file string) (string, error) {
	sk, err := streamKeys(ctx, s3, prefix, stream)
	if err != nil {
		return "", err
	}
	recs, err := s3Keys(ctx, s3, sk+"snapshots/")
	if err != nil {
		return "", err
	}
	for _, key := range recs {
		obj, err := s3.Client().GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String(s3.Bucket), Key: aws.String(key)})
		if err != nil {
			return "", fmt.Errorf("get %s: %w", key, err)
		}
		data, err := io.ReadAll(obj.Body)
		obj.Body.Close()
		if err != nil {
			return "", fmt.Errorf("read %s: %w", key, err)
		}
		var rec struct {
			Manifest json.RawMessage `json:"manifest"`
		}
		if err := envelope.Open(key, data, "snapshot", &rec); err != nil {
			return "", err
		}
		if bytes.Contains(rec.Manifest, []byte(strconv.Quote(file))) {
			return key, nil
		}
	}
	return "", nil
}
