package dstl_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/materializer"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// Restore and rescale, end to end through the SDK (issue 10): a node
// writes a state of incompressible 1 KiB values, checkpoints it and
// snapshots it; then a node with an empty disk on the same blob store opens
// writers from that checkpoint, with the same key groups (restore) or
// others (rescale). Reported: the time to open the writer(s) and serve a
// first read, the time until every byte is local (hydration), and the
// bytes read from the blob store ÷ the state of the key groups opened.
//
//	DSTL_BENCH_STATE_MB=256 DSTL_BENCH_BLOB_LATENCY=20ms \
//	  go test -run '^$' -bench 'BenchmarkRestore|BenchmarkRescale' -benchtime 1x ./sdk/go/
//
// The state size defaults to 64 MiB so that a plain -bench run stays
// short; DSTL_BENCH_BLOB_LATENCY adds a fixed delay to every blob-store
// request of the restoring node (a real object store's ~20 ms);
// DSTL_BENCH_TARGET_FILE_MB sets the snapshot's SST target size (default
// the materializer's, 64 MiB), reported with the number of SST objects
// (sst-files) to weigh objects against read amplification.

const benchValueSize = 1 << 10

func benchStateBytes(b *testing.B) int {
	mb := 64
	if v := os.Getenv("DSTL_BENCH_STATE_MB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("DSTL_BENCH_STATE_MB=%q: want a positive integer", v)
		}
		mb = n
	}
	return mb << 20
}

func benchTargetFileSize(b *testing.B) int64 {
	v := os.Getenv("DSTL_BENCH_TARGET_FILE_MB")
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("DSTL_BENCH_TARGET_FILE_MB=%q: want a positive integer", v)
	}
	return int64(n) << 20
}

// countSSTs counts the snapshot files on the blob store.
func countSSTs(b *testing.B, blobURL string) int {
	store, err := blobstore.Open(b.Context(), blobURL)
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	n, after := 0, ""
	for {
		page, err := store.List(b.Context(), "streams/", after, 1000)
		if err != nil {
			b.Fatal(err)
		}
		for _, o := range page.Objects {
			if strings.HasSuffix(o.Key, ".sst") {
				n++
			}
		}
		if page.Next == "" {
			return n
		}
		after = page.Next
	}
}

// benchBlobURL is a fresh blob store: a directory, or with
// DSTL_BENCH_BLOB=s3 a bucket of a versitygw started on loopback (reached
// through the real AWS SDK).
func benchBlobURL(b *testing.B) string {
	switch v := os.Getenv("DSTL_BENCH_BLOB"); v {
	case "", "file":
		return "file://" + filepath.Join(b.TempDir(), "blobs")
	case "s3":
		srv := s3server.Start(b)
		b.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
		b.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
		b.Setenv("AWS_EC2_METADATA_DISABLED", "true")
		return srv.URL("bench")
	default:
		b.Fatalf("DSTL_BENCH_BLOB=%q: want file or s3", v)
		return ""
	}
}

func benchBlobLatency(b *testing.B) time.Duration {
	v := os.Getenv("DSTL_BENCH_BLOB_LATENCY")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		b.Fatalf("DSTL_BENCH_BLOB_LATENCY=%q: %v", v, err)
	}
	return d
}

// writeSnapshottedState writes stateBytes of values into stream with one
// writer per range of ranges, completes checkpoint 1, snapshots it, and
// returns the value bytes written per key group.
func writeSnapshottedState(b *testing.B, blobURL string, ranges []dstl.KeyGroupRange, keyGroups, stateBytes int) []int64 {
	ctx := b.Context()
	n, err := embedded.Open(ctx, embedded.Options{Dir: b.TempDir(), BlobURL: blobURL, NoMaterializer: true})
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close(context.Background())
	c := n.Client()
	if _, err := c.CreateStream(ctx, "state", keyGroups); err != nil {
		b.Fatal(err)
	}
	var writers []*dstl.Writer
	for _, r := range ranges {
		w, err := c.OpenWriter(ctx, "state", dstl.WriterOptions{KeyGroups: &r, CacheBytes: -1})
		if err != nil {
			b.Fatal(err)
		}
		writers = append(writers, w)
	}
	perKG := make([]int64, keyGroups)
	value := make([]byte, benchValueSize)
	for i := range stateBytes / benchValueSize {
		key := fmt.Appendf(nil, "key:%09d", i)
		kg := int(keygroup.Of(key, keyGroups))
		if _, err := rand.Read(value); err != nil {
			b.Fatal(err)
		}
		for _, w := range writers {
			if w.Owns(kg) {
				if err := w.Put(ctx, "s", key, value); err != nil {
					b.Fatal(err)
				}
			}
		}
		perKG[kg] += int64(len(value))
	}
	for _, w := range writers {
		if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
			b.Fatal(err)
		}
	}
	mat, err := materializer.New(n.ChangelogNode(), b.TempDir(), materializer.Config{Store: materializer.Options{TargetFileSize: benchTargetFileSize(b)}})
	if err != nil {
		b.Fatal(err)
	}
	defer mat.Close()
	if _, err := mat.MaterializeStream(ctx, "state", true); err != nil {
		b.Fatal(err)
	}
	// A crash, not a close: the new node starts from checkpoint 1.
	for _, w := range writers {
		w.Abort()
	}
	return perKG
}

// countingStore counts the bytes read from a blob store, and adds a fixed
// latency to every request.
type countingStore struct {
	upload.BlobStore
	latency time.Duration
	read    atomic.Int64
}

func (s *countingStore) wait(ctx context.Context) error {
	if s.latency <= 0 {
		return nil
	}
	return clock.Sleep(ctx, clock.Real{}, s.latency)
}

func (s *countingStore) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	if err := s.wait(ctx); err != nil {
		return nil, err
	}
	r, err := s.BlobStore.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	return &countingReader{r, &s.read}, nil
}

func (s *countingStore) GetRange(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	if err := s.wait(ctx); err != nil {
		return nil, err
	}
	r, err := s.BlobStore.GetRange(ctx, key, offset, length)
	if err != nil {
		return nil, err
	}
	return &countingReader{r, &s.read}, nil
}

func (s *countingStore) Stat(ctx context.Context, key string) (upload.ObjectInfo, error) {
	if err := s.wait(ctx); err != nil {
		return upload.ObjectInfo{}, err
	}
	return s.BlobStore.Stat(ctx, key)
}

func (s *countingStore) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	if err := s.wait(ctx); err != nil {
		return upload.ListPage{}, err
	}
	return s.BlobStore.List(ctx, prefix, startAfter, limit)
}

type countingReader struct {
	io.ReadCloser
	n *atomic.Int64
}

func (r *countingReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	r.n.Add(int64(n))
	return n, err
}

// openRestoring opens a node with an empty disk on blobURL whose blob-store
// reads are counted (and delayed by DSTL_BENCH_BLOB_LATENCY).
func openRestoring(b *testing.B, blobURL string) (*embedded.Node, *countingStore) {
	var cs *countingStore
	n, err := embedded.Open(b.Context(), embedded.Options{
		Dir: b.TempDir(), BlobURL: blobURL, NoMaterializer: true,
		Node: func(o *changelog.Options) {
			cs = &countingStore{BlobStore: o.Store, latency: benchBlobLatency(b)}
			o.Store = cs
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = n.Close(context.Background()) })
	return n, cs
}

// waitHydrated polls the stream's hydration on the node until every byte
// is local (at once if nothing was restored lazily).
func waitHydrated(b *testing.B, c *dstl.Client, stream string) {
	for {
		st, err := c.Stream(b.Context(), stream)
		if err != nil {
			b.Fatal(err)
		}
		if st.Hydration == nil || st.Hydration.Done() {
			return
		}
		if st.Hydration.LastError != "" {
			b.Logf("hydration retrying: %s", st.Hydration.LastError)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// firstRead reads one key of the writer's key groups and checks its size.
func firstRead(b *testing.B, w *dstl.Writer, keyGroups, stateBytes int) {
	for i := range stateBytes / benchValueSize {
		key := fmt.Appendf(nil, "key:%09d", i)
		if w.Owns(int(keygroup.Of(key, keyGroups))) {
			v, ok, err := w.Get(b.Context(), "s", key)
			if err != nil || !ok || len(v) != benchValueSize {
				b.Fatalf("first read of %s: %d bytes, %v %v", key, len(v), ok, err)
			}
			return
		}
	}
}

func BenchmarkRestore(b *testing.B) {
	const keyGroups = 128
	stateBytes := benchStateBytes(b)
	all := dstl.KeyGroupRange{Lo: 0, Hi: keyGroups - 1}
	blobURL := benchBlobURL(b)
	writeSnapshottedState(b, blobURL, []dstl.KeyGroupRange{all}, keyGroups, stateBytes)
	for b.Loop() {
		n, cs := openRestoring(b, blobURL)
		c := n.Client()
		start := time.Now()
		w, err := c.OpenWriter(b.Context(), "state", dstl.WriterOptions{CacheBytes: -1})
		if err != nil {
			b.Fatal(err)
		}
		opened := time.Since(start)
		firstRead(b, w, keyGroups, stateBytes)
		first := time.Since(start)
		readAtFirst := cs.read.Load()
		waitHydrated(b, c, "state")
		hydrated := time.Since(start)
		b.ReportMetric(opened.Seconds(), "open-s")
		b.ReportMetric(first.Seconds(), "first-read-s")
		b.ReportMetric(hydrated.Seconds(), "hydrated-s")
		b.ReportMetric(float64(readAtFirst)/float64(stateBytes), "read-at-first/state")
		b.ReportMetric(float64(cs.read.Load())/float64(stateBytes), "read/state")
		b.ReportMetric(float64(countSSTs(b, blobURL)), "sst-files")
		w.Abort()
	}
}

func BenchmarkRescale(b *testing.B) {
	const keyGroups = 128
	stateBytes := benchStateBytes(b)
	split := func(n int) []dstl.KeyGroupRange {
		var rs []dstl.KeyGroupRange
		for i := range n {
			rs = append(rs, dstl.KeyGroupRange{Lo: i * keyGroups / n, Hi: (i+1)*keyGroups/n - 1})
		}
		return rs
	}
	for _, tc := range []struct{ from, to int }{{2, 3}, {4, 2}} {
		b.Run(fmt.Sprintf("%dto%d", tc.from, tc.to), func(b *testing.B) {
			blobURL := benchBlobURL(b)
			perKG := writeSnapshottedState(b, blobURL, split(tc.from), keyGroups, stateBytes)
			for b.Loop() {
				// Each new range on its own node: the bytes it reads are its
				// own.
				var worstFirst, worstHydrated time.Duration
				var read, moved int64
				for _, r := range split(tc.to) {
					n, cs := openRestoring(b, blobURL)
					c := n.Client()
					start := time.Now()
					w, err := c.OpenWriter(b.Context(), "state", dstl.WriterOptions{KeyGroups: &r, CacheBytes: -1})
					if err != nil {
						b.Fatal(err)
					}
					firstRead(b, w, keyGroups, stateBytes)
					worstFirst = max(worstFirst, time.Since(start))
					waitHydrated(b, c, "state")
					worstHydrated = max(worstHydrated, time.Since(start))
					read += cs.read.Load()
					for kg := r.Lo; kg <= r.Hi; kg++ {
						moved += perKG[kg]
					}
					w.Abort()
				}
				b.ReportMetric(worstFirst.Seconds(), "first-read-s")
				b.ReportMetric(worstHydrated.Seconds(), "hydrated-s")
				b.ReportMetric(float64(read)/float64(moved), "read/moved")
				b.ReportMetric(float64(countSSTs(b, blobURL)), "sst-files")
			}
		})
	}
}
