package materializer_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

// BenchmarkLazyRestore measures a restore of one snapshot (a base run of
// DSTL_BENCH_STATE_MB MiB of incompressible 4 KiB values over 128 key
// groups, default 256) from a file blob store, eager against lazy:
//
//   - first-read-ms: from opening an empty store to the first Get
//     answered (eager: after every file was copied, verified and
//     ingested; lazy: after the by-reference ingest);
//   - hydrated-ms: until the whole state is local (eager: the same);
//   - remote-MiB: bytes Pebble read from the blob store through the lazily
//     imported files (block reads before hydration, compactions), apart
//     from the hydrator's own whole-file fetches (hydrator-MiB);
//   - gets/s-hydrating and gets/s-local: random point reads on one
//     goroutine while the store hydrates (from the first read on; eager:
//     none) and for a second once it is local.
//
// DSTL_BENCH_LATENCY (a duration, e.g. 20ms) adds that latency to every
// blob-store request (upload/faulty), modelling an object store;
// DSTL_BENCH_BW is the hydration bandwidth in MiB/s (default 64; -1:
// unbounded). Run with -benchtime 1x:
//
//	DSTL_BENCH_STATE_MB=256 go test -run '^$' -bench LazyRestore -benchtime 1x ./materializer
func BenchmarkLazyRestore(b *testing.B) {
	mb := lazyEnvInt(b, "DSTL_BENCH_STATE_MB", 256)
	bw := int64(lazyEnvInt(b, "DSTL_BENCH_BW", 64))
	var latency time.Duration
	if v := os.Getenv("DSTL_BENCH_LATENCY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatal(err)
		}
		latency = d
	}
	fx := lazyBenchFixture(b, mb)
	blob := upload.BlobStore(fx.blob)
	if latency > 0 {
		blob = faulty.Wrap(fx.blob, faulty.Options{All: faulty.Faults{Latency: 1}, Sleep: func(ctx context.Context, _ time.Duration) error {
			return clock.Sleep(ctx, clock.Real{}, latency) // fixed, not the drawn delay
		}})
	}
	for _, mode := range []string{"eager", "lazy"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				lazyBenchRun(b, fx, blob, mode == "lazy", bw<<20)
			}
		})
	}
}

type lazyBenchFx struct {
	blob upload.BlobStore
	man  materializer.SnapshotManifest
	keys int
	all  keygroup.Range
}

const (
	benchStream = "bench"
	benchInc    = "0123456789abcdef01234567"
)

func lazyEnvInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	return n
}

// lazyBenchFixture folds mb MiB of incompressible values into a store and
// exports them as one base run onto a file blob store.
func lazyBenchFixture(b *testing.B, mb int) *lazyBenchFx {
	b.Helper()
	ctx := context.Background()
	dir := b.TempDir()
	blob, err := file.Open(filepath.Join(dir, "blobs"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { blob.Close() })
	src, err := materializer.Open(filepath.Join(dir, "src"), materializer.Options{Logger: quietPebble{}})
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	const valueLen = 4 << 10
	keys := mb << 20 / valueLen
	rng := rand.New(rand.NewPCG(1, 2))
	batch := make([]segments.Change, 0, 1024)
	var sqn uint64
	for i := range keys {
		v := make([]byte, valueLen)
		for j := 0; j < valueLen; j += 8 {
			x := rng.Uint64()
			for k := 0; k < 8; k++ {
				v[j+k] = byte(x >> (8 * k))
			}
		}
		sqn++
		batch = append(batch, segments.Change{SQN: sqn, Op: segments.OpPut, KeyGroup: uint16(i % 128), State: "st", Key: fmt.Appendf(nil, "key%09d", i), Value: v})
		if len(batch) == cap(batch) || i == keys-1 {
			if err := src.Apply(benchStream, benchStream+"/1", batch); err != nil {
				b.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	prefix := changelog.SnapshotFilePrefix(benchStream, benchInc) + "00000000000000000001-bench-"
	all := keygroup.Range{Lo: 0, Hi: 127}
	man, err := src.Export(ctx, benchStream, all, func(name string) (io.WriteCloser, error) {
		return newSpool(ctx, blob, dir, prefix+name)
	})
	if err != nil {
		b.Fatal(err)
	}
	man = man.RenameFiles(func(n string) string { return prefix + n })
	b.Logf("state: %d keys of %d bytes (%d MiB), %d files, %d MiB of SSTs", keys, valueLen, mb, len(man.Runs[0].Files), man.Bytes>>20)
	return &lazyBenchFx{blob: blob, man: man, keys: keys, all: all}
}

// spool writes a file locally and uploads it on Close.
type spool struct {
	ctx  context.Context
	blob upload.BlobStore
	key  string
	f    *os.File
}

func newSpool(ctx context.Context, blob upload.BlobStore, dir, key string) (*spool, error) {
	f, err := os.CreateTemp(dir, "spool-*")
	if err != nil {
		return nil, err
	}
	return &spool{ctx: ctx, blob: blob, key: key, f: f}, nil
}

func (s *spool) Write(p []byte) (int, error) { return s.f.Write(p) }

func (s *spool) Close() error {
	defer os.Remove(s.f.Name())
	defer s.f.Close()
	size, err := s.f.Seek(0, io.SeekCurrent)
	if err != nil {
		return err
	}
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	return s.blob.PutIfAbsent(s.ctx, s.key, s.f, size)
}

func lazyBenchRun(b *testing.B, fx *lazyBenchFx, blob upload.BlobStore, lazy bool, bw int64) {
	ctx := context.Background()
	dir := b.TempDir()
	o := materializer.Options{Logger: quietPebble{}}
	if lazy {
		o.Remote, o.HydrateBandwidth = blob, bw
	}
	b.ResetTimer()
	start := time.Now()
	s, err := materializer.Open(dir, o)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	open := func(name string) (io.ReaderAt, error) {
		for _, f := range fx.man.Runs[0].Files {
			if f.Name == name {
				return upload.ReaderAt(ctx, blob, name, f.Size), nil
			}
		}
		return nil, fmt.Errorf("%s not in the manifest", name)
	}
	if err := s.ImportRange(ctx, fx.man, fx.all, open, materializer.ImportOptions{Lazy: lazy, Incarnation: benchInc}); err != nil {
		b.Fatal(err)
	}
	i := rand.IntN(fx.keys)
	if _, ok, err := s.Get(benchStream, uint16(i%128), "st", fmt.Appendf(nil, "key%09d", i)); err != nil || !ok {
		b.Fatalf("first read: %v %v", ok, err)
	}
	first := time.Since(start)
	remoteAtFirst := s.RemoteReadBytes()
	// Random point reads while the store hydrates (cold blocks come from
	// the blob store), then as many seconds of them once it is local.
	get := func() {
		i := rand.IntN(fx.keys)
		if _, ok, err := s.Get(benchStream, uint16(i%128), "st", fmt.Appendf(nil, "key%09d", i)); err != nil || !ok {
			b.Fatalf("read: %v %v", ok, err)
		}
	}
	hctx, cancel := context.WithCancel(ctx)
	waited := make(chan error, 1)
	go func() { waited <- s.WaitHydrated(hctx) }()
	var during int
	duringStart := time.Now()
reading:
	for {
		select {
		case err := <-waited:
			if err != nil {
				b.Fatal(err)
			}
			break reading
		default:
			get()
			during++
		}
	}
	cancel()
	duringSecs := time.Since(duringStart).Seconds()
	hydrated := time.Since(start)
	b.StopTimer()
	after := 0
	afterStart := time.Now()
	for time.Since(afterStart) < time.Second {
		get()
		after++
	}
	afterSecs := time.Since(afterStart).Seconds()
	var fetched int64
	for _, h := range s.Hydration() {
		fetched += h.RemoteReadBytes
	}
	b.ReportMetric(float64(first.Milliseconds()), "first-read-ms")
	b.ReportMetric(float64(hydrated.Milliseconds()), "hydrated-ms")
	b.ReportMetric(float64(s.RemoteReadBytes())/(1<<20), "remote-MiB")
	b.ReportMetric(float64(remoteAtFirst)/(1<<10), "first-read-remote-KiB")
	b.ReportMetric(float64(fetched)/(1<<20), "hydrator-MiB")
	if lazy {
		b.ReportMetric(float64(during)/duringSecs, "gets/s-hydrating")
	}
	b.ReportMetric(float64(after)/afterSecs, "gets/s-local")
}

// quietPebble drops Pebble's log lines in benchmarks.
type quietPebble struct{}

func (quietPebble) Infof(string, ...any)  {}
func (quietPebble) Errorf(string, ...any) {}
func (quietPebble) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}
