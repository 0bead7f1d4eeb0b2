package materializer_test

import (
	"context"
	"errors"
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

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestMaterializeModel drives a real changelog node (writers appending,
// checkpointing, closing, being fenced and rescaled) and a materializer on
// its own node ("remote", behind a blob store that injects put failures),
// with materializer crashes (closed mid-way, local stores wiped), log
// truncation below snapshots, and garbage collection of segments, snapshot
// records and snapshot files. After random steps, every retained
// checkpoint is restored on an empty store (snapshot import + changelog
// tail) and compared with a map model of that checkpoint (brief
// invariants 1, 4 and 5). It ends with the no-leak check: the blob store
// holds exactly the snapshot files and records that something uses.
// DSTL_MODEL_SEED replays one seed.
func TestMaterializeModel(t *testing.T) {
	seeds := []uint64{1, 2, 3}
	if s := os.Getenv("DSTL_MODEL_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("DSTL_MODEL_SEED: %v", err)
		}
		seeds = []uint64{v}
	} else {
		seeds = append(seeds, uint64(time.Now().UnixNano()))
	}
	steps := 160
	if testing.Short() {
		steps = 60
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("replay with DSTL_MODEL_SEED=%d", seed)
			runMatModel(t, seed, steps)
		})
	}
}

const (
	mmStream    = "orders"
	mmKeyGroups = 8
	mmRetain    = 3
)

type mmWriter struct {
	w *changelog.Writer
	r keygroup.Range
}

type matModel struct {
	t     *testing.T
	ctx   context.Context
	rnd   *rand.Rand
	dir   string
	inner upload.BlobStore
	fault *faulty.Store

	node    *changelog.Node // the writers' node
	matNode *changelog.Node // the materializer's node (reads through fault)
	mat     *materializer.Materializer
	matDir  string

	writers []mmWriter
	live    map[string]string            // acknowledged state
	ckpts   map[uint64]map[string]string // state at each complete checkpoint
	next    uint64                       // next checkpoint id

	snapshots, deltas, crashes, verified, needSnapshot, rollbacks int
}

func runMatModel(t *testing.T, seed uint64, steps int) {
	ctx := context.Background()
	dir := t.TempDir()
	inner, err := file.Open(filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	m := &matModel{
		t: t, ctx: ctx, rnd: rand.New(rand.NewPCG(seed, seed+1)), dir: dir, inner: inner,
		fault:  faulty.Wrap(inner, faulty.Options{Seed: seed}),
		live:   map[string]string{},
		ckpts:  map[uint64]map[string]string{},
		next:   1,
		matDir: filepath.Join(dir, "materializer"),
	}
	m.node = m.openNode(inner, "writers")
	m.matNode = m.openNode(m.fault, "matnode")
	t.Cleanup(func() {
		if m.mat != nil {
			_ = m.mat.Close()
		}
		_ = m.matNode.Close(ctx)
		_ = m.node.Close(ctx)
	})
	if _, err := m.node.CreateStream(ctx, mmStream, mmKeyGroups); err != nil {
		t.Fatal(err)
	}
	m.openMaterializer()
	m.reopenWriters()

	for i := 0; i < steps; i++ {
		switch p := m.rnd.IntN(100); {
		case p < 40:
			m.appendBatch()
		case p < 55:
			m.checkpoint()
		case p < 70:
			m.materialize()
		case p < 75:
			m.crashMaterializer()
		case p < 85:
			m.collect()
		case p < 87:
			m.reopenWriters()
		case p < 90:
			m.rollbackOne()
		default:
			m.verifyRetained()
		}
	}
	// Settle: a checkpoint, a clean snapshot, truncation and collection
	// with the grace period passed twice; then everything retained must
	// restore and nothing unused may remain.
	m.fault.SetAll(faulty.Faults{})
	m.checkpoint()
	if _, err := m.mat.MaterializeStream(ctx, mmStream, true); err != nil {
		t.Fatalf("final materialize: %v", err)
	}
	for range 3 {
		m.collectStrict()
		time.Sleep(5 * time.Millisecond)
	}
	m.verifyRetained()
	m.checkNoLeaks()
	t.Logf("%d snapshots (%d deltas), %d materializer crashes, %d partial rollbacks, %d checkpoint restores verified, %d of them impossible without a snapshot (truncated logs)", m.snapshots, m.deltas, m.crashes, m.rollbacks, m.verified, m.needSnapshot)
	if m.snapshots == 0 || m.verified == 0 {
		t.Fatalf("the run exercised nothing: %d snapshots, %d restores", m.snapshots, m.verified)
	}
}

func (m *matModel) openNode(store upload.BlobStore, name string) *changelog.Node {
	o := changelog.Options{Store: store, DataDir: filepath.Join(m.dir, name), GCInterval: -1, GCGrace: time.Nanosecond, RetainCheckpoints: mmRetain}
	o.Scheduler.BatchDelay = time.Millisecond
	o.Scheduler.Interval = -1
	n, err := changelog.Open(m.ctx, o)
	if err != nil {
		m.t.Fatal(err)
	}
	return n
}

func (m *matModel) openMaterializer() {
	mat, err := materializer.New(m.matNode, m.matDir, materializer.Config{
		GCGrace: time.Millisecond, ReleasedGrace: time.Millisecond, Seed: m.rnd.Uint64() | 1,
		// Small files and a low delta ratio: many files, base and delta
		// snapshots both happen.
		MaxDeltaRatio: 0.5,
		Store:         materializer.Options{TargetFileSize: 4 << 10},
	})
	if err != nil {
		m.t.Fatal(err)
	}
	m.mat = mat
}

func mmKey(kg uint16, state, key string) string { return fmt.Sprintf("%d/%s/%s", kg, state, key) }

func (m *matModel) appendBatch() {
	wi := m.rnd.IntN(len(m.writers))
	w := m.writers[wi]
	n := 1 + m.rnd.IntN(20)
	batch := make([]changelog.Change, 0, n)
	for range n {
		kg := w.r.Lo + uint16(m.rnd.IntN(int(w.r.Hi-w.r.Lo)+1))
		state := []string{"a", "b"}[m.rnd.IntN(2)]
		key := fmt.Sprintf("k%02d", m.rnd.IntN(30))
		c := changelog.Change{KeyGroup: kg, State: state, Key: []byte(key)}
		switch p := m.rnd.IntN(100); {
		case p < 55:
			c.Op, c.Value = changelog.OpPut, []byte(fmt.Sprintf("v%d", m.rnd.IntN(1000)))
		case p < 80:
			c.Op, c.Value = changelog.OpMerge, []byte(fmt.Sprintf("+%d", m.rnd.IntN(10)))
		case p < 97:
			c.Op = changelog.OpDelete
		default:
			c.Op, c.Key = changelog.OpClear, nil
		}
		batch = append(batch, c)
	}
	if _, _, err := w.w.Append(m.ctx, batch, changelog.Buffered); err != nil {
		m.t.Fatalf("append: %v", err)
	}
	for _, c := range batch {
		k := mmKey(c.KeyGroup, c.State, string(c.Key))
		switch c.Op {
		case changelog.OpPut:
			m.live[k] = string(c.Value)
		case changelog.OpMerge:
			m.live[k] += string(c.Value)
		case changelog.OpDelete:
			delete(m.live, k)
		case changelog.OpClear:
			prefix := mmKey(c.KeyGroup, c.State, "")
			for k := range m.live {
				if strings.HasPrefix(k, prefix) {
					delete(m.live, k)
				}
			}
		}
	}
}

func (m *matModel) checkpoint() {
	id := m.next
	m.next++
	complete := false
	for _, w := range m.writers {
		res, err := w.w.Checkpoint(m.ctx, id, nil)
		if err != nil {
			m.t.Fatalf("checkpoint %d: %v", id, err)
		}
		complete = complete || res.Complete
	}
	if !complete {
		m.t.Fatalf("checkpoint %d: not complete after every writer recorded its part", id)
	}
	m.ckpts[id] = maps.Clone(m.live)
}

// latest returns the newest complete checkpoint (0: none).
func (m *matModel) latest() uint64 {
	cps, err := m.node.Checkpoints(m.ctx, mmStream)
	if err != nil {
		m.t.Fatal(err)
	}
	if len(cps) == 0 {
		return 0
	}
	return cps[len(cps)-1].ID
}

// reopenWriters closes (or abandons, so they get fenced) the writers and
// opens 1 or 2 new ones over a new split, from the newest checkpoint: the
// state falls back to that checkpoint's.
func (m *matModel) reopenWriters() {
	closeOld := m.rnd.IntN(2) == 0
	if closeOld {
		for _, w := range m.writers {
			if err := w.w.Close(m.ctx); err != nil {
				m.t.Fatalf("close: %v", err)
			}
		}
	}
	from := m.latest()
	var ranges []keygroup.Range
	if m.rnd.IntN(2) == 0 {
		ranges = []keygroup.Range{{Lo: 0, Hi: mmKeyGroups - 1}}
	} else {
		cut := uint16(1 + m.rnd.IntN(mmKeyGroups-1))
		ranges = []keygroup.Range{{Lo: 0, Hi: cut - 1}, {Lo: cut, Hi: mmKeyGroups - 1}}
	}
	old := m.writers
	m.writers = nil
	for _, r := range ranges {
		w, err := m.node.OpenWriter(m.ctx, changelog.WriterConfig{Stream: mmStream, KeyGroups: r, FromCheckpoint: from})
		if err != nil {
			m.t.Fatalf("open writer %s from %d: %v", r, from, err)
		}
		m.writers = append(m.writers, mmWriter{w: w, r: r})
	}
	if !closeOld {
		for _, w := range old {
			// Fenced: closing it now is a no-op that must not fail.
			if err := w.w.Close(m.ctx); err != nil && !errors.Is(err, changelog.ErrFenced) {
				m.t.Fatalf("close fenced writer: %v", err)
			}
		}
	}
	if from == 0 {
		m.live = map[string]string{}
	} else {
		m.live = maps.Clone(m.ckpts[from])
	}
}

// rollbackOne replaces one writer by a new epoch over the same key groups
// started from a random retained (often older) checkpoint, while the other
// writers carry on: that range falls back to the checkpoint's state.
func (m *matModel) rollbackOne() {
	cps, err := m.node.Checkpoints(m.ctx, mmStream)
	if err != nil {
		m.t.Fatal(err)
	}
	if len(cps) == 0 {
		return
	}
	if len(cps) > mmRetain {
		cps = cps[len(cps)-mmRetain:]
	}
	from := cps[m.rnd.IntN(len(cps))].ID
	i := m.rnd.IntN(len(m.writers))
	old := m.writers[i]
	if m.rnd.IntN(2) == 0 {
		if err := old.w.Close(m.ctx); err != nil {
			m.t.Fatalf("close: %v", err)
		}
	}
	w, err := m.node.OpenWriter(m.ctx, changelog.WriterConfig{Stream: mmStream, KeyGroups: old.r, FromCheckpoint: from})
	if err != nil {
		m.t.Fatalf("open writer %s from %d: %v", old.r, from, err)
	}
	if err := old.w.Close(m.ctx); err != nil && !errors.Is(err, changelog.ErrFenced) {
		m.t.Fatalf("close fenced writer: %v", err)
	}
	m.writers[i] = mmWriter{w: w, r: old.r}
	inRange := func(k string) bool {
		kg, _, _ := strings.Cut(k, "/")
		v, err := strconv.Atoi(kg)
		return err == nil && v >= int(old.r.Lo) && v <= int(old.r.Hi)
	}
	maps.DeleteFunc(m.live, func(k, _ string) bool { return inRange(k) })
	for k, v := range m.ckpts[from] {
		if inRange(k) {
			m.live[k] = v
		}
	}
	m.rollbacks++
}

// materialize snapshots the newest checkpoint, sometimes through a blob
// store that fails puts (an interrupted upload: the snapshot fails and its
// files are garbage).
func (m *matModel) materialize() {
	faults := m.rnd.IntN(4) == 0
	if faults {
		m.fault.SetFaults(faulty.OpPut, faulty.Faults{Transient: 0.5})
	}
	res, err := m.mat.MaterializeStream(m.ctx, mmStream, true)
	m.fault.SetFaults(faulty.OpPut, faulty.Faults{})
	if err != nil {
		if !faults {
			m.t.Fatalf("materialize: %v", err)
		}
		return
	}
	if res.Snapshot != nil {
		m.snapshots++
		if !res.Base {
			m.deltas++
		}
	}
}

// crashMaterializer closes the materializer (as if its process died
// between two calls) and sometimes loses its local stores; the next one
// must carry on from the blob store.
func (m *matModel) crashMaterializer() {
	m.crashes++
	if err := m.mat.Close(); err != nil {
		m.t.Fatalf("close materializer: %v", err)
	}
	if m.rnd.IntN(2) == 0 {
		if err := os.RemoveAll(m.matDir); err != nil {
			m.t.Fatal(err)
		}
	}
	m.openMaterializer()
}

// collect truncates logs below snapshots and collects garbage everywhere,
// tolerating injected failures.
func (m *matModel) collect() {
	if _, err := m.node.AdoptSnapshots(m.ctx); err != nil {
		m.t.Fatalf("adopt snapshots: %v", err)
	}
	if _, err := m.node.CollectGarbage(m.ctx); err != nil {
		m.t.Fatalf("gc: %v", err)
	}
	if _, err := m.mat.CollectFiles(m.ctx, mmStream); err != nil {
		m.t.Fatalf("collect files: %v", err)
	}
}

func (m *matModel) collectStrict() {
	m.collect()
	if _, err := m.matNode.CollectGarbage(m.ctx); err != nil {
		m.t.Fatalf("materializer node gc: %v", err)
	}
}

// verifyRetained restores every retained checkpoint on an empty store and
// compares it with the model.
func (m *matModel) verifyRetained() {
	cps, err := m.node.Checkpoints(m.ctx, mmStream)
	if err != nil {
		m.t.Fatal(err)
	}
	if len(cps) > mmRetain {
		cps = cps[len(cps)-mmRetain:]
	}
	for _, cp := range cps {
		got := restoreOnEmptyStore(m.t, m.ctx, m.node, mmStream, cp.ID, keygroup.Range{Lo: 0, Hi: mmKeyGroups - 1})
		want := m.ckpts[cp.ID]
		if !maps.Equal(got, want) {
			m.t.Fatalf("restore of checkpoint %d differs from the model:\n%s", cp.ID, diffMaps(want, got))
		}
		m.verified++
		// Count the restores that only a snapshot makes possible: the
		// changelog alone lost a truncated prefix.
		if _, err := m.node.PlanRestoreFrom(m.ctx, mmStream, cp.ID, keygroup.Range{Lo: 0, Hi: mmKeyGroups - 1}, nil); errors.Is(err, changelog.ErrLogTruncated) {
			m.needSnapshot++
		}
	}
}

// restoreOnEmptyStore rebuilds key groups r of a checkpoint in a fresh
// store, the way a node with an empty disk does, and returns its state.
func restoreOnEmptyStore(t *testing.T, ctx context.Context, node *changelog.Node, stream string, id uint64, r keygroup.Range) map[string]string {
	t.Helper()
	st, err := materializer.Open(t.TempDir(), materializer.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pl, err := node.PlanRestore(ctx, stream, id, r)
	if err != nil {
		t.Fatalf("plan restore of checkpoint %d: %v", id, err)
	}
	for _, b := range pl.Bases {
		if err := st.ImportSnapshot(ctx, node.BlobStore(), b.Snapshot, b.Ranges, materializer.ImportOptions{SkipApplied: true}); err != nil {
			t.Fatalf("import snapshot of checkpoint %d for %d: %v", b.Snapshot.Checkpoint, id, err)
		}
	}
	var batch []segments.Change
	var sqn uint64
	for c, err := range node.ReplayPlan(ctx, pl) {
		if err != nil {
			t.Fatalf("replay checkpoint %d: %v", id, err)
		}
		sqn++
		c.SQN, c.LogID = sqn, ""
		c.Key, c.Value = slices.Clone(c.Key), slices.Clone(c.Value)
		batch = append(batch, c)
	}
	if len(batch) > 0 {
		if err := st.Apply(stream, "restore", batch); err != nil {
			t.Fatal(err)
		}
	}
	states, err := st.StateNames(ctx, stream, r)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, state := range states {
		for e, err := range st.Scan(ctx, stream, r, state, materializer.ScanOptions{}) {
			if err != nil {
				t.Fatal(err)
			}
			got[mmKey(e.KeyGroup, state, string(e.Key))] = string(e.Value)
		}
	}
	return got
}

func diffMaps(want, got map[string]string) string {
	var b strings.Builder
	keys := slices.Sorted(maps.Keys(want))
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	n := 0
	for _, k := range keys {
		w, wok := want[k]
		g, gok := got[k]
		if w == g && wok == gok {
			continue
		}
		if n++; n > 20 {
			b.WriteString("  ...\n")
			break
		}
		fmt.Fprintf(&b, "  %s: want %q (%v), got %q (%v)\n", k, w, wok, g, gok)
	}
	return b.String()
}

// checkNoLeaks: every snapshot file is referenced by an existing record,
// and every record is the newest or the base of a retained checkpoint's
// restore plan.
func (m *matModel) checkNoLeaks() {
	snaps, err := m.node.Snapshots(m.ctx, mmStream)
	if err != nil {
		m.t.Fatal(err)
	}
	referenced := map[string]bool{}
	for _, s := range snaps {
		man, err := materializer.DecodeManifest(s)
		if err != nil {
			m.t.Fatal(err)
		}
		for _, r := range man.Runs {
			for _, f := range r.Files {
				referenced[f.Name] = true
			}
		}
	}
	cfg, err := m.node.Stream(m.ctx, mmStream)
	if err != nil {
		m.t.Fatal(err)
	}
	for o, err := range upload.Walk(m.ctx, m.inner, changelog.SnapshotFilePrefix(mmStream, cfg.Incarnation), "") {
		if err != nil {
			m.t.Fatal(err)
		}
		if !referenced[o.Key] {
			m.t.Errorf("leaked snapshot file %s (%d bytes): no snapshot references it", o.Key, o.Size)
		}
		delete(referenced, o.Key)
	}
	for k := range referenced {
		m.t.Errorf("snapshot file %s is referenced but missing", k)
	}
	used := map[uint64]bool{}
	if len(snaps) > 0 {
		used[snaps[len(snaps)-1].Checkpoint] = true
	}
	cps, err := m.node.Checkpoints(m.ctx, mmStream)
	if err != nil {
		m.t.Fatal(err)
	}
	if len(cps) > mmRetain {
		cps = cps[len(cps)-mmRetain:]
	}
	for _, cp := range cps {
		pl, err := m.node.PlanRestore(m.ctx, mmStream, cp.ID, keygroup.Range{Lo: 0, Hi: mmKeyGroups - 1})
		if err != nil {
			m.t.Fatal(err)
		}
		for _, b := range pl.Bases {
			used[b.Snapshot.Checkpoint] = true
		}
	}
	for _, w := range m.writers {
		pl, _, err := m.node.PlanWriter(m.ctx, w.w)
		if err != nil {
			m.t.Fatal(err)
		}
		for _, b := range pl.Bases {
			used[b.Snapshot.Checkpoint] = true
		}
		// The checkpoint a live epoch started from stays restorable.
		if from := w.w.FromCheckpoint(); from != 0 {
			pl, err := m.node.PlanRestore(m.ctx, mmStream, from, w.r)
			if err != nil {
				m.t.Fatal(err)
			}
			for _, b := range pl.Bases {
				used[b.Snapshot.Checkpoint] = true
			}
		}
	}
	for _, s := range snaps {
		if !used[s.Checkpoint] {
			m.t.Errorf("leaked snapshot record of checkpoint %d: no retained checkpoint, live writer or live epoch's base restores from it", s.Checkpoint)
		}
	}
}
