package changelog

import (
	"context"
	"errors"
	"fmt"
)

// Orphaned epochs (issue 9, S1). An epoch-open entry can land in the journal
// without a writer ever existing for it: the local log failed to record it
// (SetMeta), or the node crashed in between. Such an epoch is live, owns its
// key groups and never records a part, so no checkpoint of the stream could
// complete until someone reopened its range. The node that owns it (the
// entry names the node) closes it instead, as if a writer had opened and at
// once closed it:
//
//   - its final part is its part of the newest complete checkpoint, if that
//     has one (every checkpoint completed while the epoch is live has one),
//     else an empty part (UpToSQN 0) starting from the epoch's checkpoint.
//     Either is exactly what a reopen of the range would restore, so no
//     change a checkpoint acknowledged is lost;
//   - an epoch is an orphan only if this node is open and holds neither a
//     live writer nor a recovered log for it and has no open of the stream
//     in flight (n.opening): every epoch this process opened is then either
//     attached, or its writer died (a failed local log), and every epoch an
//     earlier process opened and still can resume is a recovered log. This
//     relies on node ids being unique, as segment keys do already.
//
// The journal stays the authority: the close is a create-only entry that
// applies only while the epoch is live and open.

// abandonOrphans closes every orphaned epoch of h that this node owns,
// reading the cached journal state (abandonEpoch re-reads it before
// writing). It returns the errors of the closes that failed; the background
// refresh calls it again.
func (n *Node) abandonOrphans(ctx context.Context, h *streamHandle) error {
	if h.journal.isGone() {
		return nil
	}
	var errs []error
	for _, ep := range h.journal.openEpochsOf(n.id) {
		if !n.isOrphan(h, ep.Epoch) {
			continue
		}
		if err := n.abandonEpoch(ctx, h, ep); err != nil {
			errs = append(errs, err)
			continue
		}
		n.log.Info("closed an epoch no writer holds (opened in the journal, not in the local log)", "stream", h.cfg.Name, "epoch", ep.Epoch)
	}
	return errors.Join(errs...)
}

// isOrphan reports whether epoch of h has no writer on this node that could
// ever write it (see above).
func (n *Node) isOrphan(h *streamHandle, epoch uint64) bool {
	logID := logIDOf(h.cfg.Name, epoch)
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed || n.opening[h.cfg.Name] > 0 {
		return false
	}
	_, live := n.writers[logID]
	_, recovered := n.recovered[logID]
	return !live && !recovered
}

// abandonEpoch closes ep, an open epoch no writer holds, with the final
// part described above.
func (n *Node) abandonEpoch(ctx context.Context, h *streamHandle, ep EpochState) error {
	st := h.journal.snapshot()
	var empty PartRef
	if _, ok := newestPartOf(st, ep.Epoch); !ok {
		var err error
		empty, err = writePart(ctx, n.store, Part{
			Stream: h.cfg.Name, Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, LogID: logIDOf(h.cfg.Name, ep.Epoch),
			FromCheckpoint: ep.FromCheckpoint, TruncatedBefore: 1,
		})
		if err != nil {
			return fmt.Errorf("stream %s: close orphaned epoch %d: %w", h.cfg.Name, ep.Epoch, err)
		}
	}
	_, err := h.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		i := s.liveIndex(ep.Epoch)
		if i < 0 || s.live[i].Closed {
			return JournalEntry{}, errNothingToAppend // fenced or closed meanwhile
		}
		ref, ok := newestPartOf(*s, ep.Epoch)
		if !ok {
			if empty.Key == "" {
				return JournalEntry{}, errNothingToAppend // cannot happen: checkpoints only grow
			}
			ref = empty
		}
		return JournalEntry{Kind: EntryEpochClose, Close: &EpochClose{Epoch: ep.Epoch, FinalPart: ref}}, nil
	})
	if err != nil {
		return fmt.Errorf("stream %s: close orphaned epoch %d: %w", h.cfg.Name, ep.Epoch, err)
	}
	// Writers of this node may have waited on nothing else.
	n.completeWaiting(ctx, h)
	return nil
}

// newestPartOf returns epoch's part of the newest complete checkpoint, if
// it has one.
func newestPartOf(s journalState, epoch uint64) (PartRef, bool) {
	if len(s.checkpoints) == 0 {
		return PartRef{}, false
	}
	for _, p := range s.checkpoints[len(s.checkpoints)-1].Parts {
		if p.Epoch == epoch {
			return p, true
		}
	}
	return PartRef{}, false
}

// abandonAllOrphans loads every stream once and closes its orphaned epochs:
// after a restart, an orphan of a stream this node never touches again
// would otherwise block the stream's checkpoints on every other node.
func (n *Node) abandonAllOrphans(ctx context.Context) {
	names, err := n.ListStreams(ctx)
	if err != nil {
		if ctx.Err() == nil {
			n.log.Warn("listing streams to close orphaned epochs failed; retried at the next start", "err", err)
		}
		return
	}
	for _, name := range names {
		if _, err := n.streamHandle(ctx, name); err != nil && !errors.Is(err, ErrStreamNotFound) && ctx.Err() == nil {
			n.log.Warn("reading a stream to close orphaned epochs failed", "stream", name, "err", err)
		}
	}
	n.abandonCachedOrphans(ctx)
}

// abandonCachedOrphans runs abandonOrphans on every stream this node has
// read.
func (n *Node) abandonCachedOrphans(ctx context.Context) {
	n.mu.Lock()
	hs := make([]*streamHandle, 0, len(n.streams))
	for _, h := range n.streams {
		hs = append(hs, h)
	}
	n.mu.Unlock()
	for _, h := range hs {
		if err := n.abandonOrphans(ctx, h); err != nil && ctx.Err() == nil {
			n.log.Warn("closing an orphaned epoch failed; retried by the background refresh", "stream", h.cfg.Name, "err", err)
		}
	}
}

// openEpochsOf returns the live, open epochs of node in the cached state
// (without cloning the whole state: the background pass asks every second).
func (j *journal) openEpochsOf(node string) []EpochState {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []EpochState
	for _, ep := range j.state.live {
		if !ep.Closed && ep.Node == node {
			out = append(out, ep)
		}
	}
	return out
}
