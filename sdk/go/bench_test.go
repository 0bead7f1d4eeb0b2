package dstl_test

import (
	"fmt"
	"testing"
	"time"

	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
)

// BenchmarkWriterPut measures blind puts of 100-byte values through the
// public SDK in the embedded mode (HTTP/2 over in-memory pipes, through
// the node's whole handler: admission, decode, append), buffered, the
// writer batching as it does by default. One op is one Put; Flush at the
// end is included.
func BenchmarkWriterPut(b *testing.B) {
	ctx := b.Context()
	n, err := embedded.Open(ctx, embedded.Options{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close(ctx)
	c := n.Client()
	if _, err := c.CreateStream(ctx, "bench", 128); err != nil {
		b.Fatal(err)
	}
	w, err := c.OpenWriter(ctx, "bench", dstl.WriterOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Abort()
	value := make([]byte, 100)
	keys := make([][]byte, 4096)
	for i := range keys {
		keys[i] = fmt.Appendf(nil, "user:%06d", i)
	}
	start := time.Now()
	i := 0
	for b.Loop() {
		if err := w.Put(ctx, "s", keys[i%len(keys)], value); err != nil {
			b.Fatal(err)
		}
		i++
	}
	if _, err := w.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(i)/time.Since(start).Seconds(), "puts/s")
}
