package materializer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/dstl-dev/dstl/segments"
)

// fill applies random puts and merges to a store and returns the model.
func fill(t testing.TB, s *Store, n int, keyGroups uint16, seed uint64) *model {
	rng := rand.New(rand.NewPCG(seed, 1))
	m := newModel()
	var batch []segments.Change
	for sqn := uint64(1); sqn <= uint64(n); sqn++ {
		c := segments.Change{
			SQN:      sqn,
			KeyGroup: uint16(rng.IntN(int(keyGroups))),
			State:    testStates[rng.IntN(len(testStates))],
			Key:      fmt.Appendf(nil, "key-%05d", rng.IntN(n)),
			Op:       segments.OpPut,
			Value:    randValue(rng, 1+rng.IntN(200)),
		}
		if rng.IntN(4) == 0 {
			c.Op = segments.OpMerge
		}
		batch = append(batch, c)
		if len(batch) == 500 || sqn == uint64(n) {
			if err := s.Apply("st", "st/1", batch); err != nil {
				t.Fatal(err)
			}
			m.apply(t, "st", "st/1", batch)
			batch = batch[:0]
		}
	}
	return m
}

func randValue(rng *rand.Rand, n int) []byte {
	const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, n)
	for i := range b {
		b[i] = alnum[rng.IntN(len(alnum))]
	}
	return b
}

// TestScanPagination: a scan yields the model's keys of one state in (key
// group, key) order, with a prefix filter, and pages resumed with After
// concatenate to the full scan.
func TestScanPagination(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	m := fill(t, s, 3000, 16, 3)
	ctx := context.Background()
	for _, tc := range []struct {
		r      KeyGroupRange
		state  string
		prefix string
		limit  int
	}{
		{KeyGroupRange{Lo: 0, Hi: 15}, "a", "", 7},
		{KeyGroupRange{Lo: 3, Hi: 9}, "bb", "key-01", 5},
		{KeyGroupRange{Lo: 15, Hi: 15}, "a", "key-0", 1},
		{KeyGroupRange{Lo: 0, Hi: 15}, "none", "", 3},
		{KeyGroupRange{Lo: 0, Hi: 15}, "a", "zzz", 3},
	} {
		// Expected: the model's keys, sorted.
		var want []Entry
		for kg := tc.r.Lo; kg <= tc.r.Hi; kg++ {
			p := string(mustKey(t, "st", kg, tc.state, nil))
			var keys []string
			for k := range m.data {
				if strings.HasPrefix(k, p+tc.prefix) {
					keys = append(keys, k)
				}
			}
			slices.Sort(keys)
			for _, k := range keys {
				want = append(want, Entry{KeyGroup: kg, Key: []byte(k[len(p):]), Value: []byte(m.data[k])})
			}
		}
		var full []Entry
		for e, err := range s.Scan(ctx, "st", tc.r, tc.state, ScanOptions{Prefix: []byte(tc.prefix)}) {
			if err != nil {
				t.Fatal(err)
			}
			full = append(full, e)
		}
		eq := func(a, b []Entry) bool {
			return slices.EqualFunc(a, b, func(x, y Entry) bool {
				return x.KeyGroup == y.KeyGroup && bytes.Equal(x.Key, y.Key) && bytes.Equal(x.Value, y.Value)
			})
		}
		if !eq(full, want) {
			t.Fatalf("%+v: full scan has %d entries, model %d", tc, len(full), len(want))
		}
		var paged []Entry
		var after *Position
		for pages := 0; ; pages++ {
			var page []Entry
			for e, err := range s.Scan(ctx, "st", tc.r, tc.state, ScanOptions{Prefix: []byte(tc.prefix), After: after, Limit: tc.limit}) {
				if err != nil {
					t.Fatal(err)
				}
				page = append(page, e)
			}
			if len(page) > tc.limit {
				t.Fatalf("page of %d entries, limit %d", len(page), tc.limit)
			}
			paged = append(paged, page...)
			if len(page) < tc.limit {
				break
			}
			last := page[len(page)-1]
			after = &Position{KeyGroup: last.KeyGroup, Key: last.Key}
		}
		if !eq(paged, want) {
			t.Fatalf("%+v: paged scan has %d entries, model %d", tc, len(paged), len(want))
		}
	}
	// Bad arguments are errors, not panics.
	for _, r := range []KeyGroupRange{{Lo: 5, Hi: 4}} {
		for _, err := range s.Scan(ctx, "st", r, "a", ScanOptions{}) {
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("scan %s: %v", r, err)
			}
		}
	}
}

// TestExportImport: a multi-file export of a range round-trips; corrupt,
// truncated and extended files, a non-empty target range and conflicting
// applied SQNs are refused; DropKeyGroups empties exactly a range.
func TestExportImport(t *testing.T) {
	ctx := context.Background()
	src := openStore(t, t.TempDir(), Options{TargetFileSize: 16 << 10})
	defer src.Close()
	m := fill(t, src, 5000, 32, 5)
	r := KeyGroupRange{Lo: 4, Hi: 19}
	var files memFiles
	man, err := src.Export(ctx, "st", r, files.create)
	if err != nil {
		t.Fatal(err)
	}
	if len(man.Runs[0].Files) < 3 {
		t.Fatalf("%d files, want several at a 16 KiB target", len(man.Runs[0].Files))
	}
	for i, f := range man.Runs[0].Files {
		if i > 0 && f.KeyGroups.Lo < man.Runs[0].Files[i-1].KeyGroups.Hi {
			t.Fatalf("file %s key groups %s overlap the previous %s", f.Name, f.KeyGroups, man.Runs[0].Files[i-1].KeyGroups)
		}
	}
	if man.Applied["st/1"] != 5000 {
		t.Fatalf("applied %v", man.Applied)
	}
	want := m.restrict(t, "st", r)

	// Corruptions are detected before anything is ingested.
	for _, tc := range []struct {
		name string
		mod  func(b []byte) []byte
	}{
		{"flipped byte", func(b []byte) []byte { b[len(b)/2] ^= 1; return b }},
		{"truncated", func(b []byte) []byte { return b[:len(b)-1] }},
		{"extended", func(b []byte) []byte { return append(b, 0) }},
	} {
		bad := func(name string) (io.ReaderAt, error) {
			ra, err := files.open(name)
			if err != nil || name != man.Runs[0].Files[1].Name {
				return ra, err
			}
			b := bytes.Clone(files.files[name].Bytes())
			return bytes.NewReader(tc.mod(b)), nil
		}
		dst := openStore(t, t.TempDir(), Options{})
		err := dst.Import(ctx, man, bad)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), man.Runs[0].Files[1].Name) {
			t.Fatalf("%s: %v, want ErrCorrupt naming %s", tc.name, err, man.Runs[0].Files[1].Name)
		}
		if d := dump(t, dst); len(d) != 0 {
			t.Fatalf("%s: failed import left %d keys", tc.name, len(d))
		}
		if a, _ := dst.AppliedSQN("st", "st/1"); a != 0 {
			t.Fatalf("%s: failed import left applied %d", tc.name, a)
		}
		dst.Close()
	}
	// A manifest whose files do not partition the range is refused.
	broken := man.RenameFiles(func(n string) string { return n })
	broken.Runs[0].Files[1].Start = man.Runs[0].Files[0].Start
	if err := openStore(t, t.TempDir(), Options{}).Import(ctx, broken, files.open); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("overlapping files: %v", err)
	}

	dst := openStore(t, t.TempDir(), Options{})
	defer dst.Close()
	if err := dst.Import(ctx, man, files.open); err != nil {
		t.Fatal(err)
	}
	diff(t, "import", dump(t, dst), want)
	// Importing again over the same range is refused.
	if err := dst.Import(ctx, man, files.open); !errors.Is(err, ErrRangeNotEmpty) {
		t.Fatalf("second import: %v", err)
	}
	// Changes after the snapshot apply on top; replays are skipped.
	next := []segments.Change{
		{SQN: 5000, Op: segments.OpPut, KeyGroup: 4, State: "a", Key: []byte("old"), Value: []byte("x")},
		{SQN: 5001, Op: segments.OpPut, KeyGroup: 4, State: "a", Key: []byte("new"), Value: []byte("y")},
	}
	if err := dst.Apply("st", "st/1", next); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := dst.Get("st", 4, "a", []byte("old")); ok {
		t.Fatal("change at the snapshot's SQN applied twice")
	}
	if v, ok, _ := dst.Get("st", 4, "a", []byte("new")); !ok || string(v) != "y" {
		t.Fatal("change after the snapshot not applied")
	}

	// Rescale: drop 4..11 and re-import an export of just 12..19 elsewhere.
	if err := dst.DropKeyGroups(ctx, "st", KeyGroupRange{Lo: 4, Hi: 11}); err != nil {
		t.Fatal(err)
	}
	want2 := m.restrict(t, "st", KeyGroupRange{Lo: 12, Hi: 19})
	diff(t, "after drop", dump(t, dst), want2)
	var files2 memFiles
	man2, err := dst.Export(ctx, "st", KeyGroupRange{Lo: 12, Hi: 19}, files2.create)
	if err != nil {
		t.Fatal(err)
	}
	other := openStore(t, t.TempDir(), Options{})
	defer other.Close()
	// The other store already folded st/1 further: conflict.
	if err := other.ApplyThrough("st", "st/1", nil, 6000); err != nil {
		t.Fatal(err)
	}
	if err := other.Import(ctx, man2, files2.open); !errors.Is(err, ErrAppliedConflict) {
		t.Fatalf("conflicting import: %v", err)
	}
	// An empty range exports no files and imports only its applied SQNs.
	var files3 memFiles
	man3, err := dst.Export(ctx, "st", KeyGroupRange{Lo: 0, Hi: 3}, files3.create)
	if err != nil || len(man3.Runs) != 1 || len(man3.Runs[0].Files) != 0 || man3.Applied["st/1"] != 5001 {
		t.Fatalf("empty export: %+v %v", man3, err)
	}
	empty := openStore(t, t.TempDir(), Options{})
	defer empty.Close()
	if err := empty.Import(ctx, man3, files3.open); err != nil {
		t.Fatal(err)
	}
	if a, _ := empty.Applied("st"); !maps.Equal(a, map[string]uint64{"st/1": 5001}) {
		t.Fatalf("applied after empty import %v", a)
	}
}

type failingFile struct {
	n       int
	aborted *bool
}

func (f *failingFile) Write(p []byte) (int, error) {
	if f.n += len(p); f.n > 20<<10 {
		return 0, errors.New("disk full")
	}
	return len(p), nil
}
func (f *failingFile) Close() error { return errors.New("closed instead of aborted") }
func (f *failingFile) Abort() error { *f.aborted = true; return nil }

// TestExportAbort: a failing writer fails the export and is aborted, not
// closed (so a blob-store writer does not publish a partial file).
func TestExportAbort(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{TargetFileSize: 1 << 20})
	defer s.Close()
	fill(t, s, 3000, 8, 9)
	aborted := false
	_, err := s.Export(context.Background(), "st", KeyGroupRange{Lo: 0, Hi: 7}, func(string) (io.WriteCloser, error) {
		return &failingFile{aborted: &aborted}, nil
	})
	if err == nil || !strings.Contains(err.Error(), "disk full") || !aborted {
		t.Fatalf("export = %v, aborted %v", err, aborted)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var files memFiles
	if _, err := s.Export(ctx, "st", KeyGroupRange{Lo: 0, Hi: 7}, files.create); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled export: %v", err)
	}
}
