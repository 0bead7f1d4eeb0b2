package changelog

import (
	"bytes"
	"context"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// A node killed in the middle of a GC round leaves its round marker; its
// next process removes it at once, so retains and opens from older
// checkpoints do not wait minutes for it to go stale.
func TestRestartClearsOwnRoundMarkers(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	dir := t.TempDir()
	opts := testNodeOptions(store, dir)
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 2; id++ {
		if _, _, err := w.Append(ctx, []Change{put(0, "k", "v")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := w.Checkpoint(ctx, id, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", id, res, err)
		}
	}
	// The round of a process killed mid-GC, and one of another node.
	own := gcRoundPrefix() + n.ID() + "/killed"
	other := gcRoundPrefix() + "another-node/running"
	for _, key := range []string{own, other} {
		if err := store.PutIfAbsent(ctx, key, bytes.NewReader(nil), 0); err != nil {
			t.Fatal(err)
		}
	}
	n.crash()

	n, err = Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if _, err := store.Stat(ctx, own); err == nil {
		t.Fatalf("the killed process's round marker %s is still there after the restart", own)
	}
	if _, err := store.Stat(ctx, other); err != nil {
		t.Fatalf("another node's round marker was touched: %v", err)
	}
	// With the other node's round over, nothing holds a retain up.
	if err := store.Delete(ctx, other); err != nil {
		t.Fatal(err)
	}
	if err := n.RetainCheckpoint(ctx, "s", 1, true); err != nil {
		t.Fatal(err)
	}
}
