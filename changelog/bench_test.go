package changelog

// Benchmarks of the changelog against the brief's performance targets. See
// "## Performance" in docs/changelog.md for the commands and the figures.
//
//   - BenchmarkAppend: sustained append throughput (changes/s), buffered and
//     local, 1 and 64 writers, with the default scheduler (2 s interval,
//     16 MiB flushes, 256 MiB in-flight bound) on a local-FS store. The
//     timed region ends once everything appended is uploaded, so the figure
//     includes upload and back-pressure, not just buffering in memory.
//   - BenchmarkPersistAfter100MB / BenchmarkPersistAfter1GB: latency of
//     append+persist rounds (p50-ms, p99-ms) with 1, 16 and 128 writers on
//     the local-FS store and on a loopback S3 server (versitygw), after that
//     many bytes were appended and persisted first; objects/flush and
//     objects/round (all writers persisting concurrently).
//   - BenchmarkCheckpointAfter100MB / BenchmarkCheckpointAfter1GB: latency
//     of append+checkpoint rounds of 16 writers (p50-ms, p99-ms per
//     writer's Checkpoint call, round-p99-ms until the round's last writer
//     returned).
//
// The 1 GB cases take minutes: they are skipped unless the -bench pattern
// names them ("1GB"), so `go test -run '^$' -bench . ./changelog` stays
// short. Run them with
//
//	go test -run '^$' -bench 'After1GB' -timeout 60m ./changelog

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
	"github.com/dstl-dev/dstl/upload/file"
)

const (
	benchKeyGroups = 128
	benchBatch     = 100 // changes per Append
	benchKeyLen    = 16
	benchValueLen  = 100
	benchState     = "s"
	// benchChangeBytes is the payload of one change (key + value): what
	// "N bytes appended" counts.
	benchChangeBytes = benchKeyLen + benchValueLen
)

// benchStore opens a blob store of the given kind for b: "file" (a
// directory under b.TempDir()) or "s3" (a bucket on a versitygw started on
// loopback for this benchmark).
func benchStore(b *testing.B, kind string) upload.BlobStore {
	b.Helper()
	var (
		s   upload.BlobStore
		err error
	)
	switch kind {
	case "file":
		s, err = file.Open(b.TempDir())
	case "s3":
		srv := s3server.Start(b)
		b.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
		b.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
		b.Setenv("AWS_CONFIG_FILE", filepath.Join(b.TempDir(), "none"))
		b.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(b.TempDir(), "none"))
		s, err = blobstore.Open(context.Background(), srv.URL("bench"))
	default:
		b.Fatalf("unknown store %q", kind)
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// benchNode opens a node with the production defaults (batching delay
// 10 ms, interval 2 s, 16 MiB flushes, 256 MiB in-flight bound, fsynced
// local log), except that background garbage collection is off so that it
// cannot land inside a measurement.
func benchNode(b *testing.B, store upload.BlobStore) (*Node, *upload.SchedulerMetrics) {
	b.Helper()
	m := upload.NewSchedulerMetrics()
	o := Options{Store: store, DataDir: b.TempDir(), GCInterval: -1}
	o.Scheduler.Metrics = m
	n, err := Open(context.Background(), o)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := n.Close(ctx); err != nil {
			b.Errorf("close node: %v", err)
		}
	})
	return n, m
}

// benchWriters creates a stream of 128 key groups and opens count writers
// splitting it into equal ranges.
func benchWriters(b *testing.B, n *Node, count int) []*Writer {
	b.Helper()
	ctx := context.Background()
	if benchKeyGroups%count != 0 {
		b.Fatalf("%d writers do not divide %d key groups", count, benchKeyGroups)
	}
	if _, err := n.CreateStream(ctx, "bench", benchKeyGroups); err != nil {
		b.Fatal(err)
	}
	per := benchKeyGroups / count
	ws := make([]*Writer, count)
	for i := range ws {
		r := keygroup.Range{Lo: uint16(i * per), Hi: uint16((i+1)*per - 1)}
		w, err := n.OpenWriter(ctx, WriterConfig{Stream: "bench", KeyGroups: r})
		if err != nil {
			b.Fatal(err)
		}
		ws[i] = w
	}
	return ws
}

// valuePool holds random alphanumeric text (≈6 bits of entropy per byte,
// so zstd compresses it to ~75 %): values are 100-byte windows of it.
var valuePool = func() []byte {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	r := rand.New(rand.NewPCG(1, 2))
	p := make([]byte, 1<<20)
	for i := range p {
		p[i] = alphabet[r.IntN(len(alphabet))]
	}
	return p
}()

// benchBatches returns a few distinct batches of benchBatch puts for a
// writer owning r: 16-byte keys, 100-byte values, key groups spread over r.
// Append copies keys and values, so callers reuse the batches.
func benchBatches(r keygroup.Range, seed uint64) [][]Change {
	rng := rand.New(rand.NewPCG(seed, 7))
	span := int(r.Hi-r.Lo) + 1
	out := make([][]Change, 8)
	for i := range out {
		batch := make([]Change, benchBatch)
		for j := range batch {
			off := rng.IntN(len(valuePool) - benchValueLen)
			batch[j] = Change{
				KeyGroup: r.Lo + uint16(rng.IntN(span)),
				State:    benchState,
				Op:       OpPut,
				Key:      fmt.Appendf(nil, "key-%012d", rng.Uint64N(1e12)),
				Value:    valuePool[off : off+benchValueLen],
			}
		}
		out[i] = batch
	}
	return out
}

// counter reads a Prometheus counter.
func counter(b *testing.B, c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		b.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// countSegments counts the segment objects the node has on the store.
func countSegments(b *testing.B, n *Node) int {
	objs, err := listSegments(context.Background(), n.store, n.id)
	if err != nil {
		b.Fatal(err)
	}
	return len(objs)
}

func percentileMs(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return float64(sorted[int(p*float64(len(sorted)-1)+0.5)]) / float64(time.Millisecond)
}

// BenchmarkAppend measures sustained append throughput: b.N batches of 100
// changes (16-byte keys, 100-byte values) spread over the writers, each
// writer appending from its own goroutine, then one flush that uploads
// whatever is still pending. changes/s counts from the first append to the
// end of that flush.
func BenchmarkAppend(b *testing.B) {
	for _, d := range []Durability{Buffered, Local} {
		for _, writers := range []int{1, 64} {
			b.Run(fmt.Sprintf("%v/writers=%d", d, writers), func(b *testing.B) { benchAppend(b, d, writers) })
		}
	}
}

func benchAppend(b *testing.B, d Durability, writers int) {
	ctx := context.Background()
	n, m := benchNode(b, benchStore(b, "file"))
	ws := benchWriters(b, n, writers)
	batches := make([][][]Change, writers)
	for i, w := range ws {
		batches[i] = benchBatches(w.KeyGroups(), uint64(i))
	}
	waits0 := counter(b, m.BackpressureWaits)
	b.SetBytes(benchBatch * benchChangeBytes)
	b.ReportAllocs()
	b.ResetTimer()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i, w := range ws {
		wg.Go(func() {
			for k := 0; ; k++ {
				if next.Add(1) > int64(b.N) {
					return
				}
				if _, _, err := w.Append(ctx, batches[i][k%len(batches[i])], d); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	if err := n.Scheduler().FlushNow(ctx); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)*benchBatch/b.Elapsed().Seconds(), "changes/s")
	b.ReportMetric((counter(b, m.BackpressureWaits)-waits0)/float64(b.N), "bp-waits/op")
}

// skipUnless1GBSelected skips the 1 GB cases unless the -bench pattern
// names them, so that -bench . stays short.
func skipUnless1GBSelected(b *testing.B) {
	if f := flag.Lookup("test.bench"); f == nil || !strings.Contains(f.Value.String(), "1GB") {
		b.Skip("1 GB case: runs only when -bench names it, e.g. -bench 'After1GB'")
	}
}

// BenchmarkPersistAfter100MB: see benchPersist.
func BenchmarkPersistAfter100MB(b *testing.B) { persistCases(b, 100<<20) }

// BenchmarkPersistAfter1GB: see benchPersist. Runs only when selected.
func BenchmarkPersistAfter1GB(b *testing.B) {
	skipUnless1GBSelected(b)
	persistCases(b, 1<<30)
}

func persistCases(b *testing.B, before int64) {
	for _, store := range []string{"file", "s3"} {
		for _, writers := range []int{1, 16, 128} {
			b.Run(fmt.Sprintf("store=%s/writers=%d", store, writers), func(b *testing.B) {
				benchPersist(b, store, writers, before)
			})
		}
	}
}

// fill appends `total` payload bytes (buffered) spread over the writers and
// persists them, so that the measurement starts after that much history.
func fill(b *testing.B, ws []*Writer, batches [][][]Change, total int64) {
	b.Helper()
	ctx := context.Background()
	perBatch := int64(benchBatch * benchChangeBytes)
	nBatches := (total + perBatch - 1) / perBatch
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	start := time.Now()
	for i, w := range ws {
		wg.Go(func() {
			for k := 0; next.Add(1) <= nBatches; k++ {
				if _, _, err := w.Append(ctx, batches[i][k%len(batches[i])], Buffered); err != nil {
					failed.Store(&err)
					return
				}
			}
			if _, err := w.Persist(ctx, 0); err != nil {
				failed.Store(&err)
			}
		})
	}
	wg.Wait()
	if err := failed.Load(); err != nil {
		b.Fatal(*err)
	}
	el := time.Since(start)
	b.Logf("filled %d MiB (%d changes) in %v: %.0f changes/s", total>>20, nBatches*benchBatch, el.Round(time.Millisecond), float64(nBatches*benchBatch)/el.Seconds())
}

// round runs one round: every writer, in its own goroutine, runs op and
// records how long it took. It returns the round's duration.
func round(b *testing.B, ws []*Writer, lat [][]time.Duration, op func(i int, w *Writer) error) time.Duration {
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	start := time.Now()
	for i, w := range ws {
		wg.Go(func() {
			t0 := time.Now()
			if err := op(i, w); err != nil {
				failed.Store(&err)
				return
			}
			lat[i] = append(lat[i], time.Since(t0))
		})
	}
	wg.Wait()
	if err := failed.Load(); err != nil {
		b.Fatal(*err)
	}
	return time.Since(start)
}

func reportLatencies(b *testing.B, lat [][]time.Duration) {
	all := slices.Concat(lat...)
	slices.Sort(all)
	b.ReportMetric(percentileMs(all, 0.50), "p50-ms")
	b.ReportMetric(percentileMs(all, 0.99), "p99-ms")
	b.ReportMetric(float64(all[len(all)-1])/float64(time.Millisecond), "max-ms")
}

// benchPersist: after `before` bytes were appended and persisted, each
// iteration is one round in which every writer appends one batch of 100
// changes (buffered) and persists it, all writers concurrently, as at a
// checkpoint. p50-ms / p99-ms are over every writer's append+persist of
// every round. objects/flush counts the segment objects the rounds created
// per flush of the scheduler (1 by design), objects/round per round (1 if
// every writer's persist shares one object).
func benchPersist(b *testing.B, store string, writers int, before int64) {
	ctx := context.Background()
	n, m := benchNode(b, benchStore(b, store))
	ws := benchWriters(b, n, writers)
	batches := make([][][]Change, writers)
	for i, w := range ws {
		batches[i] = benchBatches(w.KeyGroups(), uint64(i))
	}
	fill(b, ws, batches, before)

	objects0 := countSegments(b, n)
	flushes0 := counter(b, m.Flushes.WithLabelValues("success"))
	lat := make([][]time.Duration, writers)
	rounds := 0
	for b.Loop() {
		round(b, ws, lat, func(i int, w *Writer) error {
			_, last, err := w.Append(ctx, batches[i][rounds%len(batches[i])], Buffered)
			if err != nil {
				return err
			}
			_, err = w.Persist(ctx, last)
			return err
		})
		rounds++
	}
	objects := float64(countSegments(b, n) - objects0)
	flushes := counter(b, m.Flushes.WithLabelValues("success")) - flushes0
	reportLatencies(b, lat)
	b.ReportMetric(objects/flushes, "objects/flush")
	b.ReportMetric(objects/float64(rounds), "objects/round")
}

// BenchmarkCheckpointAfter100MB: see benchCheckpoint.
func BenchmarkCheckpointAfter100MB(b *testing.B) { checkpointCases(b, 100<<20) }

// BenchmarkCheckpointAfter1GB: see benchCheckpoint. Runs only when selected.
func BenchmarkCheckpointAfter1GB(b *testing.B) {
	skipUnless1GBSelected(b)
	checkpointCases(b, 1<<30)
}

func checkpointCases(b *testing.B, before int64) {
	for _, store := range []string{"file", "s3"} {
		b.Run(fmt.Sprintf("store=%s/writers=16", store), func(b *testing.B) {
			benchCheckpoint(b, store, 16, before)
		})
	}
}

// benchCheckpoint: after `before` bytes were appended and checkpointed
// (checkpoint 1), each iteration is one checkpoint: every writer appends one
// batch of 100 changes and calls Checkpoint(id), all concurrently; the last
// part to be recorded completes it. p50-ms / p99-ms are over every writer's
// append+Checkpoint call; round-p50-ms / round-p99-ms over the time until
// the round's last writer returned (the checkpoint is complete by then).
func benchCheckpoint(b *testing.B, store string, writers int, before int64) {
	ctx := context.Background()
	counted := &countingStore{BlobStore: benchStore(b, store)}
	n, _ := benchNode(b, counted)
	ws := benchWriters(b, n, writers)
	batches := make([][][]Change, writers)
	for i, w := range ws {
		batches[i] = benchBatches(w.KeyGroups(), uint64(i))
	}
	fill(b, ws, batches, before)
	id := uint64(1)
	var complete atomic.Int64
	checkpoint := func(i int, w *Writer) error {
		if _, _, err := w.Append(ctx, batches[i][int(id)%len(batches[i])], Buffered); err != nil {
			return err
		}
		res, err := w.Checkpoint(ctx, id, nil)
		if res.Complete {
			complete.Add(1)
		}
		return err
	}
	round(b, ws, make([][]time.Duration, writers), checkpoint)

	lat := make([][]time.Duration, writers)
	var rounds []time.Duration
	calls0 := counted.calls.Load()
	for b.Loop() {
		id++
		complete.Store(0)
		rounds = append(rounds, round(b, ws, lat, checkpoint))
		if complete.Load() == 0 {
			b.Fatalf("checkpoint %d: no writer saw it complete", id)
		}
	}
	// Every blob-store call of the node per checkpoint: the segment put,
	// the parts, the journal reads and append, background refreshes.
	b.ReportMetric(float64(counted.calls.Load()-calls0)/float64(len(rounds)), "blob-calls/checkpoint")
	reportLatencies(b, lat)
	slices.Sort(rounds)
	b.ReportMetric(percentileMs(rounds, 0.50), "round-p50-ms")
	b.ReportMetric(percentileMs(rounds, 0.99), "round-p99-ms")
}

// countingStore counts the calls a node makes to its blob store.
type countingStore struct {
	upload.BlobStore
	calls atomic.Int64
}

func (c *countingStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	c.calls.Add(1)
	return c.BlobStore.PutIfAbsent(ctx, key, r, size)
}

func (c *countingStore) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	c.calls.Add(1)
	return c.BlobStore.Get(ctx, key)
}

func (c *countingStore) GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error) {
	c.calls.Add(1)
	return c.BlobStore.GetRange(ctx, key, off, n)
}

func (c *countingStore) Stat(ctx context.Context, key string) (upload.ObjectInfo, error) {
	c.calls.Add(1)
	return c.BlobStore.Stat(ctx, key)
}

func (c *countingStore) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	c.calls.Add(1)
	return c.BlobStore.List(ctx, prefix, startAfter, limit)
}

func (c *countingStore) Delete(ctx context.Context, key string) error {
	c.calls.Add(1)
	return c.BlobStore.Delete(ctx, key)
}
