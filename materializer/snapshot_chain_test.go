package materializer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/segments"
)

// memStore opens a store on an in-memory file system.
func memStore(t testing.TB, o Options) *Store {
	t.Helper()
	if o.FS == nil {
		o.FS = vfs.NewMem()
	}
	return openStore(t, "/s", o)
}

// prefixed creates files under a prefix (the caller's blob keys), so that
// the runs of several exports have distinct names.
func (m *memFiles) prefixed(prefix string) func(string) (io.WriteCloser, error) {
	return func(name string) (io.WriteCloser, error) { return m.create(prefix + name) }
}

func renamed(man SnapshotManifest, prefix string) SnapshotManifest {
	return man.RenameFiles(func(n string) string { return prefix + n })
}

// restrictTo returns the entries of data inside key groups r of a stream.
func restrictTo(t testing.TB, data map[string]string, stream string, r KeyGroupRange) map[string]string {
	lo, hi, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for k, v := range data {
		if k >= string(lo) && k < string(hi) {
			out[k] = v
		}
	}
	return out
}

// sstEntries lists the point keys (kind:key) and range deletions
// (RANGEDEL:start..end) of an SST.
func sstEntries(t testing.TB, data []byte) []string {
	t.Helper()
	fs := vfs.NewMem()
	f, err := fs.Create("x.sst", vfs.WriteCategoryUnspecified)
	if err != nil {
		t.Fatal(err)
	}
	// A copy: MemFS scribbles over written buffers in invariants builds.
	if _, err := f.Write(bytes.Clone(data)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if f, err = fs.Open("x.sst"); err != nil {
		t.Fatal(err)
	}
	readable, err := sstable.NewSimpleReadable(f)
	if err != nil {
		t.Fatal(err)
	}
	rd, err := sstable.NewReader(context.Background(), readable, sstable.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var out []string
	it, err := rd.NewIter(sstable.NoTransforms, nil, nil, sstable.AssertNoBlobHandles)
	if err != nil {
		t.Fatal(err)
	}
	for kv := it.First(); kv != nil; kv = it.Next() {
		out = append(out, fmt.Sprintf("%s:%x", kv.Kind(), kv.K.UserKey))
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	dels, err := rd.NewRawRangeDelIter(context.Background(), sstable.NoFragmentTransforms, sstable.NoReadEnv)
	if err != nil {
		t.Fatal(err)
	}
	if dels != nil {
		defer dels.Close()
		for s, err := dels.First(); s != nil || err != nil; s, err = dels.Next() {
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, fmt.Sprintf("RANGEDEL:%x..%x", s.Start, s.End))
		}
	}
	return out
}

// TestDeltaRangeDelSameFile verifies the Pebble semantics the delta
// encoding relies on: every key of an ingested SST gets the same sequence
// number and a range deletion hides only lower ones, so a RANGEDEL in an
// SST hides the keys of earlier ingests (and writes) but not the Sets of its
// own file, also after the files are compacted together.
func TestDeltaRangeDelSameFile(t *testing.T) {
	ctx := context.Background()
	// 1. Plain Pebble: ingest one SST holding DeleteRange [a, z) and Set b
	// over a DB holding a, b, c.
	fs := vfs.NewMem()
	db, err := pebble.Open("/db", &pebble.Options{FS: fs, FormatMajorVersion: pebble.FormatNewest, Logger: quietLogger{t}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, k := range []string{"a", "b", "c", "zz"} {
		if err := db.Set([]byte(k), []byte("old"), nil); err != nil {
			t.Fatal(err)
		}
	}
	f, err := fs.Create("/delta.sst", vfs.WriteCategoryUnspecified)
	if err != nil {
		t.Fatal(err)
	}
	w := sstable.NewWriter(objstorageprovider.NewFileWritable(f), sstable.WriterOptions{TableFormat: db.TableFormat()})
	if err := errors.Join(w.Set([]byte("b"), []byte("new")), w.DeleteRange([]byte("a"), []byte("z")), w.Close()); err != nil {
		t.Fatal(err)
	}
	if err := db.Ingest(ctx, []string{"/delta.sst"}); err != nil {
		t.Fatal(err)
	}
	read := func(what string) {
		t.Helper()
		it, err := db.NewIter(nil)
		if err != nil {
			t.Fatal(err)
		}
		defer it.Close()
		got := map[string]string{}
		for ok := it.First(); ok; ok = it.Next() {
			got[string(it.Key())] = string(it.Value())
		}
		if want := map[string]string{"b": "new", "zz": "old"}; !maps.Equal(got, want) {
			t.Fatalf("%s: %v, want %v", what, got, want)
		}
	}
	read("after ingest")
	if err := db.Compact(ctx, []byte("a"), []byte("zzz"), false); err != nil {
		t.Fatal(err)
	}
	read("after compaction")

	// 2. Through ExportChanged: base of state s with k000..k199; then clear
	// s and put back only the even keys (new values), with a small target so
	// the delta is cut inside the cleared state.
	src := memStore(t, Options{TargetFileSize: 1 << 10})
	defer src.Close()
	var sqn uint64
	apply := func(cs *ChangedSet, changes ...segments.Change) {
		t.Helper()
		for i := range changes {
			sqn++
			changes[i].SQN = sqn
			if cs != nil {
				if err := cs.Add(changes[i]); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := src.Apply("st", "st/1", changes); err != nil {
			t.Fatal(err)
		}
	}
	put := func(kg uint16, state string, i int, v string) segments.Change {
		return segments.Change{Op: segments.OpPut, KeyGroup: kg, State: state, Key: fmt.Appendf(nil, "k%03d", i), Value: []byte(v + strings.Repeat(".", 40))}
	}
	for i := range 200 {
		apply(nil, put(1, "s", i, "old"), put(1, "t", i, "old"))
	}
	r := KeyGroupRange{Lo: 0, Hi: 3}
	var files memFiles
	base, err := src.Export(ctx, "st", r, files.prefixed("base/"))
	if err != nil {
		t.Fatal(err)
	}
	chain := renamed(base, "base/")
	cs := NewChangedSet("st")
	apply(cs, segments.Change{Op: segments.OpClear, KeyGroup: 1, State: "s"})
	for i := 0; i < 200; i += 2 {
		apply(cs, put(1, "s", i, "new"))
	}
	// A clear of a state with no keys left, and of one never written.
	apply(cs, segments.Change{Op: segments.OpClear, KeyGroup: 2, State: "gone"})
	delta, err := src.ExportChanged(ctx, "st", r, cs, files.prefixed("d1/"))
	if err != nil {
		t.Fatal(err)
	}
	if len(delta.Runs) != 1 || !delta.Runs[0].Delta || len(delta.Runs[0].Files) < 3 {
		t.Fatalf("delta runs %+v, want one delta run of several files", delta.Runs)
	}
	// Every delta file holds Sets and a RANGEDEL in one SST; the range
	// deletions of the cut state are contiguous over the whole state.
	p := mustKey(t, "st", 1, "s", nil)
	var covered []byte
	for i, f := range delta.Runs[0].Files {
		entries := sstEntries(t, files.files["d1/"+f.Name].Bytes())
		var sets, rangedels int
		for _, e := range entries {
			switch {
			case strings.HasPrefix(e, "SET:"):
				sets++
			case strings.HasPrefix(e, "RANGEDEL:"):
				rangedels++
				var start, end []byte
				if _, err := fmt.Sscanf(e, "RANGEDEL:%x..%x", &start, &end); err != nil {
					t.Fatal(err)
				}
				if bytes.HasPrefix(start, p) {
					if (covered == nil && !bytes.Equal(start, p)) || (covered != nil && !bytes.Equal(start, covered)) {
						t.Fatalf("file %d: range deletion starts at %x, want %x", i, start, covered)
					}
					covered = end
				}
			default:
				t.Fatalf("file %d: unexpected entry %s", i, e)
			}
		}
		if i < len(delta.Runs[0].Files)-1 && (sets == 0 || rangedels == 0) {
			t.Fatalf("file %d: %d sets, %d range deletions: %v", i, sets, rangedels, entries)
		}
	}
	if !bytes.Equal(covered, prefixEnd(p)) {
		t.Fatalf("range deletions of the state end at %x, want %x", covered, prefixEnd(p))
	}
	chain, err = chain.Append(renamed(delta, "d1/"))
	if err != nil {
		t.Fatal(err)
	}
	dst := memStore(t, Options{})
	defer dst.Close()
	if err := dst.Import(ctx, chain, files.open); err != nil {
		t.Fatal(err)
	}
	want := dump(t, src)
	diff(t, "chain import", dump(t, dst), want)
	if err := dst.db.Compact(ctx, []byte{prefixData}, []byte{prefixData + 1}, false); err != nil {
		t.Fatal(err)
	}
	diff(t, "chain import, compacted", dump(t, dst), want)
	if n := len(restrictTo(t, want, "st", KeyGroupRange{Lo: 1, Hi: 1})); n != 300 {
		t.Fatalf("%d keys in key group 1, want 300", n)
	}
}

// chainState is one stream's snapshot chain in the model test.
type chainState struct {
	stream  string
	r       KeyGroupRange
	cs      *ChangedSet
	man     *SnapshotManifest
	want    map[string]string // the model's data of r at the newest snapshot
	exports int
	maxRuns int
	// clearDeltas counts the deltas with a cleared state in the range.
	clearDeltas int
}

type importStats struct {
	imports, staged, clipped, skipped, prefilled, skipApplied atomic.Int64
	// longClearChains counts the chains of 6+ runs with 3+ deltas with
	// clears (the coverage the test needs, over all its seeds).
	longClearChains atomic.Int64
}

// TestSnapshotChainModel applies random batches (put, merge, delete,
// clear; replays) of 4 logs over 2 streams while recording changed keys
// per stream, and at random points extends each stream's chain with a
// base Export or a delta ExportChanged; at random points it imports the
// chain over a random sub-range into a fresh store, a store holding other
// key groups and streams, or without applied SQNs, and compares with the
// map model at the chain's snapshot.
func TestSnapshotChainModel(t *testing.T) {
	var st importStats
	for round := range 4 {
		sd := seed(t)
		t.Run(fmt.Sprintf("seed=%d", sd), func(t *testing.T) {
			t.Logf("DSTL_MODEL_SEED=%d", sd)
			runChainModel(t, rand.New(rand.NewPCG(sd, uint64(round)+100)), []int64{2 << 10, 300, 1, 64 << 10}[round], &st)
		})
	}
	t.Logf("%d imports: %d files staged as is, %d clipped, %d skipped; %d into pre-filled stores, %d without applied SQNs",
		st.imports.Load(), st.staged.Load(), st.clipped.Load(), st.skipped.Load(), st.prefilled.Load(), st.skipApplied.Load())
	if !t.Failed() && (st.clipped.Load() == 0 || st.skipped.Load() == 0 || st.prefilled.Load() == 0 || st.skipApplied.Load() == 0) {
		t.Fatal("some import paths were never taken")
	}
	// Over all seeds, not per seed: about one seed in a few hundred draws
	// no long chain with clears for one of its streams.
	if !t.Failed() && st.longClearChains.Load() == 0 {
		t.Fatal("no seed built a chain of 5+ deltas with 3+ clears")
	}
}

func runChainModel(t *testing.T, rng *rand.Rand, target int64, st *importStats) {
	const keyGroups = 8
	ctx := context.Background()
	logs := genLogs(rng, 4, 800, keyGroups)
	s := memStore(t, Options{MemTableSize: 64 << 10, TargetFileSize: target})
	defer s.Close()
	var files memFiles
	chains := map[string]*chainState{}
	for _, name := range testStreams {
		a, b := uint16(rng.IntN(keyGroups)), uint16(rng.IntN(keyGroups))
		r := KeyGroupRange{Lo: min(a, b), Hi: max(a, b)}
		if rng.IntN(2) == 0 {
			r = KeyGroupRange{Lo: 0, Hi: keyGroups - 1}
		}
		chains[name] = &chainState{stream: name, r: r, cs: NewChangedSet(name)}
	}
	m := newModel()
	export := func(c *chainState) {
		c.exports++
		prefix := fmt.Sprintf("%s-%03d/", c.stream, c.exports)
		// A base first, when the chain is long, and at random once a long
		// chain was seen.
		if c.man == nil || len(c.man.Runs) >= 10 || (c.maxRuns >= 7 && rng.IntN(8) == 0) {
			man, err := s.Export(ctx, c.stream, c.r, files.prefixed(prefix))
			if err != nil {
				t.Fatal(err)
			}
			man = renamed(man, prefix)
			c.man = &man
		} else {
			lo, hi, _ := KeyGroupRangeBounds(c.stream, c.r.Lo, c.r.Hi)
			if len(sortedIn(c.cs.cleared, lo, hi)) > 0 {
				c.clearDeltas++
			}
			d, err := s.ExportChanged(ctx, c.stream, c.r, c.cs, files.prefixed(prefix))
			if err != nil {
				t.Fatal(err)
			}
			if len(d.Runs) != 1 || !d.Runs[0].Delta {
				t.Fatalf("delta has runs %+v", d.Runs)
			}
			next, err := c.man.Append(renamed(d, prefix))
			if err != nil {
				t.Fatal(err)
			}
			c.man = &next
		}
		c.cs.Reset()
		c.want = m.restrict(t, c.stream, c.r)
		c.maxRuns = max(c.maxRuns, len(c.man.Runs))
		if !maps.Equal(c.man.Applied, m.streamApplied(c.stream)) {
			t.Fatalf("snapshot applied %v, model %v", c.man.Applied, m.streamApplied(c.stream))
		}
	}
	for step := 0; ; step++ {
		l, applied, ok := m.unfinished(rng, logs)
		if !ok {
			break
		}
		from := max(int(applied)-rng.IntN(4), 0)
		if rng.IntN(8) == 0 {
			from = rng.IntN(int(applied) + 1)
		}
		to := min(from+1+rng.IntN(25), len(l.changes))
		batch := l.changes[from:to]
		// Record only what this Apply folds in (not the replayed prefix):
		// the least a caller may record.
		for _, c := range batch {
			if c.SQN > applied {
				if err := chains[l.stream].cs.Add(c); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := s.Apply(l.stream, l.id, batch); err != nil {
			t.Fatalf("step %d: apply %s: %v", step, l.id, err)
		}
		m.apply(t, l.stream, l.id, batch)

		c := chains[testStreams[rng.IntN(len(testStreams))]]
		switch p := rng.IntN(100); {
		case p < 15:
			export(c)
			if rng.IntN(3) == 0 {
				checkChainImport(t, rng, c, &files, st)
			}
		case p < 20 && c.man != nil:
			checkChainImport(t, rng, c, &files, st)
		}
	}
	for _, name := range testStreams {
		c := chains[name]
		export(c)
		checkChainImport(t, rng, c, &files, st)
		if c.maxRuns >= 6 && c.clearDeltas >= 3 {
			st.longClearChains.Add(1)
		}
		t.Logf("stream %s key groups %s: %d exports, longest chain %d runs, %d deltas with clears", name, c.r, c.exports, c.maxRuns, c.clearDeltas)
	}
}

// checkChainImport imports a random sub-range of c's chain into a fresh
// store (sometimes pre-filled with other key groups and streams, sometimes
// without applied SQNs) and compares it with the model at the snapshot.
func checkChainImport(t *testing.T, rng *rand.Rand, c *chainState, files *memFiles, st *importStats) {
	t.Helper()
	ctx := context.Background()
	// The manifest goes through JSON, as it does through the blob store.
	b, err := json.Marshal(c.man)
	if err != nil {
		t.Fatal(err)
	}
	var man SnapshotManifest
	if err := json.Unmarshal(b, &man); err != nil {
		t.Fatal(err)
	}
	a, z := c.r.Lo+uint16(rng.IntN(int(c.r.Hi-c.r.Lo)+1)), c.r.Lo+uint16(rng.IntN(int(c.r.Hi-c.r.Lo)+1))
	r := KeyGroupRange{Lo: min(a, z), Hi: max(a, z)}
	opts := ImportOptions{SkipApplied: rng.IntN(4) == 0}
	prefill := rng.IntN(3) == 0
	fileKGs := map[string]KeyGroupRange{}
	for _, run := range man.Runs {
		for _, f := range run.Files {
			fileKGs[f.Name] = f.KeyGroups
			switch {
			case !f.KeyGroups.Overlaps(r):
				st.skipped.Add(1)
			case r.Covers(f.KeyGroups):
				st.staged.Add(1)
			default:
				st.clipped.Add(1)
			}
		}
	}
	open := func(name string) (io.ReaderAt, error) {
		if kgs, ok := fileKGs[name]; !ok || !kgs.Overlaps(r) {
			return nil, fmt.Errorf("import of %s opened %s (key groups %s)", r, name, kgs)
		}
		return files.open(name)
	}

	dst := memStore(t, Options{TargetFileSize: 1 << 10})
	defer dst.Close()
	other := map[string]string{}
	var preApplied uint64
	if prefill {
		// Keys right next to r (every other key group, the same state and
		// key names) and another stream, with an applied SQN of their own.
		var changes []segments.Change
		for kg := uint16(0); kg < 10; kg++ {
			if r.Contains(kg) {
				continue
			}
			for i := range 3 {
				changes = append(changes, segments.Change{SQN: uint64(len(changes) + 1), Op: segments.OpPut, KeyGroup: kg, State: testStates[i%2], Key: fmt.Appendf(nil, "k%d", i), Value: []byte("pre")})
			}
		}
		if err := dst.Apply(man.Stream, "pre/1", changes); err != nil {
			t.Fatal(err)
		}
		preApplied = uint64(len(changes))
		for i := range changes {
			changes[i].KeyGroup = r.Lo
		}
		if err := dst.Apply("zz-other", "pre/2", changes); err != nil {
			t.Fatal(err)
		}
		other = dump(t, dst)
		st.prefilled.Add(1)
	}
	if err := dst.ImportRange(ctx, man, r, open, opts); err != nil {
		t.Fatalf("import %s of %s chain of %d runs: %v", r, c.stream, len(man.Runs), err)
	}
	st.imports.Add(1)
	want := restrictTo(t, c.want, c.stream, r)
	maps.Copy(want, other)
	diff(t, fmt.Sprintf("import %s of %s chain of %d runs", r, c.stream, len(man.Runs)), dump(t, dst), want)

	got, err := dst.Applied(man.Stream)
	if err != nil {
		t.Fatal(err)
	}
	wantApplied := maps.Clone(man.Applied)
	if opts.SkipApplied {
		st.skipApplied.Add(1)
		wantApplied = map[string]uint64{}
	}
	if prefill {
		wantApplied["pre/1"] = preApplied
	}
	if !maps.Equal(got, wantApplied) {
		t.Fatalf("imported applied %v, want %v (skip %v)", got, wantApplied, opts.SkipApplied)
	}
	// The range is now taken.
	if err := dst.ImportRange(ctx, man, r, open, opts); !errors.Is(err, ErrRangeNotEmpty) && len(want) > len(other) {
		t.Fatalf("second import: %v", err)
	}
}

// chainFixture builds a store and a chain base + 2 deltas of st 0..15
// (several files per run), with the files in memory.
func chainFixture(t *testing.T) (*Store, SnapshotManifest, *memFiles) {
	t.Helper()
	ctx := context.Background()
	src := memStore(t, Options{TargetFileSize: 2 << 10})
	fill(t, src, 3000, 16, 21)
	r := KeyGroupRange{Lo: 0, Hi: 15}
	var files memFiles
	base, err := src.Export(ctx, "st", r, files.prefixed("base/"))
	if err != nil {
		t.Fatal(err)
	}
	chain := renamed(base, "base/")
	sqn := uint64(3000)
	rng := rand.New(rand.NewPCG(5, 6)) // incompressible values, so files fill up
	for d := 1; d <= 2; d++ {
		cs := NewChangedSet("st")
		var changes []segments.Change
		for i := range 400 {
			sqn++
			c := segments.Change{SQN: sqn, Op: segments.OpPut, KeyGroup: uint16(i % 16), State: testStates[i%2], Key: fmt.Appendf(nil, "key-%05d", i*7), Value: fmt.Appendf(nil, "d%d-%d-%x", d, i, rng.Uint64())}
			switch i % 10 {
			case 0:
				c.Op, c.Value = segments.OpDelete, nil
			case 1:
				c.Op, c.Key, c.Value = segments.OpClear, nil, nil
			}
			changes = append(changes, c)
			if err := cs.Add(c); err != nil {
				t.Fatal(err)
			}
		}
		if err := src.Apply("st", "st/1", changes); err != nil {
			t.Fatal(err)
		}
		prefix := fmt.Sprintf("d%d/", d)
		delta, err := src.ExportChanged(ctx, "st", r, cs, files.prefixed(prefix))
		if err != nil {
			t.Fatal(err)
		}
		if chain, err = chain.Append(renamed(delta, prefix)); err != nil {
			t.Fatal(err)
		}
	}
	for i, run := range chain.Runs {
		if len(run.Files) < 2 {
			t.Fatalf("run %d has %d files, want several", i, len(run.Files))
		}
	}
	return src, chain, &files
}

// TestChainImportErrors: a corrupt delta file fails the import before
// anything is ingested; ranges outside the snapshot, non-empty ranges and
// applied-SQN conflicts are refused; SkipApplied skips the conflict check.
func TestChainImportErrors(t *testing.T) {
	ctx := context.Background()
	src, chain, files := chainFixture(t)
	defer src.Close()
	last := chain.Runs[len(chain.Runs)-1].Files
	// A file of the last delta spanning several key groups, to import
	// partly.
	var straddling SnapshotFile
	for _, f := range last {
		if f.KeyGroups.Lo < f.KeyGroups.Hi {
			straddling = f
		}
	}
	if straddling.Name == "" {
		t.Fatal("no delta file spans several key groups")
	}
	for _, tc := range []struct {
		name string
		r    KeyGroupRange
		file SnapshotFile
	}{
		{"delta file, whole range", chain.KeyGroups, last[len(last)-1]},
		{"delta file, partly overlapping sub-range", KeyGroupRange{Lo: straddling.KeyGroups.Hi, Hi: 15}, straddling},
		{"middle delta file, sub-range", chain.Runs[1].Files[1].KeyGroups, chain.Runs[1].Files[1]},
	} {
		bad := func(name string) (io.ReaderAt, error) {
			ra, err := files.open(name)
			if err != nil || name != tc.file.Name {
				return ra, err
			}
			b := bytes.Clone(files.files[name].Bytes())
			b[len(b)/3] ^= 0x40
			return bytes.NewReader(b), nil
		}
		dst := memStore(t, Options{})
		err := dst.ImportRange(ctx, chain, tc.r, bad, ImportOptions{})
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.file.Name) {
			t.Fatalf("%s: %v, want ErrCorrupt naming %s", tc.name, err, tc.file.Name)
		}
		if d := dump(t, dst); len(d) != 0 {
			t.Fatalf("%s: failed import left %d keys", tc.name, len(d))
		}
		if a, _ := dst.Applied("st"); len(a) != 0 {
			t.Fatalf("%s: failed import left applied %v", tc.name, a)
		}
		dst.Close()
	}

	dst := memStore(t, Options{})
	defer dst.Close()
	for _, r := range []KeyGroupRange{{Lo: 3, Hi: 16}, {Lo: 5, Hi: 4}} {
		if err := dst.ImportRange(ctx, chain, r, files.open, ImportOptions{}); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("import %s of a snapshot of %s: %v", r, chain.KeyGroups, err)
		}
	}
	// Other key groups may hold data; the imported range may not.
	if err := dst.Apply("st", "x/1", []segments.Change{{SQN: 1, Op: segments.OpPut, KeyGroup: 7, State: "a", Key: []byte("k"), Value: []byte("v")}}); err != nil {
		t.Fatal(err)
	}
	if err := dst.ImportRange(ctx, chain, KeyGroupRange{Lo: 6, Hi: 8}, files.open, ImportOptions{}); !errors.Is(err, ErrRangeNotEmpty) {
		t.Fatalf("import over key group 7: %v", err)
	}
	if err := dst.ImportRange(ctx, chain, KeyGroupRange{Lo: 0, Hi: 6}, files.open, ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	// The applied SQN of st/1 is now the chain's: a snapshot at another
	// SQN conflicts, unless its applied SQNs are skipped.
	older := chain
	older.Applied = map[string]uint64{"st/1": chain.Applied["st/1"] - 1}
	if err := dst.ImportRange(ctx, older, KeyGroupRange{Lo: 8, Hi: 15}, files.open, ImportOptions{}); !errors.Is(err, ErrAppliedConflict) {
		t.Fatalf("conflicting import: %v", err)
	}
	if err := dst.ImportRange(ctx, older, KeyGroupRange{Lo: 8, Hi: 15}, files.open, ImportOptions{SkipApplied: true}); err != nil {
		t.Fatal(err)
	}
	if a, _ := dst.AppliedSQN("st", "st/1"); a != chain.Applied["st/1"] {
		t.Fatalf("applied %d after a SkipApplied import, want %d", a, chain.Applied["st/1"])
	}
	want := restrictTo(t, dump(t, src), "st", KeyGroupRange{Lo: 0, Hi: 6})
	maps.Copy(want, restrictTo(t, dump(t, src), "st", KeyGroupRange{Lo: 8, Hi: 15}))
	want[string(mustKey(t, "st", 7, "a", []byte("k")))] = "v"
	diff(t, "pieced together", dump(t, dst), want)
}

// TestManifestValidation: malformed chains are refused with ErrCorrupt
// (ErrInvalidArgument for a bad stream name) by Import before anything is
// read.
func TestManifestValidation(t *testing.T) {
	src, chain, files := chainFixture(t)
	defer src.Close()
	if err := chain.validate(); err != nil {
		t.Fatal(err)
	}
	lo, hi, _ := KeyGroupRangeBounds("st", 0, 15)
	for _, tc := range []struct {
		name string
		mod  func(m *SnapshotManifest)
		want error
	}{
		{"no runs", func(m *SnapshotManifest) { m.Runs = nil; m.Keys, m.Bytes = 0, 0 }, ErrCorrupt},
		{"delta as first run", func(m *SnapshotManifest) { m.Runs = m.Runs[1:] }, ErrCorrupt},
		{"base run after the first", func(m *SnapshotManifest) { m.Runs[2].Delta = false }, ErrCorrupt},
		{"first run marked delta", func(m *SnapshotManifest) { m.Runs[0].Delta = true }, ErrCorrupt},
		{"overlapping delta files", func(m *SnapshotManifest) { m.Runs[1].Files[1].Start = m.Runs[1].Files[0].Largest }, ErrCorrupt},
		{"unsorted delta files", func(m *SnapshotManifest) {
			f := m.Runs[1].Files
			f[0], f[1] = f[1], f[0]
		}, ErrCorrupt},
		{"delta file before the range", func(m *SnapshotManifest) { m.Runs[1].Files[0].Start = []byte{prefixData} }, ErrCorrupt},
		{"delta file past the range", func(m *SnapshotManifest) {
			f := m.Runs[2].Files
			f[len(f)-1].End = append(bytes.Clone(hi), 0)
		}, ErrCorrupt},
		{"delta file key groups outside the range", func(m *SnapshotManifest) { m.Runs[1].Files[0].KeyGroups = KeyGroupRange{Lo: 0, Hi: 16} }, ErrCorrupt},
		{"delta file keys outside its key groups", func(m *SnapshotManifest) {
			f := &m.Runs[1].Files[0]
			f.KeyGroups.Hi = f.KeyGroups.Lo
			f.Largest = mustKey(t, "st", f.KeyGroups.Lo+1, "a", nil)
		}, ErrCorrupt},
		{"base file past the range", func(m *SnapshotManifest) {
			f := m.Runs[0].Files
			f[len(f)-1].End = append(bytes.Clone(hi), 0)
		}, ErrCorrupt},
		{"base files not starting at the range", func(m *SnapshotManifest) { m.Runs[0].Files[0].Start = append(bytes.Clone(lo), 0) }, ErrCorrupt},
		{"base files with a gap", func(m *SnapshotManifest) {
			f := &m.Runs[0].Files[0]
			f.End = append(bytes.Clone(f.Largest), 0)
		}, ErrCorrupt},
		{"largest key at its end", func(m *SnapshotManifest) { m.Runs[1].Files[0].Largest = m.Runs[1].Files[0].End }, ErrCorrupt},
		{"duplicate name", func(m *SnapshotManifest) { m.Runs[2].Files[0].Name = m.Runs[0].Files[0].Name }, ErrCorrupt},
		{"no size", func(m *SnapshotManifest) { m.Runs[1].Files[0].Size = 0 }, ErrCorrupt},
		{"run totals", func(m *SnapshotManifest) { m.Runs[1].Keys++ }, ErrCorrupt},
		{"manifest totals", func(m *SnapshotManifest) { m.Bytes++ }, ErrCorrupt},
		{"empty log id", func(m *SnapshotManifest) { m.Applied[""] = 1 }, ErrCorrupt},
		{"bad stream", func(m *SnapshotManifest) { m.Stream = "" }, ErrInvalidArgument},
	} {
		m := chain.RenameFiles(func(n string) string { return n })
		tc.mod(&m)
		if err := m.validate(); !errors.Is(err, tc.want) {
			t.Errorf("%s: validate = %v, want %v", tc.name, err, tc.want)
			continue
		}
		dst := memStore(t, Options{})
		if err := dst.Import(context.Background(), m, files.open); !errors.Is(err, tc.want) {
			t.Errorf("%s: import = %v, want %v", tc.name, err, tc.want)
		}
		dst.Close()
	}
	// An empty base run is a valid chain.
	empty := chain.RenameFiles(func(n string) string { return n })
	empty.Runs = []Run{{Files: []SnapshotFile{}}}
	empty.Keys, empty.Bytes = 0, 0
	if err := empty.validate(); err != nil {
		t.Fatalf("empty base run: %v", err)
	}
}

// TestManifestAppend: Append composes only deltas of the same stream,
// range and format taken later, with distinct file names; it recomputes
// totals, takes the delta's applied SQNs, drops empty delta runs and does
// not alias its inputs.
func TestManifestAppend(t *testing.T) {
	ctx := context.Background()
	s := memStore(t, Options{TargetFileSize: 2 << 10})
	defer s.Close()
	fill(t, s, 1000, 8, 4)
	r := KeyGroupRange{Lo: 0, Hi: 7}
	var files memFiles
	base, err := s.Export(ctx, "st", r, files.prefixed("b/"))
	if err != nil {
		t.Fatal(err)
	}
	base = renamed(base, "b/")
	cs := NewChangedSet("st")
	// Nothing changed: one delta run without files, applied SQNs current.
	empty, err := s.ExportChanged(ctx, "st", r, cs, files.prefixed("e/"))
	if err != nil || len(empty.Runs) != 1 || !empty.Runs[0].Delta || len(empty.Runs[0].Files) != 0 || empty.Applied["st/1"] != 1000 {
		t.Fatalf("empty delta %+v, %v", empty, err)
	}
	changes := []segments.Change{
		{SQN: 1001, Op: segments.OpPut, KeyGroup: 3, State: "a", Key: []byte("x"), Value: []byte("y")},
		{SQN: 1002, Op: segments.OpPut, KeyGroup: 9, State: "a", Key: []byte("outside"), Value: []byte("y")},
	}
	for _, c := range changes {
		if err := cs.Add(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Apply("st", "st/1", changes); err != nil {
		t.Fatal(err)
	}
	delta, err := s.ExportChanged(ctx, "st", r, cs, files.prefixed("d/"))
	if err != nil {
		t.Fatal(err)
	}
	if f := delta.Runs[0].Files; len(f) != 1 || f[0].Keys != 1 || delta.Keys != 1 {
		t.Fatalf("delta of one key inside the range: %+v", delta.Runs)
	}
	// Outside the range: nothing.
	if d, err := s.ExportChanged(ctx, "st", KeyGroupRange{Lo: 4, Hi: 7}, cs, files.prefixed("o/")); err != nil || len(d.Runs[0].Files) != 0 {
		t.Fatalf("delta outside the changes: %+v, %v", d.Runs, err)
	}

	got, err := base.Append(renamed(empty, "e/"))
	if err != nil || len(got.Runs) != 1 || got.Applied["st/1"] != 1000 {
		t.Fatalf("append of an empty delta: %+v, %v", got.Runs, err)
	}
	got, err = got.Append(renamed(delta, "d/"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Runs) != 2 || got.Applied["st/1"] != 1002 || got.Keys != base.Keys+1 || got.Bytes != base.Bytes+delta.Bytes {
		t.Fatalf("append: runs %d applied %v keys %d bytes %d", len(got.Runs), got.Applied, got.Keys, got.Bytes)
	}
	got.Runs[0].Files[0].Name = "changed"
	got.Applied["st/1"] = 1
	if base.Runs[0].Files[0].Name == "changed" || delta.Applied["st/1"] != 1002 {
		t.Fatal("Append aliases its inputs")
	}

	other := func(mod func(d *SnapshotManifest)) SnapshotManifest {
		d := renamed(delta, "d/")
		mod(&d)
		return d
	}
	for _, tc := range []struct {
		name  string
		delta SnapshotManifest
	}{
		{"other stream", other(func(d *SnapshotManifest) { d.Stream = "other" })},
		{"other range", other(func(d *SnapshotManifest) { d.KeyGroups = KeyGroupRange{Lo: 0, Hi: 6} })},
		{"other table format", other(func(d *SnapshotManifest) { d.TableFormat = "(Pebble,v1)" })},
		{"no runs", other(func(d *SnapshotManifest) { d.Runs = nil })},
		{"a base run", renamed(base, "b2/")},
		{"same names", renamed(delta, "b/")},
		{"older applied", other(func(d *SnapshotManifest) { d.Applied = map[string]uint64{"st/1": 999} })},
		{"log missing", other(func(d *SnapshotManifest) { d.Applied = map[string]uint64{} })},
	} {
		if _, err := renamed(base, "").Append(tc.delta); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", tc.name, err)
		}
	}
	// An invalid chain is refused as such.
	broken := renamed(base, "")
	broken.Runs[0].Delta = true
	if _, err := broken.Append(renamed(delta, "d/")); !errors.Is(err, ErrCorrupt) {
		t.Errorf("append to a chain starting with a delta: %v", err)
	}
}

// TestChangedSet: Add validates like Apply, a change of a cleared state
// is covered by the clear, Len/MemBytes/Reset account entries, and
// ExportChanged refuses a set of another stream.
func TestChangedSet(t *testing.T) {
	cs := NewChangedSet("st")
	put := func(kg uint16, state, key string) segments.Change {
		return segments.Change{Op: segments.OpPut, KeyGroup: kg, State: state, Key: []byte(key)}
	}
	for _, c := range []segments.Change{
		{Op: 0, State: "a"},
		{Op: 9, State: "a"},
		{Op: segments.OpPut, State: strings.Repeat("x", MaxStateLen+1)},
	} {
		if err := cs.Add(c); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("Add(%+v): %v", c.Op, err)
		}
	}
	if err := NewChangedSet("").Add(put(0, "a", "k")); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("empty stream: %v", err)
	}
	if cs.Len() != 0 || cs.MemBytes() != 0 {
		t.Fatalf("rejected changes recorded: %d entries", cs.Len())
	}
	for _, c := range []segments.Change{
		put(1, "a", "k"), put(1, "a", "k"), {Op: segments.OpMerge, KeyGroup: 1, State: "a", Key: []byte("k")},
		{Op: segments.OpDelete, KeyGroup: 1, State: "a", Key: []byte("j")}, put(2, "a", "k"),
	} {
		if err := cs.Add(c); err != nil {
			t.Fatal(err)
		}
	}
	if cs.Len() != 3 {
		t.Fatalf("%d entries, want 3", cs.Len())
	}
	mem := cs.MemBytes()
	if err := cs.Add(segments.Change{Op: segments.OpClear, KeyGroup: 1, State: "a"}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []segments.Change{put(1, "a", "later"), {Op: segments.OpClear, KeyGroup: 1, State: "a"}} {
		if err := cs.Add(c); err != nil {
			t.Fatal(err)
		}
	}
	if cs.Len() != 4 || cs.MemBytes() <= mem {
		t.Fatalf("after clear: %d entries, %d bytes (before %d)", cs.Len(), cs.MemBytes(), mem)
	}
	cs.Reset()
	if cs.Len() != 0 || cs.MemBytes() != 0 || cs.Stream() != "st" {
		t.Fatalf("after reset: %d entries, %d bytes", cs.Len(), cs.MemBytes())
	}

	s := memStore(t, Options{})
	defer s.Close()
	var files memFiles
	for _, c := range []*ChangedSet{nil, NewChangedSet("other")} {
		if _, err := s.ExportChanged(context.Background(), "st", KeyGroupRange{}, c, files.create); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ExportChanged with set %v: %v", c, err)
		}
	}
}

// TestExportChangedAbort: a failing writer fails ExportChanged and is
// aborted, not closed.
func TestExportChangedAbort(t *testing.T) {
	s := memStore(t, Options{TargetFileSize: 1 << 20})
	defer s.Close()
	fill(t, s, 3000, 8, 9)
	cs := NewChangedSet("st")
	for kg := range uint16(8) {
		if err := cs.Add(segments.Change{Op: segments.OpClear, KeyGroup: kg, State: "a"}); err != nil {
			t.Fatal(err)
		}
	}
	aborted := false
	_, err := s.ExportChanged(context.Background(), "st", KeyGroupRange{Lo: 0, Hi: 7}, cs, func(string) (io.WriteCloser, error) {
		return &failingFile{aborted: &aborted}, nil
	})
	if err == nil || !strings.Contains(err.Error(), "disk full") || !aborted {
		t.Fatalf("export = %v, aborted %v", err, aborted)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var files memFiles
	if _, err := s.ExportChanged(ctx, "st", KeyGroupRange{Lo: 0, Hi: 7}, cs, files.create); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled export: %v", err)
	}
}

// FuzzManifestValidate: decoding and validating any manifest, composing
// it with itself and renaming its files never panics, and a valid one
// stays valid through JSON.
func FuzzManifestValidate(f *testing.F) {
	lo, hi, _ := KeyGroupRangeBounds("s", 0, 3)
	k := func(kg uint16, key string) []byte { b, _ := AppendDataKey(nil, "s", kg, "a", []byte(key)); return b }
	mid, _, _ := KeyGroupRangeBounds("s", 2, 3)
	_, kg1End, _ := KeyGroupRangeBounds("s", 1, 1)
	file := func(name string, kgs KeyGroupRange, smallest, largest, start, end []byte) SnapshotFile {
		return SnapshotFile{Name: name, Size: 100, CRC32C: 7, Keys: 2, KeyGroups: kgs, Smallest: smallest, Largest: largest, Start: start, End: end}
	}
	valid := SnapshotManifest{
		Stream: "s", KeyGroups: KeyGroupRange{Lo: 0, Hi: 3}, Applied: map[string]uint64{"s/1": 9}, TableFormat: "(Pebble,v5)",
		Runs: []Run{
			{Files: []SnapshotFile{
				file("b1", KeyGroupRange{Lo: 0, Hi: 1}, k(0, "a"), k(1, "z"), lo, mid),
				file("b2", KeyGroupRange{Lo: 2, Hi: 3}, k(2, "a"), k(3, "z"), mid, hi),
			}, Keys: 4, Bytes: 200},
			{Delta: true, Files: []SnapshotFile{
				file("d1", KeyGroupRange{Lo: 1, Hi: 1}, k(1, ""), k(1, "q"), k(1, ""), kg1End),
				file("d2", KeyGroupRange{Lo: 3, Hi: 3}, k(3, "b"), k(3, "c"), k(3, "b"), k(3, "c\x00")),
			}, Keys: 4, Bytes: 200},
		},
		Keys: 8, Bytes: 400,
	}
	if err := valid.validate(); err != nil {
		f.Fatal(err)
	}
	for _, m := range []SnapshotManifest{valid, {Stream: "s", Runs: []Run{{}}}, {}} {
		b, err := json.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"stream":"s","key_groups":{"Lo":5,"Hi":1},"runs":[{"delta":true,"files":[{"name":"x","size":-1}]}]}`))
	f.Add([]byte(`{"stream":"s","runs":[{"files":[{"name":"x","size":1,"key_groups":{"Lo":65535,"Hi":65535},"start":"AQ==","end":null}]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var m SnapshotManifest
		if json.Unmarshal(data, &m) != nil {
			return
		}
		err := m.validate()
		if err != nil && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("validate: untyped error %v", err)
		}
		_, _ = m.Append(m)
		_ = m.RenameFiles(func(n string) string { return "p/" + n })
		if err != nil {
			return
		}
		b, jerr := json.Marshal(m)
		if jerr != nil {
			t.Fatal(jerr)
		}
		var again SnapshotManifest
		if jerr := json.Unmarshal(b, &again); jerr != nil {
			t.Fatal(jerr)
		}
		if err := again.validate(); err != nil {
			t.Fatalf("valid manifest invalid after JSON: %v", err)
		}
	})
}
