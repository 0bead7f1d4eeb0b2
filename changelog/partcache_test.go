package changelog

import (
	"context"
	"fmt"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// S3 (issue 9): the part cache stays within its bound however many parts
// are read, and evicted parts are read again correctly.
func TestPartCacheBounded(t *testing.T) {
	ctx := context.Background()
	o := testNodeOptions(newFileStore(t), t.TempDir())
	o.PartCacheBytes = 4 << 10
	n, err := Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(ctx) })
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	const checkpoints = 40
	for i := uint64(1); i <= checkpoints; i++ {
		if _, _, err := w.Append(ctx, []Change{put(0, fmt.Sprintf("k%d", i), "v")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Checkpoint(ctx, i, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	for round := 0; round < 2; round++ {
		for i := uint64(1); i <= checkpoints; i++ {
			parts, err := n.CheckpointParts(ctx, "s", i)
			if err != nil || len(parts) != 1 || parts[0].UpToSQN != i || string(parts[0].Metadata) != fmt.Sprint(i) {
				t.Fatalf("checkpoint %d: %+v %v", i, parts, err)
			}
			if count, size := n.parts.stats(); size > o.PartCacheBytes {
				t.Fatalf("part cache holds %d parts, %d bytes: over its bound %d", count, size, o.PartCacheBytes)
			}
		}
	}
	count, size := n.parts.stats()
	t.Logf("part cache after %d checkpoints: %d parts, %d bytes (bound %d)", checkpoints, count, size, o.PartCacheBytes)
	if count == 0 || count >= checkpoints {
		t.Fatalf("cache holds %d parts of %d: not bounded, or not caching", count, checkpoints)
	}
}
