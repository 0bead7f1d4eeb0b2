package server

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// Tests of the read store across restarts (issue 10: a restart reopens the
// store and keeps what is valid; see "Surviving a restart" on PebbleState).

// restartFixture is a changelog node with a stream "s" of 8 key groups and
// one writer of them all, a model of its state per complete checkpoint,
// and a materializer to snapshot it. The read stores under test are opened
// on the same node: its writers are not theirs, so their key groups serve
// the newest complete checkpoint.
type restartFixture struct {
	t     *testing.T
	rng   *rand.Rand
	node  *changelog.Node
	mat   *materializer.Materializer
	w     *changelog.Writer
	model kvModel
	cps   map[uint64]kvModel
	last  uint64 // newest complete checkpoint
	dir   string
	keys  int // distinct keys per key group and state
}

const restartKeyGroups = 8

func newRestartFixture(t *testing.T, rng *rand.Rand) *restartFixture {
	t.Helper()
	ctx := context.Background()
	dirs := newPebbleDirs(t)
	store, err := file.Open(dirs.blob)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	nodeOpts := changelog.Options{Store: store, DataDir: dirs.data, GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close(ctx) })
	if _, err := node.CreateStream(ctx, "s", restartKeyGroups); err != nil {
		t.Fatal(err)
	}
	// Small files: a snapshot of a few hundred keys is several files.
	m, err := materializer.New(node, filepath.Join(dirs.data, "mat"), materializer.Config{Store: materializer.Options{TargetFileSize: 2 << 10}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	f := &restartFixture{t: t, rng: rng, node: node, mat: m, model: kvModel{}, cps: map[uint64]kvModel{0: {}}, dir: dirs.state, keys: 20}
	f.w = f.open(0)
	return f
}

func (f *restartFixture) open(from uint64) *changelog.Writer {
	f.t.Helper()
	w, err := f.node.OpenWriter(context.Background(), changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Full(restartKeyGroups), FromCheckpoint: from})
	if err != nil {
		f.t.Fatal(err)
	}
	return w
}

// changes returns n random changes of key groups r (merges for the most
// part: folding one twice, or a mix of two checkpoints, shows).
func (f *restartFixture) changes(n int, r keygroup.Range) []changelog.Change {
	var out []changelog.Change
	for range n {
		op := []changelog.Op{changelog.OpPut, changelog.OpMerge, changelog.OpMerge, changelog.OpMerge, changelog.OpDelete, changelog.OpClear}[f.rng.IntN(6)]
		if op == changelog.OpClear && f.rng.IntN(4) > 0 {
			op = changelog.OpMerge
		}
		c := changelog.Change{
			KeyGroup: r.Lo + uint16(f.rng.IntN(int(r.Hi-r.Lo)+1)), State: []string{"a", "b"}[f.rng.IntN(2)], Op: op,
			Key: fmt.Appendf(nil, "k%03d", f.rng.IntN(f.keys)), Value: []byte(strconv.Itoa(f.rng.IntN(100))),
		}
		if op == changelog.OpDelete || op == changelog.OpClear {
			c.Value = nil
		}
		out = append(out, c)
	}
	return out
}

// append appends n random changes through the fixture's writer.
func (f *restartFixture) append(n int) {
	f.t.Helper()
	if n == 0 {
		return
	}
	batch := f.changes(n, keygroup.Full(restartKeyGroups))
	if _, _, err := f.w.Append(context.Background(), batch, changelog.Buffered); err != nil {
		f.t.Fatal(err)
	}
	for _, c := range batch {
		f.model.apply(c)
	}
}

// checkpoint completes the next checkpoint, and snapshots it with snap.
func (f *restartFixture) checkpoint(snap bool) uint64 {
	f.t.Helper()
	ctx := context.Background()
	id := f.last + 1
	if res, err := f.w.Checkpoint(ctx, id, nil); err != nil || !res.Complete {
		f.t.Fatalf("checkpoint %d: %+v %v", id, res, err)
	}
	f.last = id
	f.cps[id] = maps.Clone(f.model)
	if snap {
		if res, err := f.mat.MaterializeStream(ctx, "s", true); err != nil || res.Snapshot == nil {
			f.t.Fatalf("materialize: %+v %v", res, err)
		}
	}
	return id
}

// rollback reopens the writer from an older checkpoint (another lineage).
func (f *restartFixture) rollback(to uint64) {
	f.t.Helper()
	if err := f.w.Close(context.Background()); err != nil {
		f.t.Fatal(err)
	}
	f.w = f.open(to)
	f.model = maps.Clone(f.cps[to])
}

// check compares key groups r of the read store with the model at the
// newest complete checkpoint.
func (f *restartFixture) check(what string, ps *PebbleState, r keygroup.Range) {
	f.t.Helper()
	got := psEntries(f.t, ps, r)
	want := f.cps[f.last].entries(r)
	if !slices.Equal(got, want) {
		f.t.Fatalf("%s: key groups %s at checkpoint %d:\n got  %v\n want %v", what, r, f.last, got, want)
	}
}

func psEntries(t *testing.T, ps *PebbleState, r keygroup.Range) []string {
	t.Helper()
	es, more, err := ps.Scan(context.Background(), ScanQuery{Stream: "s", KeyGroups: r, Limit: 1 << 30})
	if err != nil || more {
		t.Fatalf("scan %s: more %v, %v", r, more, err)
	}
	out := make([]string, 0, len(es))
	for _, e := range es {
		out = append(out, fmt.Sprintf("%d/%s/%s=%s", e.KeyGroup, e.State, e.Key, e.Value))
	}
	return out
}

type kvKey struct {
	kg         uint16
	state, key string
}

// kvModel is the state a sequence of changes makes.
type kvModel map[kvKey]string

func (m kvModel) apply(c changelog.Change) {
	k := kvKey{c.KeyGroup, c.State, string(c.Key)}
	switch c.Op {
	case changelog.OpPut:
		m[k] = string(c.Value)
	case changelog.OpDelete:
		delete(m, k)
	case changelog.OpMerge:
		m[k] += string(c.Value)
	case changelog.OpClear:
		maps.DeleteFunc(m, func(o kvKey, _ string) bool { return o.kg == c.KeyGroup && o.state == c.State })
	}
}

// entries lists the keys of r in scan order (key group, state, key).
func (m kvModel) entries(r keygroup.Range) []string {
	keys := slices.SortedFunc(maps.Keys(m), func(a, b kvKey) int {
		switch {
		case a.kg != b.kg:
			return int(a.kg) - int(b.kg)
		case a.state != b.state:
			if a.state < b.state {
				return -1
			}
			return 1
		case a.key < b.key:
			return -1
		case a.key > b.key:
			return 1
		}
		return 0
	})
	out := []string{}
	for _, k := range keys {
		if r.Contains(k.kg) {
			out = append(out, fmt.Sprintf("%d/%s/%s=%s", k.kg, k.state, k.key, m[k]))
		}
	}
	return out
}

func openTestPebbleState(t *testing.T, node *changelog.Node, dir string, opts PebbleStateOptions) *PebbleState {
	t.Helper()
	ps, err := OpenPebbleState(node, dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	ps.refreshEvery = 0
	t.Cleanup(func() { ps.Close() })
	return ps
}

// TestReadStoreSurvivesRestart: after a clean shutdown, the key groups
// that held the newest checkpoint serve it at once from what is on disk,
// without importing or folding anything again; files still remote keep
// hydrating (the reopened store references them and reports the
// progress); the previous process's applied SQNs are gone; a newer
// checkpoint then advances the kept key groups incrementally.
func TestReadStoreSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	f := newRestartFixture(t, rand.New(rand.NewPCG(1, 2)))
	// A base snapshot (one run of several files) and no changelog tail
	// after it: nothing folded overlaps the files, so Pebble does not
	// compact them into local tables before the hydrator gets to them.
	f.keys = 500
	f.append(2000)
	f.checkpoint(true)
	all := keygroup.Full(restartKeyGroups)

	// 1 byte/s: the hydrator makes at most one file local before the
	// restart, so some are still remote.
	ps := openTestPebbleState(t, f.node, f.dir, PebbleStateOptions{HydrateBandwidth: 1})
	f.check("first open", ps, all)
	if ps.imports.Load() == 0 || ps.refolds.Load() == 0 {
		t.Fatalf("first open: %d imports, %d refolds, want some", ps.imports.Load(), ps.refolds.Load())
	}
	pending := 0
	for _, h := range ps.store.Hydration() {
		pending += h.TotalFiles - h.LocalFiles
	}
	t.Logf("before the restart: %+v", ps.store.Hydration())
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}

	ps = openTestPebbleState(t, f.node, f.dir, PebbleStateOptions{HydrateBandwidth: -1})
	if ps.kept != restartKeyGroups {
		t.Fatalf("reopened keeping %d key groups, want %d", ps.kept, restartKeyGroups)
	}
	h := ps.store.Hydration()
	t.Logf("%d files pending at the restart; reopened with %+v", pending, h)
	total := 0
	for _, h := range h {
		total += h.TotalFiles
	}
	// Pending files go on hydrating, none is imported again (a file
	// Pebble compacted meanwhile is local already: fewer is fine).
	if total > pending || (pending > 0 && total == 0) {
		t.Fatalf("%d files pending at the restart, %d after it", pending, total)
	}
	f.check("reopened", ps, all)
	if n, r, a := ps.imports.Load(), ps.refolds.Load(), ps.advances.Load(); n != 0 || r != 0 || a != 0 {
		t.Fatalf("reopened: %d imports, %d refolds, %d advances, want none", n, r, a)
	}
	hctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := ps.store.WaitHydrated(hctx); err != nil {
		t.Fatal(err)
	}
	if hy, ok := ps.Hydration("s"); total > 0 && (!ok || hy.LocalBytes != hy.TotalBytes || hy.TotalFiles == 0) {
		t.Fatalf("hydration after the reopen: %v %v", hy, ok)
	}
	f.check("reopened, hydrated", ps, all)

	f.append(100)
	f.checkpoint(false)
	f.check("a newer checkpoint", ps, all)
	if n, r, a := ps.imports.Load(), ps.refolds.Load(), ps.advances.Load(); n != 0 || r != 0 || a != 1 {
		t.Fatalf("after a newer checkpoint: %d imports, %d refolds, %d advances, want 0, 0, 1", n, r, a)
	}
	applied, err := ps.store.Applied("s")
	if err != nil || len(applied) == 0 {
		t.Fatalf("applied SQNs after the advance: %v %v", applied, err)
	}
	for id := range applied {
		if !strings.Contains(id, ps.gen) {
			t.Fatalf("applied SQN of log %q: not this process's (%s)", id, ps.gen)
		}
	}

	// Restart again: the advanced key groups are kept at the newer
	// checkpoint, and the applied SQNs of the previous process are gone
	// (a new process's fold ids could otherwise match them and skip).
	gen := ps.gen
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
	ps = openTestPebbleState(t, f.node, f.dir, PebbleStateOptions{HydrateBandwidth: -1})
	if a, err := ps.store.Applied("s"); err != nil || len(a) != 0 {
		t.Fatalf("applied SQNs of the previous process after the reopen: %v %v", a, err)
	}
	if ps.gen == gen || ps.kept != restartKeyGroups {
		t.Fatalf("second reopen: fold id prefix %s (was %s), %d key groups kept", ps.gen, gen, ps.kept)
	}
	f.check("reopened after the advance", ps, all)
	if n, r, a := ps.imports.Load(), ps.refolds.Load(), ps.advances.Load(); n != 0 || r != 0 || a != 0 {
		t.Fatalf("reopened after the advance: %d imports, %d refolds, %d advances, want none", n, r, a)
	}
}

// TestReadStoreWriterViewNotKept: a writer's view holds changes no
// checkpoint has; after a restart (clean, or a crash after the view was
// flushed to disk) its key groups serve the checkpoint, never the view,
// until the writer opens again; the key groups without a writer are kept.
func TestReadStoreWriterViewNotKept(t *testing.T) {
	ctx := context.Background()
	f := newRestartFixture(t, rand.New(rand.NewPCG(3, 4)))
	f.append(200)
	f.checkpoint(true)
	if err := f.w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, crash := range []bool{false, true} {
		t.Run(fmt.Sprintf("crash=%v", crash), func(t *testing.T) {
			fs := vfs.NewCrashableMem()
			opts := PebbleStateOptions{fs: fs, HydrateBandwidth: -1}
			ps := openTestPebbleState(t, f.node, "/state", opts)
			f.check("no writer", ps, keygroup.Full(restartKeyGroups))
			// A writer of key groups 0..3 on this store, with changes
			// after the checkpoint.
			r := keygroup.Range{Lo: 0, Hi: 3}
			w, err := f.node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: r})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close(ctx)
			if err := ps.WriterOpened(ctx, w); err != nil {
				t.Fatal(err)
			}
			view := maps.Clone(f.cps[f.last])
			for range 5 {
				batch := f.changes(20, r)
				first, _, err := w.Append(ctx, batch, changelog.Buffered)
				if err != nil {
					t.Fatal(err)
				}
				for _, c := range batch {
					view.apply(c)
				}
				ps.Appended("s", w.LogID(), first, slices.Clone(batch))
			}
			if got, want := psEntries(t, ps, r), view.entries(r); !slices.Equal(got, want) {
				t.Fatalf("the writer's view: %v, want %v", got, want)
			}
			if err := ps.store.Flush(); err != nil { // the view is on disk
				t.Fatal(err)
			}
			if crash {
				fs = fs.CrashClone(vfs.CrashCloneCfg{})
			}
			if err := ps.Close(); err != nil {
				t.Fatal(err)
			}
			opts.fs = fs
			ps = openTestPebbleState(t, f.node, "/state", opts)
			if ps.kept != restartKeyGroups-4 {
				t.Fatalf("kept %d key groups, want the %d without a writer", ps.kept, restartKeyGroups-4)
			}
			f.check("after the restart", ps, keygroup.Full(restartKeyGroups))
			if ps.refolds.Load() != 1 {
				t.Fatalf("%d refolds, want 1 (the writer's key groups)", ps.refolds.Load())
			}
			// The writer opens again: its view is back.
			if err := ps.WriterOpened(ctx, w); err != nil {
				t.Fatal(err)
			}
			if got, want := psEntries(t, ps, r), view.entries(r); !slices.Equal(got, want) {
				t.Fatalf("the writer's view after it opened again: %v, want %v", got, want)
			}
		})
	}
}

// TestReadStoreCrashMidWriterOpen: a crash at each step of a writer's
// open over key groups that held the checkpoint, durably marked clean:
// the reopened store never serves the half-built view as the checkpoint
// (the writer mark was on disk before the range was dropped).
func TestReadStoreCrashMidWriterOpen(t *testing.T) {
	ctx := context.Background()
	f := newRestartFixture(t, rand.New(rand.NewPCG(7, 8)))
	f.append(200)
	f.checkpoint(true)
	if err := f.w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	all, r := keygroup.Full(restartKeyGroups), keygroup.Range{Lo: 0, Hi: 3}
	for _, at := range []string{"writer marked", "dropped", "imported", "folded"} {
		t.Run(at, func(t *testing.T) {
			fs := vfs.NewCrashableMem()
			ps := openTestPebbleState(t, f.node, "/state", PebbleStateOptions{fs: fs, HydrateBandwidth: -1})
			f.check("no writer", ps, all)
			if err := ps.store.Flush(); err != nil { // the clean marks are on disk
				t.Fatal(err)
			}
			w, err := f.node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: r})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close(ctx)
			if _, _, err := w.Append(ctx, f.changes(50, r), changelog.Buffered); err != nil {
				t.Fatal(err)
			}
			var crashed *vfs.MemFS
			hook := func(step string) {
				if crashed != nil {
					return
				}
				// Memtable pressure at the steps before the crash (a flush
				// right before it would make the marks durable anyway).
				if step != at && !strings.HasSuffix(step, "marked") {
					if err := ps.store.Flush(); err != nil {
						t.Error(err)
					}
				}
				if step == at {
					crashed = fs.CrashClone(vfs.CrashCloneCfg{})
				}
			}
			ps.stepHook.Store(&hook)
			if err := ps.WriterOpened(ctx, w); err != nil {
				t.Fatal(err)
			}
			ps.stepHook.Store(nil)
			if crashed == nil {
				t.Fatalf("no step %q", at)
			}
			ps2 := openTestPebbleState(t, f.node, "/state", PebbleStateOptions{fs: crashed, HydrateBandwidth: -1})
			if ps2.kept != restartKeyGroups-4 {
				t.Errorf("kept %d key groups, want %d", ps2.kept, restartKeyGroups-4)
			}
			f.check("reopened", ps2, all)
		})
	}
}

// TestReadStoreCrashMidChange: the read store "crashes" (a copy of its
// file system with only what was synced, or some of the rest too) at a
// random step of advancing, dropping and restoring key-group ranges to a
// newer checkpoint, sometimes after a memtable flush there (as memtable
// pressure would): the store reopened on the copy serves exactly the
// newest checkpoint, never a mix of two (the range being changed was
// marked dirty on disk first, so it is dropped and refolded).
func TestReadStoreCrashMidChange(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("DSTL_MODEL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (DSTL_MODEL_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, 5))
	f := newRestartFixture(t, rng)
	fs := vfs.NewCrashableMem()
	// A small memtable: folds flush in the middle too.
	ps := openTestPebbleState(t, f.node, "/state", PebbleStateOptions{fs: fs, HydrateBandwidth: -1, memTableSize: 256 << 10})
	all := keygroup.Full(restartKeyGroups)
	kept, crashes := 0, 0
	for round := range 24 {
		if rng.IntN(2) == 0 {
			// Time passes: what the last round marked clean is on disk.
			if err := ps.store.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		f.append(50 + rng.IntN(300))
		switch x := rng.IntN(10); {
		case x < 4 && f.last > 1:
			// (FromCheckpoint 0 means the newest: roll back to 1 at most.)
			f.rollback(max(1, f.last-1-uint64(rng.IntN(2))))
			f.append(1 + rng.IntN(50))
		case x < 6:
			f.checkpoint(true)
			f.append(rng.IntN(50))
		}
		f.checkpoint(false)

		// Crash at the at-th step of the refresh (or after it).
		at, n := 1+rng.IntN(12), 0
		var crashed *vfs.MemFS
		hook := func(step string) {
			if crashed != nil {
				return
			}
			// Memtable pressure, but not right after a mark: that would
			// make it durable whether or not the protocol flushes it.
			if !strings.HasSuffix(step, "marked") && rng.IntN(3) == 0 {
				if err := ps.store.Flush(); err != nil {
					t.Error(err)
				}
			}
			if n++; n == at {
				t.Logf("round %d: crash at step %d (%s)", round, n, step)
				crashed = fs.CrashClone(crashCfg(rng))
			}
		}
		ps.stepHook.Store(&hook)
		// A read of some key groups, then of all.
		lo := uint16(rng.IntN(restartKeyGroups))
		r := keygroup.Range{Lo: lo, Hi: lo + uint16(rng.IntN(restartKeyGroups-int(lo)))}
		f.check(fmt.Sprintf("round %d", round), ps, r)
		f.check(fmt.Sprintf("round %d", round), ps, all)
		ps.stepHook.Store(nil)
		if crashed == nil {
			t.Logf("round %d: crash after the read (%d steps)", round, n)
			crashed = fs.CrashClone(crashCfg(rng))
		}
		crashes++
		ps2, err := OpenPebbleState(f.node, "/state", PebbleStateOptions{fs: crashed, HydrateBandwidth: -1})
		if err != nil {
			t.Fatal(err)
		}
		ps2.refreshEvery = 0
		t.Cleanup(func() { ps2.Close() })
		kept += ps2.kept
		f.check(fmt.Sprintf("round %d: reopened after the crash, %d key groups kept", round, ps2.kept), ps2, all)
		if err := ps2.Close(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d crashes, %d key groups kept over them", crashes, kept)
	if kept == 0 {
		t.Fatal("no crash kept any key group: the test does not exercise the marks")
	}
}

func crashCfg(rng *rand.Rand) vfs.CrashCloneCfg {
	if rng.IntN(2) == 0 {
		return vfs.CrashCloneCfg{}
	}
	return vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(100), RNG: rand.New(rand.NewPCG(rng.Uint64(), 0))}
}

// TestReadStoreDropsRangesWithFilesGone: snapshot files a kept range still
// read from the blob store (not hydrated yet) and that the blob store no
// longer has when the node starts (collected while it was down): the
// stream's ranges are not kept, they could only fail reads.
func TestReadStoreDropsRangesWithFilesGone(t *testing.T) {
	ctx := context.Background()
	f := newRestartFixture(t, rand.New(rand.NewPCG(5, 6)))
	f.keys = 500
	f.append(2000)
	f.checkpoint(true)
	ps := openTestPebbleState(t, f.node, f.dir, PebbleStateOptions{HydrateBandwidth: 1})
	f.check("first open", ps, keygroup.Full(restartKeyGroups))
	if h := ps.store.Hydration(); len(h) == 0 || h[0].Done() {
		t.Fatalf("nothing pending: %+v", h)
	}
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
	blob := f.node.BlobStore()
	n := 0
	for o, err := range upload.Walk(ctx, blob, "streams/s/", "") {
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(o.Key, "/sst/") {
			if err := blob.Delete(ctx, o.Key); err != nil {
				t.Fatal(err)
			}
			n++
		}
	}
	if n == 0 {
		t.Fatal("no snapshot file found to delete")
	}
	ps = openTestPebbleState(t, f.node, f.dir, PebbleStateOptions{HydrateBandwidth: -1})
	if ps.kept != 0 || len(ps.store.Hydration()) != 0 {
		t.Fatalf("%d snapshot files deleted; reopened keeping %d key groups, hydrating %+v", n, ps.kept, ps.store.Hydration())
	}
}
