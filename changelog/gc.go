package changelog

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/dstl-dev/dstl/upload"
)

// GCStats reports one garbage collection of a node's segments.
type GCStats struct {
	Segments     int   // segment objects of this node found
	Referenced   int   // of which something references
	Young        int   // unreferenced but still uploading or younger than the grace period
	Deleted      int   // deleted
	DeletedBytes int64 // their size
}

// CollectGarbage deletes this node's segment objects that nothing
// references. References are rebuilt from scratch every time, from the
// node's live and recovered logs and from the blob store (journals and
// checkpoint parts), so a crash never leaves a wrong count behind:
//
//   - every live or recovered log references its segments from its
//     truncation point on;
//   - each of the newest RetainCheckpoints complete checkpoints of every
//     stream, and each checkpoint marked retained, references the segments
//     its parts list, and those of the checkpoints its parts start from,
//     recursively (a restore needs them);
//   - the final part of every closed, still live epoch, the checkpoint every
//     live epoch started from, and every part of a checkpoint not complete
//     yet (it may complete later) reference their segments.
//
// Invariant (brief invariant 5): an object is deleted only when none of
// these references it, its flush has settled (the scheduler has delivered
// its callbacks, so a log that needs it references it), and it is older
// than GCGrace (a margin for objects other processes may be writing).
func (n *Node) CollectGarbage(ctx context.Context) (GCStats, error) {
	// Read before the references: a segment settled by now has had its
	// callbacks, so its logs already reference it.
	settled := n.sched.SettledBelow()
	objs, err := listSegments(ctx, n.store, n.id)
	if err != nil {
		return GCStats{}, err
	}
	refs, err := n.segmentReferences(ctx)
	if err != nil {
		return GCStats{}, err
	}
	st := GCStats{Segments: len(objs)}
	cutoff := n.clock.Now().Add(-n.opts.GCGrace)
	var errs []error
	for _, o := range objs {
		seq, ok := segmentSeq(segmentPrefix(n.id), o.Key)
		switch {
		case refs[o.Key]:
			st.Referenced++
		case !ok || seq >= settled || o.ModTime.After(cutoff):
			st.Young++
		default:
			if err := n.store.Delete(ctx, o.Key); err != nil {
				errs = append(errs, fmt.Errorf("gc: delete %s: %w", o.Key, err))
				continue
			}
			st.Deleted++
			st.DeletedBytes += o.Size
		}
	}
	return st, errors.Join(errs...)
}

// segmentReferences returns the set of segment keys something references.
func (n *Node) segmentReferences(ctx context.Context) (map[string]bool, error) {
	refs := map[string]bool{}
	n.mu.Lock()
	var logs []*Writer
	for _, w := range n.writers {
		logs = append(logs, w)
	}
	for _, r := range n.recovered {
		logs = append(logs, r.writer)
	}
	n.mu.Unlock()
	for _, w := range logs {
		w.mu.Lock()
		for _, s := range w.segs {
			refs[s.Key] = true
		}
		w.mu.Unlock()
	}
	streams, err := listStreams(ctx, n.store)
	if err != nil {
		return nil, err
	}
	for _, name := range streams {
		if err := n.checkpointReferences(ctx, name, refs); err != nil {
			return nil, err
		}
	}
	return refs, nil
}

func (n *Node) checkpointReferences(ctx context.Context, stream string, refs map[string]bool) error {
	h, err := n.streamHandle(ctx, stream)
	if errors.Is(err, ErrStreamNotFound) {
		return nil // deleted meanwhile
	}
	if err != nil {
		return err
	}
	if err := h.journal.refresh(ctx); err != nil {
		return err
	}
	st := h.journal.snapshot()
	seen := map[string]bool{}
	addPart := func(key string) error {
		return n.addPartReferences(ctx, stream, key, refs, seen)
	}
	retained := st.checkpoints
	if len(retained) > n.opts.RetainCheckpoints {
		retained = retained[len(retained)-n.opts.RetainCheckpoints:]
	}
	marked, err := n.RetainedCheckpoints(ctx, stream)
	if err != nil {
		return err
	}
	for _, id := range marked {
		if cp, ok := st.checkpoint(id); ok {
			retained = append(retained, cp)
		}
	}
	for _, cp := range retained {
		for _, p := range cp.Parts {
			if err := addPart(p.Key); err != nil {
				return err
			}
		}
	}
	for _, ep := range st.live {
		if ep.Closed {
			if err := addPart(ep.FinalPart.Key); err != nil {
				return err
			}
		}
		// A live epoch's next checkpoint restores through the checkpoint
		// it started from, however old: keep that base alive too.
		if ep.FromCheckpoint != 0 {
			base, ok := st.checkpoint(ep.FromCheckpoint)
			if !ok {
				return fmt.Errorf("gc: stream %s: epoch %d starts from checkpoint %d, which is not complete", stream, ep.Epoch, ep.FromCheckpoint)
			}
			for _, p := range base.Parts {
				if p.KeyGroups.Overlaps(ep.KeyGroups) {
					if err := addPart(p.Key); err != nil {
						return err
					}
				}
			}
		}
	}
	pending, err := n.pendingParts(ctx, stream, st.lastCheckpoint())
	if err != nil {
		return err
	}
	for _, key := range pending {
		if err := addPart(key); err != nil {
			return err
		}
	}
	return nil
}

// addPartReferences marks the segments of a part and, recursively, of every
// part of the checkpoint its epoch started from.
func (n *Node) addPartReferences(ctx context.Context, stream, key string, refs, seen map[string]bool) error {
	if seen[key] {
		return nil
	}
	seen[key] = true
	p, err := n.part(ctx, key)
	if err != nil {
		return fmt.Errorf("gc: stream %s: %w", stream, err)
	}
	for _, s := range p.Segments {
		refs[s.Key] = true
	}
	if p.FromCheckpoint == 0 {
		return nil
	}
	cp, err := n.completeCheckpoint(ctx, stream, p.FromCheckpoint)
	if err != nil {
		return fmt.Errorf("gc: stream %s: part %s: %w", stream, key, err)
	}
	for _, base := range cp.Parts {
		if base.KeyGroups.Overlaps(p.KeyGroups) {
			if err := n.addPartReferences(ctx, stream, base.Key, refs, seen); err != nil {
				return err
			}
		}
	}
	return nil
}

// pendingParts lists the parts recorded for checkpoints above the newest
// complete one.
func (n *Node) pendingParts(ctx context.Context, stream string, lastComplete uint64) ([]string, error) {
	prefix := streamPrefix(stream) + "checkpoints/"
	// '~' sorts after every digit: start after all parts of lastComplete.
	startAfter := fmt.Sprintf("%s%020d/~", prefix, lastComplete)
	var keys []string
	for o, err := range upload.Walk(ctx, n.store, prefix, startAfter) {
		if err != nil {
			return nil, fmt.Errorf("gc: stream %s: list pending parts: %w", stream, err)
		}
		id, _, ok := strings.Cut(strings.TrimPrefix(o.Key, prefix), "/")
		if v, err := strconv.ParseUint(id, 10, 64); ok && err == nil && v > lastComplete {
			keys = append(keys, o.Key)
		}
	}
	return keys, nil
}
