package changelog

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"slices"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
)

// CheckpointParts returns the parts of complete checkpoint id of a stream,
// with each writer's client metadata.
func (n *Node) CheckpointParts(ctx context.Context, stream string, id uint64) ([]Part, error) {
	cp, err := n.completeCheckpoint(ctx, stream, id)
	if err != nil {
		return nil, err
	}
	parts := make([]Part, 0, len(cp.Parts))
	for _, ref := range cp.Parts {
		p, err := n.part(ctx, ref.Key)
		if err != nil {
			return nil, fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)
		}
		parts = append(parts, p)
	}
	return parts, nil
}

func (n *Node) completeCheckpoint(ctx context.Context, stream string, id uint64) (CheckpointComplete, error) {
	h, err := n.streamHandle(ctx, stream)
	if err != nil {
		return CheckpointComplete{}, err
	}
	st := h.journal.snapshot()
	cp, ok := st.checkpoint(id)
	if !ok {
		if err := h.journal.refresh(ctx); err != nil {
			return CheckpointComplete{}, err
		}
		st = h.journal.snapshot()
		if cp, ok = st.checkpoint(id); !ok {
			return CheckpointComplete{}, fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, ErrCheckpointNotFound)
		}
	}
	return cp, nil
}

// part reads a checkpoint part, caching it: parts are immutable.
func (n *Node) part(ctx context.Context, key string) (Part, error) {
	n.mu.Lock()
	p, ok := n.parts[key]
	n.mu.Unlock()
	if ok {
		return p, nil
	}
	p, err := readPart(ctx, n.store, key)
	if err != nil {
		return Part{}, err
	}
	n.mu.Lock()
	n.parts[key] = p
	n.mu.Unlock()
	return p, nil
}

// RestoreChanges yields, for the key groups in r, every change that makes
// up the state of complete checkpoint id from an empty state, without any
// snapshot: for each part, the changes of the checkpoint its epoch started
// from (recursively), then its own log up to the part's SQN. It fails with
// ErrLogTruncated once a log the checkpoint needs was truncated (its prefix
// lives only in a snapshot: use PlanRestore). Yielded Key and Value are only
// valid until the next iteration.
func (n *Node) RestoreChanges(ctx context.Context, stream string, id uint64, r keygroup.Range) iter.Seq2[segments.Change, error] {
	return func(yield func(segments.Change, error) bool) {
		pl, err := n.PlanRestoreFrom(ctx, stream, id, r, nil)
		if err != nil {
			yield(segments.Change{}, err)
			return
		}
		for c, err := range n.ReplayPlan(ctx, pl) {
			if !yield(c, err) || err != nil {
				return
			}
		}
	}
}

// RestorePlan says how to rebuild the state of key groups KeyGroups of a
// complete checkpoint: import the snapshot's state of SnapshotRanges (when
// Snapshot is set), then apply the changes of Steps in order (ReplayPlan).
// Applied in that order, they yield exactly the state at the checkpoint
// (brief invariant 4): nothing a writer appended after its part, nothing
// of a fenced writer after the checkpoint its successor started from.
type RestorePlan struct {
	Stream         string
	Checkpoint     uint64
	KeyGroups      keygroup.Range
	Snapshot       *Snapshot
	SnapshotRanges []keygroup.Range
	Steps          []ReplayStep
}

// ReplayStep is one log's changes of key groups KeyGroups with SQNs in
// (After, UpTo], found in Segments.
type ReplayStep struct {
	LogID     string
	KeyGroups keygroup.Range
	After     uint64
	UpTo      uint64
	Segments  []SegmentBlocks
}

// TailBytes is the size of the log blocks the plan's steps read: how much
// changelog a restore replays on top of the snapshot.
func (p RestorePlan) TailBytes() int64 {
	var total int64
	for _, s := range p.Steps {
		for _, seg := range s.Segments {
			for _, b := range seg.Blocks {
				if b.LastSQN > s.After && b.FirstSQN <= s.UpTo {
					total += int64(b.Length)
				}
			}
		}
	}
	return total
}

// TailChanges is the number of SQNs the plan's steps cover (an upper
// bound of the changes replayed: key-group filtering skips some).
func (p RestorePlan) TailChanges() uint64 {
	var total uint64
	for _, s := range p.Steps {
		total += s.UpTo - s.After
	}
	return total
}

// errNotABase: a snapshot cannot serve as the base of a restore (the
// checkpoint's lineage does not go through it).
var errNotABase = errors.New("snapshot is not a base of the checkpoint")

// PlanRestore plans the restore of key groups r of complete checkpoint id
// from the newest published snapshot that is a base of it (one at or below
// it that the checkpoint's lineage goes through, covering every truncated
// log prefix), or from the changelog alone if there is none.
func (n *Node) PlanRestore(ctx context.Context, stream string, id uint64, r keygroup.Range) (RestorePlan, error) {
	snaps, err := n.Snapshots(ctx, stream)
	if err != nil {
		return RestorePlan{}, err
	}
	return n.planWith(ctx, stream, id, r, snaps)
}

func (n *Node) planWith(ctx context.Context, stream string, id uint64, r keygroup.Range, snaps []Snapshot) (RestorePlan, error) {
	var firstErr error
	for _, s := range slices.Backward(snaps) {
		if s.Checkpoint > id {
			continue
		}
		pl, err := n.PlanRestoreFrom(ctx, stream, id, r, &s)
		if err == nil {
			return pl, nil
		}
		if !errors.Is(err, errNotABase) && !errors.Is(err, ErrLogTruncated) {
			return RestorePlan{}, err
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	pl, err := n.PlanRestoreFrom(ctx, stream, id, r, nil)
	if err != nil && firstErr != nil && errors.Is(err, ErrLogTruncated) {
		return RestorePlan{}, fmt.Errorf("%w (newest snapshot: %v)", err, firstErr)
	}
	return pl, err
}

// planPartWith plans the restore of part p's key groups (a part of a
// checkpoint not complete yet, or a closed epoch's final part) like
// planWith.
func (n *Node) planPartWith(ctx context.Context, p Part, snaps []Snapshot) (RestorePlan, error) {
	var firstErr error
	for _, s := range slices.Backward(snaps) {
		if p.Checkpoint != 0 && s.Checkpoint >= p.Checkpoint {
			continue
		}
		pl := RestorePlan{Stream: p.Stream, Checkpoint: p.Checkpoint, KeyGroups: p.KeyGroups, Snapshot: &s}
		err := n.planPart(ctx, p, p.KeyGroups, &s, &pl)
		if err == nil {
			return pl, nil
		}
		if !errors.Is(err, errNotABase) && !errors.Is(err, ErrLogTruncated) {
			return RestorePlan{}, err
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	pl := RestorePlan{Stream: p.Stream, Checkpoint: p.Checkpoint, KeyGroups: p.KeyGroups}
	if err := n.planPart(ctx, p, p.KeyGroups, nil, &pl); err != nil {
		return RestorePlan{}, errors.Join(err, firstErr)
	}
	return pl, nil
}

// PlanRestoreFrom plans the restore of key groups r of complete checkpoint
// id on top of snapshot base (nil: from an empty state). It fails with an
// error wrapping ErrLogTruncated if a log prefix the restore needs is
// neither in the changelog nor in base.
func (n *Node) PlanRestoreFrom(ctx context.Context, stream string, id uint64, r keygroup.Range, base *Snapshot) (RestorePlan, error) {
	pl := RestorePlan{Stream: stream, Checkpoint: id, KeyGroups: r, Snapshot: base}
	if err := n.planCheckpoint(ctx, stream, id, r, base, &pl); err != nil {
		return RestorePlan{}, err
	}
	if base != nil && len(pl.SnapshotRanges) == 0 {
		pl.Snapshot = nil // nothing of the snapshot is needed
	}
	return pl, nil
}

func (n *Node) planCheckpoint(ctx context.Context, stream string, id uint64, r keygroup.Range, base *Snapshot, pl *RestorePlan) error {
	cp, err := n.completeCheckpoint(ctx, stream, id)
	if err != nil {
		return err
	}
	for _, ref := range cp.Parts {
		sub, ok := intersect(ref.KeyGroups, r)
		if !ok {
			continue
		}
		p, err := n.part(ctx, ref.Key)
		if err != nil {
			return fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)
		}
		if p.FromCheckpoint >= id && p.FromCheckpoint != 0 {
			return fmt.Errorf("stream %s: checkpoint %d: part %s starts from checkpoint %d: %w", stream, id, ref.Key, p.FromCheckpoint, errJournalInvalid)
		}
		if err := n.planPart(ctx, p, sub, base, pl); err != nil {
			return fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)
		}
	}
	return nil
}

// planPart adds the steps rebuilding key groups sub of part p: the state
// its epoch started from (the snapshot's, or recursively the base
// checkpoint's), then its own log.
func (n *Node) planPart(ctx context.Context, p Part, sub keygroup.Range, base *Snapshot, pl *RestorePlan) error {
	var after, sqn uint64
	inBase := false
	if base != nil {
		sqn, inBase = base.Logs[p.LogID]
	}
	switch {
	case inBase:
		// The snapshot's checkpoint has a part of this very log: its state
		// of these key groups is the log up to sqn on top of the epoch's
		// start.
		if sqn > p.UpToSQN {
			return fmt.Errorf("log %s: snapshot of checkpoint %d is at SQN %d, past the part's %d: %w", p.LogID, base.Checkpoint, sqn, p.UpToSQN, errNotABase)
		}
		pl.SnapshotRanges = append(pl.SnapshotRanges, sub)
		after = sqn
	case base != nil && p.FromCheckpoint == base.Checkpoint:
		pl.SnapshotRanges = append(pl.SnapshotRanges, sub)
	case base != nil && p.FromCheckpoint < base.Checkpoint:
		// The epoch started from an older state than the snapshot's (or
		// from an empty one): the snapshot is not on its lineage.
		return fmt.Errorf("log %s starts from checkpoint %d, before the snapshot's %d: %w", p.LogID, p.FromCheckpoint, base.Checkpoint, errNotABase)
	case p.FromCheckpoint != 0:
		if err := n.planCheckpoint(ctx, p.Stream, p.FromCheckpoint, sub, base, pl); err != nil {
			return err
		}
	}
	if p.TruncatedBefore > after+1 {
		// The log's prefix was released; its effect lives in a snapshot
		// this plan does not have: refuse rather than return a state
		// missing it (invariant 4).
		return fmt.Errorf("log %s was truncated before SQN %d and no snapshot covers it: %w", p.LogID, p.TruncatedBefore, ErrLogTruncated)
	}
	if p.UpToSQN <= after {
		return nil
	}
	var segs []SegmentBlocks
	for _, s := range p.Segments {
		if s.lastSQN() > after && s.firstSQN() <= p.UpToSQN {
			segs = append(segs, s)
		}
	}
	pl.Steps = append(pl.Steps, ReplayStep{LogID: p.LogID, KeyGroups: sub, After: after, UpTo: p.UpToSQN, Segments: segs})
	return nil
}

// ReplayPlan yields the changes of the plan's steps in order. Yielded Key
// and Value are only valid until the next iteration.
func (n *Node) ReplayPlan(ctx context.Context, pl RestorePlan) iter.Seq2[segments.Change, error] {
	return func(yield func(segments.Change, error) bool) {
		for _, s := range pl.Steps {
			for c, err := range replaySegments(ctx, n.store, s.LogID, s.Segments, s.After, s.UpTo, s.KeyGroups) {
				if err != nil {
					yield(c, fmt.Errorf("stream %s: checkpoint %d: %w", pl.Stream, pl.Checkpoint, err))
					return
				}
				if !yield(c, nil) {
					return
				}
			}
		}
	}
}

func intersect(a, b keygroup.Range) (keygroup.Range, bool) {
	if !a.Overlaps(b) {
		return keygroup.Range{}, false
	}
	return keygroup.Range{Lo: max(a.Lo, b.Lo), Hi: min(a.Hi, b.Hi)}, true
}

// PlanWriter plans the rebuild of a live writer's state: the returned plan
// restores the state its epoch started from (from the newest snapshot that
// is a base of the writer, if any), and the writer's own changes after
// ownAfter come from w.Replay (which also covers its not yet uploaded
// tail). A writer that truncated its log needs a snapshot of its log.
func (n *Node) PlanWriter(ctx context.Context, w *Writer) (pl RestorePlan, ownAfter uint64, err error) {
	w.mu.Lock()
	p := Part{Stream: w.cfg.Stream, Epoch: w.epoch, KeyGroups: w.cfg.KeyGroups, LogID: w.logID, FromCheckpoint: w.from, TruncatedBefore: w.truncatedBefore, UpToSQN: w.next - 1}
	w.mu.Unlock()
	snaps, err := n.Snapshots(ctx, p.Stream)
	if err != nil {
		return RestorePlan{}, 0, err
	}
	pl, err = n.planPartWith(ctx, p, snaps)
	if err != nil {
		return RestorePlan{}, 0, fmt.Errorf("writer %s: %w", w.logID, err)
	}
	// The last step, if any, is the writer's own log: the caller replays
	// it from the writer instead.
	if k := len(pl.Steps); k > 0 && pl.Steps[k-1].LogID == p.LogID {
		ownAfter = pl.Steps[k-1].After
		pl.Steps = pl.Steps[:k-1]
	} else if pl.Snapshot != nil {
		ownAfter = pl.Snapshot.Logs[p.LogID]
	}
	return pl, ownAfter, nil
}
