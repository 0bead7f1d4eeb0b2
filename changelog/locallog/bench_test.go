package locallog

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/dstl-dev/dstl/segments"
)

// BenchmarkLocalLogAppend: appenders each append batches of 100 changes with
// 100-byte random (incompressible) values to their own log, with real fsync
// and group commit. One op is one Append.
//
//	go test -run '^$' -bench LocalLogAppend -benchtime 3s ./changelog/locallog
func BenchmarkLocalLogAppend(b *testing.B) {
	for _, appenders := range []int{1, 64} {
		b.Run(fmt.Sprintf("appenders=%d", appenders), func(b *testing.B) {
			benchAppend(b, appenders, 100, 100)
		})
	}
}

func benchAppend(b *testing.B, appenders, batch, vlen int) {
	l, _, err := Open(Options{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	// Per appender: one batch of changes whose SQNs are bumped in place.
	batches := make([][]segments.Change, appenders)
	for g := range batches {
		rng := rand.New(rand.NewPCG(uint64(g), 9))
		cs := make([]segments.Change, batch)
		for i := range cs {
			v := make([]byte, vlen)
			for j := range v {
				v[j] = byte(rng.Uint32())
			}
			cs[i] = segments.Change{KeyGroup: uint16(i % 128), State: "counts", Op: segments.OpPut,
				Key: fmt.Appendf(nil, "key-%d-%d", g, i), Value: v, TimestampMs: 1700000000000}
		}
		batches[g] = cs
	}
	b.SetBytes(int64(batch * vlen))
	before := l.Stats()
	b.ResetTimer()
	var wg sync.WaitGroup
	for g := range appenders {
		n := b.N / appenders
		if g < b.N%appenders {
			n++
		}
		wg.Go(func() {
			log := fmt.Sprintf("bench-%d", g)
			cs := batches[g]
			sqn := uint64(0)
			for range n {
				for i := range cs {
					sqn++
					cs[i].SQN = sqn
				}
				if err := l.Append(context.Background(), log, cs); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	st := l.Stats()
	secs := b.Elapsed().Seconds()
	changes := st.Changes - before.Changes
	fsyncs := st.Fsyncs - before.Fsyncs
	b.ReportMetric(float64(changes)/secs, "changes/s")
	b.ReportMetric(float64(fsyncs)/secs, "fsyncs/s")
	if fsyncs > 0 {
		b.ReportMetric(float64(st.Appends-before.Appends)/float64(fsyncs), "appends/fsync")
	}
	if err := l.Close(); err != nil {
		b.Fatal(err)
	}
}
