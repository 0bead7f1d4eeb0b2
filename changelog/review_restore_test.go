package changelog

// Review tests of restorability (issue 9 R2, S6, S4, S5), adapted from the
// adversarial review: each asserts the correct behaviour.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// R2: a checkpoint whose data GC deleted must be refused by
// OpenWriter{FromCheckpoint} and RetainCheckpoint.
func TestReviewOpenFromCollectedCheckpoint(t *testing.T) {
	ctx := context.Background()
	hs := &hookStore{BlobStore: newFileStore(t)}
	n := openTestNode(t, hs, t.TempDir())
	cfg, err := n.CreateStream(ctx, "s", 4)
	if err != nil {
		t.Fatal(err)
	}
	all := keygroup.Range{Lo: 0, Hi: 3}
	w1, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all})
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 5; i++ {
		if _, _, err := w1.Append(ctx, []Change{put(0, fmt.Sprintf("k%d", i), "v")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := w1.Checkpoint(ctx, i, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", i, res, err)
		}
	}
	// A materializer published a snapshot of checkpoint 3 (the manifest is
	// opaque to the changelog); the node adopts it and collects.
	if _, err := n.PublishSnapshot(ctx, "s", 3, SnapshotContent{Incarnation: cfg.Incarnation, Manifest: json.RawMessage(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if k, err := n.AdoptSnapshots(ctx); err != nil || k != 1 {
		t.Fatalf("adopt: %d %v", k, err)
	}
	gst, err := n.CollectGarbage(ctx)
	t.Logf("GC: %+v (deleted %v)", gst, hs.deletedKeys)
	if err != nil || gst.Deleted == 0 {
		t.Fatalf("gc deleted nothing: %v", err)
	}
	// Checkpoint 1 is still "complete" in the journal, but unrestorable.
	rerr := func(id uint64) error {
		for _, err := range n.RestoreChanges(ctx, "s", id, all) {
			if err != nil {
				return err
			}
		}
		return nil
	}
	t.Logf("restore checkpoint 1 after GC: %v", rerr(1))

	// RetainCheckpoint(1) says yes.
	err = n.RetainCheckpoint(ctx, "s", 1, true)
	t.Logf("RetainCheckpoint(1): %v", err)
	retainAccepted := err == nil

	// OpenWriter from checkpoint 1: fences w1 and succeeds.
	w2, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all, FromCheckpoint: 1})
	t.Logf("OpenWriter(FromCheckpoint=1): err=%v", err)
	if err != nil {
		if retainAccepted {
			t.Fatalf("VIOLATION: RetainCheckpoint(1) accepted a checkpoint that cannot be restored")
		}
		// Refused with the typed error, before anything was fenced, and
		// without leaving a retain mark or a pin behind.
		if !errors.Is(err, ErrCheckpointNotRestorable) {
			t.Fatalf("open from a collected checkpoint: %v, want ErrCheckpointNotRestorable", err)
		}
		if rerr := n.RetainCheckpoint(ctx, "s", 1, true); !errors.Is(rerr, ErrCheckpointNotRestorable) {
			t.Fatalf("retain of a collected checkpoint: %v, want ErrCheckpointNotRestorable", rerr)
		}
		if _, _, err := w1.Append(ctx, []Change{put(0, "z", "z")}, Buffered); err != nil {
			t.Fatalf("the healthy writer was harmed by the refused open: %v", err)
		}
		if ids, err := n.RetainedCheckpoints(ctx, "s"); err != nil || len(ids) != 0 {
			t.Fatalf("retained after refusals: %v %v", ids, err)
		}
		if pins, err := n.pinnedCheckpoints(ctx, testNS(t, n.store, "s")); err != nil || len(pins) != 0 {
			t.Fatalf("pins after refusals: %v %v", pins, err)
		}
		// A checkpoint that is still restorable is accepted.
		if err := n.RetainCheckpoint(ctx, "s", 3, true); err != nil {
			t.Fatalf("retain 3: %v", err)
		}
		return
	}
	_, _, aerr := w1.Append(ctx, []Change{put(0, "z", "z")}, Buffered)
	t.Logf("old writer after the open: %v", aerr)
	if _, _, err := w2.Append(ctx, []Change{put(1, "new", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	res, err := w2.Checkpoint(ctx, 6, nil)
	t.Logf("checkpoint 6 by the new writer: %+v err=%v", res, err)
	if err == nil && res.Complete {
		if rerr := rerr(6); rerr != nil {
			t.Fatalf("VIOLATION: checkpoint 6 was acknowledged Complete but cannot be restored: %v (retain of 1 accepted: %v; old writer fenced: %v)", rerr, retainAccepted, aerr)
		}
	}
}

// checkpointsWithSnapshot makes checkpoints 1..5 of stream s (4 key
// groups, one writer), publishes a snapshot of 3 and adopts it, so that
// the segments of checkpoints 1 and 2 are garbage for the next GC.
func checkpointsWithSnapshot(t *testing.T, n *Node) *Writer {
	t.Helper()
	ctx := context.Background()
	cfg, err := n.CreateStream(ctx, "s", 4)
	if err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 5; i++ {
		if _, _, err := w.Append(ctx, []Change{put(0, fmt.Sprintf("k%d", i), "v")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := w.Checkpoint(ctx, i, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", i, res, err)
		}
	}
	if _, err := n.PublishSnapshot(ctx, "s", 3, SnapshotContent{Incarnation: cfg.Incarnation, Manifest: json.RawMessage(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if k, err := n.AdoptSnapshots(ctx); err != nil || k != 1 {
		t.Fatalf("adopt: %d %v", k, err)
	}
	return w
}

// S6: a RetainCheckpoint racing a GC round. The retain runs while GC lists
// the retained marks, once just after the listing (GC did not see the
// mark: the retain must wait for the round and then refuse, since the
// round deletes the data) and once just before it (GC sees the mark and
// keeps the data: the retain succeeds). Either way a retain that returns
// nil must leave a restorable checkpoint.
func TestReviewRetainRacesGC(t *testing.T) {
	for _, retainBeforeListing := range []bool{false, true} {
		t.Run(fmt.Sprintf("retainBeforeListing=%v", retainBeforeListing), func(t *testing.T) {
			ctx := context.Background()
			hs := &hookStore{BlobStore: newFileStore(t)}
			n := openTestNode(t, hs, t.TempDir())
			checkpointsWithSnapshot(t, n)
			ns := testNS(t, hs, "s")

			retainDone := make(chan error, 1)
			retainerWaits := make(chan struct{}) // the retainer listed the GC round markers
			var once, waitOnce sync.Once
			hs.mu.Lock()
			hs.listHook = func(prefix string, inner func() (upload.ListPage, error)) (upload.ListPage, error) {
				if prefix == gcRoundPrefix() {
					waitOnce.Do(func() { close(retainerWaits) })
					return inner()
				}
				if prefix != retainedPrefix(ns) {
					return inner()
				}
				var page upload.ListPage
				var err error
				if !retainBeforeListing {
					page, err = inner()
				}
				once.Do(func() {
					go func() { retainDone <- n.RetainCheckpoint(ctx, "s", 1, true) }()
					select {
					case <-retainerWaits: // the retainer's mark exists and it waits for this round
					case err := <-retainDone: // a retain that does not wait (the old code)
						retainDone <- err
					}
				})
				if retainBeforeListing {
					page, err = inner()
				}
				return page, err
			}
			hs.mu.Unlock()
			gst, gerr := n.CollectGarbage(ctx)
			hs.mu.Lock()
			hs.listHook = nil
			hs.mu.Unlock()
			if gerr != nil {
				t.Fatalf("gc: %+v %v", gst, gerr)
			}
			rerr := <-retainDone
			t.Logf("GC %+v; RetainCheckpoint(1): %v", gst, rerr)
			var restoreErr error
			for _, err := range n.RestoreChanges(ctx, "s", 1, keygroup.Range{Lo: 0, Hi: 3}) {
				if err != nil {
					restoreErr = err
					break
				}
			}
			switch {
			case rerr == nil && restoreErr != nil:
				t.Fatalf("VIOLATION: RetainCheckpoint(1) returned nil but checkpoint 1 cannot be restored: %v", restoreErr)
			case rerr != nil && !errors.Is(rerr, ErrCheckpointNotRestorable):
				t.Fatalf("retain: %v, want nil or ErrCheckpointNotRestorable", rerr)
			case retainBeforeListing && rerr != nil:
				t.Fatalf("GC saw the mark, yet the retain failed: %v", rerr)
			case !retainBeforeListing && rerr == nil:
				t.Fatalf("GC did not see the mark and deleted nothing? %+v", gst)
			}
			// And a GC after the race keeps what the retain protects.
			if _, err := n.CollectGarbage(ctx); err != nil {
				t.Fatal(err)
			}
			if rerr == nil {
				restoreMap(t, n, "s", 1, keygroup.Range{Lo: 0, Hi: 3})
			}
		})
	}
}

// S5: node B's data dir is lost forever. Its segments nothing references
// are collected by node A once B owns no live epoch and has been quiet for
// ForeignGCGrace; segments a checkpoint references are kept, and nothing
// of B is touched while B still owns a live epoch or was active lately.
func TestReviewForeignSegmentsCollected(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	const grace = 300 * time.Millisecond
	open := func(id string) *Node {
		o := testNodeOptions(store, t.TempDir())
		o.NodeID, o.ForeignGCGrace = id, grace
		n, err := Open(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close(ctx) })
		return n
	}
	a, b := open("node-a"), open("node-b")
	if _, err := a.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	all := keygroup.Range{Lo: 0, Hi: 3}
	wb, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := wb.Append(ctx, []Change{put(0, "k", "checkpointed")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if res, err := wb.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint 1: %+v %v", res, err)
	}
	// Uploaded after the checkpoint, never checkpointed: garbage once B's
	// epoch is fenced.
	if _, _, err := wb.Append(ctx, []Change{put(1, "lost", "x")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := wb.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	b.crash() // and its data dir is never seen again
	bsegs := func() int {
		objs, err := listSegments(ctx, store, "node-b")
		if err != nil {
			t.Fatal(err)
		}
		return len(objs)
	}
	if got := bsegs(); got != 2 {
		t.Fatalf("node b has %d segments, want 2", got)
	}
	time.Sleep(2 * grace)
	// B still owns a live epoch: its uncheckpointed segment is kept.
	if st, err := a.CollectGarbage(ctx); err != nil || st.ForeignDeleted != 0 || bsegs() != 2 {
		t.Fatalf("gc while b owns a live epoch: %+v %v, b has %d segments", st, err, bsegs())
	}
	wa, err := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all}) // fences b's epoch
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := wa.Append(ctx, []Change{put(2, "a", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if res, err := wa.Checkpoint(ctx, 2, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint 2: %+v %v", res, err)
	}
	st, err := a.CollectGarbage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("gc after b's epoch was fenced: %+v", st)
	if st.ForeignDeleted != 1 || bsegs() != 1 {
		t.Fatalf("want b's unreferenced segment collected and its checkpointed one kept: %+v, b has %d segments", st, bsegs())
	}
	got := restoreMap(t, a, "s", 2, all)
	if len(got) != 2 || got["0/s/k"] != "checkpointed" || got["2/s/a"] != "1" {
		t.Fatalf("restore 2 after foreign GC: %v", got)
	}
	// A node seen active lately is never collected: b comes back (a new
	// data dir) and uploads; its old unreferenced segments wait again.
	b2 := open("node-b")
	w2, err := b2.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 3, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w2.Append(ctx, []Change{put(3, "b", "2")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := w2.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if st, err := a.CollectGarbage(ctx); err != nil || st.ForeignDeleted != 0 {
		t.Fatalf("gc of an active node's segments: %+v %v", st, err)
	}
}

// S4: a segment PUT still in flight when the node dies (kill -9) lands
// after the restarted node listed its segments; the restarted node reused
// the SQNs of the lost buffered changes for new ones. Neither a later
// restart nor a restore may ever read the dead incarnation's changes.
func TestReviewLateSegmentAfterRestartNeverReused(t *testing.T) {
	ctx := context.Background()
	inner := newFileStore(t)
	hs := &hookStore{BlobStore: inner, held: make(chan heldPut, 1)}
	dir := t.TempDir()
	start := func() *Node {
		n, err := Open(ctx, testNodeOptions(hs, dir))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close(ctx) })
		return n
	}
	all := keygroup.Range{Lo: 0, Hi: 3}
	n := start()
	for _, s := range []string{"s", "t"} {
		if _, err := n.CreateStream(ctx, s, 4); err != nil {
			t.Fatal(err)
		}
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "k1", "v1")}, Local); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	// SQN 2 is buffered only; its upload is in flight when the node dies.
	hs.mu.Lock()
	hs.holdPut = func(key string) bool { return strings.HasPrefix(key, "segments/") }
	hs.mu.Unlock()
	if _, _, err := w.Append(ctx, []Change{put(0, "dead", "from the dead incarnation")}, Buffered); err != nil {
		t.Fatal(err)
	}
	n.Scheduler().RequestFlush()
	late := <-hs.held
	n.crash()

	// Restart 1: the late PUT has not landed. The log continues at SQN 2.
	n = start()
	// Another log's flush first, so that the resumed log's segment sorts
	// after the late one whatever the random key suffixes.
	wt, err := n.OpenWriter(ctx, WriterConfig{Stream: "t", KeyGroups: all})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := wt.Append(ctx, []Change{put(0, "x", "y")}, Local); err != nil {
		t.Fatal(err)
	}
	if _, err := wt.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	w, err = n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all, Resume: w.Epoch()})
	if err != nil {
		t.Fatal(err)
	}
	first, _, err := w.Append(ctx, []Change{put(0, "alive", "from the restarted incarnation")}, Local)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restarted log continues at SQN %d; the late segment is %s", first, late.key)
	if _, err := w.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	// Now the dead incarnation's PUT lands.
	if err := inner.PutIfAbsent(ctx, late.key, bytes.NewReader(late.data), int64(len(late.data))); err != nil {
		t.Fatal(err)
	}
	n.crash()

	// Restart 2 rebuilds the log's segments from a listing that has both.
	n = start()
	w, err = n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all, Resume: w.Epoch()})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := w.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint: %+v %v", res, err)
	}
	got := restoreMap(t, n, "s", 1, all)
	want := map[string]string{"0/s/k1": "v1", "0/s/alive": "from the restarted incarnation"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("VIOLATION: restore after a late segment: %v, want %v", got, want)
	}
	var replayed []string
	for c, err := range w.Replay(ctx, 0, 0, all) {
		if err != nil {
			t.Fatal(err)
		}
		replayed = append(replayed, string(c.Key))
	}
	if fmt.Sprint(replayed) != "[k1 alive]" {
		t.Fatalf("VIOLATION: replay after a late segment: %v", replayed)
	}
}
