package materializer

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/cockroachdb/pebble/v2/sstable"

	"github.com/dstl-dev/dstl/segments"
)

const (
	benchKeyGroups = 128
	benchKeys      = 1 << 20 // distinct user keys per state
	benchBatch     = 1000    // changes per Apply (one replayed block's worth)
)

var benchStates = []string{"count", "session", "join", "dedup"}

// benchBatches makes n batches of a realistic mix: 16-byte keys, 100-byte
// values; 70 % put, 15 % merge (20-byte appends), 14.9 % delete, 0.1 %
// clear of one state of one key group.
func benchBatches(rng *rand.Rand, n int) ([][]segments.Change, int64) {
	var payload int64
	out := make([][]segments.Change, n)
	for i := range out {
		b := make([]segments.Change, benchBatch)
		for j := range b {
			c := &b[j]
			c.KeyGroup = uint16(rng.IntN(benchKeyGroups))
			c.State = benchStates[rng.IntN(len(benchStates))]
			c.Key = fmt.Appendf(nil, "user-%011d", rng.IntN(benchKeys))
			switch p := rng.IntN(1000); {
			case p < 700:
				c.Op, c.Value = segments.OpPut, randValue(rng, 100)
			case p < 850:
				c.Op, c.Value = segments.OpMerge, randValue(rng, 20)
			case p < 999:
				c.Op = segments.OpDelete
			default:
				c.Op, c.Key = segments.OpClear, nil
			}
			payload += int64(len(c.Key) + len(c.Value))
		}
		out[i] = b
	}
	return out, payload
}

// BenchmarkMaterialize folds batches of 1,000 changes of one log into a
// store on disk; one iteration is one batch (Apply = one Pebble batch).
//
//	go test -run '^$' -bench Materialize -benchtime 5s ./materializer
func BenchmarkMaterialize(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("sync=%v", sync), func(b *testing.B) {
			batches, payload := benchBatches(rand.New(rand.NewPCG(1, 2)), 256)
			s := openStore(b, b.TempDir(), Options{SyncWrites: sync})
			defer s.Close()
			var sqn uint64
			b.ResetTimer()
			n := 0
			for b.Loop() {
				batch := batches[n%len(batches)]
				for j := range batch {
					sqn++
					batch[j].SQN = sqn
				}
				if err := s.Apply("bench", "bench/1", batch); err != nil {
					b.Fatal(err)
				}
				n++
			}
			sec := b.Elapsed().Seconds()
			b.ReportMetric(float64(n*benchBatch)/sec, "changes/s")
			b.ReportMetric(float64(payload)/float64(len(batches))*float64(n)/sec/1e6, "MB/s")
		})
	}
}

type countingDiscard struct{ n *int64 }

func (c countingDiscard) Write(p []byte) (int, error) { *c.n += int64(len(p)); return len(p), nil }
func (countingDiscard) Close() error                  { return nil }

// BenchmarkExport exports every key group of a ~100 MB state (1M keys of
// 16 + 100 bytes) from one Pebble snapshot into SSTs (discarded); MB/s is
// logical state (keys + values) per second.
//
//	go test -run '^$' -bench Export -benchtime 5x ./materializer
func BenchmarkExport(b *testing.B) {
	s := openStore(b, b.TempDir(), Options{})
	defer s.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	const total = 1 << 20
	batch := make([]segments.Change, 0, 10000)
	var logical int64
	for sqn := uint64(1); sqn <= total; sqn++ {
		c := segments.Change{
			SQN: sqn, Op: segments.OpPut, KeyGroup: uint16(rng.IntN(benchKeyGroups)), State: benchStates[rng.IntN(len(benchStates))],
			Key: fmt.Appendf(nil, "user-%011d", sqn), Value: randValue(rng, 100),
		}
		batch = append(batch, c)
		logical += int64(len(c.Key) + len(c.Value))
		if len(batch) == cap(batch) {
			if err := s.Apply("bench", "bench/1", batch); err != nil {
				b.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	if err := s.Flush(); err != nil {
		b.Fatal(err)
	}
	for _, comp := range []struct {
		name string
		p    *sstable.CompressionProfile
	}{{"zstd", sstable.ZstdCompression}, {"snappy", sstable.SnappyCompression}} {
		b.Run("compression="+comp.name, func(b *testing.B) {
			s.opts.ExportCompression = comp.p
			var written int64
			files := 0
			for b.Loop() {
				m, err := s.Export(context.Background(), "bench", KeyGroupRange{Lo: 0, Hi: benchKeyGroups - 1}, func(string) (io.WriteCloser, error) {
					return countingDiscard{&written}, nil
				})
				if err != nil {
					b.Fatal(err)
				}
				files = len(m.Runs[0].Files)
			}
			sec := b.Elapsed().Seconds()
			b.ReportMetric(float64(logical)*float64(b.N)/sec/1e6, "MB/s")
			b.ReportMetric(float64(written)/float64(b.N)/float64(logical), "sst/logical")
			b.ReportMetric(float64(files), "files")
		})
	}
}
