package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/upload"
)

// ErrCheckpointNotRestorable: the checkpoint is complete in the journal but
// garbage collection already deleted data its restore needs (it was neither
// retained nor among the newest). Retaining it or opening a writer from it
// is refused; restore from a newer checkpoint.
var ErrCheckpointNotRestorable = errors.New("checkpoint no longer restorable")

// The GC/root protocol (issue 9 S6). A new root for an old checkpoint — a
// retain marker, or an epoch-open from it — must never be created while a
// garbage collection that did not see it deletes the checkpoint's data.
//
// Every GC round first creates a round marker gc/<node>/<nonce>, then reads
// every root (journals, retained markers, pins, snapshots), deletes, and
// removes its marker. A round deletes nothing once it is older than
// Options.GCMaxRound (it stops and the next round continues).
//
// A new root is made by: (1) creating its object (retained/<id>, or a pin
// pins/<id>-<nonce> for an open); (2) listing the round markers and waiting
// until each one present is gone or older than GCMaxRound+gcMarkerSkew;
// (3) checking that the checkpoint is restorable now (checkRestorable); if
// not, removing the object and failing.
//
// Invariant: a round either read the roots after (1) and so keeps the
// checkpoint's data, or its marker was created before (1) — every blob
// store here is linearizable, so (2) sees that marker — and then every one
// of its deletes landed before (3) looked. Either way a root that (3)
// accepted protects data that exists. An open keeps its pin until the
// epoch-open entry is in the journal and every round that may have read
// the journal before it is over (the entry is then a root by itself).
//
// Marker ages are compared with this node's clock; gcMarkerSkew is the
// clock difference between nodes (and the blob store) tolerated.
const gcMarkerSkew = time.Minute

func gcRoundPrefix() string { return "gc/" }

func pinPrefix(ns streamNS) string { return streamPrefix(ns) + "pins/" }

func pinKey(ns streamNS, id uint64, nonce string) string {
	return fmt.Sprintf("%s%020d-%s", pinPrefix(ns), id, nonce)
}

// pinTTL: a pin older than this is stale (its open crashed) and no longer
// a root. An open whose pin is older than half of it refuses to append.
const pinTTL = time.Hour

// beginGCRound creates this round's marker. The returned end removes it.
func (n *Node) beginGCRound(ctx context.Context) (end func(), err error) {
	key := gcRoundPrefix() + n.id + "/" + newNonce()
	if err := n.store.PutIfAbsent(ctx, key, bytes.NewReader(nil), 0); err != nil {
		// The put may have landed: remove it, or it blocks retains until
		// it is stale.
		_ = n.store.Delete(context.WithoutCancel(ctx), key)
		return nil, fmt.Errorf("gc: create round marker: %w", err)
	}
	return func() {
		if err := n.store.Delete(context.WithoutCancel(ctx), key); err != nil {
			n.log.Warn("gc: remove round marker", "key", key, "err", err)
		}
	}, nil
}

// collectStaleRoundMarkers deletes round markers of rounds that can no
// longer delete anything (crashed nodes leave them behind).
func (n *Node) collectStaleRoundMarkers(ctx context.Context) error {
	cutoff := n.clock.Now().Add(-(n.opts.GCMaxRound + 2*gcMarkerSkew))
	var errs []error
	for o, err := range upload.Walk(ctx, n.store, gcRoundPrefix(), "") {
		if err != nil {
			return fmt.Errorf("gc: list round markers: %w", err)
		}
		if o.ModTime.Before(cutoff) {
			if err := n.store.Delete(ctx, o.Key); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// clearOwnRoundMarkers deletes the GC round markers an earlier process of
// this node left behind (killed mid-round): that process is dead (the data
// dir's lock is held by this one) and deletes nothing any more, and every
// retain and open-from would otherwise wait for the marker to go stale
// (GCMaxRound plus the skew margin, minutes). Best effort: a marker left
// here only costs that wait.
func (n *Node) clearOwnRoundMarkers(ctx context.Context) {
	prefix := gcRoundPrefix() + n.id + "/"
	for o, err := range upload.Walk(ctx, n.store, prefix, "") {
		if err != nil {
			n.log.Warn("gc: list this node's round markers", "err", err)
			return
		}
		if err := n.store.Delete(ctx, o.Key); err != nil {
			n.log.Warn("gc: remove a round marker of an earlier process", "key", o.Key, "err", err)
		}
	}
}

// waitGCRounds waits until every GC round in progress when it is called is
// over (its marker gone, or too old to delete anything).
func (n *Node) waitGCRounds(ctx context.Context) error {
	live := func() (map[string]time.Time, error) {
		out := map[string]time.Time{}
		for o, err := range upload.Walk(ctx, n.store, gcRoundPrefix(), "") {
			if err != nil {
				return nil, fmt.Errorf("list gc round markers: %w", err)
			}
			out[o.Key] = o.ModTime
		}
		return out, nil
	}
	waiting, err := live()
	if err != nil {
		return err
	}
	delay := 5 * time.Millisecond
	for {
		stale := n.clock.Now().Add(-(n.opts.GCMaxRound + gcMarkerSkew))
		for k, t := range waiting {
			if t.Before(stale) {
				delete(waiting, k)
			}
		}
		if len(waiting) == 0 {
			return nil
		}
		if err := clock.Sleep(ctx, n.clock, delay); err != nil {
			return fmt.Errorf("wait for garbage collection rounds: %w", err)
		}
		delay = min(2*delay, 500*time.Millisecond)
		now, err := live()
		if err != nil {
			return err
		}
		for k := range waiting {
			if _, ok := now[k]; !ok {
				delete(waiting, k) // that round is over
			}
		}
	}
}

// checkRestorable reports (wrapping ErrCheckpointNotRestorable) whether
// complete checkpoint id of stream can be restored from what is on the
// blob store now: it plans the restore of every key group with the
// published snapshots and checks that every segment the plan reads exists
// (one Stat each). Snapshot files are the materializer's: their records
// are checked, the files they list are not.
//
// r limits the check to those key groups (an open needs only its own);
// nil means every key group.
func (n *Node) checkRestorable(ctx context.Context, stream string, id uint64, r *keygroup.Range) error {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return err
	}
	snaps, err := n.Snapshots(ctx, stream)
	if err != nil {
		return err
	}
	all := keygroup.Range{Lo: 0, Hi: uint16(h.cfg.KeyGroups - 1)}
	if r != nil {
		all = *r
	}
	pl, err := n.planWith(ctx, stream, id, all, snaps)
	if errors.Is(err, ErrLogTruncated) {
		return fmt.Errorf("%w: %w", ErrCheckpointNotRestorable, err)
	}
	if err != nil {
		return err
	}
	for _, b := range pl.Bases {
		if _, err := n.store.Stat(ctx, b.Snapshot.Key()); errors.Is(err, upload.ErrNotFound) {
			return fmt.Errorf("stream %s: checkpoint %d: snapshot %d was collected: %w", stream, id, b.Snapshot.Checkpoint, ErrCheckpointNotRestorable)
		} else if err != nil {
			return fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)
		}
	}
	seen := map[string]bool{}
	for _, s := range pl.Steps {
		for _, seg := range s.Segments {
			if seen[seg.Key] {
				continue
			}
			seen[seg.Key] = true
			if _, err := n.store.Stat(ctx, seg.Key); errors.Is(err, upload.ErrNotFound) {
				return fmt.Errorf("stream %s: checkpoint %d: segment %s was collected: %w", stream, id, seg.Key, ErrCheckpointNotRestorable)
			} else if err != nil {
				return fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, err)
			}
		}
	}
	return nil
}

// makeRoot runs steps (2) and (3) of the protocol above for a root object
// already created at key; on refusal it removes the object.
func (n *Node) makeRoot(ctx context.Context, stream string, id uint64, r *keygroup.Range, key string) error {
	err := n.waitGCRounds(ctx)
	if err == nil {
		err = n.checkRestorable(ctx, stream, id, r)
	}
	if err != nil {
		if derr := n.store.Delete(context.WithoutCancel(ctx), key); derr != nil {
			err = errors.Join(err, fmt.Errorf("remove %s: %w", key, derr))
		}
		return err
	}
	return nil
}

// pin protects checkpoint id from garbage collection while an open from it
// is under way: it returns once the checkpoint's key groups r are known
// restorable and
// protected, and unpin, to call once the epoch-open entry is in the
// journal (or the open failed). created is when the pin was made.
func (n *Node) pin(ctx context.Context, h *streamHandle, id uint64, r keygroup.Range) (unpin func(appended bool), created time.Time, err error) {
	stream := h.cfg.Name
	key := pinKey(h.cfg.ns(), id, newNonce())
	created = n.clock.Now()
	if err := n.store.PutIfAbsent(ctx, key, bytes.NewReader(nil), 0); err != nil {
		_ = n.store.Delete(context.WithoutCancel(ctx), key)
		return nil, time.Time{}, fmt.Errorf("stream %s: pin checkpoint %d: %w", stream, id, err)
	}
	if err := n.makeRoot(ctx, stream, id, &r, key); err != nil {
		return nil, time.Time{}, err
	}
	return func(appended bool) {
		if appended {
			// A round that read the journal before the entry may still
			// be deleting: it saw the pin, so keep it until it is over.
			if err := n.waitGCRounds(ctx); err != nil {
				n.log.Warn("open: pin kept until it is stale", "key", key, "err", err)
				return
			}
		}
		if err := n.store.Delete(context.WithoutCancel(ctx), key); err != nil {
			n.log.Warn("open: remove pin", "key", key, "err", err)
		}
	}, created, nil
}

// pinnedCheckpoints lists the checkpoints pinned by opens in progress,
// deleting stale pins (older than pinTTL).
func (n *Node) pinnedCheckpoints(ctx context.Context, ns streamNS) ([]uint64, error) {
	stream, prefix := ns.name, pinPrefix(ns)
	cutoff := n.clock.Now().Add(-pinTTL)
	var ids []uint64
	for o, err := range upload.Walk(ctx, n.store, prefix, "") {
		if err != nil {
			return nil, fmt.Errorf("stream %s: list pins: %w", stream, err)
		}
		idText, _, _ := strings.Cut(strings.TrimPrefix(o.Key, prefix), "-")
		id, perr := strconv.ParseUint(idText, 10, 64)
		if perr != nil {
			continue
		}
		if o.ModTime.Before(cutoff) {
			if err := n.store.Delete(ctx, o.Key); err != nil {
				return nil, fmt.Errorf("stream %s: delete stale pin: %w", stream, err)
			}
			continue
		}
		ids = append(ids, id)
	}
	return ids, nil
}
