package changelog

// Tests of the changelog side of snapshots: publishing and reading snapshot
// records, restore plans on top of them (lineage, rescale, truncation),
// writer plans, and garbage collection of segments and snapshot records.
// The snapshot records carry an opaque manifest ({}): the changelog never
// reads it. The state a snapshot stands for is the model's expected state
// of its checkpoint, which is what a materializer would have folded.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// snapWriter is a writer and the model of its state: the state of its key
// groups at the checkpoint it started from, and every change it appended
// (SQN i+1 at index i).
type snapWriter struct {
	w    *Writer
	r    keygroup.Range
	base map[string]string
	log  []segments.Change
}

func (sw *snapWriter) state(upTo uint64) map[string]string {
	m := maps.Clone(sw.base)
	for _, c := range sw.log[:upTo] {
		applyChange(m, c)
	}
	return m
}

// snapEnv is one node on a file blob store with one stream, and the
// expected state of every complete checkpoint.
type snapEnv struct {
	t      *testing.T
	ctx    context.Context
	store  upload.BlobStore
	n      *Node
	stream string
	inc    string // the stream's incarnation
	groups int
	want   map[uint64]map[string]string
}

func newSnapEnv(t *testing.T, groups, retainCheckpoints int) *snapEnv {
	t.Helper()
	ctx := context.Background()
	store := newFileStore(t)
	opts := testNodeOptions(store, t.TempDir())
	opts.RetainCheckpoints = retainCheckpoints
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	cfg, err := n.CreateStream(ctx, "s", groups)
	if err != nil {
		t.Fatal(err)
	}
	return &snapEnv{t: t, ctx: ctx, store: store, n: n, stream: "s", inc: cfg.Incarnation, groups: groups, want: map[uint64]map[string]string{}}
}

func (e *snapEnv) full() keygroup.Range { return keygroup.Full(e.groups) }

// open opens a writer over r from checkpoint from (0: the newest).
func (e *snapEnv) open(r keygroup.Range, from uint64) *snapWriter {
	e.t.Helper()
	w, err := e.n.OpenWriter(e.ctx, WriterConfig{Stream: e.stream, KeyGroups: r, FromCheckpoint: from})
	if err != nil {
		e.t.Fatal(err)
	}
	base := map[string]string{}
	if f := w.FromCheckpoint(); f != 0 {
		base = restrict(e.want[f], r)
	}
	return &snapWriter{w: w, r: r, base: base}
}

// append appends the changes in one batch and records them in the model.
func (e *snapEnv) append(sw *snapWriter, batch ...Change) {
	e.t.Helper()
	first, last, err := sw.w.Append(e.ctx, batch, Buffered)
	if err != nil {
		e.t.Fatal(err)
	}
	if first != uint64(len(sw.log))+1 || last != first+uint64(len(batch))-1 {
		e.t.Fatalf("append to %s: SQNs %d..%d after %d", sw.w.LogID(), first, last, len(sw.log))
	}
	for i, c := range batch {
		sw.log = append(sw.log, segments.Change{LogID: sw.w.LogID(), SQN: first + uint64(i), KeyGroup: c.KeyGroup, State: c.State, Op: c.Op, Key: c.Key, Value: c.Value})
	}
}

// checkpoint records the parts of checkpoint id of the given writers (every
// live writer of the stream, in this order) and checks that the last one
// completes it.
func (e *snapEnv) checkpoint(id uint64, ws ...*snapWriter) {
	e.t.Helper()
	want := map[string]string{}
	for i, sw := range ws {
		res, err := sw.w.Checkpoint(e.ctx, id, nil)
		if err != nil {
			e.t.Fatalf("checkpoint %d of %s: %v", id, sw.w.LogID(), err)
		}
		if res.Complete != (i == len(ws)-1) {
			e.t.Fatalf("checkpoint %d of %s: complete %v", id, sw.w.LogID(), res.Complete)
		}
		maps.Copy(want, sw.state(uint64(len(sw.log))))
	}
	e.want[id] = want
}

func (e *snapEnv) publish(id uint64) Snapshot {
	e.t.Helper()
	s, err := e.n.PublishSnapshot(e.ctx, e.stream, id, e.content(`{}`))
	if err != nil {
		e.t.Fatalf("publish snapshot of checkpoint %d: %v", id, err)
	}
	return s
}

// content is a publication of the current incarnation naming no files.
func (e *snapEnv) content(manifest string) SnapshotContent {
	return SnapshotContent{Incarnation: e.inc, Manifest: json.RawMessage(manifest), Bytes: 100, NewBytes: 10}
}

func (e *snapEnv) adopt(want int) {
	e.t.Helper()
	got, err := e.n.AdoptSnapshots(e.ctx)
	if err != nil || got != want {
		e.t.Fatalf("AdoptSnapshots truncated %d writers (%v), want %d", got, err, want)
	}
}

// plan plans the restore of key groups r of checkpoint id on node n and
// checks that the bases' states of their ranges plus the replayed changes
// is the checkpoint's expected state of r.
func (e *snapEnv) plan(n *Node, id uint64, r keygroup.Range) RestorePlan {
	e.t.Helper()
	pl, err := n.PlanRestore(e.ctx, e.stream, id, r)
	if err != nil {
		e.t.Fatalf("plan checkpoint %d %s: %v", id, r, err)
	}
	e.checkState(n, pl)
	return pl
}

func (e *snapEnv) checkState(n *Node, pl RestorePlan) {
	e.t.Helper()
	got := e.planState(n, pl)
	if want := restrict(e.want[pl.Checkpoint], pl.KeyGroups); !maps.Equal(got, want) {
		e.t.Fatalf("checkpoint %d %s restores (plan %s) to\n  %v\nwant\n  %v", pl.Checkpoint, pl.KeyGroups, describePlan(pl), got, want)
	}
}

// planState rebuilds the state a plan describes: each base's state (the
// expected state of its snapshot's checkpoint) of its ranges, then the
// replay. The bases' ranges must be disjoint, inside the plan's key groups,
// and each base a distinct snapshot at or below the plan's checkpoint (if
// it is a checkpoint's plan).
func (e *snapEnv) planState(n *Node, pl RestorePlan) map[string]string {
	e.t.Helper()
	m := map[string]string{}
	var all []keygroup.Range
	seen := map[uint64]bool{}
	for _, b := range pl.Bases {
		// A writer's plan (PlanWriter) has checkpoint 0.
		if seen[b.Snapshot.Checkpoint] || (pl.Checkpoint != 0 && b.Snapshot.Checkpoint > pl.Checkpoint) || len(b.Ranges) == 0 {
			e.t.Fatalf("plan of checkpoint %d: bad base of snapshot %d (%s)", pl.Checkpoint, b.Snapshot.Checkpoint, describePlan(pl))
		}
		seen[b.Snapshot.Checkpoint] = true
		base, ok := e.want[b.Snapshot.Checkpoint]
		if !ok {
			e.t.Fatalf("plan uses snapshot of checkpoint %d, which the test never completed", b.Snapshot.Checkpoint)
		}
		for _, r := range b.Ranges {
			if got, ok := intersect(r, pl.KeyGroups); !ok || got != r {
				e.t.Fatalf("plan of %d %s: base range %s outside the key groups (%s)", pl.Checkpoint, pl.KeyGroups, r, describePlan(pl))
			}
			for _, o := range all {
				if o.Overlaps(r) {
					e.t.Fatalf("plan of %d: base ranges %s and %s overlap (%s)", pl.Checkpoint, o, r, describePlan(pl))
				}
			}
			all = append(all, r)
			maps.Copy(m, restrict(base, r))
		}
	}
	for c, err := range n.ReplayPlan(e.ctx, pl) {
		if err != nil {
			e.t.Fatalf("replay plan of checkpoint %d (%s): %v", pl.Checkpoint, describePlan(pl), err)
		}
		applyChange(m, c)
	}
	return m
}

// part returns the part of log logID in complete checkpoint id.
func (e *snapEnv) part(id uint64, logID string) Part {
	e.t.Helper()
	parts, err := e.n.CheckpointParts(e.ctx, e.stream, id)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, p := range parts {
		if p.LogID == logID {
			return p
		}
	}
	e.t.Fatalf("checkpoint %d has no part of %s", id, logID)
	return Part{}
}

func (e *snapEnv) snapshotIDs(n *Node) []uint64 {
	e.t.Helper()
	snaps, err := n.Snapshots(e.ctx, e.stream)
	if err != nil {
		e.t.Fatal(err)
	}
	var ids []uint64
	for _, s := range snaps {
		ids = append(ids, s.Checkpoint)
	}
	return ids
}

func (e *snapEnv) gc() GCStats {
	e.t.Helper()
	st, err := e.n.CollectGarbage(e.ctx)
	if err != nil {
		e.t.Fatalf("gc: %v", err)
	}
	e.t.Logf("gc: %+v", st)
	return st
}

func (e *snapEnv) exists(key string) bool {
	e.t.Helper()
	_, err := e.store.Stat(e.ctx, key)
	if errors.Is(err, upload.ErrNotFound) {
		return false
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return true
}

// restrict returns the entries of m (keys "<kg>/<state>/<key>") whose key
// group is in r.
func restrict(m map[string]string, r keygroup.Range) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		var kg uint16
		if _, err := fmt.Sscanf(k, "%d/", &kg); err != nil {
			panic(fmt.Sprintf("model key %q: %v", k, err))
		}
		if r.Contains(kg) {
			out[k] = v
		}
	}
	return out
}

func segmentKeys(segs []SegmentBlocks) []string {
	var keys []string
	for _, s := range segs {
		keys = append(keys, s.Key)
	}
	return keys
}

func describePlan(pl RestorePlan) string {
	var b bytes.Buffer
	if len(pl.Bases) == 0 {
		b.WriteString("no snapshot;")
	}
	for _, base := range pl.Bases {
		fmt.Fprintf(&b, " snapshot %d of %v;", base.Snapshot.Checkpoint, base.Ranges)
	}
	for _, s := range pl.Steps {
		fmt.Fprintf(&b, " %s %s (%d,%d] in %d segments;", s.LogID, s.KeyGroups, s.After, s.UpTo, len(s.Segments))
	}
	return b.String()
}

// singleBase returns the checkpoint of the plan's snapshot if it has
// exactly one base covering all its key groups, else 0.
func singleBase(pl RestorePlan) uint64 {
	s, ok := pl.SingleBase()
	if !ok {
		return 0
	}
	return s.Checkpoint
}

// baseRanges returns the ranges the plan takes from the snapshot of
// checkpoint id, sorted.
func baseRanges(pl RestorePlan, id uint64) []keygroup.Range {
	for _, b := range pl.Bases {
		if b.Snapshot.Checkpoint == id {
			return sortedRanges(b.Ranges)
		}
	}
	return nil
}

func sortedRanges(rs []keygroup.Range) []keygroup.Range {
	return slices.SortedFunc(slices.Values(rs), func(a, b keygroup.Range) int { return cmp.Compare(a.Lo, b.Lo) })
}

// PlanRestore uses the newest snapshot at or below the checkpoint: the plan
// of checkpoint 3 imports snapshot 2 and replays only the writer's log after
// the SQN snapshot 2 recorded; checkpoint 1 predates it and replays from
// scratch.
func TestSnapshotPlanRestorePicksNewestBase(t *testing.T) {
	e := newSnapEnv(t, 8, 3)
	a := e.open(e.full(), 0)
	for id := uint64(1); id <= 3; id++ {
		e.append(a, put(uint16(id), "k", fmt.Sprint("v", id)), put(uint16(id+4), fmt.Sprint("k", id), "x"))
		if id == 3 {
			e.append(a, Change{KeyGroup: 1, State: "s", Op: OpDelete, Key: []byte("k")})
		}
		e.checkpoint(id, a)
	}
	before := time.Now()
	snap := e.publish(2)
	after := time.Now()
	if snap.Stream != "s" || snap.Checkpoint != 2 || snap.Bytes != 100 || snap.NewBytes != 10 || string(snap.Manifest) != "{}" {
		t.Fatalf("published %+v", snap)
	}
	if want := map[string]uint64{a.w.LogID(): 4}; !maps.Equal(snap.Logs, want) {
		t.Fatalf("snapshot logs %v, want %v (the part's SQN)", snap.Logs, want)
	}
	if snap.CreatedAt.Before(before.Add(-time.Second)) || snap.CreatedAt.After(after.Add(time.Second)) {
		t.Fatalf("created at %v, published between %v and %v", snap.CreatedAt, before, after)
	}
	if snap.Key() != "streams/s/snapshots/00000000000000000002" {
		t.Fatalf("key %q", snap.Key())
	}
	if got := SnapshotFilePrefix("s"); got != "streams/s/sst/" {
		t.Fatalf("SnapshotFilePrefix = %q", got)
	}

	// A node with an empty disk reads the record from the blob store.
	obs := openTestNode(t, e.store, t.TempDir())
	snaps, err := obs.Snapshots(e.ctx, "s")
	if err != nil || len(snaps) != 1 {
		t.Fatalf("snapshots: %+v, %v", snaps, err)
	}
	if got := snaps[0]; got.Checkpoint != 2 || got.Key() != snap.Key() || !maps.Equal(got.Logs, snap.Logs) ||
		!got.CreatedAt.Equal(snap.CreatedAt) || got.Bytes != 100 || got.NewBytes != 10 || string(got.Manifest) != "{}" {
		t.Fatalf("read back %+v, published %+v", got, snap)
	}

	for _, n := range []*Node{e.n, obs} {
		pl := e.plan(n, 3, e.full())
		if singleBase(pl) != 2 {
			t.Fatalf("plan of 3: %s, want snapshot 2", describePlan(pl))
		}
		if len(pl.Bases) != 1 || !slices.Equal(pl.Bases[0].Ranges, []keygroup.Range{e.full()}) {
			t.Fatalf("plan of 3: %s, want snapshot ranges the writer's %v", describePlan(pl), e.full())
		}
		if s, ok := pl.NewestBase(); !ok || s.Checkpoint != 2 || s.Key() != snap.Key() {
			t.Fatalf("plan of 3: newest base %+v (%v), want snapshot 2", s, ok)
		}
		p3 := e.part(3, a.w.LogID())
		if len(pl.Steps) != 1 {
			t.Fatalf("plan of 3: %s, want one step", describePlan(pl))
		}
		s := pl.Steps[0]
		if s.LogID != a.w.LogID() || s.KeyGroups != e.full() || s.After != snap.Logs[a.w.LogID()] || s.UpTo != p3.UpToSQN || s.UpTo != 7 || len(s.Segments) == 0 {
			t.Fatalf("plan of 3: step %+v, want %s %s (%d,%d]", s, a.w.LogID(), e.full(), snap.Logs[a.w.LogID()], p3.UpToSQN)
		}
		if pl.TailChanges() != 3 || pl.TailBytes() <= 0 {
			t.Fatalf("plan of 3: tail %d changes, %d bytes", pl.TailChanges(), pl.TailBytes())
		}
		got, err := collect(n.ReplayPlan(e.ctx, pl))
		if err != nil {
			t.Fatal(err)
		}
		want := a.log[4:7]
		if len(got) != len(want) {
			t.Fatalf("replay of plan of 3: %d changes, want %d", len(got), len(want))
		}
		for i := range got {
			if !sameChange(got[i], want[i]) {
				t.Fatalf("replay of plan of 3, change %d: %+v, want %+v", i, got[i], want[i])
			}
		}

		// The snapshot's own checkpoint: the snapshot alone.
		if pl := e.plan(n, 2, e.full()); singleBase(pl) != 2 || len(pl.Steps) != 0 || pl.TailChanges() != 0 || pl.TailBytes() != 0 {
			t.Fatalf("plan of 2: %s, want snapshot 2 and no steps", describePlan(pl))
		}
		// Checkpoint 1 predates the snapshot.
		if pl := e.plan(n, 1, e.full()); len(pl.Bases) != 0 || len(pl.Steps) != 1 || pl.Steps[0].After != 0 || pl.Steps[0].UpTo != 2 {
			t.Fatalf("plan of 1: %s, want no snapshot, (0,2]", describePlan(pl))
		} else if _, ok := pl.NewestBase(); ok {
			t.Fatalf("plan of 1: %s has a newest base", describePlan(pl))
		}
		// A part of the key groups.
		lo := keygroup.Range{Lo: 0, Hi: 3}
		pl = e.plan(n, 3, lo)
		if singleBase(pl) != 2 || !slices.Equal(baseRanges(pl, 2), []keygroup.Range{lo}) || len(pl.Steps) != 1 || pl.Steps[0].KeyGroups != lo {
			t.Fatalf("plan of 3 %s: %s", lo, describePlan(pl))
		}
		for c, err := range n.ReplayPlan(e.ctx, pl) {
			if err != nil || !lo.Contains(c.KeyGroup) {
				t.Fatalf("replay of 3 %s yields key group %d (%v)", lo, c.KeyGroup, err)
			}
		}
		// Without the snapshot, the whole log.
		pl, err = n.PlanRestoreFrom(e.ctx, "s", 3, e.full(), nil)
		if err != nil || len(pl.Bases) != 0 || len(pl.Steps) != 1 || pl.Steps[0].After != 0 || pl.Steps[0].UpTo != 7 {
			t.Fatalf("plan of 3 without snapshot: %s, %v", describePlan(pl), err)
		}
		e.checkState(n, pl)
		if got := restoreMap(t, n, "s", 3, e.full()); !maps.Equal(got, e.want[3]) {
			t.Fatalf("RestoreChanges of 3 = %v, want %v", got, e.want[3])
		}
	}
	if _, err := e.n.PlanRestore(e.ctx, "s", 4, e.full()); !errors.Is(err, ErrCheckpointNotFound) {
		t.Fatalf("plan of an unknown checkpoint: %v", err)
	}
}

// A writer reopened from checkpoint 1 after a snapshot of checkpoint 2
// exists forks the history: its checkpoints' lineage does not go through
// snapshot 2, so their plans must not use it (even after the old writer
// truncated its log below it and GC ran), but may use an older snapshot.
func TestSnapshotPlanSkipsSnapshotOffTheLineage(t *testing.T) {
	e := newSnapEnv(t, 8, 1)
	a := e.open(e.full(), 0)
	for id := uint64(1); id <= 3; id++ {
		e.append(a, put(0, "k", fmt.Sprint("a", id)), put(uint16(id), fmt.Sprint("a", id), "x"))
		e.checkpoint(id, a)
	}
	snap2 := e.publish(2)
	e.adopt(1)
	if _, err := collect(a.w.Replay(e.ctx, 0, 0, e.full())); !errors.Is(err, ErrLogTruncated) {
		t.Fatalf("replay of the adopted writer from 0: %v, want ErrLogTruncated", err)
	}

	b := e.open(e.full(), 1) // rollback: fences a
	e.append(b, put(0, "k", "b"), put(5, "b", "y"), Change{KeyGroup: 1, State: "s", Op: OpDelete, Key: []byte("a1")})
	e.checkpoint(4, b)
	if want := map[string]string{"0/s/k": "b", "5/s/b": "y"}; !maps.Equal(e.want[4], want) {
		t.Fatalf("model of checkpoint 4: %v, want %v", e.want[4], want)
	}

	check4 := func(wantSnap uint64) {
		t.Helper()
		pl := e.plan(e.n, 4, e.full())
		var logs []string
		for _, s := range pl.Steps {
			logs = append(logs, s.LogID)
		}
		switch wantSnap {
		case 0:
			if len(pl.Bases) != 0 || !slices.Equal(logs, []string{a.w.LogID(), b.w.LogID()}) || pl.Steps[0].UpTo != 2 {
				t.Fatalf("plan of 4: %s, want no snapshot: %s up to 2, then %s", describePlan(pl), a.w.LogID(), b.w.LogID())
			}
		default:
			if singleBase(pl) != wantSnap || !slices.Equal(logs, []string{b.w.LogID()}) || pl.Steps[0].After != 0 {
				t.Fatalf("plan of 4: %s, want snapshot %d and %s from 0", describePlan(pl), wantSnap, b.w.LogID())
			}
		}
	}
	check4(0)
	// Offered snapshot 2 as the only candidate, the plan of 4 leaves it
	// out (it is off the lineage of b's part) and replays a's log up to
	// checkpoint 1, then b's: exactly checkpoint 4's state.
	if pl, err := e.n.PlanRestoreFrom(e.ctx, "s", 4, e.full(), &snap2); err != nil {
		t.Fatalf("plan of 4 from snapshot 2: %v", err)
	} else {
		var logs []string
		for _, s := range pl.Steps {
			logs = append(logs, s.LogID)
		}
		if len(pl.Bases) != 0 || !slices.Equal(logs, []string{a.w.LogID(), b.w.LogID()}) || pl.Steps[0].After != 0 || pl.Steps[0].UpTo != 2 {
			t.Fatalf("plan of 4 from snapshot 2: %s, want snapshot 2 unused: %s (0,2], then %s", describePlan(pl), a.w.LogID(), b.w.LogID())
		}
		e.checkState(e.n, pl)
	}
	// Checkpoint 3 is on the old lineage: snapshot 2 serves it.
	if pl := e.plan(e.n, 3, e.full()); singleBase(pl) != 2 {
		t.Fatalf("plan of 3: %s, want snapshot 2", describePlan(pl))
	}
	// GC keeps what the fork needs (its base checkpoint 1 and its own log).
	e.gc()
	check4(0)
	if got := restoreMap(t, e.n, "s", 4, e.full()); !maps.Equal(got, e.want[4]) {
		t.Fatalf("RestoreChanges of 4 = %v, want %v", got, e.want[4])
	}
	// An older snapshot on the fork's lineage is used.
	e.publish(1)
	check4(1)
	pl, _, err := e.n.PlanWriter(e.ctx, b.w)
	if err != nil || singleBase(pl) != 1 {
		t.Fatalf("PlanWriter of the fork: %s, %v; want snapshot 1", describePlan(pl), err)
	}
}

// A writer over all key groups checkpoints and is snapshotted; two writers
// split its key groups from that checkpoint. Their checkpoint restores from
// the snapshot for both halves plus their own logs only: nothing of the old
// writer's log, and nothing it appended after the split.
func TestSnapshotPlanAfterRescale(t *testing.T) {
	e := newSnapEnv(t, 128, 3)
	a := e.open(e.full(), 0)
	e.append(a, put(5, "a", "1"), put(70, "b", "1"), put(127, "c", "1"))
	e.checkpoint(1, a)
	e.append(a, put(5, "a", "2"), put(64, "d", "2"), put(63, "e", "2"))
	e.checkpoint(2, a)
	e.publish(2)
	// Appended after the checkpoint the new writers start from: never part
	// of their state.
	e.append(a, put(5, "a", "zombie"), put(100, "z", "zombie"))

	lo, hi := keygroup.Range{Lo: 0, Hi: 63}, keygroup.Range{Lo: 64, Hi: 127}
	b := e.open(lo, 0)
	c := e.open(hi, 0)
	if b.w.FromCheckpoint() != 2 || c.w.FromCheckpoint() != 2 {
		t.Fatalf("new writers start from %d and %d, want 2", b.w.FromCheckpoint(), c.w.FromCheckpoint())
	}
	e.append(b, put(5, "a", "b"), put(0, "f", "b"))
	e.append(c, put(70, "b", "c"), Change{KeyGroup: 127, State: "s", Op: OpDelete, Key: []byte("c")})
	e.checkpoint(3, b, c)

	obs := openTestNode(t, e.store, t.TempDir())
	for _, n := range []*Node{e.n, obs} {
		pl := e.plan(n, 3, e.full())
		if singleBase(pl) != 2 || len(pl.Bases) != 1 {
			t.Fatalf("plan of 3: %s, want snapshot 2", describePlan(pl))
		}
		if got := baseRanges(pl, 2); !slices.Equal(got, []keygroup.Range{lo, hi}) {
			t.Fatalf("plan of 3: snapshot ranges %v, want %v and %v", got, lo, hi)
		}
		steps := map[string]ReplayStep{}
		for _, s := range pl.Steps {
			steps[s.LogID] = s
		}
		if len(pl.Steps) != 2 || steps[b.w.LogID()].KeyGroups != lo || steps[c.w.LogID()].KeyGroups != hi ||
			steps[b.w.LogID()].After != 0 || steps[c.w.LogID()].After != 0 || steps[b.w.LogID()].UpTo != 2 || steps[c.w.LogID()].UpTo != 2 {
			t.Fatalf("plan of 3: %s, want %s over %s and %s over %s, (0,2] each", describePlan(pl), b.w.LogID(), lo, c.w.LogID(), hi)
		}
		// Half the key groups: one half of the snapshot, one log.
		pl = e.plan(n, 3, keygroup.Range{Lo: 60, Hi: 63})
		if singleBase(pl) != 2 || len(pl.Steps) != 1 || pl.Steps[0].LogID != b.w.LogID() {
			t.Fatalf("plan of 3 60..63: %s", describePlan(pl))
		}
		// Without the snapshot the old writer's log is replayed for both
		// halves, up to checkpoint 2.
		pl, err := n.PlanRestoreFrom(e.ctx, "s", 3, e.full(), nil)
		if err != nil {
			t.Fatal(err)
		}
		var aSteps int
		for _, s := range pl.Steps {
			if s.LogID == a.w.LogID() {
				aSteps++
				if s.UpTo != 6 {
					t.Fatalf("plan of 3 without snapshot: %s replays %s up to %d, want 6", describePlan(pl), s.LogID, s.UpTo)
				}
			}
		}
		if aSteps != 2 {
			t.Fatalf("plan of 3 without snapshot: %s, want a step of %s per half", describePlan(pl), a.w.LogID())
		}
		e.checkState(n, pl)
	}

	// The new writers' own plans: the snapshot's half, their whole log.
	for _, sw := range []*snapWriter{b, c} {
		pl, ownAfter, err := e.n.PlanWriter(e.ctx, sw.w)
		if err != nil || singleBase(pl) != 2 || !slices.Equal(baseRanges(pl, 2), []keygroup.Range{sw.r}) || len(pl.Steps) != 0 || ownAfter != 0 {
			t.Fatalf("PlanWriter(%s): %s, own after %d, %v", sw.w.LogID(), describePlan(pl), ownAfter, err)
		}
	}
	// Only the fenced writer's log is in the snapshot: nothing to adopt.
	e.adopt(0)
}

// A live writer truncated below a snapshot: its later checkpoints restore
// only with the snapshot, and GC deletes exactly the segments below the
// snapshot that no retained checkpoint needs.
func TestSnapshotTruncationAndSegmentGC(t *testing.T) {
	e := newSnapEnv(t, 8, 1)
	a := e.open(e.full(), 0)
	step := func(id uint64) {
		e.append(a, put(uint16(id%8), "k", fmt.Sprint(id)), put(uint16((id+3)%8), fmt.Sprint("k", id), "x"))
		e.checkpoint(id, a)
	}
	for id := uint64(1); id <= 3; id++ {
		step(id)
	}
	snap := e.publish(3)
	if snap.Logs[a.w.LogID()] != 6 {
		t.Fatalf("snapshot of 3 at SQN %d, want 6", snap.Logs[a.w.LogID()])
	}
	e.adopt(1)
	e.adopt(0) // already truncated there
	for id := uint64(4); id <= 5; id++ {
		step(id)
	}
	if p := e.part(5, a.w.LogID()); p.TruncatedBefore != 7 {
		t.Fatalf("part of 5 truncated before %d, want 7", p.TruncatedBefore)
	}

	var restoreErr error
	for _, err := range e.n.RestoreChanges(e.ctx, "s", 5, e.full()) {
		if err != nil {
			restoreErr = err
			break
		}
	}
	if !errors.Is(restoreErr, ErrLogTruncated) {
		t.Fatalf("RestoreChanges of 5: %v, want ErrLogTruncated", restoreErr)
	}
	if pl := e.plan(e.n, 5, e.full()); singleBase(pl) != 3 || len(pl.Steps) != 1 || pl.Steps[0].After != 6 || pl.Steps[0].UpTo != 10 {
		t.Fatalf("plan of 5: %s, want snapshot 3 and (6,10]", describePlan(pl))
	}

	if err := e.n.RetainCheckpoint(e.ctx, "s", 2, true); err != nil {
		t.Fatal(err)
	}
	segs2 := segmentKeys(e.part(2, a.w.LogID()).Segments)
	segs3 := segmentKeys(e.part(3, a.w.LogID()).Segments)
	segs5 := segmentKeys(e.part(5, a.w.LogID()).Segments)
	var below []string // only checkpoint 3 lists them, below the snapshot
	for _, k := range segs3 {
		if !slices.Contains(segs2, k) && !slices.Contains(segs5, k) {
			below = append(below, k)
		}
	}
	if len(below) == 0 {
		t.Fatalf("no segment only below the snapshot: 2 %v, 3 %v, 5 %v", segs2, segs3, segs5)
	}
	st := e.gc()
	if st.Deleted != len(below) || st.SnapshotsDeleted != 0 {
		t.Fatalf("gc deleted %d segments, %d snapshots; want %d (%v), 0", st.Deleted, st.SnapshotsDeleted, len(below), below)
	}
	for _, k := range below {
		if e.exists(k) {
			t.Errorf("segment %s below the snapshot survived gc", k)
		}
	}
	// Everything the retained checkpoints (5, the newest, and 2, marked)
	// read is still there.
	for _, id := range []uint64{5, 2} {
		pl := e.plan(e.n, id, e.full())
		for _, s := range pl.Steps {
			for _, seg := range s.Segments {
				if !e.exists(seg.Key) {
					t.Errorf("checkpoint %d needs segment %s, deleted", id, seg.Key)
				}
			}
		}
	}
	if got := restoreMap(t, e.n, "s", 2, e.full()); !maps.Equal(got, e.want[2]) {
		t.Fatalf("retained checkpoint 2 restores to %v, want %v", got, e.want[2])
	}
	if st := e.gc(); st.Deleted != 0 {
		t.Fatalf("second gc deleted %d", st.Deleted)
	}

	// Released, checkpoint 2's segments go too; 5 still restores.
	if err := e.n.RetainCheckpoint(e.ctx, "s", 2, false); err != nil {
		t.Fatal(err)
	}
	if st := e.gc(); st.Deleted == 0 {
		t.Fatalf("gc after release deleted nothing")
	}
	for _, k := range segs2 {
		if !slices.Contains(segs5, k) && e.exists(k) {
			t.Errorf("segment %s of released checkpoint 2 survived gc", k)
		}
	}
	e.plan(e.n, 5, e.full())
	obs := openTestNode(t, e.store, t.TempDir())
	e.plan(obs, 5, e.full())
	// The live writer replays from its truncation point.
	got, err := collect(a.w.Replay(e.ctx, 6, 0, e.full()))
	if err != nil || len(got) != 4 {
		t.Fatalf("replay after 6: %d changes, %v", len(got), err)
	}
	// A later checkpoint still restores, and the snapshot is the newest:
	// never collected.
	step(6)
	e.plan(e.n, 6, e.full())
	e.gc()
	if ids := e.snapshotIDs(e.n); !slices.Equal(ids, []uint64{3}) {
		t.Fatalf("snapshots after gc: %v", ids)
	}
	e.plan(e.n, 6, e.full())
}

// Snapshot records that no retained checkpoint restores from are deleted,
// the newest never; a checkpoint marked retained keeps the snapshot its
// plan uses.
func TestSnapshotRecordGC(t *testing.T) {
	e := newSnapEnv(t, 8, 1)
	a := e.open(e.full(), 0)
	for id := uint64(1); id <= 5; id++ {
		e.append(a, put(uint16(id%8), "k", fmt.Sprint(id)))
		e.checkpoint(id, a)
		if id != 3 && id != 5 {
			e.publish(id)
		}
	}
	e.adopt(1)
	// The newest snapshot with the log (4, at SQN 4) is the one adopted.
	if _, err := collect(a.w.Replay(e.ctx, 3, 0, e.full())); !errors.Is(err, ErrLogTruncated) {
		t.Fatalf("replay after 3: %v, want ErrLogTruncated (truncated below snapshot 4)", err)
	}
	if got, err := collect(a.w.Replay(e.ctx, 4, 0, e.full())); err != nil || len(got) != 1 {
		t.Fatalf("replay after 4: %d changes, %v", len(got), err)
	}
	if err := e.n.RetainCheckpoint(e.ctx, "s", 2, true); err != nil {
		t.Fatal(err)
	}
	st := e.gc()
	if st.SnapshotsDeleted != 1 {
		t.Fatalf("gc deleted %d snapshot records, want 1 (of checkpoint 1)", st.SnapshotsDeleted)
	}
	obs := openTestNode(t, e.store, t.TempDir())
	for _, n := range []*Node{e.n, obs} {
		if ids := e.snapshotIDs(n); !slices.Equal(ids, []uint64{2, 4}) {
			t.Fatalf("snapshots after gc: %v, want [2 4]", ids)
		}
		if pl := e.plan(n, 2, e.full()); singleBase(pl) != 2 {
			t.Fatalf("plan of retained 2: %s", describePlan(pl))
		}
		if pl := e.plan(n, 5, e.full()); singleBase(pl) != 4 {
			t.Fatalf("plan of 5: %s", describePlan(pl))
		}
	}
	if st := e.gc(); st.SnapshotsDeleted != 0 {
		t.Fatalf("second gc deleted %d snapshot records", st.SnapshotsDeleted)
	}
	if _, err := e.n.PlanRestoreFrom(e.ctx, "s", 2, e.full(), nil); err != nil {
		t.Fatalf("checkpoint 2 predates the truncation: %v", err)
	}
	// The newest snapshot is never deleted, even while no root uses it: a
	// fork from retained checkpoint 2 restores from snapshot 2, not 4.
	b := e.open(e.full(), 2)
	e.append(b, put(1, "fork", "b"))
	e.checkpoint(6, b)
	if pl := e.plan(e.n, 6, e.full()); singleBase(pl) != 2 || len(pl.Steps) != 1 || pl.Steps[0].LogID != b.w.LogID() {
		t.Fatalf("plan of the fork's checkpoint 6: %s, want snapshot 2 and the fork's log", describePlan(pl))
	}
	if st := e.gc(); st.SnapshotsDeleted != 0 {
		t.Fatalf("gc deleted %d snapshot records; the newest must stay", st.SnapshotsDeleted)
	}
	if ids := e.snapshotIDs(obs); !slices.Equal(ids, []uint64{2, 4}) {
		t.Fatalf("snapshots: %v, want [2 4]", ids)
	}
	e.plan(obs, 6, e.full())
	// A newer one on the fork's lineage: 4 goes, 2 stays (the live fork
	// started from checkpoint 2, which is also still marked).
	e.publish(6)
	if st := e.gc(); st.SnapshotsDeleted != 1 {
		t.Fatalf("gc deleted %d snapshot records, want 1 (of 4)", st.SnapshotsDeleted)
	}
	if ids := e.snapshotIDs(obs); !slices.Equal(ids, []uint64{2, 6}) {
		t.Fatalf("snapshots: %v, want [2 6]", ids)
	}
	if err := e.n.RetainCheckpoint(e.ctx, "s", 2, false); err != nil {
		t.Fatal(err)
	}
	if st := e.gc(); st.SnapshotsDeleted != 0 {
		t.Fatalf("gc deleted %d snapshot records while a live epoch starts from checkpoint 2", st.SnapshotsDeleted)
	}
	// Once no live epoch starts from checkpoint 2 and it is released, its
	// snapshot goes.
	c := e.open(e.full(), 0) // fences the fork
	if c.w.FromCheckpoint() != 6 {
		t.Fatalf("writer starts from %d, want 6", c.w.FromCheckpoint())
	}
	if st := e.gc(); st.SnapshotsDeleted != 1 {
		t.Fatalf("gc deleted %d snapshot records, want 1 (of 2)", st.SnapshotsDeleted)
	}
	if ids := e.snapshotIDs(obs); !slices.Equal(ids, []uint64{6}) {
		t.Fatalf("snapshots: %v, want [6]", ids)
	}
	e.plan(obs, 6, e.full())
	e.append(c, put(2, "c", "c"))
	e.checkpoint(7, c)
	if pl := e.plan(obs, 7, e.full()); singleBase(pl) != 6 {
		t.Fatalf("plan of 7: %s, want snapshot 6", describePlan(pl))
	}
}

// Publishing refuses a second snapshot of a checkpoint and unknown
// checkpoints; a damaged record is reported as corrupt, never decoded.
func TestSnapshotPublishErrorsAndCorruption(t *testing.T) {
	e := newSnapEnv(t, 4, 3)
	a := e.open(e.full(), 0)
	e.append(a, put(0, "k", "v"))
	e.checkpoint(1, a)
	e.append(a, put(1, "k", "v"))
	e.checkpoint(2, a)
	snap := e.publish(1)
	if _, err := e.n.PublishSnapshot(e.ctx, "s", 1, e.content(`{"other":true}`)); !errors.Is(err, ErrSnapshotConflict) {
		t.Fatalf("second snapshot of 1: %v, want ErrSnapshotConflict", err)
	}
	other := openTestNode(t, e.store, t.TempDir())
	if _, err := other.PublishSnapshot(e.ctx, "s", 1, e.content(`{}`)); !errors.Is(err, ErrSnapshotConflict) {
		t.Fatalf("second snapshot of 1 from another node: %v, want ErrSnapshotConflict", err)
	}
	if _, err := e.n.PublishSnapshot(e.ctx, "s", 7, e.content(`{}`)); !errors.Is(err, ErrCheckpointNotFound) {
		t.Fatalf("snapshot of unknown checkpoint 7: %v, want ErrCheckpointNotFound", err)
	}
	if _, err := e.n.PublishSnapshot(e.ctx, "missing", 1, e.content(`{}`)); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("snapshot of an unknown stream: %v, want ErrStreamNotFound", err)
	}
	if ids := e.snapshotIDs(other); !slices.Equal(ids, []uint64{1}) {
		t.Fatalf("snapshots after refused publishes: %v", ids)
	}

	fs, ok := e.store.(*file.Store)
	if !ok {
		t.Fatalf("store is %T", e.store)
	}
	path := filepath.Join(fs.Root(), filepath.FromSlash(snap.Key()))
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	write := func(path string, data []byte) {
		t.Helper()
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Every byte flipped: a reading node (records are cached only once
	// read intact) reports corruption on every path that reads it.
	reader := openTestNode(t, e.store, t.TempDir())
	for i := range good {
		bad := bytes.Clone(good)
		bad[i] ^= 0x5a
		write(path, bad)
		if _, err := reader.Snapshots(e.ctx, "s"); !errors.Is(err, envelope.ErrCorrupt) {
			t.Fatalf("byte %d flipped: Snapshots: %v, want envelope.ErrCorrupt", i, err)
		}
		if i%16 != 0 {
			continue
		}
		if _, err := reader.PlanRestore(e.ctx, "s", 2, e.full()); !errors.Is(err, envelope.ErrCorrupt) {
			t.Fatalf("byte %d flipped: PlanRestore: %v, want envelope.ErrCorrupt", i, err)
		}
		if _, _, err := reader.PlanWriter(e.ctx, a.w); !errors.Is(err, envelope.ErrCorrupt) {
			t.Fatalf("byte %d flipped: PlanWriter: %v, want envelope.ErrCorrupt", i, err)
		}
		if _, err := reader.AdoptSnapshots(e.ctx); err != nil {
			t.Fatalf("byte %d flipped: AdoptSnapshots of a node without writers: %v", i, err)
		}
		// GC must not delete anything while it cannot read the records.
		if st, err := e.n.CollectGarbage(e.ctx); (err != nil && !errors.Is(err, envelope.ErrCorrupt)) || st.Deleted != 0 || st.SnapshotsDeleted != 0 {
			// e.n cached the record when it published it, but the listing
			// shows another object under the key now: it reads it again.
			t.Fatalf("byte %d flipped: gc of the publishing node: %+v, %v", i, st, err)
		}
		if st, err := reader.CollectGarbage(e.ctx); !errors.Is(err, envelope.ErrCorrupt) || st.Deleted != 0 || st.SnapshotsDeleted != 0 {
			t.Fatalf("byte %d flipped: gc: %+v, %v; want envelope.ErrCorrupt and nothing deleted", i, st, err)
		}
	}
	for _, n := range []int{0, 1, len(good) / 2, len(good) - 1} {
		write(path, good[:n])
		if _, err := reader.Snapshots(e.ctx, "s"); !errors.Is(err, envelope.ErrCorrupt) {
			t.Fatalf("truncated to %d bytes: Snapshots: %v, want envelope.ErrCorrupt", n, err)
		}
	}
	// A valid record stored under another checkpoint's key.
	write(path, good)
	misplaced := filepath.Join(fs.Root(), filepath.FromSlash(snapshotKey("s", 2)))
	write(misplaced, good)
	if _, err := reader.Snapshots(e.ctx, "s"); !errors.Is(err, envelope.ErrCorrupt) {
		t.Fatalf("record of 1 under the key of 2: %v, want envelope.ErrCorrupt", err)
	}
	if err := os.Remove(misplaced); err != nil {
		t.Fatal(err)
	}
	// Repaired, it reads again.
	reader = openTestNode(t, e.store, t.TempDir())
	if ids := e.snapshotIDs(reader); !slices.Equal(ids, []uint64{1}) {
		t.Fatalf("snapshots after repair: %v", ids)
	}
	e.plan(reader, 2, e.full())
	// A record deleted between the listing and the read (by GC on another
	// node) is skipped.
	e.publish(2)
	hidden := openTestNode(t, &goneStore{BlobStore: e.store, gone: snapshotKey("s", 2)}, t.TempDir())
	if ids := e.snapshotIDs(hidden); !slices.Equal(ids, []uint64{1}) {
		t.Fatalf("snapshots with 2 deleted meanwhile: %v, want [1]", ids)
	}
	if ids := e.snapshotIDs(reader); !slices.Equal(ids, []uint64{1, 2}) {
		t.Fatalf("snapshots: %v, want [1 2]", ids)
	}
}

// goneStore lists key gone but reports it not found when read, as if it
// was deleted right after the listing.
type goneStore struct {
	upload.BlobStore
	gone string
}

func (s *goneStore) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	if key == s.gone {
		return nil, fmt.Errorf("get %s: %w", key, upload.ErrNotFound)
	}
	return s.BlobStore.Get(ctx, key)
}

// A live writer truncated below a snapshot rebuilds from the snapshot plus
// its own log after the snapshot's SQN.
func TestSnapshotPlanWriterAfterTruncation(t *testing.T) {
	e := newSnapEnv(t, 8, 3)
	a := e.open(e.full(), 0)

	// No snapshot yet: the whole log.
	e.append(a, put(1, "k", "1"), put(2, "j", "1"))
	pl, ownAfter, err := e.n.PlanWriter(e.ctx, a.w)
	if err != nil || len(pl.Bases) != 0 || len(pl.Steps) != 0 || ownAfter != 0 {
		t.Fatalf("PlanWriter without snapshot: %s, own after %d, %v", describePlan(pl), ownAfter, err)
	}
	e.checkpoint(1, a)
	e.append(a, put(1, "k", "2"), Change{KeyGroup: 2, State: "s", Op: OpDelete, Key: []byte("j")})
	e.checkpoint(2, a)
	snap := e.publish(2)
	e.adopt(1)
	sqn := snap.Logs[a.w.LogID()]
	if sqn != 4 {
		t.Fatalf("snapshot at SQN %d, want 4", sqn)
	}

	checkWriter := func() {
		t.Helper()
		pl, ownAfter, err := e.n.PlanWriter(e.ctx, a.w)
		if err != nil {
			t.Fatalf("PlanWriter: %v", err)
		}
		if singleBase(pl) != 2 || !slices.Equal(baseRanges(pl, 2), []keygroup.Range{e.full()}) || len(pl.Steps) != 0 || ownAfter != sqn {
			t.Fatalf("PlanWriter: %s, own after %d; want snapshot 2, no steps, own after %d", describePlan(pl), ownAfter, sqn)
		}
		m := e.planState(e.n, pl)
		got, err := collect(a.w.Replay(e.ctx, ownAfter, 0, e.full()))
		if err != nil {
			t.Fatalf("replay after %d: %v", ownAfter, err)
		}
		want := a.log[ownAfter:]
		if len(got) != len(want) {
			t.Fatalf("replay after %d: %d changes, want %d", ownAfter, len(got), len(want))
		}
		for i := range got {
			if !sameChange(got[i], want[i]) {
				t.Fatalf("replay change %d: %+v, want %+v", i, got[i], want[i])
			}
			applyChange(m, got[i])
		}
		if want := a.state(uint64(len(a.log))); !maps.Equal(m, want) {
			t.Fatalf("writer state rebuilt as %v, want %v", m, want)
		}
	}
	checkWriter() // nothing after the snapshot
	if _, err := collect(a.w.Replay(e.ctx, 0, 0, e.full())); !errors.Is(err, ErrLogTruncated) {
		t.Fatalf("replay from 0: %v, want ErrLogTruncated", err)
	}
	// Uploaded and not uploaded changes after the snapshot.
	e.append(a, put(3, "x", "3"), put(1, "k", "3"))
	if _, err := a.w.Persist(e.ctx, 0); err != nil {
		t.Fatal(err)
	}
	e.append(a, put(4, "y", "4"), Change{KeyGroup: 1, State: "s", Op: OpMerge, Key: []byte("k"), Value: []byte("+")})
	checkWriter()
	// GC while the writer is live keeps its log from the snapshot on.
	e.gc()
	checkWriter()

	// A writer forked from checkpoint 1 does not use snapshot 2: it
	// rebuilds from checkpoint 1 (the old log before its truncation).
	b := e.open(e.full(), 1)
	e.append(b, put(6, "b", "1"))
	pl, ownAfter, err = e.n.PlanWriter(e.ctx, b.w)
	if err != nil || len(pl.Bases) != 0 || len(pl.Steps) != 1 || pl.Steps[0].LogID != a.w.LogID() || pl.Steps[0].UpTo != 2 || ownAfter != 0 {
		t.Fatalf("PlanWriter of the fork: %s, own after %d, %v", describePlan(pl), ownAfter, err)
	}
	m := e.planState(e.n, pl)
	for c, err := range b.w.Replay(e.ctx, ownAfter, 0, b.r) {
		if err != nil {
			t.Fatal(err)
		}
		applyChange(m, c)
	}
	if want := b.state(uint64(len(b.log))); !maps.Equal(m, want) {
		t.Fatalf("fork state rebuilt as %v, want %v", m, want)
	}
}

// stepsOver describes, in order, the plan's steps over key groups that
// overlap r: "<log> <key groups> (after,upTo]".
func stepsOver(pl RestorePlan, r keygroup.Range) []string {
	var out []string
	for _, s := range pl.Steps {
		if s.KeyGroups.Overlaps(r) {
			out = append(out, fmt.Sprintf("%s %s (%d,%d]", s.LogID, s.KeyGroups, s.After, s.UpTo))
		}
	}
	return out
}

func stepDesc(logID string, r keygroup.Range, after, upTo uint64) string {
	return fmt.Sprintf("%s %s (%d,%d]", logID, r, after, upTo)
}

// Two writers split the key groups; both adopt a snapshot of checkpoint 2
// (truncating their logs). Then one half is rolled back to checkpoint 1:
// the next checkpoint's lineage goes through snapshot 2 for the other half
// (whose log is truncated, so it needs the snapshot) and through checkpoint
// 1 for the rolled back half (snapshot 2 has no part of its new log and is
// not of the checkpoint its epoch started from). An
// acknowledged complete checkpoint must still restore: snapshot choice is
// per part.
func TestSnapshotPlanPartialRollbackAfterTruncation(t *testing.T) {
	e := newSnapEnv(t, 8, 3)
	lo, hi := keygroup.Range{Lo: 0, Hi: 3}, keygroup.Range{Lo: 4, Hi: 7}
	a := e.open(lo, 0)
	x := e.open(hi, 0)
	var snap2 Snapshot
	for id := uint64(1); id <= 3; id++ {
		e.append(a, put(1, "a", fmt.Sprint(id)), put(2, fmt.Sprint("a", id), "x"))
		e.append(x, put(5, "x", fmt.Sprint(id)), put(6, fmt.Sprint("x", id), "x"))
		e.checkpoint(id, a, x)
		if id == 2 {
			snap2 = e.publish(2)
			e.adopt(2)
		}
	}
	if want := map[string]uint64{a.w.LogID(): 4, x.w.LogID(): 4}; !maps.Equal(snap2.Logs, want) {
		t.Fatalf("snapshot 2 logs %v, want %v", snap2.Logs, want)
	}
	b := e.open(lo, 1) // fences a
	e.append(b, put(1, "b", "1"))
	e.append(x, put(5, "x", "4"))
	e.checkpoint(4, b, x)
	if p := e.part(4, x.w.LogID()); p.TruncatedBefore != 5 || p.UpToSQN != 7 {
		t.Fatalf("part of %s in 4: truncated before %d, up to %d; want 5, 7", x.w.LogID(), p.TruncatedBefore, p.UpToSQN)
	}

	// Snapshot 2 for x's half (its log after SQN 4 on top), checkpoint 1
	// replayed (a's log up to 2) then b's log for the rolled back half.
	checkPlan := func(n *Node, pl RestorePlan) {
		t.Helper()
		if len(pl.Bases) != 1 || pl.Bases[0].Snapshot.Checkpoint != 2 || !slices.Equal(pl.Bases[0].Ranges, []keygroup.Range{hi}) {
			t.Fatalf("plan of 4: %s, want snapshot 2 for %s only", describePlan(pl), hi)
		}
		if _, ok := pl.SingleBase(); ok {
			t.Fatalf("plan of 4: %s: SingleBase reports the base of half the key groups as covering all", describePlan(pl))
		}
		if got, want := stepsOver(pl, lo), []string{stepDesc(a.w.LogID(), lo, 0, 2), stepDesc(b.w.LogID(), lo, 0, 1)}; !slices.Equal(got, want) {
			t.Fatalf("plan of 4: steps over %s %v, want %v (%s)", lo, got, want, describePlan(pl))
		}
		if got, want := stepsOver(pl, hi), []string{stepDesc(x.w.LogID(), hi, 4, 7)}; !slices.Equal(got, want) {
			t.Fatalf("plan of 4: steps over %s %v, want %v (%s)", hi, got, want, describePlan(pl))
		}
		e.checkState(n, pl)
	}
	pl, err := e.n.PlanRestore(e.ctx, "s", 4, e.full())
	if err != nil {
		t.Fatalf("complete checkpoint 4 (%s from 1, %s truncated below snapshot 2) is not restorable: PlanRestore: %v", b.w.LogID(), x.w.LogID(), err)
	}
	checkPlan(e.n, pl)
	if want := map[string]string{"1/s/a": "1", "2/s/a1": "x", "1/s/b": "1", "5/s/x": "4", "6/s/x1": "x", "6/s/x2": "x", "6/s/x3": "x"}; !maps.Equal(e.want[4], want) {
		t.Fatalf("model of checkpoint 4: %v, want %v", e.want[4], want)
	}
	// Snapshot 2 as the only candidate: the same plan.
	pl, err = e.n.PlanRestoreFrom(e.ctx, "s", 4, e.full(), &snap2)
	if err != nil {
		t.Fatalf("plan of 4 from snapshot 2: %v", err)
	}
	checkPlan(e.n, pl)
	// Without it, x's truncated prefix is missing.
	if _, err := e.n.PlanRestoreFrom(e.ctx, "s", 4, e.full(), nil); !errors.Is(err, ErrLogTruncated) {
		t.Fatalf("plan of 4 without snapshot: %v, want ErrLogTruncated", err)
	}
	// Each half alone.
	if pl := e.plan(e.n, 4, lo); len(pl.Bases) != 0 || len(pl.Steps) != 2 {
		t.Fatalf("plan of 4 %s: %s, want no snapshot, %s then %s", lo, describePlan(pl), a.w.LogID(), b.w.LogID())
	}
	if pl := e.plan(e.n, 4, hi); singleBase(pl) != 2 || len(pl.Steps) != 1 || pl.Steps[0].After != 4 {
		t.Fatalf("plan of 4 %s: %s, want snapshot 2, then %s after 4", hi, describePlan(pl), x.w.LogID())
	}
	// Checkpoint 3, on the old lineage of both halves: snapshot 2 for all.
	if pl := e.plan(e.n, 3, e.full()); singleBase(pl) != 2 {
		t.Fatalf("plan of 3: %s, want snapshot 2", describePlan(pl))
	}

	e.gc()
	obs := openTestNode(t, e.store, t.TempDir())
	for _, n := range []*Node{e.n, obs} {
		pl, err := n.PlanRestore(e.ctx, "s", 4, e.full())
		if err != nil {
			t.Fatalf("plan of 4 after gc: %v", err)
		}
		checkPlan(n, pl)
	}
}

// Two writers split the key groups and are snapshotted at checkpoints 2
// and 3, and adopt snapshot 3 (truncating their logs). One half is rolled
// back to checkpoint 2: the plan of the next checkpoint takes that half
// from snapshot 2 (the checkpoint its epoch started from) and the other
// from snapshot 3 (the newest with its log), two different bases whose
// states of their ranges plus the replay are the checkpoint's state.
func TestSnapshotPlanTwoBases(t *testing.T) {
	e := newSnapEnv(t, 8, 1)
	lo, hi := keygroup.Range{Lo: 0, Hi: 3}, keygroup.Range{Lo: 4, Hi: 7}
	a := e.open(lo, 0)
	x := e.open(hi, 0)
	for id := uint64(1); id <= 3; id++ {
		e.append(a, put(1, "a", fmt.Sprint(id)), put(uint16(id), fmt.Sprint("a", id), "x"))
		e.append(x, put(5, "x", fmt.Sprint(id)), put(uint16(id+4), fmt.Sprint("x", id), "x"))
		if id == 3 {
			e.append(a, Change{KeyGroup: 1, State: "s", Op: OpDelete, Key: []byte("a1")})
			e.append(x, Change{KeyGroup: 5, State: "s", Op: OpDelete, Key: []byte("x1")})
		}
		e.checkpoint(id, a, x)
	}
	snap2 := e.publish(2)
	snap3 := e.publish(3)
	if snap3.Logs[x.w.LogID()] != 7 {
		t.Fatalf("snapshot 3 has %s at %d, want 7", x.w.LogID(), snap3.Logs[x.w.LogID()])
	}
	e.adopt(2) // a and x truncated below snapshot 3

	b := e.open(lo, 2) // fences a: its checkpoint 3 changes are gone
	e.append(b, put(0, "b", "1"), Change{KeyGroup: 2, State: "s", Op: OpDelete, Key: []byte("a2")})
	e.append(x, put(5, "x", "4"), Change{KeyGroup: 7, State: "s", Op: OpMerge, Key: []byte("x3"), Value: []byte("+")})
	e.checkpoint(4, b, x)
	want4 := map[string]string{"1/s/a": "2", "1/s/a1": "x", "0/s/b": "1", "5/s/x": "4", "6/s/x2": "x", "7/s/x3": "x+"}
	if !maps.Equal(e.want[4], want4) {
		t.Fatalf("model of checkpoint 4: %v, want %v", e.want[4], want4)
	}

	checkPlan := func(n *Node, pl RestorePlan) {
		t.Helper()
		if len(pl.Bases) != 2 || !slices.Equal(baseRanges(pl, 2), []keygroup.Range{lo}) || !slices.Equal(baseRanges(pl, 3), []keygroup.Range{hi}) {
			t.Fatalf("plan of 4: %s, want snapshot 2 for %s and snapshot 3 for %s", describePlan(pl), lo, hi)
		}
		if s, ok := pl.SingleBase(); ok {
			t.Fatalf("plan of 4: %s: SingleBase = snapshot %d with two bases", describePlan(pl), s.Checkpoint)
		}
		if s, ok := pl.NewestBase(); !ok || s.Checkpoint != 3 {
			t.Fatalf("plan of 4: %s: newest base %d (%v), want 3", describePlan(pl), s.Checkpoint, ok)
		}
		if got, want := stepsOver(pl, lo), []string{stepDesc(b.w.LogID(), lo, 0, 2)}; !slices.Equal(got, want) {
			t.Fatalf("plan of 4: steps over %s %v, want %v (%s)", lo, got, want, describePlan(pl))
		}
		if got, want := stepsOver(pl, hi), []string{stepDesc(x.w.LogID(), hi, 7, 9)}; !slices.Equal(got, want) {
			t.Fatalf("plan of 4: steps over %s %v, want %v (%s)", hi, got, want, describePlan(pl))
		}
		// Both bases' ranges imported (each the model state of its
		// snapshot's checkpoint), then the replay: checkpoint 4's state.
		m := map[string]string{}
		for _, base := range pl.Bases {
			for _, r := range base.Ranges {
				maps.Copy(m, restrict(e.want[base.Snapshot.Checkpoint], r))
			}
		}
		for c, err := range n.ReplayPlan(e.ctx, pl) {
			if err != nil {
				t.Fatalf("replay plan of 4: %v", err)
			}
			if c.LogID == a.w.LogID() {
				t.Fatalf("replay plan of 4 yields %s SQN %d of the fenced writer", c.LogID, c.SQN)
			}
			applyChange(m, c)
		}
		if !maps.Equal(m, want4) {
			t.Fatalf("checkpoint 4 restores (plan %s) to\n  %v\nwant\n  %v", describePlan(pl), m, want4)
		}
		e.checkState(n, pl)
	}
	pl := e.plan(e.n, 4, e.full())
	checkPlan(e.n, pl)

	// Key groups 2..5 straddle the halves: both bases, each for its part.
	mid := keygroup.Range{Lo: 2, Hi: 5}
	pl = e.plan(e.n, 4, mid)
	if len(pl.Bases) != 2 || !slices.Equal(baseRanges(pl, 2), []keygroup.Range{{Lo: 2, Hi: 3}}) || !slices.Equal(baseRanges(pl, 3), []keygroup.Range{{Lo: 4, Hi: 5}}) {
		t.Fatalf("plan of 4 %s: %s, want snapshot 2 for 2..3 and 3 for 4..5", mid, describePlan(pl))
	}
	// Each half alone: one base.
	if pl := e.plan(e.n, 4, lo); singleBase(pl) != 2 || len(pl.Steps) != 1 || pl.Steps[0].LogID != b.w.LogID() {
		t.Fatalf("plan of 4 %s: %s, want snapshot 2 and %s", lo, describePlan(pl), b.w.LogID())
	}
	if pl := e.plan(e.n, 4, hi); singleBase(pl) != 3 || len(pl.Steps) != 1 || pl.Steps[0].After != 7 {
		t.Fatalf("plan of 4 %s: %s, want snapshot 3 and %s after 7", hi, describePlan(pl), x.w.LogID())
	}
	// With only one of the snapshots: snapshot 2 does not cover x's
	// truncated prefix; with snapshot 3 alone, the rolled back half
	// replays a's log up to checkpoint 2 (not yet collected).
	if _, err := e.n.PlanRestoreFrom(e.ctx, "s", 4, e.full(), &snap2); !errors.Is(err, ErrLogTruncated) {
		t.Fatalf("plan of 4 from snapshot 2 only: %v, want ErrLogTruncated", err)
	}
	pl3, err := e.n.PlanRestoreFrom(e.ctx, "s", 4, e.full(), &snap3)
	if err != nil {
		t.Fatalf("plan of 4 from snapshot 3 only: %v", err)
	}
	if len(pl3.Bases) != 1 || !slices.Equal(baseRanges(pl3, 3), []keygroup.Range{hi}) ||
		!slices.Equal(stepsOver(pl3, lo), []string{stepDesc(a.w.LogID(), lo, 0, 4), stepDesc(b.w.LogID(), lo, 0, 2)}) {
		t.Fatalf("plan of 4 from snapshot 3 only: %s, want snapshot 3 for %s, %s (0,4] and %s for %s", describePlan(pl3), hi, a.w.LogID(), b.w.LogID(), lo)
	}
	e.checkState(e.n, pl3)

	// The writers' own plans: each its half of its base.
	if pl, ownAfter, err := e.n.PlanWriter(e.ctx, b.w); err != nil || singleBase(pl) != 2 || len(pl.Steps) != 0 || ownAfter != 0 {
		t.Fatalf("PlanWriter(%s): %s, own after %d, %v; want snapshot 2", b.w.LogID(), describePlan(pl), ownAfter, err)
	}
	if pl, ownAfter, err := e.n.PlanWriter(e.ctx, x.w); err != nil || singleBase(pl) != 3 || len(pl.Steps) != 0 || ownAfter != 7 {
		t.Fatalf("PlanWriter(%s): %s, own after %d, %v; want snapshot 3, own after 7", x.w.LogID(), describePlan(pl), ownAfter, err)
	}

	// GC keeps both bases of the retained checkpoint, and what its steps
	// read.
	e.gc()
	obs := openTestNode(t, e.store, t.TempDir())
	for _, n := range []*Node{e.n, obs} {
		if ids := e.snapshotIDs(n); !slices.Equal(ids, []uint64{2, 3}) {
			t.Fatalf("snapshots after gc: %v, want [2 3] (both bases of checkpoint 4)", ids)
		}
		pl, err := n.PlanRestore(e.ctx, "s", 4, e.full())
		if err != nil {
			t.Fatalf("plan of 4 after gc: %v", err)
		}
		checkPlan(n, pl)
	}
}

// statFault fails every Stat of a snapshot file (an unknown outcome) while
// fail is set.
type statFault struct {
	upload.BlobStore
	fail atomic.Bool
}

func (s *statFault) Stat(ctx context.Context, key string) (upload.ObjectInfo, error) {
	if s.fail.Load() && strings.Contains(key, "/sst/") {
		return upload.ObjectInfo{}, fmt.Errorf("stat %s: injected: %w", key, upload.ErrTransient)
	}
	return s.BlobStore.Stat(ctx, key)
}

// putFile stores a snapshot file of the stream and returns its reference.
func (e *snapEnv) putFile(name string, size int) SnapshotFileRef {
	e.t.Helper()
	key := SnapshotFilePrefix(e.stream) + name
	if err := e.store.PutIfAbsent(e.ctx, key, bytes.NewReader(make([]byte, size)), int64(size)); err != nil {
		e.t.Fatal(err)
	}
	return SnapshotFileRef{Key: key, Size: int64(size)}
}

func (e *snapEnv) truncatedBefore(sw *snapWriter) uint64 {
	sw.w.mu.Lock()
	defer sw.w.mu.Unlock()
	return sw.w.truncatedBefore
}

// R3 (publication): every file a record names is Stat-ed, with its size,
// before the record is written; a definitely missing file refuses it, a
// failed Stat (unknown outcome) refuses it without calling anything
// missing; bad requests are refused before anything is read.
func TestSnapshotPublishVerifiesFiles(t *testing.T) {
	e := newSnapEnv(t, 4, 3)
	a := e.open(e.full(), 0)
	e.append(a, put(0, "k", "v"))
	e.checkpoint(1, a)
	f1, f2 := e.putFile("r1-a-000001.sst", 10), e.putFile("r1-a-000002.sst", 20)
	c := e.content(`{}`)
	c.Files = []SnapshotFileRef{f1, {Key: SnapshotFilePrefix("s") + "r1-a-000003.sst", Size: 5}}
	if _, err := e.n.PublishSnapshot(e.ctx, "s", 1, c); !errors.Is(err, ErrSnapshotFilesMissing) {
		t.Fatalf("publish naming a file never stored: %v, want ErrSnapshotFilesMissing", err)
	}
	c.Files = []SnapshotFileRef{f1, {Key: f2.Key, Size: 21}}
	if _, err := e.n.PublishSnapshot(e.ctx, "s", 1, c); !errors.Is(err, ErrSnapshotFilesMissing) {
		t.Fatalf("publish naming a file with the wrong size: %v, want ErrSnapshotFilesMissing", err)
	}
	for _, bad := range [][]SnapshotFileRef{
		{{Key: "streams/t/sst/x", Size: 1}},
		{{Key: SnapshotFilePrefix("s"), Size: 1}},
		{f1, f1},
		{{Key: f1.Key, Size: -1}},
	} {
		c.Files = bad
		if _, err := e.n.PublishSnapshot(e.ctx, "s", 1, c); !errors.Is(err, ErrInvalidChange) {
			t.Fatalf("publish with files %v: %v, want ErrInvalidChange", bad, err)
		}
	}
	c.Files = []SnapshotFileRef{f1, f2}
	c.Incarnation = ""
	if _, err := e.n.PublishSnapshot(e.ctx, "s", 1, c); !errors.Is(err, ErrInvalidChange) {
		t.Fatalf("publish without an incarnation: %v, want ErrInvalidChange", err)
	}
	faulty := &statFault{BlobStore: e.store}
	faulty.fail.Store(true)
	other := openTestNode(t, faulty, t.TempDir())
	c.Incarnation = e.inc
	if _, err := other.PublishSnapshot(e.ctx, "s", 1, c); err == nil || errors.Is(err, ErrSnapshotFilesMissing) || !errors.Is(err, upload.ErrTransient) {
		t.Fatalf("publish while Stat fails: %v, want the Stat's error, not ErrSnapshotFilesMissing", err)
	}
	if e.exists(snapshotKey("s", 1)) {
		t.Fatal("a refused publication wrote a record")
	}
	s, err := e.n.PublishSnapshot(e.ctx, "s", 1, c)
	if err != nil {
		t.Fatal(err)
	}
	if s.Incarnation != e.inc || !slices.Equal(s.Files, c.Files) {
		t.Fatalf("published %+v", s)
	}
	if snaps, err := openTestNode(t, e.store, t.TempDir()).Snapshots(e.ctx, "s"); err != nil || len(snaps) != 1 || !slices.Equal(snaps[0].Files, c.Files) {
		t.Fatalf("read back: %+v %v", snaps, err)
	}
}

// R3 (adoption): a node truncates a writer below a snapshot only after it
// found all the snapshot's files. A record with a file definitely missing
// is refused before anything is truncated, is never planned from, and GC
// deletes it; checkpoint 1 still restores from the log. A Stat that fails
// decides nothing: no truncation, no deletion, and once Stat works the
// (complete) snapshot is adopted.
func TestSnapshotAdoptRefusesMissingFiles(t *testing.T) {
	e := newSnapEnv(t, 4, 3)
	a := e.open(e.full(), 0)
	e.append(a, put(0, "k", "v"), put(1, "k2", "v2"))
	e.checkpoint(1, a)
	e.append(a, put(2, "k3", "v3"))
	e.checkpoint(2, a)
	c := e.content(`{}`)
	c.Files = []SnapshotFileRef{e.putFile("r1-a-000001.sst", 10), e.putFile("r1-a-000002.sst", 20)}
	// Published by another node (a materializer): e.n has not checked it.
	pub := openTestNode(t, e.store, t.TempDir())
	s, err := pub.PublishSnapshot(e.ctx, "s", 1, c)
	if err != nil {
		t.Fatal(err)
	}
	// A file vanishes after publication (the review's in-flight GC).
	if err := e.store.Delete(e.ctx, c.Files[1].Key); err != nil {
		t.Fatal(err)
	}
	before := e.truncatedBefore(a)
	k, err := e.n.AdoptSnapshots(e.ctx)
	if k != 0 || !errors.Is(err, ErrSnapshotFilesMissing) {
		t.Fatalf("adopt a snapshot with a missing file: truncated %d, %v; want 0 and ErrSnapshotFilesMissing", k, err)
	}
	if got := e.truncatedBefore(a); got != before {
		t.Fatalf("writer truncated before %d (was %d) below a snapshot with a missing file", got, before)
	}
	if ids := e.snapshotIDs(e.n); len(ids) != 0 {
		t.Fatalf("Snapshots lists %v, want none (the record names a missing file)", ids)
	}
	if pl := e.plan(e.n, 2, e.full()); len(pl.Bases) != 0 {
		t.Fatalf("plan of 2 uses a base with a missing file: %s", describePlan(pl))
	}
	if st := e.gc(); st.SnapshotsDeleted != 1 || e.exists(s.Key()) {
		t.Fatalf("gc kept the record with a missing file: %+v", st)
	}
	e.plan(e.n, 1, e.full())
	e.plan(e.n, 2, e.full())

	// Unknown outcome: a writer node whose Stats fail.
	faulty := &statFault{BlobStore: e.store}
	wn, err := Open(e.ctx, testNodeOptions(faulty, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wn.Close(context.Background()) })
	a.w.Close(e.ctx)
	w, err := wn.OpenWriter(e.ctx, WriterConfig{Stream: "s", KeyGroups: e.full()})
	if err != nil {
		t.Fatal(err)
	}
	b := &snapWriter{w: w, r: e.full(), base: e.want[2]}
	e.append(b, put(3, "k4", "v4"))
	e.checkpoint(3, b)
	c.Files = []SnapshotFileRef{e.putFile("r3-a-000001.sst", 10)}
	if _, err := pub.PublishSnapshot(e.ctx, "s", 3, c); err != nil {
		t.Fatal(err)
	}
	faulty.fail.Store(true)
	k, err = wn.AdoptSnapshots(e.ctx)
	if k != 0 || err == nil || errors.Is(err, ErrSnapshotFilesMissing) {
		t.Fatalf("adopt while Stat fails: truncated %d, %v; want 0 and the Stat's error", k, err)
	}
	if st, err := wn.CollectGarbage(e.ctx); err == nil || st.SnapshotsDeleted != 0 || st.Deleted != 0 {
		t.Fatalf("gc while Stat fails: %+v %v; want an error and nothing deleted", st, err)
	}
	faulty.fail.Store(false)
	if k, err := wn.AdoptSnapshots(e.ctx); k != 1 || err != nil {
		t.Fatalf("adopt once Stat works: truncated %d, %v; want 1", k, err)
	}
	if got := e.truncatedBefore(b); got != uint64(len(b.log))+1 {
		t.Fatalf("writer truncated before %d, want %d", got, len(b.log)+1)
	}
}

// sealSnapshot stores a snapshot record as another process would have.
func (e *snapEnv) sealSnapshot(s Snapshot) {
	e.t.Helper()
	data, err := envelope.Seal(snapshotKind, s)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := e.store.PutIfAbsent(e.ctx, snapshotKey(s.Stream, s.Checkpoint), bytes.NewReader(data), int64(len(data))); err != nil {
		e.t.Fatal(err)
	}
}

// R5: records of another incarnation of the stream (a late publication by
// a round that spanned DeleteStream + CreateStream), and records of no
// incarnation, are refused everywhere: not listed, planned or adopted,
// deleted by GC; publication for another incarnation is refused.
func TestSnapshotForeignIncarnationRefused(t *testing.T) {
	e := newSnapEnv(t, 4, 3)
	a := e.open(e.full(), 0)
	e.append(a, put(0, "k", "v"), put(1, "k2", "v2"))
	e.checkpoint(1, a)
	e.append(a, put(2, "k3", "v3"))
	e.checkpoint(2, a)
	logs := map[string]uint64{a.w.LogID(): 2}
	e.sealSnapshot(Snapshot{Stream: "s", Incarnation: "old-incarnation", Checkpoint: 1, Logs: logs, CreatedAt: time.Now().UTC(), Manifest: json.RawMessage(`{}`)})
	e.sealSnapshot(Snapshot{Stream: "s", Checkpoint: 2, Logs: map[string]uint64{a.w.LogID(): 3}, CreatedAt: time.Now().UTC(), Manifest: json.RawMessage(`{}`)})
	for _, n := range []*Node{e.n, openTestNode(t, e.store, t.TempDir())} {
		if ids := e.snapshotIDs(n); len(ids) != 0 {
			t.Fatalf("Snapshots lists %v, want none (foreign and incarnation-less records)", ids)
		}
	}
	if pl := e.plan(e.n, 2, e.full()); len(pl.Bases) != 0 {
		t.Fatalf("plan of 2 uses a foreign base: %s", describePlan(pl))
	}
	if _, ownAfter, err := e.n.PlanWriter(e.ctx, a.w); err != nil || ownAfter != 0 {
		t.Fatalf("writer plan: after %d, %v; want the whole log", ownAfter, err)
	}
	e.adopt(0)
	if got := e.truncatedBefore(a); got > 1 {
		t.Fatalf("writer truncated before %d below a foreign snapshot", got)
	}
	if _, err := e.n.PublishSnapshot(e.ctx, "s", 2, SnapshotContent{Incarnation: "old-incarnation", Manifest: json.RawMessage(`{}`)}); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("publish for another incarnation: %v, want ErrStreamNotFound", err)
	}
	if st := e.gc(); st.SnapshotsDeleted != 2 || e.exists(snapshotKey("s", 1)) || e.exists(snapshotKey("s", 2)) {
		t.Fatalf("gc kept foreign records: %+v", st)
	}
	e.publish(2)
	e.adopt(1)
	e.plan(e.n, 2, e.full())
}

// R5 with a stale view: a node that read stream t before it was deleted
// and created again must neither publish the old incarnation's state into
// the new stream nor set aside (and so collect) the new stream's records;
// a record of the old incarnation it had cached does not hide the new
// one's under the same key.
func TestSnapshotStaleIncarnationView(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	x := openTestNode(t, store, t.TempDir()) // the stale node
	y := openTestNode(t, store, t.TempDir())
	cfg1, err := y.CreateStream(ctx, "t", 2)
	if err != nil {
		t.Fatal(err)
	}
	all := keygroup.Full(2)
	cp := func(id uint64) *Writer {
		t.Helper()
		w, err := y.OpenWriter(ctx, WriterConfig{Stream: "t", KeyGroups: all})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := w.Append(ctx, []Change{put(0, "k", fmt.Sprint(id))}, Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := w.Checkpoint(ctx, id, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", id, res, err)
		}
		return w
	}
	w := cp(1)
	if _, err := y.PublishSnapshot(ctx, "t", 1, SnapshotContent{Incarnation: cfg1.Incarnation, Manifest: json.RawMessage(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if snaps, err := x.Snapshots(ctx, "t"); err != nil || len(snaps) != 1 {
		t.Fatalf("x lists %v %v", snaps, err) // x caches incarnation 1's record
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := y.DeleteStream(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	cfg2, err := y.CreateStream(ctx, "t", 2)
	if err != nil {
		t.Fatal(err)
	}
	w = cp(1)
	defer w.Close(ctx)
	s2, err := y.PublishSnapshot(ctx, "t", 1, SnapshotContent{Incarnation: cfg2.Incarnation, Manifest: json.RawMessage(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	// x's garbage collection sees the new record as foreign at first: it
	// must find out it is stale rather than delete it.
	for range 3 {
		_, err := x.CollectGarbage(ctx)
		t.Logf("gc of the stale node: %v", err)
		if err != nil && !errors.Is(err, ErrStreamNotFound) {
			t.Fatalf("gc of the stale node: %v", err)
		}
		if _, err := store.Stat(ctx, s2.Key()); err != nil {
			t.Fatalf("the stale node's gc deleted the new incarnation's record: %v", err)
		}
	}
	var snaps []Snapshot
	for range 2 { // the first call may only find out the view is stale
		if snaps, err = x.Snapshots(ctx, "t"); err == nil {
			break
		}
		if !errors.Is(err, ErrStreamNotFound) {
			t.Fatal(err)
		}
	}
	if err != nil || len(snaps) != 1 || snaps[0].Incarnation != cfg2.Incarnation {
		t.Fatalf("x lists %+v %v, want the new incarnation's record", snaps, err)
	}
	// A round that folded the old incarnation on x cannot publish.
	if _, err := x.PublishSnapshot(ctx, "t", 2, SnapshotContent{Incarnation: cfg1.Incarnation, Manifest: json.RawMessage(`{}`)}); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("publish of the old incarnation: %v, want ErrStreamNotFound", err)
	}
}
