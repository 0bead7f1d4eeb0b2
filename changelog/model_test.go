package changelog

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestModelRandomized drives one node through random appends, persists,
// checkpoints, truncations, writer reopens (from a checkpoint, fencing the
// old writer), rescaling, garbage collection and crash-and-restart, over a
// blob store that injects transient errors and lost acknowledgements, and
// compares everything with a trivially correct model (maps) after every
// step. The seed is printed on failure; DSTL_MODEL_SEED replays one.
//
// Checked after every step: each live writer's replay equals its model log
// (invariant 2: order, nothing lost or doubled). Checked every few steps and
// at the end, on a second node with an empty disk reading the blob store
// without faults: every retained checkpoint restores exactly its model
// state (invariants 1, 3, 4, 5). At the end: garbage collection leaves
// nothing unreferenced (invariant 5).
func TestModelRandomized(t *testing.T) {
	seeds := []uint64{1, 2, 3}
	steps := 250
	if testing.Short() {
		steps = 80
	}
	if s := os.Getenv("DSTL_MODEL_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("DSTL_MODEL_SEED: %v", err)
		}
		seeds = []uint64{seed}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			m := newModel(t, seed)
			defer func() {
				if t.Failed() {
					t.Logf("replay with DSTL_MODEL_SEED=%d go test -run TestModelRandomized ./changelog", seed)
				}
			}()
			m.run(steps)
		})
	}
}

const modelKeyGroups = 8

type modelWriter struct {
	w               *Writer
	r               keygroup.Range
	base            map[string]string // the state it started from, within r
	log             []segments.Change // every change it appended, SQN i+1 at i
	durable         uint64            // every SQN ≤ durable was acknowledged durable
	truncatedBefore uint64
	// baseOK: the checkpoint it started from restores (no truncated log
	// without a snapshot anywhere in its chain).
	baseOK bool
}

// state returns the writer's model state covering SQNs up to upTo.
func (mw *modelWriter) state(upTo uint64) map[string]string {
	s := maps.Clone(mw.base)
	for _, c := range mw.log[max(mw.truncatedBefore, 1)-1 : upTo] {
		applyChange(s, c)
	}
	return s
}

type model struct {
	t        *testing.T
	ctx      context.Context
	rng      *rand.Rand
	seed     uint64
	inner    upload.BlobStore
	store    *faulty.Store
	dataDir  string
	node     *Node
	observer *Node
	writers  []*modelWriter
	zombies  []*modelWriter
	expected map[uint64]map[string]string
	// restorable[id][kg] is false for a key group of a checkpoint whose
	// part (or a part of its chain) has a truncated log (see restorableIn):
	// its chain) has a truncated log: until snapshots exist, its restore
	// must fail with ErrLogTruncated rather than return a partial state.
	restorable map[uint64][]bool
	complete   []uint64
	nextID     uint64
	step       int
	trace      []string
}

func newModel(t *testing.T, seed uint64) *model {
	inner, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inner.Close() })
	store := faulty.Wrap(inner, faulty.Options{Seed: seed, PerOp: map[faulty.Op]faulty.Faults{
		faulty.OpPut:      {Transient: 0.05, LostAck: 0.05},
		faulty.OpGet:      {Transient: 0.02},
		faulty.OpGetRange: {Transient: 0.02},
		faulty.OpList:     {Transient: 0.02},
	}})
	m := &model{
		t: t, ctx: context.Background(), rng: rand.New(rand.NewPCG(seed, seed*31+7)), seed: seed,
		inner: inner, store: store, dataDir: t.TempDir(), expected: map[uint64]map[string]string{}, restorable: map[uint64][]bool{}, nextID: 1,
	}
	opts := testNodeOptions(store, m.dataDir)
	opts.Scheduler.BaseBackoff, opts.Scheduler.MaxBackoff = 1, 2 // nanoseconds: retries without waiting
	m.node, err = openRetrying(m.ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	m.observer = openTestNode(t, inner, t.TempDir())
	t.Cleanup(func() { m.node.Close(context.Background()) })
	if _, err := m.node.CreateStream(m.ctx, "m", modelKeyGroups); err != nil {
		t.Fatal(err)
	}
	m.writers = []*modelWriter{m.openWriter(keygroup.Full(modelKeyGroups), 0)}
	return m
}

func (m *model) fatalf(format string, args ...any) {
	m.t.Helper()
	tail := m.trace[max(0, len(m.trace)-15):]
	m.t.Fatalf("seed %d step %d: %s\nlast steps:\n  %s", m.seed, m.step, fmt.Sprintf(format, args...), joinLines(tail))
}

func joinLines(s []string) string {
	out := ""
	for i, l := range s {
		if i > 0 {
			out += "\n  "
		}
		out += l
	}
	return out
}

func (m *model) logf(format string, args ...any) {
	m.trace = append(m.trace, fmt.Sprintf("%d: ", m.step)+fmt.Sprintf(format, args...))
}

func (m *model) run(steps int) {
	for m.step = 1; m.step <= steps; m.step++ {
		switch p := m.rng.IntN(100); {
		case p < 40:
			m.append()
		case p < 52:
			m.persist()
		case p < 67:
			m.checkpoint()
		case p < 72:
			m.truncate()
		case p < 80:
			m.reopen()
		case p < 85:
			m.rescale()
		case p < 92:
			m.crashRestart()
		default:
			m.gc()
		}
		m.checkReplays()
		if m.step%10 == 0 {
			m.checkCheckpoints()
		}
	}
	m.checkCheckpoints()
	m.checkNoLeaks()
}

func (m *model) randomChange(r keygroup.Range) Change {
	kg := r.Lo + uint16(m.rng.IntN(int(r.Hi-r.Lo)+1))
	c := Change{KeyGroup: kg, State: []string{"a", "b"}[m.rng.IntN(2)], Key: []byte(fmt.Sprintf("k%d", m.rng.IntN(6))), TimestampMs: int64(m.step)}
	switch p := m.rng.IntN(100); {
	case p < 60:
		c.Op, c.Value = OpPut, []byte(fmt.Sprintf("v%d.%d", m.step, m.rng.IntN(100)))
	case p < 75:
		c.Op = OpDelete
	case p < 92:
		c.Op, c.Value = OpMerge, []byte(fmt.Sprintf("+%d", m.rng.IntN(10)))
	default:
		c.Op, c.Key = OpClear, nil
	}
	return c
}

func (m *model) append() {
	mw := m.writers[m.rng.IntN(len(m.writers))]
	batch := make([]Change, 1+m.rng.IntN(5))
	for i := range batch {
		batch[i] = m.randomChange(mw.r)
	}
	d := Buffered
	if m.rng.IntN(10) < 3 {
		d = Local
	}
	first, last, err := mw.w.Append(m.ctx, batch, d)
	if err != nil {
		m.fatalf("append to %s: %v", mw.w.LogID(), err)
	}
	if first != uint64(len(mw.log))+1 || last != first+uint64(len(batch))-1 {
		m.fatalf("append to %s got SQNs %d..%d after %d changes", mw.w.LogID(), first, last, len(mw.log))
	}
	for i, c := range batch {
		mw.log = append(mw.log, segments.Change{LogID: mw.w.LogID(), SQN: first + uint64(i), KeyGroup: c.KeyGroup, State: c.State, Op: c.Op, Key: c.Key, Value: c.Value, TimestampMs: c.TimestampMs})
	}
	if d == Local {
		mw.durable = last
	}
	// A zombie's appends must be refused.
	if len(m.zombies) > 0 {
		z := m.zombies[m.rng.IntN(len(m.zombies))]
		if _, _, err := z.w.Append(m.ctx, batch[:1], Buffered); !errors.Is(err, ErrFenced) && !errors.Is(err, ErrClosed) {
			m.fatalf("zombie %s append: %v, want ErrFenced", z.w.LogID(), err)
		}
	}
	m.logf("append %d to %s (%v) → %d..%d", len(batch), mw.w.LogID(), d, first, last)
}

func (m *model) persist() {
	mw := m.writers[m.rng.IntN(len(m.writers))]
	h, err := mw.w.Persist(m.ctx, 0)
	if err != nil {
		m.logf("persist %s failed: %v", mw.w.LogID(), err)
		return
	}
	if h.UpToSQN != uint64(len(mw.log)) {
		m.fatalf("persist %s up to %d, appended %d", mw.w.LogID(), h.UpToSQN, len(mw.log))
	}
	mw.durable = h.UpToSQN
	m.logf("persist %s → %d", mw.w.LogID(), h.UpToSQN)
}

func (m *model) checkpoint() {
	id := m.nextID
	m.nextID += uint64(1 + m.rng.IntN(2)) // ids need not be consecutive
	order := m.rng.Perm(len(m.writers))
	var failed error
	for _, i := range order {
		mw := m.writers[i]
		if _, err := mw.w.Checkpoint(m.ctx, id, []byte(fmt.Sprintf("meta-%d-%d", id, mw.w.Epoch()))); err != nil {
			failed = err
			break
		}
	}
	// Whether it completed is what the journal says, errors or not (an
	// error may follow a completion whose acknowledgement was lost).
	cps, err := m.observer.Checkpoints(m.ctx, "m")
	if err != nil {
		m.fatalf("list checkpoints: %v", err)
	}
	done := slices.ContainsFunc(cps, func(c CheckpointComplete) bool { return c.ID == id })
	if failed == nil && !done {
		m.fatalf("checkpoint %d: every writer recorded its part but it is not complete", id)
	}
	if !done {
		m.logf("checkpoint %d failed: %v", id, failed)
		return
	}
	want := map[string]string{}
	ok := make([]bool, modelKeyGroups)
	for _, mw := range m.writers {
		maps.Copy(want, mw.state(uint64(len(mw.log))))
		mw.durable = uint64(len(mw.log))
		for kg := mw.r.Lo; kg <= mw.r.Hi; kg++ {
			ok[kg] = mw.baseOK && mw.truncatedBefore <= 1
		}
	}
	m.expected[id] = want
	m.restorable[id] = ok
	m.complete = append(m.complete, id)
	m.logf("checkpoint %d complete (%d keys)", id, len(want))
	m.checkCheckpoint(id)
}

func (m *model) truncate() {
	mw := m.writers[m.rng.IntN(len(m.writers))]
	mw.w.mu.Lock()
	uploaded := mw.w.uploaded
	mw.w.mu.Unlock()
	lo := max(mw.truncatedBefore, 1)
	if uploaded+1 <= lo {
		return
	}
	before := lo + uint64(m.rng.IntN(int(uploaded+1-lo)+1))
	if err := mw.w.Truncate(m.ctx, before); err != nil {
		m.fatalf("truncate %s before %d: %v", mw.w.LogID(), before, err)
	}
	mw.truncatedBefore = before
	m.logf("truncate %s before %d", mw.w.LogID(), before)
}

// restorableIn says whether key groups r of checkpoint id restore from the
// changelog alone (the model has no snapshots).
func (m *model) restorableIn(id uint64, r keygroup.Range) bool {
	ok := m.restorable[id]
	for kg := r.Lo; kg <= r.Hi; kg++ {
		if !ok[kg] {
			return false
		}
	}
	return true
}

// retained returns the ids of the checkpoints whose objects GC keeps.
func (m *model) retained() []uint64 {
	return m.complete[max(0, len(m.complete)-m.node.opts.RetainCheckpoints):]
}

// openWriter opens a writer over r from checkpoint `from` (0: newest),
// retrying: an open whose acknowledgement was lost may already have
// created an epoch, which the retry's epoch fences in turn.
func (m *model) openWriter(r keygroup.Range, from uint64) *modelWriter {
	var w *Writer
	var err error
	for range 10 {
		if w, err = m.node.OpenWriter(m.ctx, WriterConfig{Stream: "m", KeyGroups: r, FromCheckpoint: from}); err == nil {
			break
		}
	}
	if err != nil {
		m.fatalf("open writer %s from %d: %v", r, from, err)
	}
	base := map[string]string{}
	if f := w.FromCheckpoint(); f != 0 {
		for k, v := range m.expected[f] {
			var kg uint16
			fmt.Sscanf(k, "%d/", &kg)
			if r.Contains(kg) {
				base[k] = v
			}
		}
	}
	baseOK := true
	if f := w.FromCheckpoint(); f != 0 {
		baseOK = m.restorableIn(f, r)
	}
	return &modelWriter{w: w, r: r, base: base, truncatedBefore: 1, baseOK: baseOK}
}

func (m *model) reopen() {
	i := m.rng.IntN(len(m.writers))
	old := m.writers[i]
	from := uint64(0)
	if ret := m.retained(); len(ret) > 0 && m.rng.IntN(2) == 0 {
		from = ret[m.rng.IntN(len(ret))]
	}
	if from != 0 && !m.restorableIn(from, old.r) {
		// A checkpoint that cannot be restored is refused before anything
		// is fenced (issue 9 R2); the writer reopens from the newest.
		_, err := m.node.OpenWriter(m.ctx, WriterConfig{Stream: "m", KeyGroups: old.r, FromCheckpoint: from})
		if !errors.Is(err, ErrCheckpointNotRestorable) && !upload.IsTransient(err) {
			m.fatalf("open %s from unrestorable checkpoint %d: %v, want ErrCheckpointNotRestorable", old.r, from, err)
		}
		if err := old.w.alive(); err != nil {
			m.fatalf("a refused open fenced %s: %v", old.w.LogID(), err)
		}
		m.logf("open %s from %d refused: %v", old.r, from, err)
		from = 0
	}
	m.writers[i] = m.openWriter(old.r, from)
	m.zombies = append(m.zombies, old)
	m.logf("reopen %s from %d as %s (from %d)", old.w.LogID(), from, m.writers[i].w.LogID(), m.writers[i].w.FromCheckpoint())
}

func (m *model) rescale() {
	var ranges []keygroup.Range
	if len(m.writers) == 1 {
		split := uint16(1 + m.rng.IntN(modelKeyGroups-1))
		ranges = []keygroup.Range{{Lo: 0, Hi: split - 1}, {Lo: split, Hi: modelKeyGroups - 1}}
	} else {
		ranges = []keygroup.Range{keygroup.Full(modelKeyGroups)}
	}
	m.zombies = append(m.zombies, m.writers...)
	m.writers = nil
	for _, r := range ranges {
		m.writers = append(m.writers, m.openWriter(r, 0))
	}
	m.logf("rescale to %v", ranges)
}

func (m *model) crashRestart() {
	m.node.crash()
	var err error
	if m.node, err = openRetrying(m.ctx, m.node.opts); err != nil {
		m.fatalf("restart: %v", err)
	}
	m.zombies = nil // their node is gone
	for _, mw := range m.writers {
		var w *Writer
		for range 10 {
			if w, err = m.node.OpenWriter(m.ctx, WriterConfig{Stream: "m", KeyGroups: mw.r, Resume: mw.w.Epoch()}); err == nil {
				break
			}
		}
		if err != nil {
			m.fatalf("resume %s: %v", mw.w.LogID(), err)
		}
		n := w.LastSQN()
		if n < mw.durable || n > uint64(len(mw.log)) {
			m.fatalf("resumed %s at SQN %d; durable %d, appended %d", w.LogID(), n, mw.durable, len(mw.log))
		}
		// Buffered changes that were never made durable may be lost.
		mw.log = mw.log[:n]
		mw.w = w
	}
	m.logf("crash and restart")
}

func (m *model) gc() {
	st, err := m.node.CollectGarbage(m.ctx)
	m.logf("gc: %+v err=%v", st, err)
}

// checkReplays compares each live writer's replay with its model log.
func (m *model) checkReplays() {
	for _, mw := range m.writers {
		after := max(mw.truncatedBefore, 1) - 1
		var got []segments.Change
		var err error
		for range 20 { // reads may hit injected transient errors
			got, err = collect(mw.w.Replay(m.ctx, after, 0, mw.r))
			if err == nil {
				break
			}
		}
		if err != nil {
			m.fatalf("replay %s: %v", mw.w.LogID(), err)
		}
		want := mw.log[after:]
		if len(got) != len(want) {
			m.fatalf("replay %s after %d: %d changes, want %d", mw.w.LogID(), after, len(got), len(want))
		}
		for i := range got {
			if !sameChange(got[i], want[i]) {
				m.fatalf("replay %s change %d: got %+v, want %+v", mw.w.LogID(), i, got[i], want[i])
			}
		}
	}
}

// checkCheckpoints restores every retained checkpoint on the observer, a
// node with an empty disk reading the blob store without faults.
func (m *model) checkCheckpoints() {
	for _, id := range m.retained() {
		m.checkCheckpoint(id)
	}
}

func (m *model) checkCheckpoint(id uint64) {
	got := map[string]string{}
	for c, err := range m.observer.RestoreChanges(m.ctx, "m", id, keygroup.Full(modelKeyGroups)) {
		if err != nil && !m.restorableIn(id, keygroup.Full(modelKeyGroups)) && errors.Is(err, ErrLogTruncated) {
			return // refused, as it must be without a snapshot
		}
		if err != nil {
			m.fatalf("restore checkpoint %d: %v", id, err)
		}
		applyChange(got, c)
	}
	if !m.restorableIn(id, keygroup.Full(modelKeyGroups)) {
		m.fatalf("checkpoint %d has a truncated log without a snapshot, but restored without ErrLogTruncated", id)
	}
	if !maps.Equal(got, m.expected[id]) {
		m.fatalf("checkpoint %d restores to\n  %v\nwant\n  %v", id, got, m.expected[id])
	}
}

// checkNoLeaks runs GC without faults and checks that every segment left is
// referenced, and the retained checkpoints still restore.
func (m *model) checkNoLeaks() {
	m.store.SetAll(faulty.Faults{})
	for op := range []faulty.Op{faulty.OpPut, faulty.OpGet, faulty.OpGetRange, faulty.OpStat, faulty.OpList, faulty.OpDelete} {
		m.store.SetFaults(faulty.Op(op), faulty.Faults{})
	}
	if _, err := m.node.CollectGarbage(m.ctx); err != nil {
		m.fatalf("final gc: %v", err)
	}
	refs, _, err := m.node.segmentReferences(m.ctx, &GCStats{}, time.Now().Add(time.Hour))
	if err != nil {
		m.fatalf("references: %v", err)
	}
	objs, err := listSegments(m.ctx, m.inner, m.node.ID())
	if err != nil {
		m.fatalf("list: %v", err)
	}
	for _, o := range objs {
		if !refs[o.Key] {
			m.fatalf("segment %s survived GC unreferenced", o.Key)
		}
	}
	m.checkCheckpoints()
	m.checkReplays()
	m.t.Logf("seed %d: %d steps, %d checkpoints complete, %d segments kept, faults injected: %d transient, %d lost acks",
		m.seed, m.step-1, len(m.complete), len(objs), m.store.Total(faulty.Transient), m.store.Total(faulty.LostAck))
}

// openRetrying opens a node, retrying the transient errors the faulty
// store injects into its first listings.
func openRetrying(ctx context.Context, opts Options) (n *Node, err error) {
	for range 10 {
		if n, err = Open(ctx, opts); err == nil || !upload.IsTransient(err) {
			return n, err
		}
	}
	return nil, err
}

func collect(seq func(func(segments.Change, error) bool)) ([]segments.Change, error) {
	var out []segments.Change
	for c, err := range seq {
		if err != nil {
			return nil, err
		}
		out = append(out, c.Clone())
	}
	return out, nil
}

func sameChange(a, b segments.Change) bool {
	return a.SQN == b.SQN && a.KeyGroup == b.KeyGroup && a.State == b.State && a.Op == b.Op &&
		string(a.Key) == string(b.Key) && string(a.Value) == string(b.Value) && a.TimestampMs == b.TimestampMs
}
