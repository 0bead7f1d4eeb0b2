package changelog

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// GCStats reports one garbage collection of a node's segments.
type GCStats struct {
	Segments     int   // segment objects of this node found
	Referenced   int   // of which something references
	Young        int   // unreferenced but still uploading or younger than the grace period
	Deleted      int   // deleted
	DeletedBytes int64 // their size
	// ForeignDeleted counts the deleted segments (included in Deleted)
	// of other nodes that look gone for good.
	ForeignDeleted int
	// SnapshotsDeleted counts snapshot records no retained checkpoint, live
	// epoch or pending part restores from any more (never the newest).
	SnapshotsDeleted int
	// DeadIncarnationObjects counts the objects deleted from the prefixes
	// of deleted incarnations of live stream names (late writes after a
	// delete and create; see collectDeadIncarnations).
	DeadIncarnationObjects int
}

// CollectGarbage deletes segment objects that nothing references: this
// node's, and those of other nodes that look gone for good (see
// foreignCollectable). References are rebuilt from scratch every time,
// from the node's live and recovered logs and from the blob store
// (journals and checkpoint parts), so a crash never leaves a wrong count
// behind:
//
//   - every live or recovered log references its segments from its
//     truncation point on;
//   - each of the newest RetainCheckpoints complete checkpoints of every
//     stream, each checkpoint marked retained, and each checkpoint pinned
//     by an open in progress references the segments its parts list, and
//     those of the checkpoints its parts start from, recursively (a
//     restore needs them);
//   - the final part of every closed, still live epoch, the checkpoint every
//     live epoch started from, and every part of a checkpoint not complete
//     yet (it may complete later) reference their segments;
//   - every registered CDC subscription that is not expired holds the
//     checkpoint of its position and every complete checkpoint after it
//     (their plans, snapshots and every segment their parts list; see
//     subscription.go).
//
// Invariant (brief invariant 5): an object is deleted only when none of
// these references it, its flush has settled (the scheduler has delivered
// its callbacks, so a log that needs it references it), and it is older
// than GCGrace (a margin for objects other processes may be writing).
// The round runs inside a round marker and stops deleting after GCMaxRound
// (see the GC/root protocol in restorable.go): a root created meanwhile is
// either seen by the round or waits for it to end.
func (n *Node) CollectGarbage(ctx context.Context) (GCStats, error) {
	end, err := n.beginGCRound(ctx)
	if err != nil {
		return GCStats{}, err
	}
	defer end()
	deadline := n.clock.Now().Add(n.opts.GCMaxRound)
	// Read before the references: a segment settled by now has had its
	// callbacks, so its logs already reference it.
	settled := n.sched.SettledBelow()
	all, err := listAllSegments(ctx, n.store)
	if err != nil {
		return GCStats{}, err
	}
	objs := all[n.id]
	st := GCStats{Segments: len(objs)}
	refs, owners, err := n.segmentReferences(ctx, &st, deadline)
	if err != nil {
		return st, err
	}
	cutoff := n.clock.Now().Add(-n.opts.GCGrace)
	var errs []error
	del := func(o upload.ObjectInfo) bool {
		if !n.clock.Now().Before(deadline) {
			errs = append(errs, fmt.Errorf("gc: round took longer than %v: %w", n.opts.GCMaxRound, context.DeadlineExceeded))
			return false
		}
		if err := n.store.Delete(ctx, o.Key); err != nil {
			errs = append(errs, fmt.Errorf("gc: delete %s: %w", o.Key, err))
			return true
		}
		st.Deleted++
		st.DeletedBytes += o.Size
		return true
	}
	for _, o := range objs {
		seq, ok := segmentSeq(segmentPrefix(n.id), o.Key)
		switch {
		case refs[o.Key]:
			st.Referenced++
		case !ok || seq >= settled || o.ModTime.After(cutoff):
			st.Young++
		default:
			if !del(o) {
				return st, errors.Join(errs...)
			}
		}
	}
	for node, fobjs := range all {
		if node == n.id || !n.foreignCollectable(node, fobjs, owners) {
			continue
		}
		fcutoff := n.clock.Now().Add(-n.opts.ForeignGCGrace)
		for _, o := range fobjs {
			if refs[o.Key] || o.ModTime.After(fcutoff) {
				continue
			}
			if !del(o) {
				return st, errors.Join(errs...)
			}
			st.ForeignDeleted++
		}
	}
	if err := n.collectStaleRoundMarkers(ctx); err != nil {
		errs = append(errs, err)
	}
	return st, errors.Join(errs...)
}

// foreignCollectable says whether another node's segments may be collected
// (issue 9 S5: a node whose data dir is lost never collects its own). The
// rule is conservative, because many nodes share the blob store and a
// node's live logs reference segments no checkpoint lists yet: the node
// owns no live epoch in any stream's journal (its logs can never be
// checkpointed again, so only checkpoints — already references — need its
// segments), and it has uploaded no segment for ForeignGCGrace. Each
// segment must also be unreferenced and older than ForeignGCGrace.
func (n *Node) foreignCollectable(node string, objs []upload.ObjectInfo, owners map[string]bool) bool {
	if n.opts.ForeignGCGrace < 0 || owners[node] || len(objs) == 0 {
		return false
	}
	cutoff := n.clock.Now().Add(-n.opts.ForeignGCGrace)
	for _, o := range objs {
		if o.ModTime.After(cutoff) {
			return false // active lately
		}
	}
	return true
}

// listAllSegments lists every node's segment objects, by node.
func listAllSegments(ctx context.Context, store upload.BlobStore) (map[string][]upload.ObjectInfo, error) {
	out := map[string][]upload.ObjectInfo{}
	for o, err := range upload.Walk(ctx, store, "segments/", "") {
		if err != nil {
			return nil, fmt.Errorf("list segments: %w", err)
		}
		node, _, ok := strings.Cut(strings.TrimPrefix(o.Key, "segments/"), "/")
		if !ok {
			continue
		}
		out[node] = append(out[node], o)
	}
	return out, nil
}

// segmentReferences returns the set of segment keys something references.
// owners are the nodes owning a live epoch of some stream.
func (n *Node) segmentReferences(ctx context.Context, st *GCStats, deadline time.Time) (refs, owners map[string]bool, err error) {
	refs, owners = map[string]bool{}, map[string]bool{}
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
		return nil, nil, err
	}
	for _, name := range streams {
		if err := n.checkpointReferences(ctx, name, refs, owners, st, deadline); err != nil {
			return nil, nil, err
		}
		if err := n.collectDeadIncarnations(ctx, name, st, deadline); err != nil {
			return nil, nil, err
		}
	}
	return refs, owners, nil
}

func (n *Node) checkpointReferences(ctx context.Context, stream string, refs, owners map[string]bool, st *GCStats, deadline time.Time) error {
	h, err := n.freshHandle(ctx, stream)
	if errors.Is(err, ErrStreamNotFound) {
		return nil // deleted meanwhile
	}
	if err != nil {
		return err
	}
	js := h.journal.snapshot()
	if err := n.compactJournal(ctx, h); err != nil { // journal_compact.go
		return err
	}
	snaps, unusable, err := n.listSnapshots(ctx, h)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	// used: the snapshots some root restores from. The newest is always
	// kept: the next checkpoints build on it, and live writers may have
	// truncated their logs below it.
	used := map[uint64]bool{}
	if len(snaps) > 0 {
		used[snaps[len(snaps)-1].Checkpoint] = true
	}
	seen := map[string]bool{}
	addPart := func(key string) error {
		p, err := n.part(ctx, key)
		if err != nil {
			return fmt.Errorf("gc: stream %s: %w", stream, err)
		}
		pl, _, err := n.planPartWith(ctx, p, snaps)
		if err != nil {
			// No plan (e.g. a snapshot it needs is gone): keep everything
			// the part can reach rather than guess.
			return n.addPartReferences(ctx, stream, key, refs, seen)
		}
		markPlan(pl, refs, used)
		return nil
	}
	addCheckpoint := func(id uint64, r keygroup.Range) error {
		pl, err := n.planWith(ctx, stream, id, r, snaps)
		if err != nil {
			cp, ok := js.checkpoint(id)
			if !ok {
				return fmt.Errorf("gc: stream %s: checkpoint %d: %w", stream, id, err)
			}
			for _, p := range cp.Parts {
				if p.KeyGroups.Overlaps(r) {
					if err := n.addPartReferences(ctx, stream, p.Key, refs, seen); err != nil {
						return err
					}
				}
			}
			return nil
		}
		markPlan(pl, refs, used)
		return nil
	}
	all := keygroup.Range{Lo: 0, Hi: uint16(js.keyGroups - 1)}
	retained := js.checkpoints
	if len(retained) > n.opts.RetainCheckpoints {
		retained = retained[len(retained)-n.opts.RetainCheckpoints:]
	}
	marked, err := n.retainedCheckpoints(ctx, h.cfg.ns())
	if err != nil {
		return err
	}
	// Fail safe (journal_compact.go): a mark created after the forget's
	// own listing, for a record it forgot, cannot be honoured; stop
	// rather than collect what the mark asks to keep. The retain refuses
	// and removes it once this round ends (restorable.go).
	after := h.journal.snapshot()
	for _, id := range marked {
		if after.forgotten(id) {
			return fmt.Errorf("gc: stream %s: checkpoint %d: %w", stream, id, ErrRetainedCheckpointForgotten)
		}
	}
	pinned, err := n.pinnedCheckpoints(ctx, h.cfg.ns())
	if err != nil {
		return err
	}
	for _, id := range append(marked, pinned...) {
		if cp, ok := js.checkpoint(id); ok {
			retained = append(retained, cp)
		}
	}
	for _, cp := range retained {
		if err := addCheckpoint(cp.ID, all); err != nil {
			return err
		}
	}
	// Registered subscriptions (subscription.go): the checkpoint each one
	// holds and every complete checkpoint after it, with every segment
	// their parts list. Listed after the journal was read: a subscription
	// created later waits for this round before it checks its data.
	held, err := n.subscriptionHolds(ctx, h, &js, true)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	if err := n.markHeldCheckpoints(ctx, stream, &js, held, all, refs, addCheckpoint); err != nil {
		return err
	}
	for _, ep := range js.live {
		owners[ep.Node] = true
		if ep.Closed {
			if err := addPart(ep.FinalPart.Key); err != nil {
				return err
			}
		}
		// A live epoch's next checkpoint restores through the checkpoint
		// it started from, however old: keep that base alive too.
		if ep.FromCheckpoint != 0 {
			if _, ok := js.checkpoint(ep.FromCheckpoint); !ok {
				return fmt.Errorf("gc: stream %s: epoch %d starts from checkpoint %d, which is not complete", stream, ep.Epoch, ep.FromCheckpoint)
			}
			if err := addCheckpoint(ep.FromCheckpoint, ep.KeyGroups); err != nil {
				return err
			}
		}
	}
	pending, err := n.pendingParts(ctx, h.cfg.ns(), js.lastCheckpoint())
	if err != nil {
		return err
	}
	for _, key := range pending {
		if err := addPart(key); err != nil {
			return err
		}
	}
	// Snapshot records no root uses are deleted; their files become
	// garbage for the materializer's collection.
	var errs []error
	for _, s := range snaps {
		if used[s.Checkpoint] {
			continue
		}
		if !n.clock.Now().Before(deadline) {
			errs = append(errs, fmt.Errorf("gc: round took longer than %v: %w", n.opts.GCMaxRound, context.DeadlineExceeded))
			break
		}
		if err := n.deleteSnapshot(ctx, s); err != nil {
			errs = append(errs, fmt.Errorf("gc: %w", err))
			continue
		}
		st.SnapshotsDeleted++
	}
	errs = append(errs, n.deleteUnusableSnapshots(ctx, unusable, st))
	return errors.Join(errs...)
}

// markPlan marks the segments a restore plan reads and the snapshot it
// starts from.
func markPlan(pl RestorePlan, refs map[string]bool, used map[uint64]bool) {
	for _, b := range pl.Bases {
		used[b.Snapshot.Checkpoint] = true
	}
	for _, s := range pl.Steps {
		for _, seg := range s.Segments {
			refs[seg.Key] = true
		}
	}
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
func (n *Node) pendingParts(ctx context.Context, ns streamNS, lastComplete uint64) ([]string, error) {
	stream, prefix := ns.name, streamPrefix(ns)+"checkpoints/"
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
