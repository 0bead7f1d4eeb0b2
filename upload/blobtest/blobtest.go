// Package blobtest is the conformance suite every upload.BlobStore backend
// runs: one set of behaviours, checked the same way against the file system,
// a real S3-compatible server, and wrappers.
package blobtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/upload"
)

// LargeSize is the size of the suite's large object: more than 64 MiB, so
// that S3 backends must use multipart uploads.
const LargeSize = 64<<20 + 1<<20 + 12345

// Run runs the conformance suite. newStore must return an empty store for
// each call (a fresh directory or bucket); the suite closes it when the
// subtest ends. Subtests run in parallel.
func Run(t *testing.T, newStore func(t *testing.T) upload.BlobStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s upload.BlobStore)
	}{
		{"RoundTrip", testRoundTrip},
		{"Missing", testMissing},
		{"Ranges", testRanges},
		{"ReaderAt", testReaderAt},
		{"PutTwice", testPutTwice},
		{"RacingCreators", testRacingCreators},
		{"SizeMismatch", testSizeMismatch},
		{"Large", testLarge},
		{"List", testList},
		{"ListSmall", testListSmall},
		{"Delete", testDelete},
		{"CancelledContext", testCancelled},
		{"CancelDuringPut", testCancelDuringPut},
		{"InvalidKeys", testInvalidKeys},
		{"UnusualKeys", testUnusualKeys},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newStore(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			tc.fn(t, s)
		})
	}
}

// --- helpers ---

// onlyReader hides every method but Read (no Seek, no WriterTo, no Len), as
// a network stream would.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func put(t *testing.T, s upload.BlobStore, key string, data []byte) {
	t.Helper()
	if err := s.PutIfAbsent(t.Context(), key, onlyReader{bytes.NewReader(data)}, int64(len(data))); err != nil {
		t.Fatalf("PutIfAbsent(%q, %d bytes): %v", key, len(data), err)
	}
}

func readAll(t *testing.T, rc io.ReadCloser, err error) []byte {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(rc)
	if cerr := rc.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return data
}

func get(t *testing.T, s upload.BlobStore, key string) []byte {
	t.Helper()
	rc, err := s.Get(t.Context(), key)
	return readAll(t, rc, err)
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: got error %v, want %v", what, err, target)
	}
}

func wantMissing(t *testing.T, s upload.BlobStore, key string) {
	t.Helper()
	_, err := s.Stat(context.Background(), key)
	wantErr(t, fmt.Sprintf("Stat(%q)", key), err, upload.ErrNotFound)
}

// Generated content: byte i of stream seed is byte i%8 of splitmix64(seed+i/8),
// so any range can be regenerated without reading from the start.
type gen struct {
	seed      uint64
	off, size int64
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func fill(p []byte, seed uint64, off int64) {
	var w [8]byte
	for len(p) > 0 {
		binary.LittleEndian.PutUint64(w[:], splitmix64(seed+uint64(off/8)))
		n := copy(p, w[off%8:])
		p = p[n:]
		off += int64(n)
	}
}

func (g *gen) Read(p []byte) (int, error) {
	if g.off >= g.size {
		return 0, io.EOF
	}
	if rest := g.size - g.off; int64(len(p)) > rest {
		p = p[:rest]
	}
	fill(p, g.seed, g.off)
	g.off += int64(len(p))
	return len(p), nil
}

func genBytes(seed uint64, off, n int64) []byte {
	p := make([]byte, n)
	fill(p, seed, off)
	return p
}

// --- tests ---

func testRoundTrip(t *testing.T, s upload.BlobStore) {
	binaryData := make([]byte, 0, 256+100_000)
	for i := range 256 {
		binaryData = append(binaryData, byte(i))
	}
	binaryData = append(binaryData, genBytes(1, 0, 100_000)...)
	objects := map[string][]byte{
		"empty":                  {},
		"small":                  []byte("hello, blob"),
		"binary":                 binaryData,
		"nested/dir/deeper/leaf": []byte("nested"),
	}
	before := time.Now().Add(-time.Minute)
	for key, data := range objects {
		put(t, s, key, data)
	}
	for key, data := range objects {
		if got := get(t, s, key); !bytes.Equal(got, data) {
			t.Errorf("Get(%q) = %d bytes, want %d (content differs)", key, len(got), len(data))
		}
		rc, err := s.GetRange(t.Context(), key, 0, int64(len(data)))
		if got := readAll(t, rc, err); !bytes.Equal(got, data) {
			t.Errorf("GetRange(%q, whole) differs", key)
		}
		info, err := s.Stat(t.Context(), key)
		if err != nil {
			t.Fatalf("Stat(%q): %v", key, err)
		}
		if info.Key != key || info.Size != int64(len(data)) {
			t.Errorf("Stat(%q) = %+v, want key %q size %d", key, info, key, len(data))
		}
		if info.ModTime.Before(before) || info.ModTime.After(time.Now().Add(time.Minute)) {
			t.Errorf("Stat(%q).ModTime = %v, want about now", key, info.ModTime)
		}
	}
}

func testMissing(t *testing.T, s upload.BlobStore) {
	put(t, s, "present/x", []byte("x"))
	for _, key := range []string{"missing", "present/missing", "present/x/below", "present"} {
		_, err := s.Get(t.Context(), key)
		wantErr(t, "Get "+key, err, upload.ErrNotFound)
		_, err = s.GetRange(t.Context(), key, 0, 1)
		wantErr(t, "GetRange "+key, err, upload.ErrNotFound)
		_, err = s.GetRange(t.Context(), key, 0, 0)
		wantErr(t, "GetRange(0 bytes) "+key, err, upload.ErrNotFound)
		_, err = s.Stat(t.Context(), key)
		wantErr(t, "Stat "+key, err, upload.ErrNotFound)
	}
}

func testRanges(t *testing.T, s upload.BlobStore) {
	data := genBytes(2, 0, 1000)
	put(t, s, "r", data)
	for _, c := range []struct{ off, n int64 }{
		{0, 10}, {500, 100}, {990, 10}, {999, 1}, {0, 1000}, {0, 0}, {500, 0}, {1000, 0},
	} {
		rc, err := s.GetRange(t.Context(), "r", c.off, c.n)
		got := readAll(t, rc, err)
		if want := data[c.off : c.off+c.n]; !bytes.Equal(got, want) {
			t.Errorf("GetRange(%d, %d) = %d bytes, want %d (content differs)", c.off, c.n, len(got), len(want))
		}
	}
	for _, c := range []struct{ off, n int64 }{
		{995, 10}, {0, 1001}, {1000, 1}, {1001, 0}, {2000, 5}, {-1, 5}, {5, -1},
	} {
		rc, err := s.GetRange(t.Context(), "r", c.off, c.n)
		if err == nil {
			_ = rc.Close()
		}
		wantErr(t, fmt.Sprintf("GetRange(%d, %d)", c.off, c.n), err, upload.ErrInvalidRange)
	}
	put(t, s, "empty", nil)
	rc, err := s.GetRange(t.Context(), "empty", 0, 0)
	if got := readAll(t, rc, err); len(got) != 0 {
		t.Errorf("GetRange(empty, 0, 0) = %d bytes", len(got))
	}
	_, err = s.GetRange(t.Context(), "empty", 0, 1)
	wantErr(t, "GetRange(empty, 0, 1)", err, upload.ErrInvalidRange)
}

func testReaderAt(t *testing.T, s upload.BlobStore) {
	data := genBytes(3, 0, 5000)
	put(t, s, "ra", data)
	ra := upload.ReaderAt(t.Context(), s, "ra", int64(len(data)))
	p := make([]byte, 100)
	if n, err := ra.ReadAt(p, 1234); n != 100 || err != nil || !bytes.Equal(p, data[1234:1334]) {
		t.Errorf("ReadAt(100 @ 1234) = %d, %v", n, err)
	}
	if n, err := ra.ReadAt(p, 4950); n != 50 || err != io.EOF || !bytes.Equal(p[:50], data[4950:]) {
		t.Errorf("ReadAt(100 @ 4950) = %d, %v; want 50, EOF", n, err)
	}
	if n, err := ra.ReadAt(p, 5000); n != 0 || err != io.EOF {
		t.Errorf("ReadAt(100 @ 5000) = %d, %v; want 0, EOF", n, err)
	}
	got, err := io.ReadAll(io.NewSectionReader(ra, 0, int64(len(data))))
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("SectionReader over ReaderAt: %d bytes, %v", len(got), err)
	}
}

func testPutTwice(t *testing.T, s upload.BlobStore) {
	put(t, s, "k/once", []byte("original"))
	err := s.PutIfAbsent(t.Context(), "k/once", strings.NewReader("replacement!"), 12)
	wantErr(t, "second PutIfAbsent", err, upload.ErrAlreadyExists)
	if upload.IsTransient(err) {
		t.Errorf("ErrAlreadyExists must not be transient: %v", err)
	}
	if got := get(t, s, "k/once"); string(got) != "original" {
		t.Errorf("after failed overwrite: %q, want %q", got, "original")
	}
	// An empty object is an object too.
	put(t, s, "k/empty", nil)
	err = s.PutIfAbsent(t.Context(), "k/empty", strings.NewReader("x"), 1)
	wantErr(t, "PutIfAbsent over empty object", err, upload.ErrAlreadyExists)
}

func testRacingCreators(t *testing.T, s upload.BlobStore) {
	const n = 16
	content := func(i int) []byte { return bytes.Repeat([]byte(fmt.Sprintf("writer-%02d;", i)), 1000+i) }
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			data := content(i)
			errs[i] = s.PutIfAbsent(t.Context(), "race/key", onlyReader{bytes.NewReader(data)}, int64(len(data)))
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("writers %d and %d both succeeded", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, upload.ErrAlreadyExists):
			t.Errorf("writer %d: %v, want ErrAlreadyExists", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no writer succeeded")
	}
	if got := get(t, s, "race/key"); !bytes.Equal(got, content(winner)) {
		t.Errorf("stored content (%d bytes) is not the winner's (writer %d)", len(got), winner)
	}
}

func testSizeMismatch(t *testing.T, s upload.BlobStore) {
	err := s.PutIfAbsent(t.Context(), "short", onlyReader{strings.NewReader("abc")}, 10)
	wantErr(t, "short reader", err, upload.ErrSizeMismatch)
	wantMissing(t, s, "short")
	err = s.PutIfAbsent(t.Context(), "long", onlyReader{strings.NewReader("abcdefghijkl")}, 10)
	wantErr(t, "long reader", err, upload.ErrSizeMismatch)
	wantMissing(t, s, "long")
	if err := s.PutIfAbsent(t.Context(), "negative", strings.NewReader(""), -1); err == nil {
		t.Error("negative size: no error")
	}
	wantMissing(t, s, "negative")
	// A seekable reader positioned mid-way: only the rest is read.
	r := strings.NewReader("0123456789")
	_, _ = r.Seek(4, io.SeekStart)
	if err := s.PutIfAbsent(t.Context(), "seeked", r, 6); err != nil {
		t.Fatal(err)
	}
	if got := get(t, s, "seeked"); string(got) != "456789" {
		t.Errorf("seeked reader stored %q", got)
	}
}

func testLarge(t *testing.T, s upload.BlobStore) {
	const seed = 42
	want := sha256.New()
	if _, err := io.Copy(want, &gen{seed: seed, size: LargeSize}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := s.PutIfAbsent(t.Context(), "large/object", &gen{seed: seed, size: LargeSize}, LargeSize); err != nil {
		t.Fatalf("PutIfAbsent(%d bytes): %v", LargeSize, err)
	}
	t.Logf("put %d MiB in %v", LargeSize>>20, time.Since(start).Round(time.Millisecond))
	info, err := s.Stat(t.Context(), "large/object")
	if err != nil || info.Size != LargeSize {
		t.Fatalf("Stat = %+v, %v; want size %d", info, err, LargeSize)
	}
	rc, err := s.Get(t.Context(), "large/object")
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	n, err := io.Copy(got, rc)
	if cerr := rc.Close(); err == nil {
		err = cerr
	}
	if err != nil || n != LargeSize {
		t.Fatalf("Get: read %d bytes, %v", n, err)
	}
	if !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		t.Fatal("large object checksum differs")
	}
	// A range across the 16 MiB and 32 MiB boundaries (S3 part edges), and the tail.
	for _, c := range []struct{ off, n int64 }{{16<<20 - 1000, 16<<20 + 2000}, {LargeSize - 777, 777}} {
		rc, err := s.GetRange(t.Context(), "large/object", c.off, c.n)
		if data := readAll(t, rc, err); !bytes.Equal(data, genBytes(seed, c.off, c.n)) {
			t.Errorf("GetRange(%d, %d) differs", c.off, c.n)
		}
	}
	err = s.PutIfAbsent(t.Context(), "large/object", &gen{seed: seed + 1, size: LargeSize}, LargeSize)
	wantErr(t, "large overwrite", err, upload.ErrAlreadyExists)
}

// listAll pages through prefix with limit, checking the page contract, and
// returns the keys.
func listAll(t *testing.T, s upload.BlobStore, prefix, startAfter string, limit int) []string {
	t.Helper()
	pageLimit := limit
	if pageLimit <= 0 {
		pageLimit = 1000
	}
	var keys []string
	for pages := 0; ; pages++ {
		if pages > 10000 {
			t.Fatal("List does not terminate")
		}
		page, err := s.List(t.Context(), prefix, startAfter, limit)
		if err != nil {
			t.Fatalf("List(%q, %q, %d): %v", prefix, startAfter, limit, err)
		}
		if len(page.Objects) > pageLimit {
			t.Fatalf("List(%q, %q, %d) returned %d objects", prefix, startAfter, limit, len(page.Objects))
		}
		for _, o := range page.Objects {
			keys = append(keys, o.Key)
		}
		if page.Next == "" {
			if len(page.Objects) == 0 && pages > 0 {
				t.Errorf("List(%q, %d): an empty last page after a page with Next set", prefix, limit)
			}
			return keys
		}
		if len(page.Objects) != pageLimit {
			t.Errorf("List(%q, %q, %d): a non-final page holds %d objects", prefix, startAfter, limit, len(page.Objects))
		}
		if len(page.Objects) == 0 || page.Next != page.Objects[len(page.Objects)-1].Key {
			t.Fatalf("List(%q, %q, %d): Next %q is not the page's last key", prefix, startAfter, limit, page.Next)
		}
		startAfter = page.Next
	}
}

func putMany(t *testing.T, s upload.BlobStore, keys []string) {
	t.Helper()
	work := make(chan string)
	errs := make(chan error, len(keys))
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for key := range work {
				errs <- s.PutIfAbsent(t.Context(), key, strings.NewReader(key), int64(len(key)))
			}
		})
	}
	for _, k := range keys {
		work <- k
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func filter(keys []string, prefix, startAfter string) []string {
	var out []string
	for _, k := range keys {
		if strings.HasPrefix(k, prefix) && k > startAfter {
			out = append(out, k)
		}
	}
	return out
}

func testList(t *testing.T, s upload.BlobStore) {
	var keys []string
	for i := range 700 {
		keys = append(keys, fmt.Sprintf("list/a/%04d", i))
	}
	for i := range 400 {
		keys = append(keys, fmt.Sprintf("list/b/c/%04d", i))
	}
	// Keys whose byte order differs from a naive directory walk ('-' and
	// '.' sort before '/', '0' after it).
	keys = append(keys, "list/a-x", "list/a.y/1", "list/a0", "list/a/y/z", "list/b-c/1", "list/b/c0",
		"lisu", "lis", "other/1", "z")
	putMany(t, s, keys)
	slices.Sort(keys)

	check := func(prefix, startAfter string, limit int) {
		t.Helper()
		got := listAll(t, s, prefix, startAfter, limit)
		if want := filter(keys, prefix, startAfter); !slices.Equal(got, want) {
			t.Errorf("List(%q, after %q, limit %d): got %d keys, want %d\n got %.10q...\nwant %.10q...",
				prefix, startAfter, limit, len(got), len(want), got, want)
		}
	}
	check("", "", 1000)
	check("", "", 0)
	check("", "", 7)
	check("list/", "", 1000)
	check("list/a", "", 7)
	check("list/a/", "", 100)
	check("list/b/c/00", "", 7)
	check("list/", "list/a/0500", 1000)
	check("list/", "list/a/0500x", 7)
	check("", "list/a/y", 3)
	check("list/b", "list/a", 11)
	check("list/a/", "list/b", 7) // startAfter past the prefix
	check("nomatch/", "", 7)
	check("", "zz", 7)
	check("lis", "", 1)

	page, err := s.List(t.Context(), "list/a/", "", 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range page.Objects {
		if o.Size != int64(len(o.Key)) {
			t.Errorf("List: %q has size %d, want %d", o.Key, o.Size, len(o.Key))
		}
		if o.ModTime.IsZero() {
			t.Errorf("List: %q has no ModTime", o.Key)
		}
	}
	// Exactly one full page: Next must be empty.
	page, err = s.List(t.Context(), "list/b/c/", "", 400)
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Objects) != 400 || page.Next != "" {
		t.Errorf("List of exactly limit keys: %d objects, Next %q; want 400, \"\"", len(page.Objects), page.Next)
	}
}

func testListSmall(t *testing.T, s upload.BlobStore) {
	page, err := s.List(t.Context(), "", "", 10)
	if err != nil || len(page.Objects) != 0 || page.Next != "" {
		t.Fatalf("List of an empty store = %+v, %v", page, err)
	}
	keys := []string{"a", "b/1", "b/2", "c"}
	for _, k := range keys {
		put(t, s, k, []byte(k))
	}
	if got := listAll(t, s, "", "", 1); !slices.Equal(got, keys) {
		t.Errorf("List = %q, want %q", got, keys)
	}
	if err := s.Delete(t.Context(), "b/1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(t.Context(), "b/2"); err != nil {
		t.Fatal(err)
	}
	if got := listAll(t, s, "", "", 2); !slices.Equal(got, []string{"a", "c"}) {
		t.Errorf("List after deletes = %q", got)
	}
}

func testDelete(t *testing.T, s upload.BlobStore) {
	put(t, s, "d/x/1", []byte("1"))
	put(t, s, "d/x/2", []byte("2"))
	for range 2 { // idempotent
		if err := s.Delete(t.Context(), "d/x/1"); err != nil {
			t.Fatalf("Delete: %v", err)
		}
	}
	wantMissing(t, s, "d/x/1")
	if got := get(t, s, "d/x/2"); string(got) != "2" {
		t.Errorf("sibling after delete: %q", got)
	}
	for _, key := range []string{"never", "d/x", "d/never/deeper", "d/x/2/below"} {
		if err := s.Delete(t.Context(), key); err != nil {
			t.Errorf("Delete(missing %q): %v", key, err)
		}
	}
	if got := get(t, s, "d/x/2"); string(got) != "2" {
		t.Errorf("after deleting missing keys: %q", got)
	}
	// A deleted key can be created again.
	put(t, s, "d/x/1", []byte("again"))
	if got := get(t, s, "d/x/1"); string(got) != "again" {
		t.Errorf("recreated: %q", got)
	}
	for _, k := range []string{"d/x/1", "d/x/2"} {
		if err := s.Delete(t.Context(), k); err != nil {
			t.Fatal(err)
		}
	}
	if got := listAll(t, s, "", "", 0); len(got) != 0 {
		t.Errorf("List after deleting everything: %q", got)
	}
	put(t, s, "d/x/3", []byte("3")) // parents pruned by a delete are recreated
}

func testCancelled(t *testing.T, s upload.BlobStore) {
	put(t, s, "exists", []byte("data"))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	check := func(op string, err error) {
		t.Helper()
		wantErr(t, op, err, context.Canceled)
	}
	check("PutIfAbsent", s.PutIfAbsent(ctx, "new", strings.NewReader("x"), 1))
	check("PutIfAbsent large", s.PutIfAbsent(ctx, "newlarge", &gen{size: 20 << 20}, 20<<20))
	_, err := s.Get(ctx, "exists")
	check("Get", err)
	_, err = s.GetRange(ctx, "exists", 1, 2)
	check("GetRange", err)
	_, err = s.Stat(ctx, "exists")
	check("Stat", err)
	_, err = s.List(ctx, "", "", 10)
	check("List", err)
	check("Delete", s.Delete(ctx, "exists"))
	wantMissing(t, s, "new")
	wantMissing(t, s, "newlarge")
	if got := get(t, s, "exists"); string(got) != "data" {
		t.Errorf("after cancelled delete: %q", got)
	}
}

// cancelAfter cancels its context once n bytes have been read.
type cancelAfter struct {
	r      io.Reader
	n      int64
	cancel context.CancelFunc
}

func (c *cancelAfter) Read(p []byte) (int, error) {
	if c.n <= 0 {
		c.cancel()
	}
	n, err := c.r.Read(p)
	c.n -= int64(n)
	return n, err
}

func testCancelDuringPut(t *testing.T, s upload.BlobStore) {
	for _, size := range []int64{4 << 20, 40 << 20} {
		ctx, cancel := context.WithCancel(t.Context())
		r := &cancelAfter{r: &gen{size: size}, n: size / 2, cancel: cancel}
		key := fmt.Sprintf("cancelled/%d", size)
		err := s.PutIfAbsent(ctx, key, r, size)
		cancel()
		wantErr(t, fmt.Sprintf("PutIfAbsent(%d bytes) cancelled half-way", size), err, context.Canceled)
		wantMissing(t, s, key)
	}
	if got := listAll(t, s, "", "", 0); len(got) != 0 {
		t.Errorf("List after cancelled puts: %q", got)
	}
}

// InvalidKeys are keys every backend rejects with upload.ErrInvalidKey.
var InvalidKeys = []string{
	"", "/abs", "a/../b", "./a", "a/.", "..", "a//b", "a/", ".tmp/x", ".tmp",
	"a\x00b", "tab\tkey", "\xff\xfe", strings.Repeat("k", upload.MaxKeyLen+1),
}

func testInvalidKeys(t *testing.T, s upload.BlobStore) {
	ctx := t.Context()
	for _, key := range InvalidKeys {
		wantErr(t, fmt.Sprintf("PutIfAbsent(%q)", key), s.PutIfAbsent(ctx, key, strings.NewReader("x"), 1), upload.ErrInvalidKey)
		_, err := s.Get(ctx, key)
		wantErr(t, fmt.Sprintf("Get(%q)", key), err, upload.ErrInvalidKey)
		_, err = s.GetRange(ctx, key, 0, 1)
		wantErr(t, fmt.Sprintf("GetRange(%q)", key), err, upload.ErrInvalidKey)
		_, err = s.Stat(ctx, key)
		wantErr(t, fmt.Sprintf("Stat(%q)", key), err, upload.ErrInvalidKey)
		wantErr(t, fmt.Sprintf("Delete(%q)", key), s.Delete(ctx, key), upload.ErrInvalidKey)
	}
	if got := listAll(t, s, "", "", 0); len(got) != 0 {
		t.Errorf("List after invalid puts: %q", got)
	}
}

func testUnusualKeys(t *testing.T, s upload.BlobStore) {
	keys := []string{
		"sp ace/plus+eq=pct%20q?hash#amp&", "unicode/日本語/ключ", ".hidden/x", "a..b/c...", "tmp/.tmp",
		"x/" + strings.Repeat("n", 200), "back\\slash",
	}
	for _, k := range keys {
		put(t, s, k, []byte(k))
	}
	for _, k := range keys {
		if got := get(t, s, k); string(got) != k {
			t.Errorf("Get(%q) = %q", k, got)
		}
	}
	slices.Sort(keys)
	if got := listAll(t, s, "", "", 2); !slices.Equal(got, keys) {
		t.Errorf("List = %q, want %q", got, keys)
	}
}
