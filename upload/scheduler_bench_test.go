package upload_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/upload"
)

// BenchmarkSchedulerFlush measures one flush of 128 logs (10 changes of 100
// bytes each) to the local file-system store: the objects written per flush
// and the latency of FlushNow (drain, encode, put with fsyncs, callbacks).
func BenchmarkSchedulerFlush(b *testing.B) {
	const nLogs, perLog, valueLen = 128, 10, 100
	h := start(b, upload.SchedulerOptions{Store: newFileStore(b), Interval: -1, HedgeAfter: -1})
	logs := h.logs(nLogs)
	ctx := context.Background()
	latencies := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		for _, l := range logs {
			if _, err := l.Append(ctx, h.s, perLog, valueLen); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		start := time.Now()
		if err := h.s.FlushNow(ctx); err != nil {
			b.Fatal(err)
		}
		latencies = append(latencies, time.Since(start))
	}
	b.StopTimer()
	objects := len(h.objects())
	b.ReportMetric(float64(objects)/float64(len(latencies)), "objects/flush")
	slices.Sort(latencies)
	pct := func(p float64) float64 {
		return float64(latencies[int(p*float64(len(latencies)-1))]) / float64(time.Millisecond)
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(nLogs*perLog), "changes/flush")
}
