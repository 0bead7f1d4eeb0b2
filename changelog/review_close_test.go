package changelog

// Regression tests from the adversarial review of issue 9 (R1, R1b, R6):
// each asserts the correct behaviour.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// R1: Close whose epoch-close entry landed but whose append reported an
// error (lost ack + one failing journal listing) leaves a writer that keeps
// acknowledging appends and checkpoints; the checkpoint is completed with
// the epoch's FINAL part, silently dropping every change made after the
// failed Close.
func TestReviewCloseLostAckDropsLaterChanges(t *testing.T) {
	ctx := context.Background()
	hs := &hookStore{BlobStore: newFileStore(t)}
	n := openTestNode(t, hs, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "1")}, Local); err != nil {
		t.Fatal(err)
	}
	if res, err := w.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint 1: %+v %v", res, err)
	}

	// The epoch-close entry lands, its ack is lost, and the re-read that
	// would recognise it by its nonce fails once.
	hs.mu.Lock()
	hs.lostAckPut = func(key string) bool { return strings.Contains(key, "/journal/") }
	hs.mu.Unlock()
	cerr := w.Close(ctx)
	hs.mu.Lock()
	hs.lostAckPut, hs.failLists = nil, 0
	hs.mu.Unlock()
	t.Logf("Close returned: %v", cerr)
	if cerr == nil {
		t.Skip("Close did not fail: interleaving not reproduced")
	}
	h, _ := n.streamHandle(ctx, "s")
	_ = h.journal.refresh(ctx)
	st := h.journal.snapshot()
	if i := st.liveIndex(w.Epoch()); i >= 0 {
		t.Logf("journal: epoch %d closed=%v (final part %s)", w.Epoch(), st.live[i].Closed, st.live[i].FinalPart.Key)
	}

	// The client, told Close failed, keeps using the writer.
	first, last, err := w.Append(ctx, []Change{put(0, "a", "2"), put(1, "b", "x")}, Local)
	t.Logf("append after failed close: sqn %d..%d err=%v", first, last, err)
	if err != nil {
		// Refusing is correct behaviour, with a typed error, and the
		// outcome must then be resolvable: Close succeeds, and the journal
		// and the writer agree (its final part covers every acknowledged
		// change).
		if !errors.Is(err, ErrClosing) && !errors.Is(err, ErrClosed) {
			t.Fatalf("append after failed close refused with %v, want ErrClosing or ErrClosed", err)
		}
		checkClosed(t, n, w)
		return
	}
	res, err := w.Checkpoint(ctx, 2, nil)
	t.Logf("checkpoint 2 after failed close: %+v err=%v", res, err)
	if err != nil || !res.Complete {
		return // refusing is correct behaviour
	}
	got := restoreMap(t, n, "s", 2, keygroup.Range{Lo: 0, Hi: 3})
	t.Logf("restore of acknowledged checkpoint 2: %v", got)
	if got["0/s/a"] != "2" || got["1/s/b"] != "x" {
		t.Fatalf("VIOLATION: checkpoint 2 acknowledged Complete after appends SQN %d..%d were acknowledged Local, but its restore is %v (want a=2, b=x)", first, last, got)
	}
}

// R1b: the same Close failure without a lost ack: the final part is
// recorded, the journal append fails, the writer reopens; after one more
// append every later Close fails forever with ErrCheckpointConflict.
func TestReviewCloseRetryAfterAppendConflicts(t *testing.T) {
	ctx := context.Background()
	hs := &hookStore{BlobStore: newFileStore(t)}
	n := openTestNode(t, hs, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "1")}, Local); err != nil {
		t.Fatal(err)
	}
	hs.mu.Lock()
	hs.failLists, hs.failListOf = 1, "/journal/" // the close's journal read fails once
	hs.mu.Unlock()
	err = w.Close(ctx)
	t.Logf("first Close: %v", err)
	if err == nil {
		t.Skip("not reproduced")
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "2")}, Local); err != nil {
		t.Logf("append after failed close refused: %v", err)
		if !errors.Is(err, ErrClosing) {
			t.Fatalf("append after failed close refused with %v, want ErrClosing", err)
		}
		if _, err := w.Checkpoint(ctx, 1, nil); !errors.Is(err, ErrClosing) {
			t.Fatalf("checkpoint after failed close: %v, want ErrClosing", err)
		}
		checkClosed(t, n, w)
		return
	}
	for i := 0; i < 3; i++ {
		err = w.Close(ctx)
		t.Logf("Close retry %d: %v", i, err)
	}
	if err != nil {
		t.Fatalf("VIOLATION (liveness): the writer can never be closed any more: %v", err)
	}
}

// R6: a checkpoint whose every live epoch recorded its part is never
// completed when the last part is stored on a node whose cached journal
// does not yet know that one of its local writers was fenced by another
// node (lastLocalPart waits for the zombie's part).
func TestReviewStaleFenceLeavesCheckpointIncomplete(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	optA := testNodeOptions(store, t.TempDir())
	optA.JournalRefresh = 1 << 40 // stands for "before the next 1 s refresh"
	a, err := Open(ctx, optA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(ctx)
	b := openTestNode(t, store, t.TempDir())
	if _, err := a.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w1, _ := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}})
	w2, _ := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	for _, w := range []*Writer{w1, w2} {
		if _, _, err := w.Append(ctx, []Change{put(w.KeyGroups().Lo, "k", "v1")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Failover of key groups 2..3 to node b.
	w3, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	r3, err := w3.Checkpoint(ctx, 2, nil)
	t.Logf("w3 checkpoint 2: %+v %v", r3, err)
	r1, err := w1.Checkpoint(ctx, 2, nil)
	t.Logf("w1 checkpoint 2: %+v %v", r1, err)
	// The zombie learns it is fenced (background refresh / its next call).
	_, err = w2.Checkpoint(ctx, 2, nil)
	t.Logf("zombie w2 checkpoint 2: %v", err)
	cps, _ := b.Checkpoints(ctx, "s")
	parts, _ := w1.listParts(ctx, 2)
	t.Logf("complete checkpoints: %d; parts recorded for 2: %v", len(cps), parts)
	if len(cps) < 2 {
		t.Fatalf("VIOLATION (liveness): every live epoch (w1=%d, w3=%d) recorded its part of checkpoint 2 and every call succeeded, but checkpoint 2 never completes", w1.Epoch(), w3.Epoch())
	}
}

// checkClosed closes w (again) and checks that the outcome is resolved:
// Close succeeds and stays successful, the journal says w's epoch is
// closed, its final part covers every change w acknowledged, and w
// accepts nothing more.
func checkClosed(t *testing.T, n *Node, w *Writer) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if err := w.Close(ctx); err != nil {
			t.Fatalf("Close after the failed one (%d): %v", i, err)
		}
	}
	h, err := n.streamHandle(ctx, w.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.journal.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	st := h.journal.snapshot()
	i := st.liveIndex(w.Epoch())
	if i < 0 || !st.live[i].Closed {
		t.Fatalf("journal: epoch %d not closed after a successful Close", w.Epoch())
	}
	p, err := readPart(ctx, n.store, st.live[i].FinalPart.Key)
	if err != nil {
		t.Fatal(err)
	}
	if p.UpToSQN != w.LastSQN() {
		t.Fatalf("final part covers up to SQN %d, the writer acknowledged up to %d", p.UpToSQN, w.LastSQN())
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "late", "x")}, Local); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after the close: %v, want ErrClosed", err)
	}
}

// R1 with a second writer that keeps checkpointing: every change the
// closing writer acknowledged reaches the checkpoints that carry its final
// part, and nothing it was asked after the failed Close is acknowledged.
func TestCloseLostAckWithOtherWriter(t *testing.T) {
	ctx := context.Background()
	hs := &hookStore{BlobStore: newFileStore(t)}
	n := openTestNode(t, hs, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w1, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}})
	if err != nil {
		t.Fatal(err)
	}
	w2, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []*Writer{w1, w2} {
		if _, _, err := w.Append(ctx, []Change{put(w.KeyGroups().Lo, "a", "1")}, Local); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := w1.Append(ctx, []Change{put(1, "b", "2")}, Local); err != nil {
		t.Fatal(err)
	}
	hs.mu.Lock()
	hs.lostAckPut = func(key string) bool { return strings.Contains(key, "/journal/") }
	hs.mu.Unlock()
	if err := w1.Close(ctx); err == nil {
		t.Fatal("Close with a lost ack and a failing re-read succeeded")
	}
	// Refused, whatever the journal says by now.
	if _, _, err := w1.Append(ctx, []Change{put(0, "a", "lost")}, Local); !errors.Is(err, ErrClosing) && !errors.Is(err, ErrClosed) {
		t.Fatalf("append after failed close: %v, want ErrClosing or ErrClosed", err)
	}
	checkClosed(t, n, w1)
	if _, _, err := w2.Append(ctx, []Change{put(2, "c", "3")}, Local); err != nil {
		t.Fatal(err)
	}
	res, err := w2.Checkpoint(ctx, 2, nil)
	if err != nil || !res.Complete {
		t.Fatalf("checkpoint 2: %+v %v", res, err)
	}
	got := restoreMap(t, n, "s", 2, keygroup.Range{Lo: 0, Hi: 3})
	want := map[string]string{"0/s/a": "1", "1/s/b": "2", "2/s/a": "1", "2/s/c": "3"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("restore of checkpoint 2: %v, want %v", got, want)
	}
}

// A failed Close whose caller walks away is finished by the node's
// background refresh; the writers that waited for its part complete.
func TestCloseFailedFinishedInBackground(t *testing.T) {
	ctx := context.Background()
	hs := &hookStore{BlobStore: newFileStore(t)}
	opts := testNodeOptions(hs, t.TempDir())
	opts.JournalRefresh = 1 << 40 // the test drives the refresh
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w1, _ := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}})
	w2, _ := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	for _, w := range []*Writer{w1, w2} {
		if _, _, err := w.Append(ctx, []Change{put(w.KeyGroups().Lo, "a", "1")}, Local); err != nil {
			t.Fatal(err)
		}
	}
	hs.mu.Lock()
	hs.failLists, hs.failListOf = 1, "/journal/" // the close's journal read fails
	hs.mu.Unlock()
	if err := w1.Close(ctx); err == nil {
		t.Fatal("Close with a failing journal read succeeded")
	}
	// w2 records its part; w1 owes one (its epoch is still open).
	if res, err := w2.Checkpoint(ctx, 1, nil); err != nil || res.Complete {
		t.Fatalf("checkpoint 1 while w1 is closing: %+v %v", res, err)
	}
	n.refreshWriters(ctx)
	if err := w1.alive(); !errors.Is(err, ErrClosed) {
		t.Fatalf("after the background refresh: %v, want closed", err)
	}
	cps, err := n.Checkpoints(ctx, "s")
	if err != nil || len(cps) != 1 {
		t.Fatalf("checkpoints: %v %v, want checkpoint 1 complete (w1's final part)", cps, err)
	}
	got := restoreMap(t, n, "s", 1, keygroup.Range{Lo: 0, Hi: 3})
	if got["0/s/a"] != "1" || got["2/s/a"] != "1" {
		t.Fatalf("restore of checkpoint 1: %v", got)
	}
}

// R6 without the zombie's help: it never calls again, and the background
// refresh that fences it completes the checkpoint the others waited for.
func TestStaleFenceHealedByBackgroundRefresh(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	optA := testNodeOptions(store, t.TempDir())
	optA.JournalRefresh = 1 << 40 // the test drives the refresh
	a, err := Open(ctx, optA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(ctx)
	b := openTestNode(t, store, t.TempDir())
	if _, err := a.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w1, _ := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}})
	w2, _ := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	w3, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w3.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	if res, err := w1.Checkpoint(ctx, 1, nil); err != nil || res.Complete {
		t.Fatalf("w1 checkpoint 1: %+v %v (want incomplete: node a waits for w2)", res, err)
	}
	a.refreshWriters(ctx)
	if err := w2.alive(); !errors.Is(err, ErrFenced) {
		t.Fatalf("zombie after refresh: %v", err)
	}
	cps, err := b.Checkpoints(ctx, "s")
	if err != nil || len(cps) != 1 {
		t.Fatalf("complete checkpoints: %v %v, want 1", cps, err)
	}
}

// R1 across a restart: a Close failed after storing its final part (its
// entry may still land), then the node crashed. The resumed writer stays
// closing: it acknowledges nothing until a Close succeeds.
func TestCloseUnfinishedBeforeRestart(t *testing.T) {
	ctx := context.Background()
	hs := &hookStore{BlobStore: newFileStore(t)}
	dir := t.TempDir()
	opts := testNodeOptions(hs, dir)
	opts.JournalRefresh = 1 << 40 // no background retry before the crash
	a, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(4)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "1")}, Local); err != nil {
		t.Fatal(err)
	}
	hs.mu.Lock()
	hs.failLists, hs.failListOf = 1, "/journal/"
	hs.mu.Unlock()
	if err := w.Close(ctx); err == nil {
		t.Fatal("Close with a failing journal read succeeded")
	}
	a.crash()
	a2, err := Open(ctx, testNodeOptions(hs, dir))
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close(ctx)
	r, err := a2.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(4), Resume: w.Epoch()})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Append(ctx, []Change{put(0, "a", "2")}, Local); !errors.Is(err, ErrClosing) && !errors.Is(err, ErrClosed) {
		t.Fatalf("append on the resumed writer of an unfinished close: %v, want ErrClosing", err)
	}
	checkClosed(t, a2, r)
}
