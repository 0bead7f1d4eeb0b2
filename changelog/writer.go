package changelog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// WriterConfig says which key groups of which stream a writer owns.
type WriterConfig struct {
	Stream    string
	KeyGroups keygroup.Range
	// FromCheckpoint is the complete checkpoint whose state the writer
	// starts from; 0 means the newest complete one (or empty if none).
	FromCheckpoint uint64
	// Resume, if not zero, reattaches to the live epoch of that number whose
	// log this node recovered after a restart, instead of opening a new
	// epoch. Its un-uploaded changes and SQNs carry on.
	Resume uint64
}

// Writer is the single owner of a key-group range of a stream under one
// epoch. Its changes form one log, numbered by SQN from 1.
//
// Invariants:
//   - SQNs are assigned under mu, consecutively, so a log is one sequence
//     without gaps (brief invariant 2).
//   - tail holds every change with SQN in (uploaded, next), in SQN order;
//     tail[:drained] is being uploaded by the current flush.
//   - a change acknowledged Local is in the local log, and so is every
//     change of the log before it (walMu serialises local-log writes of a
//     log, so the local log never has a gap a crash could expose).
type Writer struct {
	node   *Node
	stream *streamHandle
	cfg    WriterConfig
	// incarnation of the stream (StreamConfig.Incarnation): part of the
	// log id and of every key the writer stores.
	incarnation string
	epoch       uint64
	logID       string
	from        uint64 // checkpoint the epoch started from

	mu       sync.Mutex
	next     uint64 // next SQN to assign
	tail     []segments.Change
	drained  int
	uploaded uint64 // every SQN ≤ uploaded is in an uploaded segment
	// segs lists the uploaded segments holding the log's changes from
	// truncatedBefore on, in SQN order.
	segs            []SegmentBlocks
	truncatedBefore uint64
	// flushGen counts finished flushes that carried this log's changes;
	// lastErr is the error of the newest failed one.
	flushGen uint64
	lastErr  error
	// done is closed and replaced at every finished flush, waking waiters.
	done chan struct{}
	// dead is set once the writer is fenced or closed; every call fails.
	dead error
	// closing is set by the first Close and never cleared: no SQN is
	// assigned any more, so the final part Close records covers every
	// acknowledged change, at every attempt (see Close). closeErr is the
	// error of the newest Close attempt, if it failed.
	closing  bool
	closeErr error
	// closeMu serialises Close attempts.
	closeMu sync.Mutex

	walMu      sync.Mutex
	walDurable uint64 // every SQN ≤ walDurable is in the local log or uploaded

	truncMu sync.Mutex

	// recovered: the log's recovery marks (set before the writer is
	// shared, immutable after).
	recovered []recoveryMark
}

// logIDOf names the log of an epoch: "<stream>/<epoch>.<incarnation>",
// the incarnation shortened to its first 8 characters (random hex: a
// collision of two incarnations of one name, which would also need equal
// epoch numbers and one node holding both logs, is negligible). The
// incarnation keeps a deleted incarnation's log (its local-log entry, its
// segments' blocks) from being taken for the new incarnation's epoch of the
// same number. A stream defined before incarnations existed has none:
// "<stream>/<epoch>". Parsers take the stream as everything before the last
// '/' (see ParseLogID).
func logIDOf(ns streamNS, epoch uint64) string {
	if ns.incarnation == "" {
		return fmt.Sprintf("%s/%d", ns.name, epoch)
	}
	inc := ns.incarnation
	if len(inc) > 8 {
		inc = inc[:8]
	}
	return fmt.Sprintf("%s/%d.%s", ns.name, epoch, inc)
}

// ParseLogID splits a log id (Writer.LogID) into its stream and epoch.
func ParseLogID(id string) (stream string, epoch uint64, ok bool) {
	i := strings.LastIndexByte(id, '/')
	if i <= 0 {
		return "", 0, false
	}
	num, _, _ := strings.Cut(id[i+1:], ".")
	epoch, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return "", 0, false
	}
	return id[:i], epoch, true
}

// ns is the key space of the writer's stream incarnation.
func (w *Writer) ns() streamNS { return streamNS{name: w.cfg.Stream, incarnation: w.incarnation} }

// walMeta is what the local log keeps about a log, to resume it after a
// restart.
type walMeta struct {
	Stream string `json:"stream"`
	// Incarnation of the stream (StreamConfig.Incarnation); part of the
	// log id.
	Incarnation    string         `json:"incarnation,omitempty"`
	Epoch          uint64         `json:"epoch"`
	KeyGroups      keygroup.Range `json:"key_groups"`
	FromCheckpoint uint64         `json:"from_checkpoint"`
	// TruncatedBefore is durable before a truncation drops any segment
	// reference, so a restart never resurrects a released prefix whose
	// segments may already be deleted.
	TruncatedBefore uint64 `json:"truncated_before,omitempty"`
	// Recovered has one mark per restart that recovered the log (S4).
	Recovered []recoveryMark `json:"recovered,omitempty"`
}

// meta returns the writer's local-log metadata.
func (w *Writer) meta(truncatedBefore uint64) []byte {
	data, _ := json.Marshal(walMeta{Stream: w.cfg.Stream, Incarnation: w.incarnation, Epoch: w.epoch, KeyGroups: w.cfg.KeyGroups, FromCheckpoint: w.from, TruncatedBefore: truncatedBefore, Recovered: w.recovered})
	return data
}

// OpenWriter opens a writer: a new epoch over cfg.KeyGroups that fences
// every older writer of overlapping key groups, on any node. Changes of
// fenced writers after the checkpoint the new writer starts from never
// reach a restore or a replay.
func (n *Node) OpenWriter(ctx context.Context, cfg WriterConfig) (*Writer, error) {
	w, err := n.openWriter(ctx, cfg)
	if errors.Is(err, ErrStreamNotFound) {
		// This node's view of the stream may predate a delete and create of
		// the same name: the stale handle is dropped, try once more.
		w, err = n.openWriter(ctx, cfg)
	}
	return w, err
}

func (n *Node) openWriter(ctx context.Context, cfg WriterConfig) (*Writer, error) {
	if err := n.checkOpen(); err != nil {
		return nil, err
	}
	h, err := n.freshHandle(ctx, cfg.Stream)
	if err != nil {
		return nil, err
	}
	if err := cfg.KeyGroups.Validate(h.cfg.KeyGroups); err != nil {
		return nil, fmt.Errorf("stream %s: %w", cfg.Stream, err)
	}
	if cfg.Resume != 0 {
		w, err := n.resumeWriter(ctx, h, cfg)
		if err != nil {
			return nil, err
		}
		if err := w.resumeUnfinishedClose(ctx); err != nil {
			return nil, err
		}
		return w, nil
	}
	n.mu.Lock()
	n.opening[cfg.Stream]++
	n.mu.Unlock()
	defer func() {
		n.mu.Lock()
		if n.opening[cfg.Stream]--; n.opening[cfg.Stream] == 0 {
			delete(n.opening, cfg.Stream)
		}
		n.mu.Unlock()
	}()
	// An explicit base may be old enough for GC to have deleted its data:
	// pin it and check it is restorable before the entry that fences
	// anyone is appended (issue 9 R2). The newest complete checkpoint,
	// taken when FromCheckpoint is 0, is always a GC root and needs no pin.
	var (
		unpin    func(appended bool)
		pinnedAt time.Time
	)
	if from := cfg.FromCheckpoint; from != 0 {
		if _, err := n.completeCheckpoint(ctx, cfg.Stream, from); err != nil {
			return nil, err
		}
		if unpin, pinnedAt, err = n.pin(ctx, h, from, cfg.KeyGroups); err != nil {
			return nil, fmt.Errorf("stream %s: open from checkpoint %d: %w", cfg.Stream, from, err)
		}
	}
	e, err := h.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		from := cfg.FromCheckpoint
		if from == 0 {
			from = s.lastCheckpoint()
		} else if _, ok := s.checkpoint(from); !ok {
			return JournalEntry{}, fmt.Errorf("stream %s: checkpoint %d: %w", cfg.Stream, from, ErrCheckpointNotFound)
		} else if n.clock.Now().Sub(pinnedAt) > pinTTL/2 {
			// The pin is about to go stale: GC may stop honouring it.
			return JournalEntry{}, fmt.Errorf("stream %s: open from checkpoint %d: pinned %v ago: %w", cfg.Stream, from, n.clock.Now().Sub(pinnedAt), context.DeadlineExceeded)
		}
		return JournalEntry{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: cfg.KeyGroups, Node: n.id, FromCheckpoint: from}}, nil
	})
	if unpin != nil {
		// An append error may have landed the entry: keep the pin through
		// the rounds in progress either way.
		unpin(true)
	}
	if err != nil {
		return nil, err
	}
	w := n.newWriter(h, cfg, e.Seq, e.Open.FromCheckpoint)
	if err := n.wal.SetMeta(ctx, w.logID, w.meta(1)); err != nil {
		err = fmt.Errorf("writer %s: record in local log: %w", w.logID, err)
		// The epoch is open in the journal but no writer will ever write
		// it: close it at once, or it blocks every checkpoint (S1). If
		// that fails too, the background refresh closes it.
		ep := EpochState{Epoch: e.Seq, KeyGroups: cfg.KeyGroups, Node: n.id, FromCheckpoint: e.Open.FromCheckpoint}
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), closeRetryTimeout)
		defer cancel()
		if aerr := n.abandonEpoch(actx, h, ep); aerr != nil {
			err = errors.Join(err, aerr)
		}
		return nil, err
	}
	n.attach(w)
	return w, nil
}

// resumeUnfinishedClose keeps a resumed writer closing if a Close of its
// epoch began before the restart (its final part exists): that Close's
// epoch-close entry may still land, so the writer must not acknowledge new
// changes (see Close); Close finishes it. A resume that fails here leaves
// the writer attached, and the next resume checks again.
func (w *Writer) resumeUnfinishedClose(ctx context.Context) error {
	w.mu.Lock()
	closing := w.closing
	w.mu.Unlock()
	if closing {
		return nil
	}
	_, err := w.node.store.Stat(ctx, partKey(w.ns(), 0, w.epoch))
	if errors.Is(err, upload.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("writer %s: resume: look for the final part of an unfinished close: %w", w.logID, err)
	}
	w.mu.Lock()
	w.closing = true
	w.closeErr = errors.New("a Close began before the node restarted and did not finish")
	w.mu.Unlock()
	return nil
}

func (n *Node) newWriter(h *streamHandle, cfg WriterConfig, epoch, from uint64) *Writer {
	return &Writer{
		node: n, stream: h, cfg: cfg, incarnation: h.cfg.Incarnation, epoch: epoch, logID: logIDOf(h.cfg.ns(), epoch), from: from,
		next: 1, truncatedBefore: 1, done: make(chan struct{}),
	}
}

// attach registers w as a live writer, fencing at once any writer of this
// node that the new epoch overlaps (writers on other nodes learn it from the
// journal).
func (n *Node) attach(w *Writer) {
	n.mu.Lock()
	var fenced []*Writer
	for _, o := range n.writers {
		if o.cfg.Stream == w.cfg.Stream && o.stream.cfg.Incarnation == w.stream.cfg.Incarnation &&
			o.epoch < w.epoch && o.cfg.KeyGroups.Overlaps(w.cfg.KeyGroups) {
			fenced = append(fenced, o)
		}
	}
	n.writers[w.logID] = w
	n.mu.Unlock()
	for _, o := range fenced {
		o.fence(w.epoch)
	}
	n.sched.Register(w)
}

func (n *Node) detach(w *Writer) {
	n.mu.Lock()
	if n.writers[w.logID] == w {
		delete(n.writers, w.logID)
	}
	n.mu.Unlock()
}

// liveWriters returns this node's live writers of h's incarnation of its
// stream. A writer of a deleted incarnation of the name is not one: it can
// never record a part of this one (its keys are its own incarnation's).
func (n *Node) liveWriters(h *streamHandle) []*Writer {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []*Writer
	for _, w := range n.writers {
		if w.cfg.Stream == h.cfg.Name && w.stream.cfg.Incarnation == h.cfg.Incarnation && !w.stream.journal.isGone() {
			out = append(out, w)
		}
	}
	return out
}

// streamGone kills w if err says its stream incarnation is gone (deleted,
// maybe created again): every later call fails with ErrStreamNotFound and
// the node no longer counts it (liveWriters, DeleteStream). An object of
// the stream that was not found (a part the deletion removed) is resolved
// by reading the stream's definition: ErrStreamNotFound if the stream is
// gone, else err unchanged.
func (w *Writer) streamGone(ctx context.Context, err error) error {
	if errors.Is(err, upload.ErrNotFound) && !errors.Is(err, ErrStreamNotFound) {
		// A definition that cannot be read leaves the outcome unknown:
		// its (transient) error goes with the not-found.
		if cerr := w.stream.journal.checkCatalog(ctx); cerr != nil {
			err = errors.Join(cerr, err)
		}
	}
	if errors.Is(err, ErrStreamNotFound) && w.stream.journal.isGone() {
		w.kill(fmt.Errorf("writer %s: stream %s was deleted: %w", w.logID, w.cfg.Stream, ErrStreamNotFound))
	}
	return err
}

func (n *Node) checkOpen() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return fmt.Errorf("node %s: %w", n.id, ErrClosed)
	}
	return nil
}

// Epoch returns the writer's epoch.
func (w *Writer) Epoch() uint64 { return w.epoch }

// LogID returns the writer's log id ("<stream>/<epoch>.<incarnation
// prefix>", see logIDOf).
func (w *Writer) LogID() string { return w.logID }

// KeyGroups returns the writer's key-group range.
func (w *Writer) KeyGroups() keygroup.Range { return w.cfg.KeyGroups }

// FromCheckpoint returns the checkpoint the writer's state started from.
func (w *Writer) FromCheckpoint() uint64 { return w.from }

// LastSQN returns the SQN of the newest appended change (0 if none).
func (w *Writer) LastSQN() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.next - 1
}

// fence kills the writer because epoch `by` overlaps it.
func (w *Writer) fence(by uint64) {
	w.kill(fmt.Errorf("writer %s: fenced by epoch %d: %w", w.logID, by, ErrFenced))
}

// kill makes every later call fail with err and drops the pending tail:
// changes of a dead writer must never be uploaded after its death.
func (w *Writer) kill(err error) {
	w.mu.Lock()
	if w.dead != nil {
		w.mu.Unlock()
		return
	}
	w.dead = err
	var discarded int64
	for i := w.drained; i < len(w.tail); i++ {
		discarded += upload.ChangeBytes(w.tail[i])
	}
	w.tail = w.tail[:w.drained]
	w.wakeLocked()
	w.mu.Unlock()
	w.node.sched.Release(discarded)
	w.node.detach(w)
	w.node.sched.Unregister(w)
	if !errors.Is(err, errDetached) {
		// Fenced or closed: its changes can never become visible, or are in
		// its final part; the local log no longer needs them.
		w.node.wal.Forget(w.logID)
	}
}

// errDetached: the node stopped (shutdown or crash); the writer's epoch
// stays live and can be resumed, so its local log is kept.
var errDetached = errors.New("detached")

// detach stops the writer without uploading more (node shutdown: the caller
// has already persisted what it wanted).
func (w *Writer) detach(err error) {
	w.kill(fmt.Errorf("writer %s: %w: %w", w.logID, errDetached, err))
}

func (w *Writer) wakeLocked() {
	close(w.done)
	w.done = make(chan struct{})
}

// Append validates batch, assigns it consecutive SQNs and returns the first
// and last once the batch is as durable as d asks. The batch is all or
// nothing: one invalid change rejects the whole batch. Append blocks while
// the node's in-flight bytes are at their bound (back-pressure), honouring
// ctx.
func (w *Writer) Append(ctx context.Context, batch []Change, d Durability) (first, last uint64, err error) {
	if err := w.alive(); err != nil {
		return 0, 0, err
	}
	if len(batch) == 0 {
		return 0, 0, fmt.Errorf("writer %s: empty batch: %w", w.logID, ErrInvalidChange)
	}
	if d == Replicated {
		return 0, 0, fmt.Errorf("writer %s: %v durability needs a cluster: %w", w.logID, d, ErrUnsupportedDurability)
	}
	if d != Buffered && d != Local {
		return 0, 0, fmt.Errorf("writer %s: %v: %w", w.logID, d, ErrUnsupportedDurability)
	}
	limits := w.node.opts.Limits
	var size, bytes int64
	for i := range batch {
		if err := batch[i].validate(i, w.cfg.KeyGroups, limits); err != nil {
			return 0, 0, fmt.Errorf("writer %s: %w", w.logID, err)
		}
		size += int64(len(batch[i].Key) + len(batch[i].Value))
		bytes += upload.ChangeBytes(segments.Change{Key: batch[i].Key, Value: batch[i].Value, State: batch[i].State})
	}
	if err := w.node.sched.Reserve(ctx, bytes); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			// Waited as long as the caller allowed for upload room.
			return 0, 0, fmt.Errorf("writer %s: no room for %d bytes in flight: %w: %w", w.logID, bytes, upload.ErrBackpressure, err)
		}
		return 0, 0, fmt.Errorf("writer %s: %w", w.logID, err)
	}
	// One allocation holds every key and value of the batch: the caller
	// may reuse its buffers once Append returns.
	arena := make([]byte, 0, size)
	w.mu.Lock()
	if err := w.deadOrClosingLocked(); err != nil {
		w.mu.Unlock()
		w.node.sched.Release(bytes)
		return 0, 0, w.resolveClosing(ctx, err)
	}
	first = w.next
	for i := range batch {
		c := &batch[i]
		start := len(arena)
		arena = append(arena, c.Key...)
		key := arena[start:len(arena):len(arena)]
		start = len(arena)
		arena = append(arena, c.Value...)
		value := arena[start:len(arena):len(arena)]
		w.tail = append(w.tail, segments.Change{
			LogID: w.logID, SQN: w.next, KeyGroup: c.KeyGroup, State: c.State, Op: c.Op,
			Key: key, Value: value, TimestampMs: c.TimestampMs,
		})
		w.next++
	}
	last = w.next - 1
	w.mu.Unlock()

	if d == Local {
		// The batch has its SQNs and is in the log: from here it must not
		// be reported as not appended (a retry would apply it twice). So
		// the wait for the local log is not abandoned when ctx ends (the
		// local log is fail-stop, so the wait is bounded), and a local log
		// that fails kills the writer: nothing of it becomes visible.
		if err := w.syncLocal(context.WithoutCancel(ctx), last); err != nil {
			if !errors.Is(err, ErrFenced) && !errors.Is(err, ErrClosed) {
				w.kill(fmt.Errorf("writer %s: %w: %w", w.logID, ErrClosed, err))
			}
			return 0, 0, err
		}
	}
	return first, last, nil
}

// deadOrClosingLocked is the error of a call that would assign SQNs to a
// writer that is dead or closing; the caller holds w.mu.
func (w *Writer) deadOrClosingLocked() error {
	if w.dead != nil {
		return w.dead
	}
	if w.closing && w.closeErr != nil {
		return fmt.Errorf("writer %s: a Close failed (%v) and accepts no changes until one succeeds: call Close again: %w", w.logID, w.closeErr, ErrClosing)
	}
	if w.closing {
		return fmt.Errorf("writer %s: %w", w.logID, ErrClosing)
	}
	return nil
}

// syncLocal makes every change up to last durable in the local log (or
// finds it uploaded already). Holding walMu while writing keeps each log's
// records in SQN order in the local log; the first appender to get walMu
// writes every pending change of the log, so the others often find their
// changes already durable (per-log group commit on top of the local log's
// cross-log group commit).
func (w *Writer) syncLocal(ctx context.Context, last uint64) error {
	w.walMu.Lock()
	defer w.walMu.Unlock()
	if w.walDurable >= last {
		return nil
	}
	pending, upTo, err := w.unsyncedLocked()
	if err != nil {
		return err
	}
	if len(pending) > 0 {
		if err := w.node.wal.Append(ctx, w.logID, pending); err != nil {
			return fmt.Errorf("writer %s: local log: %w", w.logID, err)
		}
	}
	w.walDurable = upTo
	return nil
}

// unsyncedLocked copies the changes neither in the local log nor uploaded.
// A dead writer's tail may have been cut: its changes must not reach the
// local log (they can never become visible), so it reports its death.
func (w *Writer) unsyncedLocked() ([]segments.Change, uint64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.dead != nil {
		return nil, 0, w.dead
	}
	from := max(w.walDurable, w.uploaded) + 1
	upTo := w.uploaded + uint64(len(w.tail)) // == w.next-1 while alive
	if from > upTo {
		return nil, upTo, nil
	}
	base := w.uploaded + 1 // SQN of tail[0]
	return slices.Clone(w.tail[from-base : upTo-base+1]), upTo, nil
}

func (w *Writer) alive() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dead
}

// Drain implements upload.Log: it hands the scheduler every change not yet
// being uploaded.
func (w *Writer) Drain() []segments.Change {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.drained == len(w.tail) {
		return nil
	}
	out := w.tail[w.drained:len(w.tail):len(w.tail)]
	w.drained = len(w.tail)
	return out
}

// Uploaded implements upload.Log: the flush that carried the last Drain
// finished.
func (w *Writer) Uploaded(res upload.FlushResult) {
	w.mu.Lock()
	w.flushGen++
	if res.Err != nil && w.dead != nil {
		// A dead writer is never drained again: give its bytes back.
		var discarded int64
		for i := range w.tail {
			discarded += upload.ChangeBytes(w.tail[i])
		}
		clear(w.tail)
		w.tail, w.drained, w.lastErr = nil, 0, res.Err
		w.wakeLocked()
		w.mu.Unlock()
		w.node.sched.Release(discarded)
		return
	}
	if res.Err != nil {
		// Hand the same changes again at the next Drain.
		w.drained = 0
		w.lastErr = res.Err
		w.wakeLocked()
		w.mu.Unlock()
		return
	}
	if len(res.Blocks) > 0 {
		upTo := res.Blocks[len(res.Blocks)-1].LastSQN
		w.segs = append(w.segs, SegmentBlocks{Key: res.Segment.Key, Size: res.Segment.Size, Blocks: spansOf(res.Blocks)})
		n := int(upTo - w.uploaded)
		// Compact in place: keeping the array saves regrowing it after
		// every flush, and clearing the moved-from entries lets the
		// uploaded changes' arenas be freed. Safe: the scheduler is done
		// with this drain, and Replay and syncLocal copy what they read.
		m := copy(w.tail, w.tail[n:])
		clear(w.tail[m:])
		w.tail = w.tail[:m]
		if cap(w.tail) > 4*max(m, 4096) {
			w.tail = slices.Clip(slices.Clone(w.tail)) // let a burst's array go
		}
		w.drained -= n
		w.uploaded = upTo
	}
	w.lastErr = nil
	// The mark goes to the local log before any persist waiter wakes, so a
	// truncation that follows a persist is recorded after its mark.
	w.node.wal.MarkUploaded(w.logID, w.uploaded)
	w.wakeLocked()
	w.mu.Unlock()
}

// PersistHandle says where a persisted prefix of a log lives.
type PersistHandle struct {
	LogID   string
	UpToSQN uint64
	// Segments lists the segments (and this log's blocks in each) holding
	// the log's changes from its truncation point up to UpToSQN and beyond.
	Segments []SegmentBlocks
}

// Persist returns once every change with SQN ≤ upTo (0: every change
// appended so far) is inside uploaded segments. It asks the scheduler for a
// flush (after its short batching delay, so concurrent persists share one
// object). If a flush carrying its changes fails, Persist returns the
// error; a later Persist tries again.
func (w *Writer) Persist(ctx context.Context, upTo uint64) (PersistHandle, error) {
	w.mu.Lock()
	if w.dead != nil && !errors.Is(w.dead, ErrClosed) {
		err := w.dead
		w.mu.Unlock()
		return PersistHandle{}, err
	}
	if upTo == 0 || upTo >= w.next {
		upTo = w.next - 1
	}
	startGen := w.flushGen
	requested := false
	for w.uploaded < upTo {
		if w.dead != nil {
			err := w.dead
			w.mu.Unlock()
			return PersistHandle{}, err
		}
		if w.flushGen > startGen && w.lastErr != nil {
			err := w.lastErr
			w.mu.Unlock()
			return PersistHandle{}, fmt.Errorf("writer %s: persist up to %d: %w", w.logID, upTo, err)
		}
		done := w.done
		w.mu.Unlock()
		if !requested {
			w.node.sched.RequestFlush()
			requested = true
		}
		select {
		case <-ctx.Done():
			return PersistHandle{}, fmt.Errorf("writer %s: persist up to %d: %w", w.logID, upTo, ctx.Err())
		case <-done:
		}
		w.mu.Lock()
	}
	h := PersistHandle{LogID: w.logID, UpToSQN: upTo, Segments: slices.Clone(w.segs)}
	w.mu.Unlock()
	return h, nil
}
