package feed

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// BenchmarkReplay measures a feed replaying committed changes from the blob
// store (file backend) into a consumer that discards them: changes/s, and
// changelog bytes read per change. DSTL_BENCH_CHANGES sets the changes
// (default 1M: 100k keys, 16-byte keys, 100-byte values half random, 10%
// deletes), written as 10 checkpoints.
//
//	go test -run '^$' -bench BenchmarkReplay -benchtime 3x ./cdc/feed
func BenchmarkReplay(b *testing.B) {
	total := 1_000_000
	if s := os.Getenv("DSTL_BENCH_CHANGES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			b.Fatal(err)
		}
		total = n
	}
	ctx := context.Background()
	node := openNode(b)
	if _, err := node.CreateStream(ctx, "s", 128); err != nil {
		b.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Full(128)})
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	batch := make([]changelog.Change, 0, 1000)
	var id uint64
	for i := 0; i < total; i++ {
		key := fmt.Appendf(nil, "key-%012d", i%100_000)
		// Half random, half text: roughly what zstd makes of real values.
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
				b.Fatal(err)
			}
			batch = batch[:0]
		}
		if (i+1)%(total/10) == 0 || i == total-1 {
			id++
			if _, err := w.Checkpoint(ctx, id, nil); err != nil {
				b.Fatal(err)
			}
		}
	}
	parts, err := node.CheckpointParts(ctx, "s", id)
	if err != nil {
		b.Fatal(err)
	}
	var logBytes int64
	for _, p := range parts {
		for _, s := range p.Segments {
			for _, blk := range s.Blocks {
				logBytes += int64(blk.Length)
			}
		}
	}
	for _, form := range []cdc.Form{cdc.FormUpsert, cdc.FormRetract} {
		b.Run(form.String(), func(b *testing.B) {
			var events int
			start := time.Now()
			for range b.N {
				events = 0
				err := Run(ctx, Config{Node: node, Dir: b.TempDir()}, Request{Stream: "s", Form: form, NoFollow: true}, func(bt *Batch) error {
					events += len(bt.Events)
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			sec := time.Since(start).Seconds() / float64(b.N)
			b.ReportMetric(float64(total)/sec, "changes/s")
			b.ReportMetric(float64(events)/sec, "events/s")
			b.ReportMetric(float64(logBytes)/float64(total), "logB/change")
		})
	}
}
