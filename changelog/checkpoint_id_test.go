package changelog

import (
	"context"
	"errors"
	"math"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// D1: checkpoint ids are bounded by the newest complete one plus
// Limits.MaxCheckpointIDStep, so one request cannot use up the id space.
func TestCheckpointIDBound(t *testing.T) {
	ctx := context.Background()
	opts := testNodeOptions(newFileStore(t), t.TempDir())
	opts.Limits.MaxCheckpointIDStep = 100
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
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	for _, id := range []uint64{math.MaxUint64, 101} {
		_, err := w.Checkpoint(ctx, id, nil)
		if !errors.Is(err, ErrCheckpointIDOutOfRange) || !errors.Is(err, ErrInvalidChange) {
			t.Fatalf("checkpoint %d: %v, want ErrCheckpointIDOutOfRange (an ErrInvalidChange)", id, err)
		}
	}
	// The writer is unharmed and the bound moves with the newest id.
	for _, id := range []uint64{100, 200} {
		if res, err := w.Checkpoint(ctx, id, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", id, res, err)
		}
	}
	if _, err := w.Checkpoint(ctx, 301, nil); !errors.Is(err, ErrCheckpointIDOutOfRange) {
		t.Fatalf("checkpoint 301 after 200: %v, want ErrCheckpointIDOutOfRange", err)
	}
	if _, err := w.Checkpoint(ctx, 201, nil); err != nil {
		t.Fatal(err)
	}
}
