package dstl_test

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"

	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
)

// BenchmarkCounter is the read-modify-write of issue 10: one goroutine
// increments counters through ValueState.Get + Set, embedded and remote,
// against a baseline of the same loop on a bare Pebble DB (Get + Set, no
// WAL sync) in the same run. keys is how many counters it cycles through;
// cache=off disables the writer's read cache, so every Get asks the node.
func BenchmarkCounter(b *testing.B) {
	b.Run("baseline=pebble", func(b *testing.B) {
		db, err := pebble.Open(b.TempDir(), &pebble.Options{Logger: quietPebble{}})
		if err != nil {
			b.Fatal(err)
		}
		defer db.Close()
		keys := counterKeys(1)
		start, i := time.Now(), 0
		for b.Loop() {
			k := []byte(keys[i%len(keys)])
			n := 0
			if v, closer, err := db.Get(k); err == nil {
				n = int(v[0]) | int(v[1])<<8
				closer.Close()
			}
			n++
			if err := db.Set(k, []byte{byte(n), byte(n >> 8)}, pebble.NoSync); err != nil {
				b.Fatal(err)
			}
			i++
		}
		b.ReportMetric(float64(i)/time.Since(start).Seconds(), "ops/s")
	})
	for _, mode := range modes {
		for _, tc := range []struct {
			keys  int
			cache int
		}{{1, 0}, {100_000, 0}, {1, -1}} {
			name := fmt.Sprintf("mode=%s/keys=%d/cache=on", mode, tc.keys)
			if tc.cache < 0 {
				name = fmt.Sprintf("mode=%s/keys=%d/cache=off", mode, tc.keys)
			}
			b.Run(name, func(b *testing.B) {
				ctx := b.Context()
				c := clientIn(b, mode, nil)
				if _, err := c.CreateStream(ctx, "counter", 128); err != nil {
					b.Fatal(err)
				}
				w, err := c.OpenWriter(ctx, "counter", dstl.WriterOptions{CacheBytes: tc.cache})
				if err != nil {
					b.Fatal(err)
				}
				defer w.Abort()
				counts := dstl.NewValueState(w, "count", dstl.JSON[int]())
				keys := counterKeys(tc.keys)
				start, i := time.Now(), 0
				for b.Loop() {
					k := keys[i%len(keys)]
					n, _, err := counts.Get(ctx, k)
					if err != nil {
						b.Fatal(err)
					}
					if err := counts.Set(ctx, k, n+1); err != nil {
						b.Fatal(err)
					}
					i++
				}
				if _, err := w.Flush(ctx); err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(i)/time.Since(start).Seconds(), "ops/s")
			})
		}
	}
}

func counterKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("page:/%d", i)
	}
	return keys
}

// BenchmarkBlindPut is blind puts of 100-byte values through Writer.Put,
// buffered, the writer batching as it does by default: embedded
// (in-process), embedded over HTTP/2 on in-memory pipes (the wire path
// without a socket) and remote. One op is one Put; the Flush at the end is
// included.
func BenchmarkBlindPut(b *testing.B) {
	for _, mode := range append(modes, "embedded-http") {
		b.Run("mode="+mode, func(b *testing.B) {
			ctx := b.Context()
			var c *dstl.Client
			if mode == "embedded-http" {
				n, err := embedded.Open(ctx, embedded.Options{Dir: b.TempDir(), Transport: embedded.HTTP})
				if err != nil {
					b.Fatal(err)
				}
				defer n.Close(ctx)
				c = n.Client()
			} else {
				c = clientIn(b, mode, nil)
			}
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
			start, i := time.Now(), 0
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
		})
	}
}

// BenchmarkCounterParallel runs the counter loop on 16 goroutines (8 per
// core on the 2-core CI machine) sharing one Writer, each over its own
// 1,000 keys: the remote target is 150 k ops/s.
func BenchmarkCounterParallel(b *testing.B) {
	for _, mode := range modes {
		for _, cache := range []int{0, -1} {
			name := "mode=" + mode + "/cache=on"
			if cache < 0 {
				name = "mode=" + mode + "/cache=off"
			}
			b.Run(name, func(b *testing.B) {
				ctx := b.Context()
				c := clientIn(b, mode, nil)
				if _, err := c.CreateStream(ctx, "counter", 128); err != nil {
					b.Fatal(err)
				}
				w, err := c.OpenWriter(ctx, "counter", dstl.WriterOptions{CacheBytes: cache})
				if err != nil {
					b.Fatal(err)
				}
				defer w.Abort()
				counts := dstl.NewValueState(w, "count", dstl.JSON[int]())
				var next atomic.Int64
				b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
				start := time.Now()
				b.RunParallel(func(pb *testing.PB) {
					g := next.Add(1)
					keys := counterKeys(1000)
					for i := range keys {
						keys[i] = fmt.Sprintf("g%d/%s", g, keys[i])
					}
					i := 0
					for pb.Next() {
						k := keys[i%len(keys)]
						n, _, err := counts.Get(ctx, k)
						if err == nil {
							err = counts.Set(ctx, k, n+1)
						}
						if err != nil {
							b.Error(err)
							return
						}
						i++
					}
				})
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "ops/s")
			})
		}
	}
}

// quietPebble drops Pebble's informational messages.
type quietPebble struct{}

func (quietPebble) Infof(string, ...any)  {}
func (quietPebble) Errorf(string, ...any) {}
func (quietPebble) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}
