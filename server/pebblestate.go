package server

import (
	"bytes"
	"context"
	"fmt"
	"iter"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/segments"
)

// PebbleState is the StateReader backed by a materializer.Store: the same
// views and write hooks as LiveState, with the data in Pebble instead of
// maps. Only the bookkeeping of which view serves each key group (a
// writer of this node, or the newest complete checkpoint) is in memory.
//
// Every key group of a stream holds, in the store, the data of exactly one
// source:
//
//   - a writer of this node that owns it (open, or closed until a newer
//     writer opens it): the checkpoint the writer started from plus every
//     change it appended, each acknowledged batch applied in SQN order as
//     one Apply (one Pebble batch), so a read sees all of a batch or none;
//   - otherwise the newest complete checkpoint, re-checked at most once per
//     refresh interval and refolded (drop + fold) for those key groups when
//     it changes.
//
// A change of source drops the key groups (DropKeyGroups) and folds the new
// source into them, holding the stream's fold lock exclusively, so readers
// of the stream wait for the fold (as LiveState's readers wait for a
// checkpoint reload) and never see a half-folded range.
//
// Applied SQNs: every fold uses log ids of its own, derived from a counter
// that never repeats within the store (`<writer id>#<n>` for a writer's own
// changes with their real SQNs, `<writer id>#<n>/base` or `checkpoint
// <id>#<n>` with SQNs numbered 1.. for the changes of a checkpoint). The
// store keeps a log's applied SQN when its key groups are dropped, so
// reusing a log id after a drop would skip the refold; a fresh id per fold
// starts at applied SQN 0, and the writer's own id makes Appended idempotent
// against the replay it was built from (ApplyThrough marks the view folded
// through the writer's last SQN at open). The stale applied-SQN keys of
// earlier folds are a few bytes each and vanish with the directory, which
// is wiped on open: the store is a cache rebuilt from the blob store.
type PebbleState struct {
	node         *changelog.Node
	store        *materializer.Store
	refreshEvery time.Duration
	folds        atomic.Uint64 // derives fresh log ids

	mu      sync.Mutex
	streams map[string]*pebbleStream
}

// staleKG marks a key group whose data in the store is not the checkpoint
// base (a writer's, or nothing known): it must be dropped and refolded
// before the base serves it.
const staleKG = ^uint64(0)

type pebbleStream struct {
	// fold is held exclusively while key groups are dropped and refolded,
	// shared by reads.
	fold sync.RWMutex

	mu         sync.Mutex
	keyGroups  int
	checkpoint uint64    // newest complete checkpoint seen
	checkedAt  time.Time // when it was last looked up
	base       []uint64  // per key group: checkpoint folded into it, or staleKG
	dirty      bool      // some key group without a writer may need a fold
	writers    []*pebbleWriter

	statesMu sync.Mutex
	states   map[string]struct{} // every state name folded into the stream
}

// pebbleWriter is one writer's view; mu serializes its Applies. Lock order:
// pebbleStream.mu, then pebbleWriter.mu.
type pebbleWriter struct {
	id  string
	r   keygroup.Range
	log string // the store's log id for the writer's changes

	mu      sync.Mutex
	closed  bool
	dead    bool  // replaced or fenced: its key groups are no longer its own
	err     error // an Apply failed: the view is incomplete
	lastSQN uint64
	pending map[uint64][]segments.Change
}

// OpenPebbleState wipes the store in dir (a cache: it is rebuilt from the
// blob store as writers open and checkpoints complete) and opens a fresh
// one there. log receives Pebble's messages (nil: none).
func OpenPebbleState(node *changelog.Node, dir string, log *slog.Logger) (*PebbleState, error) {
	// The store lives in dir/db and dir/staging; nothing else in dir is
	// touched, so a misconfigured dir loses nothing but a store.
	for _, sub := range []string{"db", "staging"} {
		if err := os.RemoveAll(filepath.Join(dir, sub)); err != nil {
			return nil, fmt.Errorf("state dir %s: wipe: %w", dir, err)
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Remote: bases are imported lazily (see importSnapshot), read from
	// the node's blob store until the store's hydrator made them local.
	store, err := materializer.Open(dir, materializer.Options{Logger: materializer.SlogLogger(log.With("component", "pebble")), Remote: node.BlobStore(), RefOwner: node.ID()})
	if err != nil {
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	return &PebbleState{node: node, store: store, refreshEvery: time.Second, streams: map[string]*pebbleStream{}}, nil
}

// Close closes the store; reads fail afterwards.
func (p *PebbleState) Close() error { return p.store.Close() }

func (p *PebbleState) view(stream string) *pebbleStream {
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.streams[stream]
	if !ok {
		v = &pebbleStream{states: map[string]struct{}{}}
		p.streams[stream] = v
	}
	return v
}

func (p *PebbleState) lookup(stream string) *pebbleStream {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.streams[stream]
}

// sizeLocked sizes the per-key-group bookkeeping; a stream recreated with
// another key-group count starts over. The caller holds v.mu.
func (v *pebbleStream) sizeLocked(keyGroups int) {
	if v.keyGroups == keyGroups {
		return
	}
	for _, w := range v.writers {
		w.retire()
	}
	v.keyGroups, v.writers, v.dirty = keyGroups, nil, true
	v.base = make([]uint64, keyGroups)
	for i := range v.base {
		v.base[i] = staleKG // unknown contents: drop before the first fold
	}
}

func (w *pebbleWriter) retire() {
	w.mu.Lock()
	w.dead = true
	w.pending = nil
	w.mu.Unlock()
}

// owner returns the writer that serves kg, or nil (the base); the caller
// holds v.mu.
func (v *pebbleStream) owner(kg uint16) *pebbleWriter {
	for _, w := range v.writers {
		if w.r.Contains(kg) {
			return w
		}
	}
	return nil
}

func (v *pebbleStream) addStates(changes []segments.Change) {
	v.statesMu.Lock()
	defer v.statesMu.Unlock()
	prev := ""
	for i := range changes {
		if s := changes[i].State; i == 0 || s != prev {
			if _, ok := v.states[s]; !ok {
				v.states[s] = struct{}{}
			}
			prev = s
		}
	}
}

func (v *pebbleStream) addStateNames(names []string) {
	v.statesMu.Lock()
	defer v.statesMu.Unlock()
	for _, s := range names {
		v.states[s] = struct{}{}
	}
}

func (v *pebbleStream) stateNames() []string {
	v.statesMu.Lock()
	defer v.statesMu.Unlock()
	out := make([]string, 0, len(v.states))
	for s := range v.states {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// Forget drops a deleted stream's views and its data.
func (p *PebbleState) Forget(stream string) {
	// Under p.mu so that no view of a recreated stream folds before the
	// drop. (A new view also drops every key group before its first fold.)
	p.mu.Lock()
	defer p.mu.Unlock()
	v := p.streams[stream]
	if v == nil {
		return
	}
	delete(p.streams, stream)
	v.fold.Lock()
	defer v.fold.Unlock()
	v.mu.Lock()
	for _, w := range v.writers {
		w.retire()
	}
	v.writers = nil
	v.mu.Unlock()
	// Best effort: the data of a deleted stream is only garbage.
	_ = p.store.DropKeyGroups(context.Background(), stream, keygroup.Range{Lo: 0, Hi: 0xFFFF})
}

// WriterOpened builds the view of a writer just opened (or resumed after a
// restart): its key groups are dropped and the checkpoint it started from
// plus what it has appended so far are folded into them. Views of older
// writers of overlapping key groups are dropped; their other key groups go
// back to the checkpoint base.
func (p *PebbleState) WriterOpened(ctx context.Context, w *changelog.Writer) error {
	r, id := w.KeyGroups(), w.LogID()
	stream := streamOf(id)
	cfg, err := p.node.Stream(ctx, stream)
	if err != nil {
		return err
	}
	n := p.folds.Add(1)
	nw := &pebbleWriter{id: id, r: r, log: fmt.Sprintf("%s#%d", id, n), pending: map[uint64][]segments.Change{}}
	v := p.view(stream)
	v.fold.Lock()
	defer v.fold.Unlock()
	v.mu.Lock()
	v.sizeLocked(cfg.KeyGroups)
	kept := make([]*pebbleWriter, 0, len(v.writers)+1)
	for _, o := range v.writers {
		if o.r.Overlaps(r) {
			o.retire()
			v.dirty = true // its key groups outside r return to the base
			continue
		}
		kept = append(kept, o)
	}
	v.setBaseLocked(r, staleKG)
	v.writers = append(kept, nw)
	v.mu.Unlock()

	fail := func(err error) error {
		// The range holds part of a view: the base refolds it.
		v.mu.Lock()
		v.writers = slices.DeleteFunc(v.writers, func(o *pebbleWriter) bool { return o == nw })
		v.dirty = true
		v.mu.Unlock()
		nw.retire()
		return err
	}
	// The writer's state: the newest snapshot that is a base of it, the
	// changelog after it up to where the epoch started, then the writer's
	// own log (uploaded segments and local tail) after the snapshot.
	pl, ownAfter, err := p.node.PlanWriter(ctx, w)
	if err != nil {
		return fail(err)
	}
	if err := p.store.DropKeyGroups(ctx, stream, r); err != nil {
		return fail(err)
	}
	if err := p.importSnapshot(ctx, v, stream, pl); err != nil {
		return fail(err)
	}
	if len(pl.Steps) > 0 {
		if err := p.fold(ctx, v, stream, fmt.Sprintf("%s/base", nw.log), p.node.ReplayPlan(ctx, pl), true, 0); err != nil {
			return fail(err)
		}
	}
	last := w.LastSQN()
	if last > 0 {
		if err := p.fold(ctx, v, stream, nw.log, w.Replay(ctx, ownAfter, last, r), false, last); err != nil {
			return fail(err)
		}
	}
	nw.mu.Lock()
	nw.lastSQN = last
	nw.mu.Unlock()
	return nil
}

// foldChunk bounds the changes of one Apply while folding.
const (
	foldChunkChanges = 4096
	foldChunkBytes   = 4 << 20
)

// fold applies seq to the store under log id logID, in chunks. renumber
// gives the changes SQNs 1.. (checkpoint changes come from several logs);
// otherwise they keep theirs. through > 0 marks the log applied through it
// at the end. The caller holds v.fold exclusively.
func (p *PebbleState) fold(ctx context.Context, v *pebbleStream, stream, logID string, seq iter.Seq2[segments.Change, error], renumber bool, through uint64) error {
	var (
		batch []segments.Change
		arena []byte
		sqn   uint64
	)
	flush := func(through uint64) error {
		v.addStates(batch)
		if err := p.store.ApplyThrough(stream, logID, batch, through); err != nil {
			return fmt.Errorf("stream %s: fold: %w", stream, err)
		}
		batch, arena = batch[:0], arena[:0]
		return nil
	}
	for c, err := range seq {
		if err != nil {
			return err
		}
		if renumber {
			sqn++
			c.SQN = sqn
		}
		c.LogID = ""
		// Key and Value are only valid until the next iteration.
		arena = append(arena, c.Key...)
		c.Key = arena[len(arena)-len(c.Key) : len(arena) : len(arena)]
		arena = append(arena, c.Value...)
		c.Value = arena[len(arena)-len(c.Value) : len(arena) : len(arena)]
		batch = append(batch, c)
		if len(batch) >= foldChunkChanges || len(arena) >= foldChunkBytes {
			if err := flush(0); err != nil {
				return err
			}
		}
	}
	if len(batch) > 0 || through > 0 {
		return flush(through)
	}
	return nil
}

// Appended applies an acknowledged batch (SQNs first..) to its writer's
// view: batches apply in SQN order, one Pebble batch each; a batch that
// finished before the one preceding it waits in pending.
func (p *PebbleState) Appended(stream, writerID string, first uint64, batch []changelog.Change) {
	v := p.lookup(stream)
	if v == nil {
		return
	}
	v.mu.Lock()
	i := slices.IndexFunc(v.writers, func(o *pebbleWriter) bool { return o.id == writerID })
	if i < 0 {
		v.mu.Unlock()
		return // replaced by a newer writer meanwhile
	}
	w := v.writers[i]
	w.mu.Lock()
	v.mu.Unlock()
	defer w.mu.Unlock()
	if w.dead || w.err != nil || first <= w.lastSQN {
		return
	}
	changes := make([]segments.Change, len(batch))
	for j, c := range batch {
		changes[j] = segments.Change{SQN: first + uint64(j), KeyGroup: c.KeyGroup, State: c.State, Op: c.Op, Key: c.Key, Value: c.Value}
	}
	if first != w.lastSQN+1 {
		// Out of order: keep a copy until the gap before it is filled.
		for j := range changes {
			changes[j].Key, changes[j].Value = bytes.Clone(changes[j].Key), bytes.Clone(changes[j].Value)
		}
		w.pending[first] = changes
		return
	}
	for {
		v.addStates(changes)
		if err := p.store.Apply(stream, w.log, changes); err != nil {
			w.err = fmt.Errorf("read view of writer %s: apply SQNs %d..: %w", w.id, changes[0].SQN, err)
			w.pending = nil
			return
		}
		w.lastSQN += uint64(len(changes))
		next, ok := w.pending[w.lastSQN+1]
		if !ok {
			return
		}
		delete(w.pending, w.lastSQN+1)
		changes = next
	}
}

// WriterClosed keeps a closed writer's view for its key groups until a new
// writer opens them (the newest checkpoint may predate the close).
func (p *PebbleState) WriterClosed(stream, writerID string) {
	v := p.lookup(stream)
	if v == nil {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, o := range v.writers {
		if o.id == writerID {
			o.mu.Lock()
			o.closed = true
			o.mu.Unlock()
		}
	}
}

// WriterFenced drops a fenced writer's view: its changes after the
// checkpoint the new writer started from are not the stream's state. Its
// key groups go back to the checkpoint base (refolded on the next read).
func (p *PebbleState) WriterFenced(stream, writerID string) {
	v := p.lookup(stream)
	if v == nil {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.writers = slices.DeleteFunc(v.writers, func(o *pebbleWriter) bool {
		if o.id != writerID {
			return false
		}
		o.retire()
		v.dirty = true
		return true
	})
}

// refresh looks up the newest complete checkpoint (at most once per
// refreshEvery) and folds it into every key group without a writer that
// does not hold it yet.
func (p *PebbleState) refresh(ctx context.Context, stream string, keyGroups int, v *pebbleStream) error {
	v.mu.Lock()
	v.sizeLocked(keyGroups)
	check := v.checkedAt.IsZero() || time.Since(v.checkedAt) >= p.refreshEvery
	if check {
		v.checkedAt = time.Now() // concurrent readers skip the lookup
	}
	need := check || v.dirty
	v.mu.Unlock()
	if !need {
		return nil
	}
	if check {
		cps, err := p.node.Checkpoints(ctx, stream)
		if err != nil {
			v.mu.Lock()
			v.checkedAt = time.Time{}
			v.mu.Unlock()
			return err
		}
		latest := uint64(0)
		if len(cps) > 0 {
			latest = cps[len(cps)-1].ID
		}
		v.mu.Lock()
		if latest != v.checkpoint {
			v.checkpoint, v.dirty = latest, true
		}
		dirty := v.dirty
		v.mu.Unlock()
		if !dirty {
			return nil
		}
	}

	v.fold.Lock()
	defer v.fold.Unlock()
	v.mu.Lock()
	if len(v.base) != keyGroups {
		v.mu.Unlock()
		return nil // resized meanwhile; the next read folds
	}
	cp := v.checkpoint
	var runs []keygroup.Range
	for kg := 0; kg < keyGroups; kg++ {
		if v.base[kg] == cp || v.owner(uint16(kg)) != nil {
			continue
		}
		if n := len(runs); n > 0 && int(runs[n-1].Hi)+1 == kg {
			runs[n-1].Hi = uint16(kg)
		} else {
			runs = append(runs, keygroup.Range{Lo: uint16(kg), Hi: uint16(kg)})
		}
	}
	v.dirty = false
	v.mu.Unlock()

	for i, r := range runs {
		err := p.store.DropKeyGroups(ctx, stream, r)
		if err == nil && cp != 0 {
			err = p.restore(ctx, v, stream, cp, r)
		}
		v.mu.Lock()
		if len(v.base) != keyGroups {
			v.mu.Unlock()
			return nil // the stream was recreated meanwhile: everything is stale
		}
		if err != nil {
			// This run holds part of the base, the later ones are as
			// they were: fold them all again next time.
			v.dirty = true
			for _, r := range runs[i:] {
				v.setBaseLocked(r, staleKG)
			}
			v.mu.Unlock()
			return err
		}
		v.setBaseLocked(r, cp)
		v.mu.Unlock()
	}
	return nil
}

// restore folds the state of key groups r at complete checkpoint cp into
// the (emptied) range: the newest snapshot that is a base of it plus the
// changelog after it.
func (p *PebbleState) restore(ctx context.Context, v *pebbleStream, stream string, cp uint64, r keygroup.Range) error {
	pl, err := p.node.PlanRestore(ctx, stream, cp, r)
	if err != nil {
		return err
	}
	if err := p.importSnapshot(ctx, v, stream, pl); err != nil {
		return err
	}
	logID := fmt.Sprintf("checkpoint %d#%d", cp, p.folds.Add(1))
	return p.fold(ctx, v, stream, logID, p.node.ReplayPlan(ctx, pl), true, 0)
}

// importSnapshot imports the snapshot part of a plan (its applied SQNs are
// not: this store numbers its folds itself) and learns its state names.
func (p *PebbleState) importSnapshot(ctx context.Context, v *pebbleStream, stream string, pl changelog.RestorePlan) error {
	for _, b := range pl.Bases {
		// Lazy: the range serves reads at once from the snapshot's files
		// on the blob store (0 bytes read here), whatever the state size;
		// the store hydrates them in the background and references them on
		// the blob store meanwhile, so no GC deletes them under it.
		if err := p.store.ImportSnapshot(ctx, p.node.BlobStore(), b.Snapshot, b.Ranges, materializer.ImportOptions{SkipApplied: true, Lazy: true}); err != nil {
			return fmt.Errorf("stream %s: %w", stream, err)
		}
		for _, r := range b.Ranges {
			names, err := p.store.StateNames(ctx, stream, r)
			if err != nil {
				return err
			}
			v.addStateNames(names)
		}
	}
	return nil
}

// setBaseLocked records what key groups r hold; the caller holds v.mu.
// (A resize meanwhile made every key group stale already.)
func (v *pebbleStream) setBaseLocked(r keygroup.Range, cp uint64) {
	for kg := uint32(r.Lo); kg <= uint32(r.Hi) && int(kg) < len(v.base); kg++ {
		v.base[kg] = cp
	}
}

// failed returns the error of a writer serving a key group of r whose view
// is incomplete; the caller holds v.fold shared.
func (v *pebbleStream) failed(r keygroup.Range) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, w := range v.writers {
		if !w.r.Overlaps(r) {
			continue
		}
		w.mu.Lock()
		err := w.err
		w.mu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

// Get implements StateReader.
func (p *PebbleState) Get(ctx context.Context, stream string, kg uint16, state string, key []byte) ([]byte, bool, error) {
	cfg, err := p.node.Stream(ctx, stream)
	if err != nil {
		return nil, false, err
	}
	v := p.view(stream)
	if err := p.refresh(ctx, stream, cfg.KeyGroups, v); err != nil {
		return nil, false, err
	}
	v.fold.RLock()
	defer v.fold.RUnlock()
	if err := v.failed(keygroup.Range{Lo: kg, Hi: kg}); err != nil {
		return nil, false, err
	}
	return p.store.Get(stream, kg, state, key)
}

// Scan implements StateReader: one store scan per state (of the query, or
// every state the stream has had), merged in (key group, state, key) order.
func (p *PebbleState) Scan(ctx context.Context, q ScanQuery) ([]Entry, bool, error) {
	cfg, err := p.node.Stream(ctx, q.Stream)
	if err != nil {
		return nil, false, err
	}
	v := p.view(q.Stream)
	if err := p.refresh(ctx, q.Stream, cfg.KeyGroups, v); err != nil {
		return nil, false, err
	}
	v.fold.RLock()
	defer v.fold.RUnlock()
	if err := v.failed(q.KeyGroups); err != nil {
		return nil, false, err
	}
	states := []string{q.State}
	if q.State == "" {
		states = v.stateNames()
	}
	want := max(q.Limit, 0) + 1
	type source struct {
		state string
		next  func() (materializer.Entry, error, bool)
		head  materializer.Entry
		ok    bool
	}
	var srcs []*source
	advance := func(s *source) error {
		e, err, ok := s.next()
		if err != nil {
			return err
		}
		s.head, s.ok = e, ok
		return nil
	}
	for _, st := range states {
		r := q.KeyGroups
		var after *materializer.Position
		if a := q.After; a != nil {
			switch {
			case st < a.State: // this state's entries of a.KeyGroup came before
				if a.KeyGroup >= r.Hi {
					continue
				}
				r.Lo = max(r.Lo, a.KeyGroup+1)
			case st == a.State:
				after = &materializer.Position{KeyGroup: a.KeyGroup, Key: a.Key}
			default: // this state's entries of a.KeyGroup come after
				if a.KeyGroup > r.Hi {
					continue
				}
				r.Lo = max(r.Lo, a.KeyGroup)
			}
		}
		if r.Lo > r.Hi {
			continue
		}
		next, stop := iter.Pull2(p.store.Scan(ctx, q.Stream, r, st, materializer.ScanOptions{Prefix: q.Prefix, After: after, Limit: want}))
		defer stop()
		s := &source{state: st, next: next}
		if err := advance(s); err != nil {
			return nil, false, err
		}
		if s.ok {
			srcs = append(srcs, s)
		}
	}
	var out []Entry
	for len(out) < want {
		var best *source
		for _, s := range srcs {
			if s.ok && (best == nil || s.head.KeyGroup < best.head.KeyGroup ||
				(s.head.KeyGroup == best.head.KeyGroup && s.state < best.state) ||
				(s.head.KeyGroup == best.head.KeyGroup && s.state == best.state && bytes.Compare(s.head.Key, best.head.Key) < 0)) {
				best = s
			}
		}
		if best == nil {
			break
		}
		out = append(out, Entry{KeyGroup: best.head.KeyGroup, State: best.state, Key: best.head.Key, Value: best.head.Value})
		if err := advance(best); err != nil {
			return nil, false, err
		}
	}
	more := len(out) > q.Limit
	if more {
		out = out[:max(q.Limit, 0)]
	}
	return out, more, nil
}
