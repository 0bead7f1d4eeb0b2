package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"iter"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"

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
//     change it appended, the acknowledged batches applied in SQN order, a
//     batch never split over two Applies (one Pebble batch each), so a read
//     sees all of a batch or none;
//   - otherwise the newest complete checkpoint, re-checked at most once per
//     refresh interval. When it changes, key groups holding an older
//     checkpoint on its lineage advance by folding only the changes between
//     the two (advance); the others (first fold, or a rollback to another
//     lineage) are dropped and refolded from a snapshot and the changelog.
//
// A change of source drops the key groups (DropKeyGroups) and folds the new
// source into them, holding the stream's fold lock exclusively, so readers
// of the stream wait for the fold (as LiveState's readers wait for a
// checkpoint reload) and never see a half-folded range.
//
// Applied SQNs: every fold uses log ids of its own, derived from a counter
// that never repeats within the process and a random prefix drawn at each
// open (`<writer id>#<gen>.<n>` for a writer's own changes with their real
// SQNs, `<writer id>#<gen>.<n>/base` or `checkpoint <id>#<gen>.<n>` with SQNs
// numbered 1.. for the changes of a checkpoint). The store keeps a log's
// applied SQN when its key groups are dropped, so reusing a log id after a
// drop would skip the refold; a fresh id per fold starts at applied SQN 0,
// and the writer's own id makes Appended idempotent against the replay it
// was built from (ApplyThrough marks the view folded through the writer's
// last SQN at open). The applied-SQN keys mean nothing to another process:
// the open deletes them all (ResetApplied), and the random prefix keeps a
// key that a crash resurrected (the delete is not flushed) from ever
// matching a new id, so no fold is ever skipped by a previous process's
// bookkeeping.
//
// Surviving a restart (issue 10: the local store is a cache that a restart
// reopens, not a copy it rebuilds). What survives are the key groups that
// hold exactly a complete checkpoint's state (base[kg] = cp, no writer):
// the open serves them as that checkpoint at once (no import, no refold;
// a newer checkpoint advances them incrementally as usual), and lazily
// imported files in them keep hydrating where they were (materializer.Store
// persists its pending files and references them again on open). What does
// not: a writer's view (its uncommitted changes are in no checkpoint; the
// writer's next open rebuilds it) and any range that was being changed
// when the process ended. Which is which is recorded per stream in the
// store itself, as range marks (materializer.SetRangeMarks: metadata keys
// next to the data, one set per stream written in one Pebble batch, so
// the record and the data are recovered by the same Pebble and cannot
// disagree after a crash; a sidecar file would need its own ordering
// against Pebble's flushes). Values: markClean + checkpoint + stream
// incarnation, or markDirty / markWriter.
//
// Crash-consistency invariant: a clean mark for key group kg in the store
// as recovered after a crash implies kg's data is exactly that
// checkpoint's state. The store runs without a WAL (NoWAL: the fold of
// unique keys costs about half as much), so after a crash Pebble recovers
// its last flushed state: every batch up to some point in commit order
// (memtables flush in order, a batch is never split), plus every ingest
// (lazy import) and excise (drop), which are durable when they return.
// The protocol that keeps the invariant (setMarks):
//
//  1. before any change to a key-group range (drop, import, the fold of
//     an advance or a restore, a writer taking it), mark it dirty (or
//     writer) and, if any of its key groups was marked clean, Flush
//     before the first drop or import: the non-clean mark is on disk
//     before any of the change can be (an advance, only batches, needs
//     no flush: its batches come after the mark in commit order);
//  2. change the data;
//  3. mark it clean (cp) in a batch after the data, not flushed: if a
//     crash loses it, the range just looks dirty and is refolded; if it
//     survives, so does every batch before it, and the ingests and
//     excises were durable already.
//
// Every write to a key group's data happens between 1 and 3 (a writer's
// folds under its writer mark), so a recovered clean mark always comes
// after the last change of its range. The open (recover) keeps the clean
// ranges of streams whose incarnation still exists, drops everything else
// (dirty and writer ranges, marks of another incarnation, data without a
// mark, as from a store of an older version) with Excise, and rewrites the
// marks; a key group comes back with base = cp, and its state names are
// learnt by the first scan (unnamed, as after an import). A store that
// cannot be reopened (corrupt, or its references cannot be confirmed) is
// wiped and opened empty, as every start did before.
//
// The fold of acknowledged batches is off the append path: Appended only
// queues a batch on its writer's view, and one fold goroutine per store
// (started by OpenPebbleState, stopped by Close) applies each writer's
// batches in SQN order, several consecutive batches of a writer coalesced
// into one Apply (still one Pebble batch: whole acknowledged batches only;
// changes a later put or delete of the same key in it overrides are
// dropped, see supersededFilter; a small run may linger 1 ms to grow unless
// a read waits, see foldLinger).
// The queue is bounded by memory accounting rather than back-pressure: the
// batches queued over all writers hold at most queueBytes (key and value
// bytes plus a per-change overhead); a batch that does not fit is not
// copied, only its SQN range is recorded, and the fold reads it back from
// the changelog (Writer.Replay: the un-uploaded tail is in memory there
// anyway, the rest in uploaded segments). So a slow fold never slows
// appends down nor grows memory; it only grows the fold lag, which reads
// then wait out (below), and which the dstl_server_fold_* metrics show.
//
// Read-your-writes: a read of key groups served by a writer's view waits
// until the view is folded through the highest SQN acknowledged to that
// writer's appenders when the read started, at most readWait; then it
// fails with ErrFoldBehind (UNAVAILABLE). A fold that fails breaks the view
// for good (ErrReadViewBroken on every read of its key groups) rather than
// serving it without the batch.
type PebbleState struct {
	node         *changelog.Node
	store        *materializer.Store
	refreshEvery time.Duration
	gen          string        // random per open: this process's log ids
	folds        atomic.Uint64 // derives fresh log ids

	readWait   time.Duration // bound of a read's wait for the fold
	queueBytes int64         // bound of the memory of queued batches

	queued        atomic.Int64 // bytes of the batches queued (their cost)
	queuedBatches atomic.Int64 // batches waiting to be folded, kept or not
	spilled       atomic.Uint64
	advances      atomic.Uint64        // checkpoint changes folded incrementally
	refolds       atomic.Uint64        // key-group runs dropped and refolded
	imports       atomic.Uint64        // snapshot bases imported (lazily)
	kept          int                  // key groups the open found clean and kept
	superseded    supersededFilter     // the fold goroutine's
	waits         prometheus.Histogram // how long reads waited for the fold

	// foldHook, when set (tests only), runs before each run of batches is
	// applied: it may block, as a stalled fold, or fail, as a failing one.
	foldHook atomic.Pointer[func(ctx context.Context, writerID string, first, last uint64) error]
	// stepHook, when set (tests only), runs at each step of a change of a
	// key-group range's source (marked, dropped, imported, a chunk folded):
	// a crash test copies the file system there.
	stepHook atomic.Pointer[func(step string)]

	readyMu sync.Mutex
	ready   []*pebbleWriter // views with batches ready to fold, in turn
	wake    chan struct{}   // capacity 1: ready has grown
	waiting atomic.Int64    // reads waiting for the fold
	hurry   chan struct{}   // capacity 1: a read started waiting
	cancel  context.CancelFunc
	done    chan struct{} // closed when the fold goroutine has ended
	stopped chan struct{} // closed by Close: waiting reads give up
	closing atomic.Bool
	stopMu  sync.Once

	mu      sync.Mutex
	streams map[string]*pebbleStream
	// restored: per stream, the key-group ranges the open found holding a
	// complete checkpoint (clean marks), taken by the stream's view when
	// it is first sized.
	restored map[string]*restoredStream
}

// restoredStream is what a reopened store kept of a stream.
type restoredStream struct {
	inc  string // the stream incarnation the marks were written for
	runs []restoredRun
}

type restoredRun struct {
	r  keygroup.Range
	cp uint64
}

// Defaults of the fold's bounds (Options.ReadWait, Options.FoldQueueBytes).
const (
	DefaultReadWait       = 5 * time.Second
	DefaultFoldQueueBytes = 64 << 20
)

// changeOverhead is what a queued change costs besides its key and value:
// its segments.Change (about 100 bytes) and a share of the batch's slices.
const changeOverhead = 128

var (
	// ErrFoldBehind: a read of key groups of a writer of this node waited
	// as long as allowed and the fold had not reached the writer's last
	// acknowledged append (UNAVAILABLE: retry, the fold is catching up).
	ErrFoldBehind = errors.New("read view behind the writer's acknowledged appends")
	// ErrReadViewBroken: folding an acknowledged batch of a writer failed;
	// its view misses that batch, so its key groups are not served until
	// a writer opens them again (FAILED_PRECONDITION).
	ErrReadViewBroken = errors.New("read view broken")
)

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
	inc        string // the stream incarnation base and marks are of
	resets     uint64 // times sizeLocked started over
	restored   *restoredStream
	checkpoint uint64    // newest complete checkpoint seen
	checkedAt  time.Time // when it was last looked up
	base       []uint64  // per key group: checkpoint folded into it, or staleKG
	dirty      bool      // some key group without a writer may need a fold
	writers    []*pebbleWriter

	statesMu sync.Mutex
	states   map[string]struct{} // every state name folded into the stream
	// unnamed: key-group ranges imported from snapshots whose state names
	// are not in states yet. Learning them means seeking through the
	// range's data, which on a lazily imported range reads the blob store
	// (and Pebble's readahead turns the seeks into reading most of the
	// state): so it waits for the first scan that needs every state name,
	// instead of costing every writer open.
	unnamed []keygroup.Range

	// marks: per key group, what the store's range marks of the stream
	// say it holds (see "Surviving a restart" on PebbleState). Written
	// under marksMu by setMarks, whose callers hold fold exclusively;
	// reset by sizeLocked (lock order: mu, then marksMu).
	marksMu sync.Mutex
	marks   []kgMark
}

// kgMark is the range mark of one key group: markClean with the complete
// checkpoint it holds, or markDirty / markWriter (dropped on reopen).
type kgMark struct {
	kind byte
	cp   uint64
}

// Kinds of range marks.
const (
	markDirty  byte = 0 // being changed, or unknown
	markWriter byte = 1 // a writer's view: uncommitted changes
	markClean  byte = 2 // exactly complete checkpoint cp's state
)

// pebbleWriter is one writer's view and its queue of acknowledged batches.
// Lock order: pebbleStream.mu, then pebbleWriter.foldMu, then
// pebbleWriter.mu, then PebbleState.readyMu.
type pebbleWriter struct {
	p      *PebbleState
	v      *pebbleStream
	stream string
	id     string
	r      keygroup.Range
	log    string            // the store's log id for the writer's changes
	cw     *changelog.Writer // reads back the batches the queue did not keep

	// foldMu is held while the fold goroutine applies the view's batches,
	// and by retire: once retire returns, nothing more of this view
	// reaches the store (the key groups may be dropped and refolded).
	foldMu sync.Mutex

	mu        sync.Mutex
	closed    bool
	building  bool  // WriterOpened is folding the view's start: no fold yet
	dead      bool  // replaced or fenced: its key groups are no longer its own
	err       error // a fold failed: the view is incomplete
	acked     uint64
	taken     uint64                  // batches through it were taken to fold
	folded    uint64                  // the store holds the view through it
	pending   map[uint64]*queuedBatch // batches after taken, by first SQN
	scheduled bool                    // in PebbleState.ready
	progress  chan struct{}           // closed when folded, dead or err change
}

// queuedBatch is an acknowledged batch waiting to be folded.
type queuedBatch struct {
	first, last uint64
	changes     []changelog.Change // nil: not kept, read back from the changelog
	cost        int64              // bytes counted in PebbleState.queued
}

// PebbleStateOptions configure OpenPebbleState.
type PebbleStateOptions struct {
	// Logger receives Pebble's messages (nil: none).
	Logger *slog.Logger
	// HydrateBandwidth bounds the bytes per second read from the blob
	// store to make lazily imported snapshot files local (0: the default,
	// 64 MiB/s; negative: unbounded).
	HydrateBandwidth int64

	// Tests only: the store's file system (crash clones) and memtable size.
	fs           vfs.FS
	memTableSize uint64
}

// OpenPebbleState opens the read store in dir (dir/db, dir/staging),
// keeping what a previous process left there that is still valid: the key
// groups holding exactly a complete checkpoint's state, served as that
// checkpoint at once, with their lazily imported files still hydrating.
// Writers' views and ranges that were being changed when the process ended
// are dropped (see "Surviving a restart" on PebbleState for why that is
// safe after a crash too); the rest is rebuilt from the blob store as
// writers open and checkpoints complete. A store that cannot be reopened is
// wiped and opened empty: it is a cache.
func OpenPebbleState(node *changelog.Node, dir string, opts PebbleStateOptions) (*PebbleState, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p, err := openPebbleState(node, dir, opts, log)
	if err == nil {
		return p, nil
	}
	log.Warn("read store: cannot reopen it, starting empty", "dir", dir, "err", err)
	// The store lives in dir/db and dir/staging; nothing else in dir is
	// touched, so a misconfigured dir loses nothing but a store.
	fs := opts.fs
	if fs == nil {
		fs = vfs.Default
	}
	for _, sub := range []string{"db", "staging"} {
		if err := fs.RemoveAll(fs.PathJoin(dir, sub)); err != nil {
			return nil, fmt.Errorf("state dir %s: wipe: %w", dir, err)
		}
	}
	return openPebbleState(node, dir, opts, log)
}

func openPebbleState(node *changelog.Node, dir string, opts PebbleStateOptions, log *slog.Logger) (*PebbleState, error) {
	// Remote: bases are imported lazily (see importSnapshot), read from
	// the node's blob store until the store's hydrator made them local.
	store, err := materializer.Open(dir, materializer.Options{
		FS: opts.fs, MemTableSize: opts.memTableSize,
		Logger: materializer.SlogLogger(log.With("component", "pebble")), Remote: node.BlobStore(), RefOwner: node.ID(),
		HydrateBandwidth: opts.HydrateBandwidth,
		// No WAL: the range marks' protocol (see PebbleState) keeps what
		// a crash recovers consistent with flushes only, and the fold
		// does not pay for a log it never needs.
		NoWAL: true,
	})
	if err != nil {
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	p := newPebbleState(node, store)
	if err := p.recover(context.Background(), log); err != nil {
		return nil, errors.Join(fmt.Errorf("state dir %s: %w", dir, err), p.Close())
	}
	return p, nil
}

// recover keeps, of what the store holds at open, the clean ranges of
// streams that still exist in the incarnation they were marked for, and
// drops everything else (see "Surviving a restart" on PebbleState).
func (p *PebbleState) recover(ctx context.Context, log *slog.Logger) error {
	marks, err := p.store.RangeMarks()
	if err != nil {
		return err
	}
	// Streams whose files not yet local are gone from the blob store
	// (collected while the node was down) are not kept: their reads
	// could only fail until imported again.
	gone, err := p.store.PendingGone(ctx)
	if err != nil {
		return err
	}
	keep := map[string][]keygroup.Range{}
	var kept, streams int
	for stream, ms := range marks {
		if gone[stream] {
			continue
		}
		rs := &restoredStream{}
		for _, m := range ms {
			kind, cp, inc, ok := decodeMark(m.Value)
			if !ok || kind != markClean || (rs.inc != "" && inc != rs.inc) {
				continue
			}
			rs.inc = inc
			rs.runs = append(rs.runs, restoredRun{m.KeyGroups, cp})
		}
		if len(rs.runs) == 0 {
			continue
		}
		// A stream deleted (or deleted and recreated) while the node was
		// down: its data is garbage. Other errors (the blob store is not
		// reachable): keep it, the first read checks the incarnation.
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		cfg, err := p.node.Stream(cctx, stream)
		cancel()
		if errors.Is(err, changelog.ErrStreamNotFound) || (err == nil && cfg.Incarnation != rs.inc) {
			continue
		}
		p.restored[stream] = rs
		streams++
		for _, r := range rs.runs {
			keep[stream] = append(keep[stream], r.r)
			kept += int(r.r.Hi) - int(r.r.Lo) + 1
		}
	}
	// The previous process's log ids mean nothing to this one.
	if err := p.store.ResetApplied(); err != nil {
		return err
	}
	dropped, err := p.store.RetainKeyGroups(ctx, keep)
	if err != nil {
		return err
	}
	// Only the clean marks of what is kept remain; everything else is
	// gone from the store (the excises are durable), so a lost rewrite of
	// the marks only keeps stale marks of empty ranges.
	for stream := range marks {
		var out []materializer.RangeMark
		if rs := p.restored[stream]; rs != nil {
			for _, r := range rs.runs {
				out = append(out, materializer.RangeMark{KeyGroups: r.r, Value: encodeMark(markClean, r.cp, rs.inc)})
			}
		}
		if err := p.store.SetRangeMarks(stream, out, false); err != nil {
			return err
		}
	}
	if err := p.store.Flush(); err != nil {
		return err
	}
	p.kept = kept
	if kept > 0 || dropped > 0 {
		log.Info("read store reopened", "kept_key_groups", kept, "streams", streams, "dropped_spans", dropped)
	}
	return nil
}

// encodeMark is a range mark's value: kind u8 | cp u64 BE | incarnation.
func encodeMark(kind byte, cp uint64, inc string) []byte {
	b := binary.BigEndian.AppendUint64([]byte{kind}, cp)
	return append(b, inc...)
}

func decodeMark(v []byte) (kind byte, cp uint64, inc string, ok bool) {
	if len(v) < 9 || v[0] > markClean {
		return 0, 0, "", false
	}
	return v[0], binary.BigEndian.Uint64(v[1:9]), string(v[9:]), true
}

// newPebbleState starts the fold goroutine of a store; Close stops it.
func newPebbleState(node *changelog.Node, store *materializer.Store) *PebbleState {
	ctx, cancel := context.WithCancel(context.Background())
	var g [8]byte
	_, _ = rand.Read(g[:])
	p := &PebbleState{
		node: node, store: store, refreshEvery: time.Second, streams: map[string]*pebbleStream{},
		restored: map[string]*restoredStream{}, gen: hex.EncodeToString(g[:]),
		readWait: DefaultReadWait, queueBytes: DefaultFoldQueueBytes,
		waits: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "dstl_server_read_fold_wait_seconds", Help: "How long reads of key groups of a writer of this node waited for the fold to reach the writer's acknowledged appends.",
			Buckets: []float64{0, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		wake: make(chan struct{}, 1), hurry: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{}), stopped: make(chan struct{}),
	}
	go p.run(ctx)
	return p
}

// foldID returns a log id suffix no other fold of any process uses.
func (p *PebbleState) foldID() string {
	return fmt.Sprintf("%s.%d", p.gen, p.folds.Add(1))
}

// step runs the test hook at a step of a range's change.
func (p *PebbleState) step(name string) {
	if h := p.stepHook.Load(); h != nil {
		(*h)(name)
	}
}

// setMarks records that key groups rs of the stream now hold kind (with
// checkpoint cp if clean) and writes the stream's range marks. With
// flush, when a key group of rs was marked clean and is not any more, the
// marks are durable before it returns (step 1 of the protocol on
// PebbleState): the caller changes the range only afterwards. Without, the
// caller changes the range only by batches (an advance), which a crash
// recovers in commit order, after the marks; or it flushes before it drops
// or imports. A failure leaves the marks as they
// were. resets is v.resets when the caller planned the change: if the
// stream started over since (sizeLocked), nothing is written (the marks
// are all dirty, and the ones on disk of another incarnation count as
// dirty) and the caller finds out from v.resets. The caller holds v.fold
// exclusively.
func (p *PebbleState) setMarks(v *pebbleStream, stream string, rs []keygroup.Range, kind byte, cp, resets uint64, flush bool) error {
	v.marksMu.Lock()
	defer v.marksMu.Unlock()
	if v.resets != resets {
		return nil
	}
	next := slices.Clone(v.marks)
	durable := false
	for _, r := range rs {
		for kg := int(r.Lo); kg <= int(r.Hi) && kg < len(next); kg++ {
			if flush && kind != markClean && next[kg].kind == markClean {
				durable = true
			}
			next[kg] = kgMark{kind, cp}
		}
	}
	if slices.Equal(next, v.marks) {
		return nil
	}
	var out []materializer.RangeMark
	for kg := 0; kg < len(next); {
		end := kg
		for end+1 < len(next) && next[end+1] == next[kg] {
			end++
		}
		out = append(out, materializer.RangeMark{KeyGroups: keygroup.Range{Lo: uint16(kg), Hi: uint16(end)}, Value: encodeMark(next[kg].kind, next[kg].cp, v.inc)})
		kg = end + 1
	}
	if err := p.store.SetRangeMarks(stream, out, durable); err != nil {
		return fmt.Errorf("stream %s: %w", stream, err)
	}
	v.marks = next
	return nil
}

// Close stops the fold goroutine, drops the batches still queued (the
// changelog holds them), flushes the store (without a WAL, what is in
// memtables, the clean marks among it, would be lost) and closes it;
// reads fail afterwards.
func (p *PebbleState) Close() error {
	p.stopMu.Do(func() {
		p.closing.Store(true)
		close(p.stopped)
		p.cancel()
		<-p.done
		p.mu.Lock()
		for _, v := range p.streams {
			v.mu.Lock()
			for _, w := range v.writers {
				w.mu.Lock()
				w.dropPendingLocked()
				w.mu.Unlock()
			}
			v.mu.Unlock()
		}
		p.mu.Unlock()
	})
	err := p.store.Flush()
	if errors.Is(err, materializer.ErrClosed) {
		err = nil
	}
	return errors.Join(err, p.store.Close())
}

func (p *PebbleState) view(stream string) *pebbleStream {
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.streams[stream]
	if !ok {
		v = &pebbleStream{states: map[string]struct{}{}, restored: p.restored[stream]}
		delete(p.restored, stream)
		p.streams[stream] = v
	}
	return v
}

func (p *PebbleState) lookup(stream string) *pebbleStream {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.streams[stream]
}

// sizeLocked sizes the per-key-group bookkeeping; a stream recreated (with
// another incarnation or key-group count) starts over. The first sizing
// after an open takes what the open kept of the stream (the same
// incarnation's clean ranges). The caller holds v.mu.
func (v *pebbleStream) sizeLocked(cfg changelog.StreamConfig) {
	keyGroups := cfg.KeyGroups
	if v.keyGroups == keyGroups && v.inc == cfg.Incarnation {
		return
	}
	for _, w := range v.writers {
		w.retire()
	}
	v.keyGroups, v.inc, v.writers, v.dirty = keyGroups, cfg.Incarnation, nil, true
	v.base = make([]uint64, keyGroups)
	for i := range v.base {
		v.base[i] = staleKG // unknown contents: drop before the first fold
	}
	v.marksMu.Lock()
	defer v.marksMu.Unlock()
	v.resets++
	// Marks written for another incarnation count as dirty: the next
	// setMarks rewrites them all with this one.
	v.marks = make([]kgMark, keyGroups)
	rs := v.restored
	v.restored = nil
	if rs == nil || rs.inc != cfg.Incarnation {
		return
	}
	for _, run := range rs.runs {
		if int(run.r.Hi) >= keyGroups {
			continue
		}
		for kg := int(run.r.Lo); kg <= int(run.r.Hi); kg++ {
			v.base[kg] = run.cp
			v.marks[kg] = kgMark{markClean, run.cp}
		}
		v.addUnnamed(run.r)
	}
}

// retire ends the view: nothing more of it is folded once retire returns.
func (w *pebbleWriter) retire() {
	w.foldMu.Lock()
	defer w.foldMu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.dead = true
	w.dropPendingLocked()
	w.wakeLocked()
}

// dropPendingLocked forgets the queued batches; the caller holds w.mu.
func (w *pebbleWriter) dropPendingLocked() {
	for first, qb := range w.pending {
		w.p.release(qb)
		delete(w.pending, first)
	}
}

// wakeLocked tells waiting reads that folded, dead or err changed; the
// caller holds w.mu.
func (w *pebbleWriter) wakeLocked() {
	close(w.progress)
	w.progress = make(chan struct{})
}

func (p *PebbleState) release(qb *queuedBatch) {
	p.queuedBatches.Add(-1)
	if qb.cost > 0 {
		p.queued.Add(-qb.cost)
	}
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

// addUnnamed records an imported range whose state names stateNames must
// learn before it answers.
func (v *pebbleStream) addUnnamed(r keygroup.Range) {
	v.statesMu.Lock()
	defer v.statesMu.Unlock()
	v.unnamed = append(v.unnamed, r)
}

// stateNames returns every state name of the stream, first learning those
// of the imported ranges not looked at yet. The caller holds v.fold (shared
// is enough: the ranges' contents cannot change under it).
func (p *PebbleState) stateNames(ctx context.Context, stream string, v *pebbleStream) ([]string, error) {
	v.statesMu.Lock()
	todo := slices.Clone(v.unnamed)
	v.statesMu.Unlock()
	for _, r := range todo {
		names, err := p.store.StateNames(ctx, stream, r)
		if err != nil {
			return nil, err
		}
		v.statesMu.Lock()
		for _, s := range names {
			v.states[s] = struct{}{}
		}
		if i := slices.Index(v.unnamed, r); i >= 0 {
			v.unnamed = slices.Delete(v.unnamed, i, i+1)
		}
		v.statesMu.Unlock()
	}
	v.statesMu.Lock()
	defer v.statesMu.Unlock()
	out := make([]string, 0, len(v.states))
	for s := range v.states {
		out = append(out, s)
	}
	slices.Sort(out)
	return out, nil
}

// Forget drops a deleted stream's views and its data.
func (p *PebbleState) Forget(stream string) {
	// Under p.mu so that no view of a recreated stream folds before the
	// drop. (A new view also drops every key group before its first fold.)
	p.mu.Lock()
	defer p.mu.Unlock()
	v, restored := p.streams[stream], p.restored[stream] != nil
	if v == nil && !restored {
		return
	}
	delete(p.streams, stream)
	delete(p.restored, stream)
	if v != nil {
		v.fold.Lock()
		defer v.fold.Unlock()
		v.mu.Lock()
		for _, w := range v.writers {
			w.retire()
		}
		v.writers = nil
		v.mu.Unlock()
	}
	// Best effort: the data of a deleted stream is only garbage. The
	// marks go first, durably: a crash after the drop must not find a
	// clean mark over an emptied range (if deleting them fails, the drop
	// waits for the next open, which checks the stream's incarnation).
	if err := p.store.SetRangeMarks(stream, nil, true); err != nil {
		return
	}
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
	v := p.view(stream)
	nw := &pebbleWriter{
		p: p, v: v, stream: stream, id: id, r: r, log: fmt.Sprintf("%s#%s", id, p.foldID()), cw: w,
		building: true, pending: map[uint64]*queuedBatch{}, progress: make(chan struct{}),
	}
	v.fold.Lock()
	defer v.fold.Unlock()
	v.mu.Lock()
	v.sizeLocked(cfg)
	resets := v.resets
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
	// From here on the range holds a view: never kept by a reopen.
	if err := p.setMarks(v, stream, []keygroup.Range{r}, markWriter, 0, resets, true); err != nil {
		return fail(err)
	}
	p.step("writer marked")
	if err := p.store.DropKeyGroups(ctx, stream, r); err != nil {
		return fail(err)
	}
	p.step("dropped")
	if err := p.importSnapshot(ctx, v, stream, pl); err != nil {
		return fail(err)
	}
	p.step("imported")
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
	// The view holds the writer through last: batches appended meanwhile
	// up to it are in already, the later ones fold from now on.
	nw.mu.Lock()
	defer nw.mu.Unlock()
	nw.building = false
	nw.taken, nw.folded, nw.acked = last, last, max(nw.acked, last)
	for first, qb := range nw.pending {
		if qb.last <= last {
			p.release(qb)
			delete(nw.pending, first)
		}
	}
	nw.scheduleLocked()
	nw.wakeLocked()
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
		p.step("folded")
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

// Appended queues an acknowledged batch (SQNs first..) on its writer's
// view for the fold goroutine; it never waits for the fold. If the batch
// fits the queue's bound, its keys and values are copied (the caller may
// reuse those buffers) and the batch slice itself is kept (stateHooks: the
// caller hands it over); else only its SQN range is kept and the fold
// reads it back from the changelog.
func (p *PebbleState) Appended(stream, writerID string, first uint64, batch []changelog.Change) {
	if len(batch) == 0 || p.closing.Load() {
		return
	}
	w := p.writerView(stream, writerID)
	if w == nil {
		return // replaced by a newer writer meanwhile
	}
	qb := &queuedBatch{first: first, last: first + uint64(len(batch)) - 1}
	size := 0
	for i := range batch {
		size += len(batch[i].Key) + len(batch[i].Value)
	}
	cost := int64(size) + int64(len(batch))*changeOverhead
	p.queuedBatches.Add(1)
	w.mu.Lock()
	defer w.mu.Unlock()
	// closing again under w.mu: Close drops the queues after setting it.
	if w.dead || w.err != nil || qb.last <= w.taken || w.pending[first] != nil || p.closing.Load() {
		p.release(qb) // gone, broken, folded already (at open), or closing
		return
	}
	if p.queued.Add(cost) <= p.queueBytes {
		// Copied under w.mu: the fold goroutine reads a batch only once
		// it is in pending.
		qb.cost = cost
		arena := make([]byte, 0, size)
		for j := range batch {
			c := &batch[j]
			arena = append(arena, c.Key...)
			c.Key = arena[len(arena)-len(c.Key) : len(arena) : len(arena)]
			arena = append(arena, c.Value...)
			c.Value = arena[len(arena)-len(c.Value) : len(arena) : len(arena)]
		}
		qb.changes = batch
	} else {
		p.queued.Add(-cost)
		p.spilled.Add(1)
	}
	w.pending[first] = qb
	w.acked = max(w.acked, qb.last)
	w.scheduleLocked()
}

// writerView returns the view of a writer, or nil.
func (p *PebbleState) writerView(stream, writerID string) *pebbleWriter {
	v := p.lookup(stream)
	if v == nil {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, w := range v.writers {
		if w.id == writerID {
			return w
		}
	}
	return nil
}

// scheduleLocked hands the view to the fold goroutine if its next batch is
// queued; the caller holds w.mu.
func (w *pebbleWriter) scheduleLocked() {
	if w.scheduled || w.building || w.dead || w.err != nil || w.pending[w.taken+1] == nil {
		return
	}
	w.scheduled = true
	p := w.p
	p.readyMu.Lock()
	p.ready = append(p.ready, w)
	p.readyMu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// Bounds of one coalesced Apply of queued batches (a batch is never split,
// so one larger batch goes alone).
const (
	foldRunChanges = 16384
	foldRunBytes   = 16 << 20
)

// foldLinger is how long the fold goroutine lets a small run of batches
// grow before folding it, when no other view is ready and no read waits: a larger run costs fewer
// Pebble commits, and hot keys overwritten by several batches are written
// once (supersededFilter). A read that has to wait ends the linger at once,
// so read-your-writes does not pay for it.
const foldLinger = time.Millisecond

// run is the fold goroutine: it folds the ready views in turn, one run of
// batches each, until Close.
func (p *PebbleState) run(ctx context.Context) {
	defer close(p.done)
	linger := time.NewTimer(foldLinger)
	linger.Stop()
	defer linger.Stop()
	for ctx.Err() == nil {
		p.readyMu.Lock()
		var w *pebbleWriter
		if len(p.ready) > 0 {
			w = p.ready[0]
			p.ready[0] = nil
			p.ready = p.ready[1:]
		}
		alone := len(p.ready) == 0
		p.readyMu.Unlock()
		if w == nil {
			select {
			case <-p.wake:
				continue
			case <-ctx.Done():
				return
			}
		}
		// Linger only when no other view is ready: with several, their
		// turns let each run grow, and a linger per view would add up.
		if alone && p.small(w) {
			linger.Reset(foldLinger)
			select {
			case <-linger.C:
			case <-p.hurry:
				linger.Stop()
			case <-ctx.Done():
				return
			}
		}
		p.foldNext(ctx, w)
	}
}

// small reports whether the view's next run is small enough to linger on
// and no read waits.
func (p *PebbleState) small(w *pebbleWriter) bool {
	if p.waiting.Load() > 0 {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var n uint64
	for next := w.taken + 1; n < foldRunChanges/2; {
		qb := w.pending[next]
		if qb == nil {
			return true
		}
		n += qb.last - qb.first + 1
		next = qb.last + 1
	}
	return false
}

// takeLocked removes from the queue the batches that fold next: from
// taken+1 on, consecutive batches that are all kept (within the bounds of
// one Apply) or all read back from the changelog. The caller holds w.mu.
func (w *pebbleWriter) takeLocked() []*queuedBatch {
	var (
		run   []*queuedBatch
		n     uint64
		bytes int64
	)
	for {
		qb := w.pending[w.taken+1]
		if qb == nil {
			return run
		}
		size := qb.last - qb.first + 1
		if len(run) > 0 {
			kept := run[0].changes != nil
			if (qb.changes != nil) != kept || (kept && (n+size > foldRunChanges || bytes+qb.cost > foldRunBytes)) {
				return run
			}
		}
		delete(w.pending, qb.first)
		run = append(run, qb)
		w.taken, n, bytes = qb.last, n+size, bytes+qb.cost
	}
}

// foldNext folds the next run of a view's batches.
func (p *PebbleState) foldNext(ctx context.Context, w *pebbleWriter) {
	w.mu.Lock()
	w.scheduled = false
	if w.building || w.dead || w.err != nil {
		w.mu.Unlock()
		return
	}
	run := w.takeLocked()
	w.scheduleLocked() // more is queued: the other views get their turn first
	w.mu.Unlock()
	if len(run) == 0 {
		return
	}
	defer func() {
		for _, qb := range run {
			p.release(qb)
		}
	}()
	first, last := run[0].first, run[len(run)-1].last
	var err error
	if hook := p.foldHook.Load(); hook != nil {
		err = (*hook)(ctx, w.id, first, last)
	}
	if err == nil {
		err = p.applyRun(ctx, w, run)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.dead:
	case err != nil:
		w.err = fmt.Errorf("read view of writer %s: fold SQNs %d..%d: %w: %w", w.id, first, last, ErrReadViewBroken, err)
		w.dropPendingLocked()
	default:
		w.folded = last
	}
	w.wakeLocked()
}

// applyRun applies a run of batches unless the view was retired; it holds
// w.foldMu so that retire waits for it.
func (p *PebbleState) applyRun(ctx context.Context, w *pebbleWriter, run []*queuedBatch) error {
	w.foldMu.Lock()
	defer w.foldMu.Unlock()
	w.mu.Lock()
	dead := w.dead
	w.mu.Unlock()
	if dead {
		return nil
	}
	if run[0].changes == nil {
		return p.applyReplayed(ctx, w, run)
	}
	changes := p.superseded.collect(run)
	defer p.superseded.reset()
	w.v.addStates(changes) // a dropped change's state is a kept one's
	return p.store.ApplyThrough(w.stream, w.log, changes, run[len(run)-1].last)
}

// supersededFilter drops, from the changes of one Apply, every change of a
// key that a later put or delete of the same key in the same Apply
// overrides. One Apply is one Pebble batch, committed atomically, so no
// read can tell: the store holds the same state after it. Hot keys (a
// counter updated by every batch) then cost the fold one write per Apply
// instead of one per change. Only the fold goroutine uses it.
type supersededFilter struct {
	seed   maphash.Seed
	last   map[uint64]int      // hash of (key group, state, key) → index of its last put or delete
	hashes []uint64            // per change of the run, reused
	at     []*changelog.Change // per change of the run, reused
	out    []segments.Change   // the changes kept, reused
}

func (f *supersededFilter) hash(c *changelog.Change) uint64 {
	// Mixing two hashes and the key group: a collision only keeps a
	// change that could have been dropped (collect compares the keys).
	return maphash.Bytes(f.seed, c.Key) ^ (maphash.String(f.seed, c.State)+uint64(c.KeyGroup))*0x9E3779B97F4A7C15
}

// collect returns the changes of a run of batches, with their SQNs, that
// no later put or delete of the same key in the run overrides, in order.
// The result is valid until the next call.
func (f *supersededFilter) collect(run []*queuedBatch) []segments.Change {
	if f.last == nil {
		f.seed, f.last = maphash.MakeSeed(), map[uint64]int{}
	}
	n := 0
	for _, qb := range run {
		n += len(qb.changes)
	}
	clear(f.last)
	f.hashes = slices.Grow(f.hashes[:0], n)[:n]
	f.at = slices.Grow(f.at[:0], n)[:n]
	i := 0
	for _, qb := range run {
		for j := range qb.changes {
			c := &qb.changes[j]
			f.at[i] = c
			switch c.Op {
			case segments.OpPut, segments.OpDelete:
				f.hashes[i] = f.hash(c)
				f.last[f.hashes[i]] = i
			case segments.OpMerge:
				f.hashes[i] = f.hash(c)
			}
			i++
		}
	}
	out := f.out[:0]
	i = 0
	for _, qb := range run {
		for j := range qb.changes {
			c := &qb.changes[j]
			keep := true
			if c.Op != segments.OpClear {
				if k, ok := f.last[f.hashes[i]]; ok && k > i {
					o := f.at[k]
					keep = o.KeyGroup != c.KeyGroup || o.State != c.State || !bytes.Equal(o.Key, c.Key)
				}
			}
			if keep {
				out = append(out, segments.Change{SQN: qb.first + uint64(j), KeyGroup: c.KeyGroup, State: c.State, Op: c.Op, Key: c.Key, Value: c.Value})
			}
			i++
		}
	}
	f.out = out
	return out
}

// reset drops the filter's references to the last run, so that the
// memory of folded batches goes at once.
func (f *supersededFilter) reset() {
	clear(f.at)
	clear(f.out)
}

// applyReplayed folds batches the queue did not keep, read back from the
// writer's log; it cuts Applies at batch ends only, so that a read still
// sees all of a batch or none.
func (p *PebbleState) applyReplayed(ctx context.Context, w *pebbleWriter, run []*queuedBatch) error {
	var (
		batch []segments.Change
		arena []byte
		next  = run[0].first
		i     int // the batch holding SQN next
	)
	for c, err := range w.cw.Replay(ctx, run[0].first-1, run[len(run)-1].last, w.r) {
		if err != nil {
			return fmt.Errorf("read back SQNs %d..: %w", next, err)
		}
		if c.SQN != next {
			return fmt.Errorf("read back SQN %d where %d was due: %w", c.SQN, next, changelog.ErrLogTruncated)
		}
		next++
		c.LogID = ""
		// Key and Value are only valid until the next iteration.
		arena = append(arena, c.Key...)
		c.Key = arena[len(arena)-len(c.Key) : len(arena) : len(arena)]
		arena = append(arena, c.Value...)
		c.Value = arena[len(arena)-len(c.Value) : len(arena) : len(arena)]
		batch = append(batch, c)
		if c.SQN < run[i].last {
			continue
		}
		i++
		if i < len(run) && len(batch) < foldChunkChanges && len(arena) < foldChunkBytes {
			continue
		}
		w.v.addStates(batch)
		if err := p.store.Apply(w.stream, w.log, batch); err != nil {
			return err
		}
		batch, arena = batch[:0], arena[:0]
	}
	if want := run[len(run)-1].last + 1; next != want {
		return fmt.Errorf("read back SQNs %d..%d: the log ended at %d", run[0].first, want-1, next-1)
	}
	return nil
}

// awaitFold waits until the views of this node's writers serving key
// groups r are folded through their last SQN acknowledged so far (read-
// your-writes), at most p.readWait. A view retired or broken meanwhile
// ends the wait: the read then sees the new source, or the error.
func (p *PebbleState) awaitFold(ctx context.Context, stream string, v *pebbleStream, r keygroup.Range) error {
	type target struct {
		w   *pebbleWriter
		sqn uint64
	}
	var (
		buf    [4]target
		ts     = buf[:0]
		served bool
	)
	v.mu.Lock()
	for _, w := range v.writers {
		if !w.r.Overlaps(r) {
			continue
		}
		served = true
		w.mu.Lock()
		if w.folded < w.acked && !w.dead && w.err == nil {
			ts = append(ts, target{w, w.acked})
		}
		w.mu.Unlock()
	}
	v.mu.Unlock()
	if len(ts) == 0 {
		if served {
			p.waits.Observe(0)
		}
		return nil
	}
	start := time.Now()
	defer func() { p.waits.Observe(time.Since(start).Seconds()) }()
	// Tell the fold goroutine not to linger while this read waits.
	p.waiting.Add(1)
	defer p.waiting.Add(-1)
	select {
	case p.hurry <- struct{}{}:
	default: // told already
	}
	timer := time.NewTimer(p.readWait)
	defer timer.Stop()
	for _, t := range ts {
		for {
			t.w.mu.Lock()
			folded, ch := t.w.folded, t.w.progress
			done := folded >= t.sqn || t.w.dead || t.w.err != nil
			t.w.mu.Unlock()
			if done {
				break
			}
			select {
			case <-ch:
			case <-ctx.Done():
				return fmt.Errorf("stream %s: wait for the fold of writer %s: %w", stream, t.w.id, ctx.Err())
			case <-p.stopped:
				return fmt.Errorf("stream %s: wait for the fold of writer %s: %w", stream, t.w.id, materializer.ErrClosed)
			case <-timer.C:
				return fmt.Errorf("stream %s: writer %s folded through SQN %d, the read needs %d, waited %v: %w", stream, t.w.id, folded, t.sqn, p.readWait, ErrFoldBehind)
			}
		}
	}
	return nil
}

// foldLag returns the SQNs acknowledged to this node's writers and not yet
// folded, over every view.
func (p *PebbleState) foldLag() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var lag uint64
	for _, v := range p.streams {
		v.mu.Lock()
		for _, w := range v.writers {
			w.mu.Lock()
			if !w.dead && w.err == nil && w.acked > w.folded {
				lag += w.acked - w.folded
			}
			w.mu.Unlock()
		}
		v.mu.Unlock()
	}
	return lag
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
// refreshEvery) and folds it into the key groups of want without a writer
// that do not hold it yet. Only want: a node reading (or writing) some key
// groups of a stream must not import and hydrate the whole stream, which
// after a rescale would read the state of every other node's key groups
// from the blob store; the others are folded when a read asks for them.
func (p *PebbleState) refresh(ctx context.Context, stream string, cfg changelog.StreamConfig, v *pebbleStream, want keygroup.Range) error {
	keyGroups := cfg.KeyGroups
	v.mu.Lock()
	v.sizeLocked(cfg)
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
		v.mu.Unlock()
	}
	v.mu.Lock()
	need = v.dirty && v.staleLocked(want)
	v.mu.Unlock()
	if !need {
		return nil
	}

	v.fold.Lock()
	defer v.fold.Unlock()
	v.mu.Lock()
	if len(v.base) != keyGroups || v.inc != cfg.Incarnation {
		v.mu.Unlock()
		return nil // resized meanwhile; the next read folds
	}
	resets := v.resets
	cp := v.checkpoint
	// Runs of key groups holding the same checkpoint (or stale), each
	// advanced or refolded as one.
	type run struct {
		r    keygroup.Range
		from uint64
	}
	var runs []run
	// Key groups outside want that need a fold keep the view dirty.
	v.dirty = false
	for kg := 0; kg < keyGroups; kg++ {
		if v.base[kg] == cp || v.owner(uint16(kg)) != nil {
			continue
		}
		if !want.Contains(uint16(kg)) {
			v.dirty = true
			continue
		}
		if n := len(runs); n > 0 && int(runs[n-1].r.Hi)+1 == kg && runs[n-1].from == v.base[kg] {
			runs[n-1].r.Hi = uint16(kg)
		} else {
			runs = append(runs, run{keygroup.Range{Lo: uint16(kg), Hi: uint16(kg)}, v.base[kg]})
		}
	}
	v.mu.Unlock()
	if len(runs) == 0 {
		return nil
	}

	// Step 1 of the marks' protocol (see PebbleState): every run is
	// marked dirty before any of them changes. Not flushed here: an
	// advance changes its run by batches only, which a crash recovers in
	// commit order, after the mark; a refold's drop and import are
	// durable at once, so it flushes the mark first (below).
	rs := make([]keygroup.Range, len(runs))
	for i, rn := range runs {
		rs[i] = rn.r
	}
	if err := p.setMarks(v, stream, rs, markDirty, 0, resets, false); err != nil {
		v.mu.Lock()
		v.dirty = true
		v.mu.Unlock()
		return err
	}
	p.step("dirty marked")
	for i, rn := range runs {
		r := rn.r
		advanced, err := p.advance(ctx, v, stream, rn.from, cp, r)
		if err == nil && !advanced {
			p.refolds.Add(1)
			if rn.from != staleKG { // marked clean until step 1
				err = p.store.Flush()
			}
			if err == nil {
				err = p.store.DropKeyGroups(ctx, stream, r)
			}
			p.step("dropped")
			if err == nil && cp != 0 {
				err = p.restore(ctx, v, stream, cp, r)
			}
		}
		if err == nil {
			// Step 3: after the data, not flushed.
			err = p.setMarks(v, stream, []keygroup.Range{r}, markClean, cp, resets, false)
			p.step("clean marked")
		}
		v.mu.Lock()
		if len(v.base) != keyGroups || v.resets != resets {
			v.mu.Unlock()
			return nil // the stream was recreated meanwhile: everything is stale
		}
		if err != nil {
			// This run holds part of the base, the later ones are as
			// they were: fold them all again next time.
			v.dirty = true
			for _, rn := range runs[i:] {
				v.setBaseLocked(rn.r, staleKG)
			}
			v.mu.Unlock()
			return err
		}
		v.setBaseLocked(r, cp)
		v.mu.Unlock()
	}
	return nil
}

// staleLocked reports whether a key group of want without a writer does
// not hold the newest checkpoint; the caller holds v.mu.
func (v *pebbleStream) staleLocked(want keygroup.Range) bool {
	for kg := int(want.Lo); kg <= int(want.Hi) && kg < len(v.base); kg++ {
		if v.base[kg] != v.checkpoint && v.owner(uint16(kg)) == nil {
			return true
		}
	}
	return false
}

// advance moves key groups r, which hold complete checkpoint from, to the
// newer complete checkpoint to by folding only the changes between the two,
// when to is on from's lineage for all of r: planned with from as the only
// base (as if it were a snapshot holding, for each log of from, the log up
// to from's SQN), every key group of r must start from that base; the
// plan's steps are then exactly the changes after from. It reports false,
// having changed nothing, when the lineages differ (to's parts of r start
// from an older checkpoint, a rollback, or from a log truncated past
// from's SQN): the caller drops and refolds r instead.
func (p *PebbleState) advance(ctx context.Context, v *pebbleStream, stream string, from, to uint64, r keygroup.Range) (bool, error) {
	if from == 0 || from == staleKG || from >= to {
		return false, nil
	}
	parts, err := p.node.CheckpointParts(ctx, stream, from)
	if errors.Is(err, changelog.ErrCheckpointNotFound) {
		return false, nil // from is retired (e.g. while the node was down): refold
	}
	if err != nil {
		return false, err
	}
	base := changelog.Snapshot{Stream: stream, Checkpoint: from, Logs: make(map[string]uint64, len(parts))}
	for _, pt := range parts {
		base.Logs[pt.LogID] = pt.UpToSQN
	}
	pl, err := p.node.PlanRestoreFrom(ctx, stream, to, r, &base)
	if errors.Is(err, changelog.ErrLogTruncated) {
		return false, nil // a snapshot newer than from is needed: refold
	}
	if err != nil {
		return false, err
	}
	covered := 0
	for _, b := range pl.Bases {
		if b.Snapshot.Checkpoint != from {
			return false, nil
		}
		for _, br := range b.Ranges {
			covered += int(br.Hi) - int(br.Lo) + 1
		}
	}
	if covered != int(r.Hi)-int(r.Lo)+1 {
		return false, nil // some key groups do not start from from
	}
	logID := fmt.Sprintf("checkpoint %d..%d#%s", from, to, p.foldID())
	if err := p.fold(ctx, v, stream, logID, p.node.ReplayPlan(ctx, pl), true, 0); err != nil {
		return false, err
	}
	p.advances.Add(1)
	return true, nil
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
	p.step("imported")
	logID := fmt.Sprintf("checkpoint %d#%s", cp, p.foldID())
	return p.fold(ctx, v, stream, logID, p.node.ReplayPlan(ctx, pl), true, 0)
}

// importSnapshot imports the snapshot part of a plan (its applied SQNs are
// not: this store numbers its folds itself); its state names are learnt by
// the first scan that needs them (pebbleStream.unnamed).
func (p *PebbleState) importSnapshot(ctx context.Context, v *pebbleStream, stream string, pl changelog.RestorePlan) error {
	for _, b := range pl.Bases {
		// Lazy: the range serves reads at once from the snapshot's files
		// on the blob store (0 bytes read here), whatever the state size;
		// the store hydrates them in the background and references them on
		// the blob store meanwhile, so no GC deletes them under it.
		if err := p.store.ImportSnapshot(ctx, p.node.BlobStore(), b.Snapshot, b.Ranges, materializer.ImportOptions{SkipApplied: true, Lazy: true}); err != nil {
			return fmt.Errorf("stream %s: %w", stream, err)
		}
		p.imports.Add(1)
		for _, r := range b.Ranges {
			v.addUnnamed(r)
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
	if err := p.refresh(ctx, stream, cfg, v, keygroup.Range{Lo: kg, Hi: kg}); err != nil {
		return nil, false, err
	}
	if err := p.awaitFold(ctx, stream, v, keygroup.Range{Lo: kg, Hi: kg}); err != nil {
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
	if err := p.refresh(ctx, q.Stream, cfg, v, q.KeyGroups); err != nil {
		return nil, false, err
	}
	if err := p.awaitFold(ctx, q.Stream, v, q.KeyGroups); err != nil {
		return nil, false, err
	}
	v.fold.RLock()
	defer v.fold.RUnlock()
	if err := v.failed(q.KeyGroups); err != nil {
		return nil, false, err
	}
	states := []string{q.State}
	if q.State == "" {
		if states, err = p.stateNames(ctx, q.Stream, v); err != nil {
			return nil, false, err
		}
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
