package feed

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/cdc/cdctest"
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
	id := cdctest.WriteReplayWorkload(b, node, "s", total)
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
