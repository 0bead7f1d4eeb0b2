package changelog

import (
	"context"
	"fmt"
	"iter"

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
// up the state of complete checkpoint id: for each part, the changes of the
// checkpoint its epoch started from (recursively), then its own log up to
// the part's SQN. Applied in the order yielded, they rebuild exactly the
// state at the checkpoint (brief invariant 4): nothing a writer appended
// after its part, and nothing of a fenced writer after the checkpoint its
// successor started from. Yielded Key and Value are only valid until the
// next iteration.
func (n *Node) RestoreChanges(ctx context.Context, stream string, id uint64, r keygroup.Range) iter.Seq2[segments.Change, error] {
	return func(yield func(segments.Change, error) bool) {
		n.restore(ctx, stream, id, r, yield)
	}
}

// restore yields the changes of checkpoint id for r; it returns false when
// the consumer stopped or an error was yielded.
func (n *Node) restore(ctx context.Context, stream string, id uint64, r keygroup.Range, yield func(segments.Change, error) bool) bool {
	cp, err := n.completeCheckpoint(ctx, stream, id)
	if err != nil {
		return yield(segments.Change{}, err) && false
	}
	for _, ref := range cp.Parts {
		sub, ok := intersect(ref.KeyGroups, r)
		if !ok {
			continue
		}
		p, err := n.part(ctx, ref.Key)
		if err != nil {
			return yield(segments.Change{}, fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)) && false
		}
		if p.FromCheckpoint != 0 {
			if p.FromCheckpoint >= id {
				return yield(segments.Change{}, fmt.Errorf("stream %s: checkpoint %d: part %s starts from checkpoint %d: %w", stream, id, ref.Key, p.FromCheckpoint, errJournalInvalid)) && false
			}
			if !n.restore(ctx, stream, p.FromCheckpoint, sub, yield) {
				return false
			}
		}
		if p.TruncatedBefore > 1 {
			// The log's prefix was released; its effect lives in a snapshot
			// that this restore does not have: refuse rather than return a
			// state missing it (invariant 4).
			return yield(segments.Change{}, fmt.Errorf("stream %s: checkpoint %d: log %s was truncated before SQN %d and no snapshot covers it: %w", stream, id, p.LogID, p.TruncatedBefore, ErrLogTruncated)) && false
		}
		if p.UpToSQN == 0 {
			continue
		}
		for c, err := range replaySegments(ctx, n.store, p.LogID, p.Segments, 0, p.UpToSQN, sub) {
			if err != nil {
				return yield(c, fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)) && false
			}
			if !yield(c, nil) {
				return false
			}
		}
	}
	return true
}

func intersect(a, b keygroup.Range) (keygroup.Range, bool) {
	if !a.Overlaps(b) {
		return keygroup.Range{}, false
	}
	return keygroup.Range{Lo: max(a.Lo, b.Lo), Hi: min(a.Hi, b.Hi)}, true
}
