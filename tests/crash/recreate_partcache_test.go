package crash

import (
	"context"
	"fmt"
	"testing"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestRecreatedStreamStaleParts (found by TestMaterializeTwoMaterializers,
// seed 1): a checkpoint part's key is streams/<s>/checkpoints/<id>/<epoch>,
// and after DeleteStream + CreateStream the new incarnation's ids and epochs
// start at 1 again, so its parts have the keys of the old incarnation's. A
// node other than the one that deleted the stream (a verifier, a
// materializer, another serving node) keeps the old parts in its part cache
// (only the deleting node drops them) and plans and restores the new
// incarnation's checkpoint from the OLD incarnation's segments: the old
// state (invariant 4), or, once the deleting node's GC collected those
// segments, a retained checkpoint that no longer restores.
func TestRecreatedStreamStaleParts(t *testing.T) {
	ctx := t.Context()
	blob, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	w, err := changelog.Open(ctx, changelog.Options{Store: blob, DataDir: t.TempDir(), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close(context.Background())
	reader, err := changelog.Open(ctx, changelog.Options{Store: blob, DataDir: t.TempDir(), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close(context.Background())
	const stream = "recreated"
	full := keygroup.Full(4)

	// One incarnation: its writer puts k=value, checkpoint 1.
	incarnation := func(value string) *changelog.Writer {
		if _, err := w.CreateStream(ctx, stream, 4); err != nil {
			t.Fatal(err)
		}
		wr, err := w.OpenWriter(ctx, changelog.WriterConfig{Stream: stream, KeyGroups: full})
		if err != nil {
			t.Fatal(err)
		}
		c := changelog.Change{KeyGroup: keygroup.OfString("k", 4), State: "s", Op: changelog.OpPut, Key: []byte("k"), Value: []byte(value)}
		if _, _, err := wr.Append(ctx, []changelog.Change{c}, changelog.Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := wr.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint 1: %+v, %v", res, err)
		}
		return wr
	}
	// replayed returns what node n restores checkpoint 1 to, and the
	// segments its plan reads.
	replayed := func(n *changelog.Node) (string, error) {
		pl, err := n.PlanRestore(ctx, stream, 1, full)
		if err != nil {
			return "", err
		}
		var segs []string
		for _, s := range pl.Steps {
			for _, seg := range s.Segments {
				segs = append(segs, seg.Key)
			}
		}
		var vals []string
		for c, err := range n.ReplayPlan(ctx, pl) {
			if err != nil {
				return "", fmt.Errorf("replay of %v: %w", segs, err)
			}
			vals = append(vals, string(c.Value))
		}
		return fmt.Sprintf("%v from %v", vals, segs), nil
	}

	old := incarnation("old")
	got, err := replayed(reader)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first incarnation, read by the other node: %s", got)
	if err := old.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.DeleteStream(ctx, stream); err != nil {
		t.Fatal(err)
	}
	incarnation("new")

	want, err := replayed(w)
	if err != nil {
		t.Fatal(err)
	}
	// The reader's view of the stream is stale: its first call may say
	// so (ErrStreamNotFound); the next reads the new stream.
	_, _ = reader.Checkpoints(ctx, stream)
	got, err = replayed(reader)
	if err != nil {
		t.Fatalf("the other node cannot restore checkpoint 1 of the new incarnation: %v (the deleting node restores %s)", err, want)
	}
	if got != want {
		t.Errorf("checkpoint 1 of the recreated stream: the other node restores %s, the deleting node %s", got, want)
	}
}

// TestRecreatedStreamStaleJournal (found by TestMaterializeTwoMaterializers,
// seed 10): a node that read a stream's journal, and did not delete the
// stream itself, keeps listing the deleted incarnation's checkpoints after
// DeleteStream + CreateStream as long as the new incarnation's journal has
// fewer entries than it had read of the old one: its refresh reads only the
// entries after its position, finds none, and never sees the new
// incarnation (an entry past the position would be refused as of another
// incarnation). A fresh node lists the new checkpoint.
func TestRecreatedStreamStaleJournal(t *testing.T) {
	ctx := t.Context()
	blob, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	open := func() *changelog.Node {
		n, err := changelog.Open(ctx, changelog.Options{Store: blob, DataDir: t.TempDir(), GCInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = n.Close(context.Background()) })
		return n
	}
	w, reader := open(), open()
	const stream = "recreated"
	full := keygroup.Full(4)
	incarnation := func(first, checkpoints uint64) *changelog.Writer {
		if _, err := w.CreateStream(ctx, stream, 4); err != nil {
			t.Fatal(err)
		}
		wr, err := w.OpenWriter(ctx, changelog.WriterConfig{Stream: stream, KeyGroups: full})
		if err != nil {
			t.Fatal(err)
		}
		for id := first; id < first+checkpoints; id++ {
			c := changelog.Change{KeyGroup: keygroup.OfString("k", 4), State: "s", Op: changelog.OpPut, Key: []byte("k"), Value: []byte("v")}
			if _, _, err := wr.Append(ctx, []changelog.Change{c}, changelog.Buffered); err != nil {
				t.Fatal(err)
			}
			if res, err := wr.Checkpoint(ctx, id, nil); err != nil || !res.Complete {
				t.Fatalf("checkpoint %d: %+v, %v", id, res, err)
			}
		}
		return wr
	}
	ids := func(n *changelog.Node) ([]uint64, error) {
		cps, err := n.Checkpoints(ctx, stream)
		var out []uint64
		for _, cp := range cps {
			out = append(out, cp.ID)
		}
		return out, err
	}
	old := incarnation(1, 10)
	if got, err := ids(reader); err != nil || len(got) != 10 {
		t.Fatalf("first incarnation: the reader lists %v, %v", got, err)
	}
	if err := old.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.DeleteStream(ctx, stream); err != nil {
		t.Fatal(err)
	}
	incarnation(100, 1) // checkpoint 100, the new incarnation's only one
	want, err := ids(open())
	if err != nil {
		t.Fatal(err)
	}
	// The reader's first call may say its view is stale
	// (ErrStreamNotFound); the next must read the new stream.
	var got []uint64
	for range 3 {
		if got, err = ids(reader); err == nil {
			break
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || err != nil {
		t.Errorf("after delete and recreate, the reader lists checkpoints %v (%v); a fresh node %v", got, err, want)
	}
}
