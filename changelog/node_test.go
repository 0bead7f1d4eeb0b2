package changelog

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// testNodeOptions are fast settings for tests: a short batching delay and
// no background work that would make tests nondeterministic.
func testNodeOptions(store upload.BlobStore, dir string) Options {
	o := Options{Store: store, DataDir: dir, GCInterval: -1, GCGrace: time.Nanosecond}
	o.Scheduler.BatchDelay = time.Millisecond
	o.Scheduler.Interval = -1
	o.LocalLog.NoSync = false
	return o
}

func openTestNode(t *testing.T, store upload.BlobStore, dir string) *Node {
	t.Helper()
	n, err := Open(context.Background(), testNodeOptions(store, dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	return n
}

func put(kg uint16, key, value string) Change {
	return Change{KeyGroup: kg, State: "s", Op: OpPut, Key: []byte(key), Value: []byte(value)}
}

// restoreMap applies the changes of checkpoint id to a map model.
func restoreMap(t *testing.T, n *Node, stream string, id uint64, r keygroup.Range) map[string]string {
	t.Helper()
	m := map[string]string{}
	for c, err := range n.RestoreChanges(context.Background(), stream, id, r) {
		if err != nil {
			t.Fatalf("restore %s@%d: %v", stream, id, err)
		}
		applyChange(m, c)
	}
	return m
}

func applyChange(m map[string]string, c segments.Change) {
	k := fmt.Sprintf("%d/%s/%s", c.KeyGroup, c.State, c.Key)
	switch c.Op {
	case OpPut:
		m[k] = string(c.Value)
	case OpDelete:
		delete(m, k)
	case OpMerge:
		m[k] += string(c.Value)
	case OpClear:
		prefix := fmt.Sprintf("%d/%s/", c.KeyGroup, c.State)
		for key := range m {
			if len(key) >= len(prefix) && key[:len(prefix)] == prefix {
				delete(m, key)
			}
		}
	}
}

func TestAppendPersistCheckpointRestore(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "orders", 16); err != nil {
		t.Fatal(err)
	}
	if _, err := n.CreateStream(ctx, "orders", 16); !errors.Is(err, ErrStreamExists) {
		t.Fatalf("second create: %v, want ErrStreamExists", err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "orders", KeyGroups: keygroup.Full(16)})
	if err != nil {
		t.Fatal(err)
	}
	first, last, err := w.Append(ctx, []Change{put(1, "a", "1"), put(2, "b", "2")}, Buffered)
	if err != nil || first != 1 || last != 2 {
		t.Fatalf("append: %d..%d, %v", first, last, err)
	}
	if _, _, err := w.Append(ctx, []Change{put(3, "c", "3")}, Local); err != nil {
		t.Fatal(err)
	}
	h, err := w.Persist(ctx, 0)
	if err != nil || h.UpToSQN != 3 || len(h.Segments) == 0 {
		t.Fatalf("persist: %+v, %v", h, err)
	}
	res, err := w.Checkpoint(ctx, 1, []byte("offsets=7"))
	if err != nil || !res.Complete {
		t.Fatalf("checkpoint: %+v, %v", res, err)
	}
	// Changes after the checkpoint are not part of it.
	if _, _, err := w.Append(ctx, []Change{put(1, "a", "after"), {KeyGroup: 2, State: "s", Op: OpDelete, Key: []byte("b")}}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Checkpoint(ctx, 1, nil); !errors.Is(err, ErrCheckpointTooOld) {
		t.Fatalf("checkpoint 1 again: %v, want ErrCheckpointTooOld", err)
	}
	if _, err := w.Checkpoint(ctx, 2, nil); err != nil {
		t.Fatal(err)
	}

	// A node with an empty disk restores both checkpoints from the blob store.
	other := openTestNode(t, store, t.TempDir())
	got1 := restoreMap(t, other, "orders", 1, keygroup.Full(16))
	want1 := map[string]string{"1/s/a": "1", "2/s/b": "2", "3/s/c": "3"}
	if fmt.Sprint(got1) != fmt.Sprint(want1) {
		t.Fatalf("checkpoint 1 = %v, want %v", got1, want1)
	}
	got2 := restoreMap(t, other, "orders", 2, keygroup.Full(16))
	want2 := map[string]string{"1/s/a": "after", "3/s/c": "3"}
	if fmt.Sprint(got2) != fmt.Sprint(want2) {
		t.Fatalf("checkpoint 2 = %v, want %v", got2, want2)
	}
	parts, err := other.CheckpointParts(ctx, "orders", 1)
	if err != nil || len(parts) != 1 || string(parts[0].Metadata) != "offsets=7" {
		t.Fatalf("parts: %+v, %v", parts, err)
	}
	if got := restoreMap(t, other, "orders", 2, keygroup.Range{Lo: 3, Hi: 3}); fmt.Sprint(got) != "map[3/s/c:3]" {
		t.Fatalf("key group 3 of checkpoint 2 = %v", got)
	}
}

func TestBadInputIsRejectedWithTypedErrors(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, newFileStore(t), t.TempDir())
	if _, err := n.CreateStream(ctx, "bad/name", 16); !errors.Is(err, ErrInvalidStreamName) {
		t.Fatalf("bad name: %v", err)
	}
	if _, err := n.CreateStream(ctx, "s", 40000); !errors.Is(err, keygroup.ErrInvalidCount) {
		t.Fatalf("too many key groups: %v", err)
	}
	if _, err := n.OpenWriter(ctx, WriterConfig{Stream: "missing", KeyGroups: keygroup.Full(1)}); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("unknown stream: %v", err)
	}
	if _, err := n.CreateStream(ctx, "s", 16); err != nil {
		t.Fatal(err)
	}
	if _, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 16}}); !errors.Is(err, keygroup.ErrInvalidRange) {
		t.Fatalf("range outside stream: %v", err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 7}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		batch []Change
		want  error
	}{
		{"empty batch", nil, ErrInvalidChange},
		{"key group outside range", []Change{put(8, "k", "v")}, ErrKeyGroupOutOfRange},
		{"key too large", []Change{put(0, string(make([]byte, 64<<10+1)), "v")}, ErrKeyTooLarge},
		{"value too large", []Change{put(0, "k", string(make([]byte, 16<<20+1)))}, ErrValueTooLarge},
		{"unknown op", []Change{{KeyGroup: 0, Op: 9}}, ErrUnknownOp},
		{"one bad change rejects the batch", []Change{put(0, "ok", "v"), put(9, "bad", "v")}, ErrKeyGroupOutOfRange},
	} {
		if _, _, err := w.Append(ctx, tc.batch, Buffered); !errors.Is(err, tc.want) || !errors.Is(err, ErrInvalidChange) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "k", "v")}, Replicated); !errors.Is(err, ErrUnsupportedDurability) {
		t.Errorf("replicated: %v", err)
	}
	if w.LastSQN() != 0 {
		t.Fatalf("rejected batches assigned SQNs: last %d", w.LastSQN())
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "k", "v")}, Buffered); err != nil {
		t.Fatalf("a good append after bad ones: %v", err)
	}
}

// Opening a writer over overlapping key groups fences the old one: its
// appends, persists and checkpoints fail with ErrFenced, and a restore of
// the new writer's checkpoints never contains the zombie's later changes.
func TestFencingAcrossNodes(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	if _, err := a.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	old, err := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := old.Append(ctx, []Change{put(0, "k", "v1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	// The zombie keeps appending after checkpoint 1 ...
	if _, _, err := old.Append(ctx, []Change{put(0, "k", "zombie")}, Buffered); err != nil {
		t.Fatal(err)
	}
	// ... while node b opens a new writer from checkpoint 1.
	nw, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 7}})
	if err != nil {
		t.Fatal(err)
	}
	if nw.FromCheckpoint() != 1 {
		t.Fatalf("new writer starts from %d, want 1", nw.FromCheckpoint())
	}
	if _, err := old.Checkpoint(ctx, 2, nil); !errors.Is(err, ErrFenced) {
		t.Fatalf("zombie checkpoint: %v, want ErrFenced", err)
	}
	if _, _, err := old.Append(ctx, []Change{put(0, "k", "zombie2")}, Buffered); !errors.Is(err, ErrFenced) {
		t.Fatalf("zombie append: %v, want ErrFenced", err)
	}
	if _, err := old.Persist(ctx, 0); !errors.Is(err, ErrFenced) {
		t.Fatalf("zombie persist: %v, want ErrFenced", err)
	}
	if _, _, err := nw.Append(ctx, []Change{put(1, "j", "new")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := nw.Checkpoint(ctx, 2, nil); err != nil {
		t.Fatal(err)
	}
	got := restoreMap(t, b, "s", 2, keygroup.Full(8))
	if fmt.Sprint(got) != "map[0/s/k:v1 1/s/j:new]" {
		t.Fatalf("checkpoint 2 = %v", got)
	}
}

// A writer closed gracefully keeps its state in later checkpoints, and a
// new writer for its key groups starts from it.
func TestCloseCarriesStateIntoLaterCheckpoints(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	lo, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	hi, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 4, Hi: 7}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := lo.Append(ctx, []Change{put(0, "a", "lo")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, _, err := hi.Append(ctx, []Change{put(5, "b", "hi")}, Buffered); err != nil {
		t.Fatal(err)
	}
	res, err := lo.Checkpoint(ctx, 1, nil)
	if err != nil || res.Complete {
		t.Fatalf("first part: %+v, %v (must wait for the other writer)", res, err)
	}
	if err := hi.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// The closed writer's final part stands for it: lo completes alone.
	if res, err := lo.Checkpoint(ctx, 2, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint 2: %+v, %v", res, err)
	}
	if got := restoreMap(t, n, "s", 2, keygroup.Full(8)); fmt.Sprint(got) != "map[0/s/a:lo 5/s/b:hi]" {
		t.Fatalf("checkpoint 2 = %v", got)
	}
	if _, _, err := hi.Append(ctx, []Change{put(5, "b", "x")}, Buffered); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after close: %v", err)
	}
}

func TestDeleteStreamAndRecreate(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, newFileStore(t), t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(4)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "k", "v")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteStream(ctx, "s"); !errors.Is(err, ErrStreamBusy) {
		t.Fatalf("delete with an open writer: %v, want ErrStreamBusy", err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Stream(ctx, "s"); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("deleted stream: %v", err)
	}
	if err := n.DeleteStream(ctx, "s"); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	// A new stream of the same name starts from nothing.
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	cps, err := n.Checkpoints(ctx, "s")
	if err != nil || len(cps) != 0 {
		t.Fatalf("recreated stream has checkpoints %v, %v", cps, err)
	}
	if cfg, _ := n.Stream(ctx, "s"); cfg.KeyGroups != 8 {
		t.Fatalf("recreated stream has %d key groups", cfg.KeyGroups)
	}
}

// A checkpoint marked retained keeps its segments through GC after newer
// checkpoints subsume it; released, they go.
func TestRetainedCheckpointSurvivesGC(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	opts := testNodeOptions(store, t.TempDir())
	opts.RetainCheckpoints = 1
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(4)})
	if err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 4; id++ {
		if _, _, err := w.Append(ctx, []Change{put(0, "k", fmt.Sprint(id))}, Buffered); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Checkpoint(ctx, id, nil); err != nil {
			t.Fatal(err)
		}
		if err := w.Truncate(ctx, w.LastSQN()+1); err != nil {
			t.Fatal(err)
		}
		if id == 1 {
			if err := n.RetainCheckpoint(ctx, "s", 1, true); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := n.CollectGarbage(ctx); err != nil {
		t.Fatal(err)
	}
	if got := restoreMap(t, n, "s", 1, keygroup.Full(4)); got["0/s/k"] != "1" {
		t.Fatalf("retained checkpoint 1 restores to %v", got)
	}
	st, err := n.CollectGarbage(ctx)
	if err != nil || st.Referenced != 2 {
		t.Fatalf("gc kept %d segments (%v), want 2: checkpoint 1 and 4", st.Referenced, err)
	}
	if err := n.RetainCheckpoint(ctx, "s", 1, false); err != nil {
		t.Fatal(err)
	}
	if st, err := n.CollectGarbage(ctx); err != nil || st.Deleted != 1 {
		t.Fatalf("after release gc deleted %d (%v), want 1", st.Deleted, err)
	}
	if err := n.RetainCheckpoint(ctx, "s", 99, true); !errors.Is(err, ErrCheckpointNotFound) {
		t.Fatalf("retain unknown checkpoint: %v", err)
	}
}

// A node whose view of a stream predates its deletion (by another node)
// and re-creation never writes into the new stream's journal, and a writer
// of the deleted stream cannot complete checkpoints; the name stays usable.
func TestStaleStreamAcrossDeleteAndRecreate(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	if _, err := a.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	zombie, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(4)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := zombie.Append(ctx, []Change{put(0, "old", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := zombie.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	// Node a deletes the stream (b's writer lives on another node) ...
	if err := a.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	// ... and b's writer cannot complete a checkpoint of it any more.
	if _, err := zombie.Checkpoint(ctx, 2, nil); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("checkpoint of a deleted stream: %v, want ErrStreamNotFound", err)
	}
	// Its part is a leftover; deleting again clears it, and the name is free.
	if _, err := a.CreateStream(ctx, "s", 8); !errors.Is(err, ErrStreamBusy) {
		t.Fatalf("create over leftovers: %v, want ErrStreamBusy", err)
	}
	if err := a.DeleteStream(ctx, "s"); err != nil {
		t.Fatalf("delete of leftovers: %v", err)
	}
	if _, err := a.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	// b's stale view: opening a writer uses the new stream, from scratch.
	w, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if w.Epoch() != 1 || w.FromCheckpoint() != 0 {
		t.Fatalf("writer of the new stream: epoch %d from %d, want 1 from 0", w.Epoch(), w.FromCheckpoint())
	}
	if _, _, err := w.Append(ctx, []Change{put(5, "new", "2")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	// A third node reads the new stream's journal without trouble.
	c := openTestNode(t, store, t.TempDir())
	if got := restoreMap(t, c, "s", 1, keygroup.Full(8)); fmt.Sprint(got) != "map[5/s/new:2]" {
		t.Fatalf("new stream's checkpoint 1 = %v", got)
	}
}

// A checkpoint whose other parts were stored while a writer of the same
// node was closing completes when the close lands: the closing writer's
// final part stands in for it.
func TestCheckpointCompletesWhenTheLastWriterCloses(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, newFileStore(t), t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	lo, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	hi, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 4, Hi: 7}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := lo.Append(ctx, []Change{put(1, "a", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, _, err := hi.Append(ctx, []Change{put(5, "b", "2")}, Buffered); err != nil {
		t.Fatal(err)
	}
	// lo stores its part of 1; hi never checkpoints 1 but closes instead.
	if res, err := lo.Checkpoint(ctx, 1, nil); err != nil || res.Complete {
		t.Fatalf("lo's part: %+v, %v (must wait for hi)", res, err)
	}
	if err := hi.Close(ctx); err != nil {
		t.Fatal(err)
	}
	cps, err := n.Checkpoints(ctx, "s")
	if err != nil || len(cps) != 1 || cps[0].ID != 1 {
		t.Fatalf("after hi closed: checkpoints %+v, %v; want checkpoint 1 complete", cps, err)
	}
	if got := restoreMap(t, n, "s", 1, keygroup.Full(8)); fmt.Sprint(got) != "map[1/s/a:1 5/s/b:2]" {
		t.Fatalf("checkpoint 1 = %v", got)
	}
}

// testNS returns the key space of the current incarnation of stream name.
func testNS(t testing.TB, store upload.BlobStore, name string) streamNS {
	t.Helper()
	cfg, err := getStream(context.Background(), store, name)
	if err != nil {
		t.Fatal(err)
	}
	return cfg.ns()
}
