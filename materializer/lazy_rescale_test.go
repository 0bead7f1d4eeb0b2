package materializer

import (
	"context"
	crand "crypto/rand"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
)

// countingBlob counts the bytes of snapshot files read by ranged reads.
type countingBlob struct {
	upload.BlobStore
	mu   sync.Mutex
	read int64
}

func (c *countingBlob) GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error) {
	rc, err := c.BlobStore.GetRange(ctx, key, off, n)
	if err == nil && strings.Contains(key, "/sst/") {
		c.mu.Lock()
		c.read += n
		c.mu.Unlock()
	}
	return rc, err
}

func (c *countingBlob) bytes() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.read
}

// rescaleFileAllowance: Pebble's fixed reads per remote file: opening a
// table reads its footer (32 KiB), an iterator the 512 KiB before the
// top-level index (index and filter), once for reads and once for the
// hydrator's rewrite, which also reads the index to find where the range's
// blocks end.
const rescaleFileAllowance = 1 << 20

// TestLazyRescaleReads: a lazy import of a key-group range of a
// multi-file snapshot (a rescale) reads from the blob store, from the
// import through the first reads to the end of hydration, at most 1.1x the
// bytes of the files' parts inside the range, plus Pebble's fixed reads
// per file; and it holds
// exactly the range's keys, equal to the model, before and after
// hydration. Before clipped hydration, a file only partly inside the range
// was fetched whole (and its neighbour with it): the range of two key
// groups inside one 12-key-group file read the whole file; and without the
// skipped readahead (blobStorage.setSkip) the rewrite read up to 8 MiB
// past the range's end.
func TestLazyRescaleReads(t *testing.T) {
	const (
		keyGroups  = 48
		perKG      = 48
		valueBytes = 16 << 10 // 768 KiB per key group, 36 MiB in all
	)
	ctx := context.Background()
	sd := seed(t)
	t.Logf("DSTL_MODEL_SEED=%d", sd)
	rng := rand.New(rand.NewPCG(sd, 77))

	src := memStore(t, Options{TargetFileSize: 9 << 20})
	defer src.Close()
	var changes []segments.Change
	for kg := range uint16(keyGroups) {
		for i := range perKG {
			v := make([]byte, valueBytes)
			_, _ = crand.Read(v)
			changes = append(changes, segments.Change{SQN: uint64(len(changes) + 1), Op: segments.OpPut, KeyGroup: kg, State: testStates[i%2], Key: fmt.Appendf(nil, "k%04d", i), Value: v})
		}
	}
	for i := 0; i < len(changes); i += 256 {
		if err := src.Apply("st", "l/1", changes[i:min(i+256, len(changes))]); err != nil {
			t.Fatal(err)
		}
	}
	all := KeyGroupRange{Lo: 0, Hi: keyGroups - 1}
	inner := fileBlob(t)
	files := &lazyFiles{t: t, blob: inner}
	prefix := changelog.SnapshotFilePrefix("st", lazyInc) + "00000000000000000001-beef-"
	man, err := src.Export(ctx, "st", all, files.create(prefix))
	if err != nil {
		t.Fatal(err)
	}
	man = renamed(man, prefix)
	if n := len(man.Runs[0].Files); n < 3 {
		t.Fatalf("%d files: want a multi-file snapshot", n)
	}
	model := dump(t, src)

	// A range inside one file, then random ones.
	f0 := man.Runs[0].Files[0].KeyGroups
	ranges := []KeyGroupRange{{Lo: f0.Lo + 2, Hi: f0.Lo + 3}}
	for range 3 {
		a, z := uint16(rng.IntN(keyGroups)), uint16(rng.IntN(keyGroups))
		ranges = append(ranges, KeyGroupRange{Lo: min(a, z), Hi: max(a, z)})
	}
	for _, r := range ranges {
		what := fmt.Sprintf("key groups %s of %d files", r, len(man.Runs[0].Files))
		want := restrictTo(t, model, "st", r)

		// What the range needs: each file's share of its key groups in r
		// (every key group holds the same bytes); Pebble's fixed reads
		// per file.
		var inRange, allowance float64
		for _, f := range man.Runs[0].Files {
			if !f.KeyGroups.Overlaps(r) {
				continue
			}
			n := float64(f.KeyGroups.Hi-f.KeyGroups.Lo) + 1
			in := float64(min(f.KeyGroups.Hi, r.Hi)-max(f.KeyGroups.Lo, r.Lo)) + 1
			inRange += float64(f.Size) * in / n
			allowance += rescaleFileAllowance
		}

		// Before hydration: the range and nothing else, read from the
		// blob store.
		before := lazyStore(t, inner, "", Options{})
		pauseHydration(before)
		if err := before.ImportRange(ctx, man, r, nil, ImportOptions{Lazy: true, Incarnation: lazyInc}); err != nil {
			t.Fatal(err)
		}
		diff(t, what+": before hydration", dump(t, before), want)
		if err := before.Close(); err != nil {
			t.Fatal(err)
		}

		// Import, a first read, hydration: the bytes read.
		cb := &countingBlob{BlobStore: inner}
		s := lazyStore(t, cb, "", Options{})
		if err := s.ImportRange(ctx, man, r, nil, ImportOptions{Lazy: true, Incarnation: lazyInc}); err != nil {
			t.Fatal(err)
		}
		if v, ok, err := s.Get("st", r.Lo, testStates[0], []byte("k0000")); err != nil || !ok || len(v) != valueBytes {
			t.Fatalf("%s: first read: %d bytes, %v, %v", what, len(v), ok, err)
		}
		waitHydrated(t, s)
		read := cb.bytes()
		diff(t, what+": after hydration", dump(t, s), want)
		if n := cb.bytes(); n != read {
			t.Fatalf("%s: %d bytes read from the blob store after hydration", what, n-read)
		}
		t.Logf("%s: read %.2f MiB for %.2f MiB in range (%.2fx; bound %.2f MiB)", what, float64(read)/(1<<20), inRange/(1<<20), float64(read)/inRange, (1.1*inRange+allowance)/(1<<20))
		if float64(read) > 1.1*inRange+allowance {
			t.Errorf("%s: read %d bytes from the blob store for %.0f bytes in range: more than 1.1x + %.0f", what, read, inRange, allowance)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLazyClippedCorrupt: a file only partly inside the range is hydrated
// by Pebble's rewrite of its blocks in range, which checks each block's
// checksum: through a store corrupting every read, hydration fails (and
// says so) and reads fail, never returning wrong data; once healed, it
// completes with the right data.
func TestLazyClippedCorrupt(t *testing.T) {
	ctx := context.Background()
	inner := fileBlob(t)
	man, all := baseFixture(t, inner)
	r := KeyGroupRange{Lo: 1, Hi: 6}
	clipped := false
	for _, run := range man.Runs {
		for _, f := range run.Files {
			clipped = clipped || clippedPart(f.Size, f.KeyGroups, r) > 0
		}
	}
	if !clipped {
		t.Fatalf("no file of the fixture is clipped by %s", r)
	}
	want := restrictTo(t, all, "st", r)
	cs := &corruptingStore{BlobStore: inner, on: true}
	s := lazyStore(t, cs, "", Options{})
	defer s.Close()
	if err := s.ImportRange(ctx, man, r, nil, ImportOptions{Lazy: true, Incarnation: lazyInc}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for statusErr(s) == "" {
		if time.Now().After(deadline) {
			t.Fatalf("hydration never reported the corruption: %+v", s.Hydration())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got, err := readAll(s); err == nil {
		diff(t, "read through a corrupting store", got, want)
		t.Fatalf("read through a corrupting store returned %d keys and no error", len(got))
	}
	cs.set(false)
	waitHydrated(t, s)
	diff(t, "hydrated after the corruption went", dump(t, s), want)
}

// baseFixture exports one base run of 8 key groups, in files of about 3
// key groups, to blob (a chain's delta runs would be compacted into the
// base by Pebble, making files local without the hydrator) and returns it
// with the model.
func baseFixture(t *testing.T, blob upload.BlobStore) (SnapshotManifest, map[string]string) {
	t.Helper()
	src := memStore(t, Options{TargetFileSize: 16 << 10})
	defer src.Close()
	var changes []segments.Change
	for i := range 400 {
		changes = append(changes, segments.Change{SQN: uint64(i + 1), Op: segments.OpPut, KeyGroup: uint16(i % 8), State: testStates[i%2], Key: fmt.Appendf(nil, "k%04d", i), Value: fmt.Appendf(nil, "value-%d-%0100d", i, i)})
	}
	if err := src.Apply("st", "l/1", changes); err != nil {
		t.Fatal(err)
	}
	prefix := changelog.SnapshotFilePrefix("st", lazyInc) + "00000000000000000001-base-"
	man, err := src.Export(context.Background(), "st", KeyGroupRange{Lo: 0, Hi: 7}, (&lazyFiles{t: t, blob: blob}).create(prefix))
	if err != nil {
		t.Fatal(err)
	}
	return renamed(man, prefix), dump(t, src)
}

// TestLazyClippedRestart: a store closed before hydrating a clipped range
// reopens with the clipped files still pending as clipped (DSTL-LAZY.json
// keeps Part), references them again, serves the range and finishes by
// rewriting them.
func TestLazyClippedRestart(t *testing.T) {
	ctx := context.Background()
	blob := fileBlob(t)
	man, all := baseFixture(t, blob)
	r := KeyGroupRange{Lo: 1, Hi: 6}
	want := restrictTo(t, all, "st", r)
	dir := t.TempDir()
	s := lazyStore(t, blob, dir, Options{})
	pauseHydration(s)
	if err := s.ImportRange(ctx, man, r, nil, ImportOptions{Lazy: true, Incarnation: lazyInc}); err != nil {
		t.Fatal(err)
	}
	clipped := func(s *Store) int {
		s.lazy.mu.Lock()
		defer s.lazy.mu.Unlock()
		n := 0
		for _, f := range s.lazy.pending {
			if f.Part > 0 {
				n++
			}
		}
		return n
	}
	before := clipped(s)
	if before == 0 {
		t.Fatalf("no file of the fixture is clipped by %s", r)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	watch := &refWatch{BlobStore: blob, prefix: changelog.SnapshotRefPrefix("st", lazyInc)}
	s = lazyStore(t, watch, dir, Options{})
	defer s.Close()
	if n := clipped(s); n != before {
		t.Fatalf("reopened with %d clipped files pending, want %d", n, before)
	}
	if watch.count() == 0 {
		t.Fatal("reopened with files pending but wrote no reference")
	}
	diff(t, "reopened", dump(t, s), want)
	waitHydrated(t, s)
	diff(t, "hydrated after the restart", dump(t, s), want)
}

// TestLazyClippedReadErrors: reads of a clipped file that fail while the
// hydrator looks for the range's last block are reported as the stream's
// hydration error (they used to panic in Pebble's remote readable, whose
// not-exist classifier is nil outside its provider), and hydration
// completes once the store heals.
func TestLazyClippedReadErrors(t *testing.T) {
	ctx := context.Background()
	inner := fileBlob(t)
	man, all := baseFixture(t, inner)
	r := KeyGroupRange{Lo: 1, Hi: 6}
	want := restrictTo(t, all, "st", r)
	fs := faulty.Wrap(inner, faulty.Options{Seed: 1})
	s := lazyStore(t, fs, "", Options{})
	defer s.Close()
	fs.SetFaults(faulty.OpGetRange, faulty.Faults{Transient: 1})
	if err := s.ImportRange(ctx, man, r, nil, ImportOptions{Lazy: true, Incarnation: lazyInc}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for statusErr(s) == "" {
		if time.Now().After(deadline) {
			t.Fatalf("hydration never reported the failing reads: %+v", s.Hydration())
		}
		time.Sleep(10 * time.Millisecond)
	}
	fs.SetFaults(faulty.OpGetRange, faulty.Faults{})
	waitHydrated(t, s)
	diff(t, "hydrated after the reads healed", dump(t, s), want)
}
