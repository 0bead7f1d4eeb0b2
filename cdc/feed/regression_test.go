package feed

import (
	"context"
	"errors"
	"maps"
	"testing"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

func putOne(t *testing.T, w *changelog.Writer, kg uint16, key, val string) {
	t.Helper()
	if _, _, err := w.Append(context.Background(), []changelog.Change{{Op: changelog.OpPut, KeyGroup: kg, State: "a", Key: []byte(key), Value: []byte(val)}}, changelog.Buffered); err != nil {
		t.Fatal(err)
	}
}

func checkpointOne(t *testing.T, w *changelog.Writer, id uint64) {
	t.Helper()
	res, err := w.Checkpoint(context.Background(), id, nil)
	if err != nil || !res.Complete {
		t.Fatalf("checkpoint %d: %v %+v", id, err, res)
	}
}

// A boundary token issued for key groups 0..3 must not resume a
// subscription of every key group: the state of key groups 4..7 at the
// token's checkpoint was never delivered (found by review; the table missed
// their rows).
func TestBoundaryTokenCoversKeyGroups(t *testing.T) {
	ctx := context.Background()
	node := openNode(t)
	if _, err := node.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 7}})
	if err != nil {
		t.Fatal(err)
	}
	putOne(t, w, 0, "x", "1")
	putOne(t, w, 5, "y", "1")
	checkpointOne(t, w, 1)

	half := keygroup.Range{Lo: 0, Hi: 3}
	table := map[string]string{}
	_, batches := collect(t, node, Request{Stream: "s", KeyGroups: &half, Form: cdc.FormUpsert})
	evs, _ := collect(t, node, Request{Stream: "s", KeyGroups: &half, Form: cdc.FormUpsert})
	for _, e := range evs {
		table[string(e.ev.Key)] = string(e.ev.Value)
	}
	tok := batches[len(batches)-1].Token // boundary: after checkpoint 1, key groups 0..3

	putOne(t, w, 0, "x", "2")
	checkpointOne(t, w, 2)

	var runErr error
	var got []Event
	runErr = Run(ctx, Config{Node: node, Dir: t.TempDir()}, Request{Stream: "s", From: &tok, Form: cdc.FormUpsert, NoFollow: true}, func(b *Batch) error {
		for _, e := range b.Events {
			table[string(e.Key)] = string(e.Value)
			got = append(got, e)
		}
		return nil
	})
	if errors.Is(runErr, ErrTokenMismatch) {
		return // what docs/cdc.md promises
	}
	want := map[string]string{"x": "2", "y": "1"}
	t.Fatalf("token of key groups %s resumed a subscription of every key group (err %v); consumer table after checkpoint 2: %v, want %v (equal: %v)",
		tok.KeyGroups, runErr, table, want, maps.Equal(table, want))
}

// A follow that outlives a delete and re-create of its stream must end
// (stream not found) instead of carrying on with the new incarnation's
// checkpoints under the old incarnation's tokens (found by review).
func TestFollowEndsWhenStreamRecreated(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	node := openNode(t)
	if _, err := node.CreateStream(ctx, "s", 1); err != nil {
		t.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 0}})
	if err != nil {
		t.Fatal(err)
	}
	putOne(t, w, 0, "old", "1")
	checkpointOne(t, w, 1)
	oldInc := ""

	type msg struct {
		cp       uint64
		inc      string
		keys     []string
		complete bool
	}
	msgs := make(chan msg, 16)
	release := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		first := true
		done <- Run(ctx, Config{Node: node, Dir: t.TempDir()}, Request{Stream: "s", Form: cdc.FormUpsert}, func(b *Batch) error {
			m := msg{cp: b.Checkpoint, inc: b.Token.Incarnation, complete: b.Complete}
			for _, e := range b.Events {
				m.keys = append(m.keys, string(e.Key))
			}
			msgs <- m
			if first {
				first = false
				<-release // a slow consumer: the stream is deleted and created again meanwhile
			}
			return nil
		})
	}()
	m := <-msgs
	oldInc = m.inc
	t.Logf("old incarnation: checkpoint %d %v", m.cp, m.keys)

	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := node.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := node.CreateStream(ctx, "s", 1); err != nil {
		t.Fatal(err)
	}
	w2, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 0}})
	if err != nil {
		t.Fatal(err)
	}
	putOne(t, w2, 0, "new-a", "1")
	checkpointOne(t, w2, 1)
	putOne(t, w2, 0, "new-b", "1")
	checkpointOne(t, w2, 2)
	close(release)

	select {
	case err := <-done:
		t.Logf("feed ended: %v", err) // the expected outcome: an error naming the re-created stream
		return
	case m := <-msgs:
		cancel()
		t.Fatalf("after the stream was deleted and created again, the feed delivered checkpoint %d (keys %v) with tokens of incarnation %q (old %q)", m.cp, m.keys, m.inc, oldInc)
	}
}

// Key groups no writer ever owned hold nothing: they must not turn every
// checkpoint into a diff (net differences without timestamps, O(state) per
// checkpoint) for a subscription of every key group (found by review).
func TestUnownedKeyGroupsKeepChanges(t *testing.T) {
	ctx := context.Background()
	node := openNode(t)
	if _, err := node.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	put := func(key, val string, ts int64) {
		if _, _, err := w.Append(ctx, []changelog.Change{{Op: changelog.OpPut, KeyGroup: 0, State: "a", Key: []byte(key), Value: []byte(val), TimestampMs: ts}}, changelog.Buffered); err != nil {
			t.Fatal(err)
		}
	}
	put("x", "1", 100)
	checkpointOne(t, w, 1)
	put("x", "2", 200)
	put("x", "3", 300)
	checkpointOne(t, w, 2)
	evs, _ := collect(t, node, Request{Stream: "s", Form: cdc.FormRetract})
	for _, e := range evs {
		t.Logf("%v ts=%d", e, e.ev.TimestampMs)
	}
	var cp2 []delivered
	for _, e := range evs {
		if e.checkpoint == 2 {
			cp2 = append(cp2, e)
		}
	}
	if len(cp2) != 4 || cp2[0].ev.TimestampMs == 0 {
		t.Fatalf("checkpoint 2 (two PUTs of x) delivered as %d events %v: a diff, not the changes", len(cp2), cp2)
	}
}
