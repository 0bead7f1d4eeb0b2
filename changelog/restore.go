package changelog

import (
	"cmp"
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
		if h, err = n.freshHandle(ctx, stream); err != nil {
			return CheckpointComplete{}, err
		}
		st = h.journal.snapshot()
		if cp, ok = st.checkpoint(id); ok {
			return cp, nil
		}
		// Not found in a view that may predate a delete + recreate the
		// journal listing alone cannot tell: ask the stream's definition
		// (one read, on this rare path only) and retry on the new stream.
		if err := h.journal.checkCatalog(ctx); err != nil {
			if !errors.Is(err, ErrStreamNotFound) || !h.journal.isGone() {
				return CheckpointComplete{}, err
			}
			if h, err = n.freshHandle(ctx, stream); err != nil {
				return CheckpointComplete{}, err
			}
			fresh := h.journal.snapshot()
			if cp, ok = fresh.checkpoint(id); ok {
				return cp, nil
			}
		}
		return CheckpointComplete{}, fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, ErrCheckpointNotFound)
	}
	return cp, nil
}

// part reads a checkpoint part through the node's bounded cache: parts are
// immutable.
func (n *Node) part(ctx context.Context, key string) (Part, error) {
	if p, ok := n.parts.get(key); ok {
		return p, nil
	}
	p, err := readPart(ctx, n.store, key)
	if err != nil {
		return Part{}, err
	}
	n.parts.add(key, p)
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
// complete checkpoint: import the state of each base snapshot's Ranges,
// then apply the changes of Steps in order (ReplayPlan). Applied in that
// order, they yield exactly the state at the checkpoint (brief invariant
// 4): nothing a writer appended after its part, nothing of a fenced writer
// after the checkpoint its successor started from. The bases' ranges are
// disjoint; usually there is one base (or none).
type RestorePlan struct {
	Stream     string
	Checkpoint uint64
	KeyGroups  keygroup.Range
	Bases      []Base
	Steps      []ReplayStep
}

// Base is a snapshot and the key groups whose state a plan takes from it.
type Base struct {
	Snapshot Snapshot
	Ranges   []keygroup.Range
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

// SingleBase returns the plan's snapshot if the plan has exactly one base
// and it covers all of KeyGroups.
func (p RestorePlan) SingleBase() (Snapshot, bool) {
	if len(p.Bases) != 1 {
		return Snapshot{}, false
	}
	var n int
	for _, r := range p.Bases[0].Ranges {
		n += int(r.Hi) - int(r.Lo) + 1
	}
	return p.Bases[0].Snapshot, n == int(p.KeyGroups.Hi)-int(p.KeyGroups.Lo)+1
}

// NewestBase returns the plan's newest base snapshot, if any.
func (p RestorePlan) NewestBase() (Snapshot, bool) {
	var best Snapshot
	for _, b := range p.Bases {
		if b.Snapshot.Checkpoint > best.Checkpoint {
			best = b.Snapshot
		}
	}
	return best, len(p.Bases) > 0
}

func (p *RestorePlan) addBase(s Snapshot, r keygroup.Range) {
	for i := range p.Bases {
		if p.Bases[i].Snapshot.Checkpoint == s.Checkpoint {
			p.Bases[i].Ranges = append(p.Bases[i].Ranges, r)
			return
		}
	}
	p.Bases = append(p.Bases, Base{Snapshot: s, Ranges: []keygroup.Range{r}})
}

// TailBytes is the size of the log blocks the plan's steps read: how much
// changelog a restore replays on top of the snapshots.
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

// PlanRestore plans the restore of key groups r of complete checkpoint id
// with the published snapshots: each part's key groups come from the
// newest snapshot whose checkpoint has a part of the same log (its state
// there is the log up to that SQN on top of the epoch's start: only the
// log after it is replayed), else from a snapshot of exactly the
// checkpoint the epoch started from, else recursively from the plan of
// that checkpoint. A part whose log was truncated needs a snapshot of
// that log covering the truncated prefix (ErrLogTruncated otherwise).
func (n *Node) PlanRestore(ctx context.Context, stream string, id uint64, r keygroup.Range) (RestorePlan, error) {
	snaps, err := n.Snapshots(ctx, stream)
	if err != nil {
		return RestorePlan{}, err
	}
	return n.planWith(ctx, stream, id, r, snaps)
}

// PlanRestoreFrom is PlanRestore with base as the only snapshot it may
// use (nil: none, the changelog alone).
func (n *Node) PlanRestoreFrom(ctx context.Context, stream string, id uint64, r keygroup.Range, base *Snapshot) (RestorePlan, error) {
	var snaps []Snapshot
	if base != nil {
		snaps = []Snapshot{*base}
	}
	return n.planWith(ctx, stream, id, r, snaps)
}

// planWith plans with snaps (oldest first) as the candidate snapshots.
func (n *Node) planWith(ctx context.Context, stream string, id uint64, r keygroup.Range, snaps []Snapshot) (RestorePlan, error) {
	pl := RestorePlan{Stream: stream, Checkpoint: id, KeyGroups: r}
	if err := n.planCheckpoint(ctx, stream, id, r, atOrBelow(snaps, id), &pl); err != nil {
		return RestorePlan{}, err
	}
	return pl, nil
}

// atOrBelow returns the snapshots (oldest first) of checkpoints ≤ id.
func atOrBelow(snaps []Snapshot, id uint64) []Snapshot {
	i, _ := slices.BinarySearchFunc(snaps, id+1, func(s Snapshot, id uint64) int { return cmp.Compare(s.Checkpoint, id) })
	return snaps[:i]
}

func (n *Node) planCheckpoint(ctx context.Context, stream string, id uint64, r keygroup.Range, snaps []Snapshot, pl *RestorePlan) error {
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
		if _, err := n.planPart(ctx, p, sub, snaps, pl); err != nil {
			return fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)
		}
	}
	return nil
}

// planPart adds what rebuilds key groups sub of part p: the state its
// epoch started from (see PlanRestore), then its own log. snaps are the
// candidate snapshots, oldest first, all at or below the checkpoint p
// belongs to.
func (n *Node) planPart(ctx context.Context, p Part, sub keygroup.Range, snaps []Snapshot, pl *RestorePlan) (after uint64, err error) {
	base, sqn, ok := newestSnapshotWithLog(snaps, p.LogID)
	if ok && sqn <= p.UpToSQN && p.TruncatedBefore <= sqn+1 {
		// That snapshot's checkpoint has a part of this very log: its state
		// of these key groups is the log up to sqn on top of the epoch's
		// start.
		pl.addBase(base, sub)
		after = sqn
	} else if p.FromCheckpoint != 0 {
		below := atOrBelow(snaps, p.FromCheckpoint)
		if k := len(below); k > 0 && below[k-1].Checkpoint == p.FromCheckpoint {
			pl.addBase(below[k-1], sub)
		} else if err := n.planCheckpoint(ctx, p.Stream, p.FromCheckpoint, sub, below, pl); err != nil {
			return 0, err
		}
	}
	if p.TruncatedBefore > after+1 {
		// The log's prefix was released; its effect lives in a snapshot
		// this plan does not have: refuse rather than return a state
		// missing it (invariant 4).
		return 0, fmt.Errorf("log %s was truncated before SQN %d and no snapshot covers it: %w", p.LogID, p.TruncatedBefore, ErrLogTruncated)
	}
	if p.UpToSQN <= after {
		return after, nil
	}
	var segs []SegmentBlocks
	for _, s := range p.Segments {
		if s.lastSQN() > after && s.firstSQN() <= p.UpToSQN {
			segs = append(segs, s)
		}
	}
	pl.Steps = append(pl.Steps, ReplayStep{LogID: p.LogID, KeyGroups: sub, After: after, UpTo: p.UpToSQN, Segments: segs})
	return after, nil
}

// planPartWith plans the restore of part p's key groups (a part of a
// checkpoint not complete yet, or a closed epoch's final part).
func (n *Node) planPartWith(ctx context.Context, p Part, snaps []Snapshot) (RestorePlan, uint64, error) {
	if p.Checkpoint != 0 {
		snaps = atOrBelow(snaps, p.Checkpoint-1)
	}
	pl := RestorePlan{Stream: p.Stream, Checkpoint: p.Checkpoint, KeyGroups: p.KeyGroups}
	after, err := n.planPart(ctx, p, p.KeyGroups, snaps, &pl)
	if err != nil {
		return RestorePlan{}, 0, err
	}
	return pl, after, nil
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
	pl, ownAfter, err = n.planPartWith(ctx, p, snaps)
	if err != nil {
		return RestorePlan{}, 0, fmt.Errorf("writer %s: %w", w.logID, err)
	}
	// The last step, if any, is the writer's own log: the caller replays
	// it from the writer instead.
	if k := len(pl.Steps); k > 0 && pl.Steps[k-1].LogID == p.LogID {
		pl.Steps = pl.Steps[:k-1]
	}
	return pl, ownAfter, nil
}
