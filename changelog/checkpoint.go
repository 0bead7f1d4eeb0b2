package changelog

import (
	"context"
	"errors"
	"fmt"
	"slices"
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
// newest complete checkpoint is refused with ErrCheckpointTooOld; a fenced
// writer gets ErrFenced and its part never becomes visible.
func (w *Writer) Checkpoint(ctx context.Context, id uint64, metadata []byte) (CheckpointResult, error) {
	if id == 0 {
		return CheckpointResult{}, fmt.Errorf("writer %s: checkpoint id 0: %w", w.logID, ErrInvalidChange)
	}
	w.mu.Lock()
	err := w.deadOrClosingLocked()
	w.mu.Unlock()
	if err != nil {
		return CheckpointResult{}, err
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
// the writer was fenced or id is taken. It reads no blob: the background
// refresh keeps the state recent, and tryComplete checks both again on the
// newest journal before anything becomes visible.
func (w *Writer) checkJournal(_ context.Context, id uint64) error {
	st := w.stream.journal.snapshot()
	if by, ok := st.fenced(w.epoch); ok {
		w.fence(by)
		return w.alive()
	}
	if id != 0 {
		if _, done := st.checkpoint(id); !done && id <= st.lastCheckpoint() {
			return fmt.Errorf("writer %s: checkpoint %d, newest complete is %d: %w", w.logID, id, st.lastCheckpoint(), ErrCheckpointTooOld)
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
	return writePart(ctx, w.node.store, Part{
		Stream: w.cfg.Stream, Epoch: w.epoch, KeyGroups: w.cfg.KeyGroups, Checkpoint: id, LogID: w.logID,
		FromCheckpoint: w.from, TruncatedBefore: truncated, UpToSQN: h.UpToSQN, Segments: segs,
		Metadata: slices.Clone(metadata),
	})
}

// lastLocalPart records that w stored its part of id and reports whether
// every live writer of the stream on this node has now stored one, so that
// w is the one to try to complete it. Writers the journal (as last read)
// says are fenced do not count: their part will never come.
func (w *Writer) lastLocalPart(id uint64) bool {
	h := w.stream
	st := h.journal.snapshot()
	h.partsMu.Lock()
	defer h.partsMu.Unlock()
	if h.parts == nil {
		h.parts = map[uint64]map[uint64]bool{}
	}
	for old := range h.parts {
		if old <= st.lastCheckpoint() {
			delete(h.parts, old) // complete or too old: nobody completes it any more
		}
	}
	stored := h.parts[id]
	if stored == nil {
		stored = map[uint64]bool{}
		h.parts[id] = stored
	}
	stored[w.epoch] = true
	for _, o := range w.node.liveWriters(h.cfg.Name) {
		if _, fenced := st.fenced(o.epoch); !fenced && !stored[o.epoch] {
			return false
		}
	}
	return true
}

// tryComplete appends the checkpoint-complete entry for id if every live
// epoch has a part for it. Two writers recording their parts at the same
// time cannot both miss each other: each lists parts only after its own is
// stored, so the later lister sees both.
func (w *Writer) tryComplete(ctx context.Context, id uint64) (bool, error) {
	// Without the journal's lock first: most writers of a checkpoint are not
	// the last to record a part, and they must not queue behind each other
	// on the lock and its blob-store round trips just to learn that. The
	// refresh starts after this writer's part is stored, so the last writer
	// to store one sees every part (the argument of the comment above).
	if err := w.stream.journal.refresh(ctx); err != nil {
		return false, err
	}
	st := w.stream.journal.snapshot()
	if _, done := st.checkpoint(id); done {
		return true, nil
	}
	if !st.completable(id) {
		if by, ok := st.fenced(w.epoch); ok {
			w.fence(by)
			return false, w.alive()
		}
		if id <= st.lastCheckpoint() {
			return false, fmt.Errorf("writer %s: checkpoint %d, newest complete is %d: %w", w.logID, id, st.lastCheckpoint(), ErrCheckpointTooOld)
		}
		return false, nil
	}
	recorded, err := w.listParts(ctx, id)
	if err != nil {
		return false, err
	}
	if !st.partsComplete(recorded) {
		if by, ok := st.fenced(w.epoch); ok {
			w.fence(by)
			return false, w.alive()
		}
		return false, nil
	}
	complete := false
	_, err = w.stream.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		if by, ok := s.fenced(w.epoch); ok {
			return JournalEntry{}, fmt.Errorf("writer %s: fenced by epoch %d: %w", w.logID, by, ErrFenced)
		}
		if _, ok := s.checkpoint(id); ok {
			complete = true
			return JournalEntry{}, errNothingToAppend
		}
		if last := s.lastCheckpoint(); id <= last {
			return JournalEntry{}, fmt.Errorf("writer %s: checkpoint %d, newest complete is %d: %w", w.logID, id, last, ErrCheckpointTooOld)
		}
		if len(s.orphaned()) > 0 {
			return JournalEntry{}, errNothingToAppend // completes once the orphans are reopened
		}
		recorded, err := w.listParts(ctx, id)
		if err != nil {
			return JournalEntry{}, err
		}
		parts := make([]PartRef, 0, len(s.live))
		for _, ep := range s.live {
			switch {
			case ep.Closed:
				parts = append(parts, ep.FinalPart)
			case recorded[ep.Epoch]:
				parts = append(parts, PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: id, Key: partKey(w.cfg.Stream, id, ep.Epoch)})
			default:
				return JournalEntry{}, errNothingToAppend // another writer completes it
			}
		}
		complete = true
		return JournalEntry{Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: id, Parts: parts}}, nil
	})
	if errors.Is(err, ErrFenced) {
		w.kill(err)
	}
	return complete, err
}

// listParts returns the epochs that recorded a part of checkpoint id.
func (w *Writer) listParts(ctx context.Context, id uint64) (map[uint64]bool, error) {
	epochs, err := listNumbered(ctx, w.node.store, checkpointPrefix(w.cfg.Stream, id))
	if err != nil {
		return nil, fmt.Errorf("writer %s: list parts of checkpoint %d: %w", w.logID, id, err)
	}
	out := make(map[uint64]bool, len(epochs))
	for _, ep := range epochs {
		out[ep] = true
	}
	return out, nil
}

// Close ends the writer gracefully: it persists every change, records a
// final part and closes its epoch in the journal, so that later checkpoints
// carry its state until a new writer opens its key groups. A fenced or
// already closed writer closes without error.
func (w *Writer) Close(ctx context.Context) error {
	if err := w.alive(); err != nil {
		if errors.Is(err, ErrFenced) || errors.Is(err, ErrClosed) {
			return nil
		}
		return err
	}
	if err := w.checkJournal(ctx, 0); err != nil {
		if errors.Is(err, ErrFenced) {
			return nil
		}
		return err
	}
	// From here no SQN is assigned: the final part covers every
	// acknowledged change. A Close that fails reopens the writer.
	w.mu.Lock()
	if err := w.deadOrClosingLocked(); err != nil {
		w.mu.Unlock()
		return err
	}
	w.closing = true
	w.mu.Unlock()
	closed := false
	defer func() {
		if !closed {
			w.mu.Lock()
			w.closing = false
			w.mu.Unlock()
		}
	}()
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
			return JournalEntry{}, errNothingToAppend
		}
		return JournalEntry{Kind: EntryEpochClose, Close: &EpochClose{Epoch: w.epoch, FinalPart: ref}}, nil
	})
	if err != nil && !errors.Is(err, ErrFenced) {
		return err
	}
	closed = true
	if err == nil {
		w.completePending(ctx)
	}
	w.kill(fmt.Errorf("writer %s: %w", w.logID, ErrClosed))
	return nil
}

// completePending tries to complete the checkpoints other writers of this
// node stored parts for while this one was closing: they waited for its part,
// which its final part now stands in for, and nobody else would retry them.
func (w *Writer) completePending(ctx context.Context) {
	h := w.stream
	h.partsMu.Lock()
	ids := make([]uint64, 0, len(h.parts))
	for id := range h.parts {
		ids = append(ids, id)
	}
	h.partsMu.Unlock()
	slices.Sort(ids)
	for _, id := range ids {
		// Best effort: a failure leaves the id incomplete, as it would have
		// been anyway; the next checkpoint id completes normally.
		_, _ = w.tryComplete(ctx, id)
	}
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
	dead, uploaded, current := w.dead, w.uploaded, w.truncatedBefore
	w.mu.Unlock()
	if dead != nil {
		return dead
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
