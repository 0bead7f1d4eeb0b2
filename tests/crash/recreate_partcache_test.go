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
