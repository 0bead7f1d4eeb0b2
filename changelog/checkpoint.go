package changelog

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/dstl-dev/dstl/upload"
)

// CheckpointResult says what a writer's Checkpoint achieved.
type CheckpointResult struct {
	ID   uint64
	Part PartRef
	// Complete: every live writer of the stream has recorded its part and
	// the checkpoint is restorable. Otherwise the last writer to record its
	// part completes it.
	Complete bool
}

// Checkpoint persists every change appended so far and records the
// writer's part of checkpoint id with the client's opaque metadata. The
// stream's checkpoint id completes (atomically, with one create-only journal
// entry) once every live writer has recorded its part. An id not above the
// newest complete checkpoint is refused with ErrCheckpointTooOld, one more
// than Limits.MaxCheckpointIDStep above it with ErrCheckpointIDOutOfRange; a
// fenced writer gets ErrFenced and its part never becomes visible.
func (w *Writer) Checkpoint(ctx context.Context, id uint64, metadata []byte) (CheckpointResult, error) {
	res, err := w.checkpoint(ctx, id, metadata)
	err = w.streamGone(ctx, err)
	if errors.Is(err, ErrFenced) {
		// Other writers of this node may have stored their parts and waited
		// for this one's, which will never come: complete for them.
		w.node.completeWaiting(ctx, w.stream)
	}
	return res, err
}

func (w *Writer) checkpoint(ctx context.Context, id uint64, metadata []byte) (CheckpointResult, error) {
	if id == 0 {
		return CheckpointResult{}, fmt.Errorf("writer %s: checkpoint id 0: %w", w.logID, ErrInvalidChange)
	}
	w.mu.Lock()
	err := w.deadOrClosingLocked()
	w.mu.Unlock()
	if err != nil {
		return CheckpointResult{}, w.resolveClosing(ctx, err)
	}
	if err := w.checkJournal(ctx, id); err != nil {
		return CheckpointResult{}, err
	}
	if res, done, err := w.alreadyComplete(ctx, id); done || err != nil {
		return res, err
	}
	h, err := w.Persist(ctx, 0)
	if err != nil {
		return CheckpointResult{}, err
	}
	ref, err := w.recordPart(ctx, id, h, metadata)
	if err != nil {
		return CheckpointResult{}, err
	}
	if !w.lastLocalPart(id) {
		// Another writer of this node stores its part later and completes.
		return CheckpointResult{ID: id, Part: ref}, nil
	}
	complete, err := w.tryComplete(ctx, id)
	if err != nil {
		return CheckpointResult{}, err
	}
	return CheckpointResult{ID: id, Part: ref, Complete: complete}, nil
}

// checkJournal fails early if the journal as this node last read it says
// the writer was fenced or id is taken. It reads no blob unless id looks
// out of range: the background refresh keeps the state recent, and
// tryComplete checks again on the newest journal before anything becomes
// visible.
func (w *Writer) checkJournal(ctx context.Context, id uint64) error {
	st := w.stream.journal.snapshot()
	if by, ok := st.fenced(w.epoch); ok {
		w.fence(by)
		return w.alive()
	}
	if id == 0 {
		return nil
	}
	if _, done := st.checkpoint(id); !done && id <= st.lastCheckpoint() {
		return fmt.Errorf("writer %s: checkpoint %d, newest complete is %d: %w", w.logID, id, st.lastCheckpoint(), ErrCheckpointTooOld)
	}
	// Bound the id: every later id must be above it, so an id near 2^64
	// would leave the stream none. The cached state may be behind (a lower
	// newest id is a stricter bound), so refuse only on the newest journal.
	step := w.node.opts.Limits.MaxCheckpointIDStep
	if last := st.lastCheckpoint(); id > last && id-last > step {
		if err := w.stream.journal.refresh(ctx); err != nil {
			return err
		}
		st = w.stream.journal.snapshot()
		if last := st.lastCheckpoint(); id > last && id-last > step {
			return fmt.Errorf("writer %s: checkpoint %d is more than %d above the newest complete checkpoint %d: %w", w.logID, id, step, last, ErrCheckpointIDOutOfRange)
		}
	}
	return nil
}

// alreadyComplete handles a Checkpoint of an id that is complete already:
// a retry whose earlier call succeeded (its part covers everything the
// writer has appended) succeeds again; anything else is too old.
func (w *Writer) alreadyComplete(ctx context.Context, id uint64) (CheckpointResult, bool, error) {
	st := w.stream.journal.snapshot()
	cp, ok := st.checkpoint(id)
	if !ok {
		return CheckpointResult{}, false, nil
	}
	tooOld := fmt.Errorf("writer %s: checkpoint %d is complete already: %w", w.logID, id, ErrCheckpointTooOld)
	for _, ref := range cp.Parts {
		if ref.Epoch != w.epoch {
			continue
		}
		p, err := w.node.part(ctx, ref.Key)
		if err != nil {
			return CheckpointResult{}, true, err
		}
		if p.UpToSQN == w.LastSQN() {
			// A retry answered from the cached journal: first make sure
			// the stream was not deleted since (its checkpoints are gone).
			if err := w.stream.journal.checkCatalog(ctx); err != nil {
				return CheckpointResult{}, true, err
			}
			return CheckpointResult{ID: id, Part: ref, Complete: true}, true, nil
		}
	}
	return CheckpointResult{}, true, tooOld
}

// recordPart writes the writer's part covering h.
func (w *Writer) recordPart(ctx context.Context, id uint64, h PersistHandle, metadata []byte) (PartRef, error) {
	w.mu.Lock()
	truncated := w.truncatedBefore
	w.mu.Unlock()
	segs := make([]SegmentBlocks, 0, len(h.Segments))
	for _, s := range h.Segments {
		if s.firstSQN() <= h.UpToSQN {
			segs = append(segs, s)
		}
	}
	return writePart(ctx, w.node.store, w.ns(), Part{
		Stream: w.cfg.Stream, Epoch: w.epoch, KeyGroups: w.cfg.KeyGroups, Checkpoint: id, LogID: w.logID,
		FromCheckpoint: w.from, TruncatedBefore: truncated, UpToSQN: h.UpToSQN, Segments: segs,
		Metadata: slices.Clone(metadata),
	})
}

// lastLocalPart records that w stored its part of id and reports whether
// every live writer of the stream on this node has now stored one, so that
// w is the one to try to complete it. Writers the journal (as last read)
// says are fenced do not count: their part will never come. A writer the
// cached journal does not know to be fenced yet does count; once it learns
// it (its next call, or the background refresh), completeWaiting completes
// for the writers that waited for it.
func (w *Writer) lastLocalPart(id uint64) bool {
	h := w.stream
	st := h.journal.snapshot()
	h.partsMu.Lock()
	defer h.partsMu.Unlock()
	if h.parts == nil {
		h.parts = map[uint64]map[uint64]bool{}
	}
	stored := h.parts[id]
	if stored == nil {
		stored = map[uint64]bool{}
		h.parts[id] = stored
	}
	stored[w.epoch] = true
	return w.node.localPartsDoneLocked(h, st, id)
}

// localPartsDoneLocked reports whether every live writer of h on this node
// that st does not say is fenced stored its part of id; it also forgets ids
// st says are complete or too old. The caller holds h.partsMu.
func (n *Node) localPartsDoneLocked(h *streamHandle, st journalState, id uint64) bool {
	for old := range h.parts {
		if old <= st.lastCheckpoint() {
			delete(h.parts, old) // complete or too old: nobody completes it any more
		}
	}
	stored, ok := h.parts[id]
	if !ok {
		return false
	}
	for _, o := range n.liveWriters(h) {
		if _, fenced := st.fenced(o.epoch); !fenced && !stored[o.epoch] {
			return false
		}
	}
	return true
}

// completeWaiting tries to complete every checkpoint that writers of h on
// this node stored parts for and no live writer of this node still owes a
// part of: after a writer of this node was fenced or closed, the others
// may have waited for its part. Nothing is lost if it fails (the id stays
// incomplete, as it would have), but the stream is marked so that the
// background refresh tries again.
func (n *Node) completeWaiting(ctx context.Context, h *streamHandle) {
	st := h.journal.snapshot()
	h.partsMu.Lock()
	var ids []uint64
	for id := range h.parts {
		if n.localPartsDoneLocked(h, st, id) {
			ids = append(ids, id)
		}
	}
	h.partsMu.Unlock()
	slices.Sort(ids)
	failed := false
	for _, id := range ids {
		if _, err := n.finishCheckpoint(ctx, h, id); err != nil && !errors.Is(err, ErrCheckpointTooOld) {
			failed = true
			if ctx.Err() == nil {
				n.log.Warn("completing a checkpoint other writers waited for failed; retried by the background refresh", "stream", h.cfg.Name, "checkpoint", id, "err", err)
			}
		}
	}
	h.completeRetry.Store(failed)
}

// tryComplete appends the checkpoint-complete entry for id if every live
// epoch has a part for it, and reports whether id is complete. A fenced
// writer gets ErrFenced (its part is not in the checkpoint).
func (w *Writer) tryComplete(ctx context.Context, id uint64) (bool, error) {
	complete, err := w.node.finishCheckpoint(ctx, w.stream, id)
	if err != nil && !errors.Is(err, ErrCheckpointTooOld) {
		return false, err
	}
	st := w.stream.journal.snapshot()
	if by, ok := st.fenced(w.epoch); ok {
		w.fence(by)
		return false, w.alive()
	}
	return complete, err
}

// finishCheckpoint appends the checkpoint-complete entry for id if every
// live epoch has a part for it, and reports whether id is complete. It
// needs no live writer of its own: the entry names a part of exactly the
// epochs live at its position (journal invariant), whoever appends it, so
// a node whose writer was fenced can still complete for the others. Two
// writers recording their parts at the same time cannot both miss each
// other: each lists parts only after its own is stored, so the later
// lister sees both.
func (n *Node) finishCheckpoint(ctx context.Context, h *streamHandle, id uint64) (bool, error) {
	// Without the journal's lock first: most writers of a checkpoint are not
	// the last to record a part, and they must not queue behind each other
	// on the lock and its blob-store round trips just to learn that. The
	// refresh starts after this writer's part is stored, so the last writer
	// to store one sees every part (the argument of the comment above).
	if err := h.journal.refresh(ctx); err != nil {
		return false, err
	}
	st := h.journal.snapshot()
	if _, done := st.checkpoint(id); done {
		return true, nil
	}
	if id <= st.lastCheckpoint() {
		return false, fmt.Errorf("stream %s: checkpoint %d, newest complete is %d: %w", h.cfg.Name, id, st.lastCheckpoint(), ErrCheckpointTooOld)
	}
	if !st.completable(id) {
		return false, nil
	}
	recorded, err := listParts(ctx, n.store, h.cfg.ns(), id)
	if err != nil {
		return false, err
	}
	if !st.partsComplete(recorded) {
		return false, nil
	}
	complete := false
	_, err = h.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		if _, ok := s.checkpoint(id); ok {
			complete = true
			return JournalEntry{}, errNothingToAppend
		}
		if last := s.lastCheckpoint(); id <= last {
			return JournalEntry{}, fmt.Errorf("stream %s: checkpoint %d, newest complete is %d: %w", h.cfg.Name, id, last, ErrCheckpointTooOld)
		}
		if len(s.orphaned()) > 0 {
			return JournalEntry{}, errNothingToAppend // completes once the orphans are reopened
		}
		recorded, err := listParts(ctx, n.store, h.cfg.ns(), id)
		if err != nil {
			return JournalEntry{}, err
		}
		parts := make([]PartRef, 0, len(s.live))
		for _, ep := range s.live {
			switch {
			case ep.Closed:
				parts = append(parts, ep.FinalPart)
			case recorded[ep.Epoch]:
				parts = append(parts, PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: id, Key: partKey(h.cfg.ns(), id, ep.Epoch)})
			default:
				return JournalEntry{}, errNothingToAppend // another writer completes it
			}
		}
		complete = true
		return JournalEntry{Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: id, Parts: parts}}, nil
	})
	return complete, err
}

// listParts returns the epochs of this writer's stream that recorded a
// part of checkpoint id.
func (w *Writer) listParts(ctx context.Context, id uint64) (map[uint64]bool, error) {
	return listParts(ctx, w.node.store, w.ns(), id)
}

// listParts returns the epochs that recorded a part of checkpoint id.
func listParts(ctx context.Context, store upload.BlobStore, ns streamNS, id uint64) (map[uint64]bool, error) {
	epochs, err := listNumbered(ctx, store, checkpointPrefix(ns, id))
	if err != nil {
		return nil, fmt.Errorf("stream %s: list parts of checkpoint %d: %w", ns.name, id, err)
	}
	out := make(map[uint64]bool, len(epochs))
	for _, ep := range epochs {
		out[ep] = true
	}
	return out, nil
}

// ErrClosing: Close was called on the writer, so it accepts no more changes
// or checkpoints. If that Close failed, call Close again (the node also
// retries it in the background); it is not ErrClosed, because the writer
// still has to be closed.
var ErrClosing = errors.New("writer closing")

// Close ends the writer gracefully: it persists every change, records a
// final part and closes its epoch in the journal, so that later checkpoints
// carry its state until a new writer opens its key groups. A fenced or
// already closed writer closes without error.
//
// The close protocol (brief invariants 1 and 4; docs/changelog.md):
//
//   - The first Close sets closing, under mu, and nothing ever clears it:
//     from then on no SQN is assigned (Append and Checkpoint fail with
//     ErrClosing), and Truncate is refused, so every attempt computes the
//     same final part (every acknowledged change, same truncation point),
//     stored create-only at final/<epoch>. That is why a retried Close can
//     never conflict with its own earlier part (R1b), and why a writer
//     never resumes after a failed Close: the epoch-close entry of a failed
//     attempt may have landed, or may still land (a PUT that outlives its
//     deadline), and any change acknowledged after it would be dropped by
//     every later checkpoint, which uses the final part.
//   - A failed Close is resolved by re-reading the journal: a later Close
//     (or the background refresh, which retries it) finds the epoch closed
//     and finishes, or appends the entry; any Append or Checkpoint on the
//     closing writer re-reads it too and finishes a close that landed.
//   - Close attempts are serialised by closeMu.
func (w *Writer) Close(ctx context.Context) error {
	if err := w.alive(); err != nil {
		if errors.Is(err, ErrFenced) || errors.Is(err, ErrClosed) {
			return nil
		}
		return err
	}
	w.closeMu.Lock()
	defer w.closeMu.Unlock()
	// truncMu waits for a Truncate in progress: after this, none moves the
	// truncation point under the final part.
	w.truncMu.Lock()
	w.mu.Lock()
	err := w.dead
	if err == nil {
		w.closing = true
	}
	w.mu.Unlock()
	w.truncMu.Unlock()
	if err != nil {
		if errors.Is(err, ErrFenced) || errors.Is(err, ErrClosed) {
			return nil
		}
		return err
	}
	err = w.streamGone(ctx, w.close(ctx))
	w.mu.Lock()
	w.closeErr = err
	w.mu.Unlock()
	return err
}

// close is one attempt of Close; the caller holds closeMu and has set
// closing.
func (w *Writer) close(ctx context.Context) error {
	if err := w.checkJournal(ctx, 0); err != nil {
		if errors.Is(err, ErrFenced) {
			w.node.completeWaiting(ctx, w.stream)
			return nil
		}
		return err
	}
	h, err := w.Persist(ctx, 0)
	if err != nil {
		return err
	}
	ref, err := w.recordPart(ctx, 0, h, nil)
	if err != nil {
		return err
	}
	_, err = w.stream.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		if by, ok := s.fenced(w.epoch); ok {
			return JournalEntry{}, fmt.Errorf("writer %s: fenced by epoch %d: %w", w.logID, by, ErrFenced)
		}
		if i := s.liveIndex(w.epoch); i >= 0 && s.live[i].Closed {
			return JournalEntry{}, errNothingToAppend // an earlier attempt landed
		}
		return JournalEntry{Kind: EntryEpochClose, Close: &EpochClose{Epoch: w.epoch, FinalPart: ref}}, nil
	})
	switch {
	case errors.Is(err, ErrFenced):
		w.kill(err)
	case err != nil:
		return fmt.Errorf("writer %s: close (outcome unknown; the writer accepts no changes until a Close succeeds): %w", w.logID, err)
	default:
		w.kill(fmt.Errorf("writer %s: %w", w.logID, ErrClosed))
	}
	// Other writers of this node may have waited for this one's part: its
	// final part now stands in for it (or, fenced, it owes none).
	w.node.completeWaiting(ctx, w.stream)
	return nil
}

// resolveClosing is what a call refused with err (from deadOrClosingLocked)
// returns. If an earlier Close of the writer failed, the journal is re-read:
// a close that landed is finished (the writer is closed, err becomes
// ErrClosed). A Close in progress is not waited for.
func (w *Writer) resolveClosing(ctx context.Context, err error) error {
	if !errors.Is(err, ErrClosing) || !w.closeMu.TryLock() {
		return err
	}
	defer w.closeMu.Unlock()
	if rerr := w.stream.journal.refresh(ctx); rerr != nil {
		return err
	}
	if w.closedInJournal() {
		w.kill(fmt.Errorf("writer %s: %w", w.logID, ErrClosed))
		w.node.completeWaiting(ctx, w.stream)
		return w.alive()
	}
	return err
}

// closedInJournal reports whether the cached journal says w's epoch closed.
func (w *Writer) closedInJournal() bool {
	st := w.stream.journal.snapshot()
	i := st.liveIndex(w.epoch)
	return i >= 0 && st.live[i].Closed
}

// closeFailed reports whether a Close of w failed and none succeeded since.
func (w *Writer) closeFailed() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dead == nil && w.closing && w.closeErr != nil
}

// Truncate releases the log's prefix below SQN before: later checkpoint
// parts no longer list it, and its segments become garbage once no retained
// checkpoint references them. Only uploaded changes can be released; the
// caller must have made their effect durable elsewhere (a snapshot).
func (w *Writer) Truncate(ctx context.Context, before uint64) error {
	// truncMu keeps concurrent truncations from recording their points out
	// of order.
	w.truncMu.Lock()
	defer w.truncMu.Unlock()
	w.mu.Lock()
	dead, closing, uploaded, current := w.dead, w.closing, w.uploaded, w.truncatedBefore
	w.mu.Unlock()
	if dead != nil {
		return dead
	}
	if closing {
		// The final part a Close records (again, if it failed) must cover
		// the same truncation point at every attempt: see Close.
		return fmt.Errorf("writer %s: closing: %w: %w", w.logID, ErrClosing, ErrClosed)
	}
	if before > uploaded+1 {
		return fmt.Errorf("writer %s: truncate before %d, but only SQNs up to %d are uploaded: %w", w.logID, before, uploaded, ErrInvalidChange)
	}
	if before <= current {
		return nil
	}
	// Durable first: once a segment reference is dropped, GC may delete it.
	if err := w.node.wal.SetMeta(ctx, w.logID, w.meta(before)); err != nil {
		return fmt.Errorf("writer %s: record truncation: %w", w.logID, err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.truncatedBefore = before
	w.segs = dropBefore(w.segs, before)
	return nil
}

// dropBefore removes the segments holding only SQNs below before.
func dropBefore(segs []SegmentBlocks, before uint64) []SegmentBlocks {
	kept := segs[:0]
	for _, s := range segs {
		if s.lastSQN() >= before {
			kept = append(kept, s)
		}
	}
	clear(segs[len(kept):])
	return kept
}
