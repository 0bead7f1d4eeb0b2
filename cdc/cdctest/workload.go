// Package cdctest holds what CDC benchmarks in several packages share: the
// replay workload, so that the in-process feed (cdc/feed) and the SDK
// (sdk/go) measure the same changes.
package cdctest

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// WriteReplayWorkload writes the replay workload into a new stream s of
// node, with the node's own writer: total changes over 100k keys (16-byte
// keys, 100-byte values half random and half text, roughly what zstd makes
// of real values), every tenth a delete, as 10 checkpoints. It returns the
// newest checkpoint's id.
func WriteReplayWorkload(tb testing.TB, node *changelog.Node, stream string, total int) uint64 {
	tb.Helper()
	ctx := tb.Context()
	if _, err := node.CreateStream(ctx, stream, 128); err != nil {
		tb.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: stream, KeyGroups: keygroup.Full(128)})
	if err != nil {
		tb.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	batch := make([]changelog.Change, 0, 1000)
	var id uint64
	for i := 0; i < total; i++ {
		key := fmt.Appendf(nil, "key-%012d", i%100_000)
		value := make([]byte, 100)
		for j := 0; j < 50; j += 8 {
			binary.LittleEndian.PutUint64(value[j:], rng.Uint64())
		}
		copy(value[56:], "status=active;region=eu-west-1;tier=standard;x")
		c := changelog.Change{KeyGroup: keygroup.Of(key, 128), State: "v", Op: changelog.OpPut, Key: key, Value: value}
		if i%10 == 9 {
			c.Op, c.Value = changelog.OpDelete, nil
		}
		batch = append(batch, c)
		if len(batch) == cap(batch) || i == total-1 {
			if _, _, err := w.Append(ctx, batch, changelog.Buffered); err != nil {
				tb.Fatal(err)
			}
			batch = batch[:0]
		}
		if (i+1)%max(1, total/10) == 0 || i == total-1 {
			id++
			if _, err := w.Checkpoint(ctx, id, nil); err != nil {
				tb.Fatal(err)
			}
		}
	}
	return id
}
