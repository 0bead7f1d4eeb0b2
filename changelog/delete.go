package changelog

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/dstl-dev/dstl/upload"
)

// ErrStreamBusy: the stream has open writers on this node, or an earlier
// deletion of a stream of that name is not finished.
var ErrStreamBusy = errors.New("stream busy")

// DeleteStream deletes a stream: its journal, checkpoint parts and
// retention marks, then its definition. Its segments become garbage for
// the nodes that wrote them. It is refused while this node has open
// writers of the stream (close them first). Writers on other nodes are
// not stopped by it: their next checkpoint fails with ErrStreamNotFound.
//
// The definition goes last, so a deletion interrupted half way leaves a
// stream that still exists and can be deleted again; CreateStream refuses a
// name whose old objects are still there.
func (n *Node) DeleteStream(ctx context.Context, name string) error {
	cfg, err := getStream(ctx, n.store, name)
	if errors.Is(err, ErrStreamNotFound) {
		// Objects a writer on another node stored after an earlier delete
		// would keep the name from being created again: clear them.
		if leftovers := checkNoLeftovers(ctx, n.store, name); errors.Is(leftovers, ErrStreamBusy) {
			if err := deletePrefix(ctx, n.store, streamNamePrefix(name)); err != nil {
				return fmt.Errorf("stream %s: delete leftovers: %w", name, err)
			}
			return nil
		}
		return err
	} else if err != nil {
		return err
	}
	n.mu.Lock()
	for _, w := range n.writers {
		// A writer of a deleted incarnation of the name holds nothing of
		// this one (its keys are its own incarnation's).
		if w.cfg.Stream == name && w.incarnation == cfg.Incarnation {
			n.mu.Unlock()
			return fmt.Errorf("stream %s: writer %s is open: %w", name, w.logID, ErrStreamBusy)
		}
	}
	delete(n.streams, name)
	n.mu.Unlock()
	if err := deletePrefix(ctx, n.store, streamNamePrefix(name)); err != nil {
		return fmt.Errorf("stream %s: delete: %w", name, err)
	}
	if err := n.store.Delete(ctx, catalogKey(name)); err != nil {
		return fmt.Errorf("stream %s: delete definition: %w", name, err)
	}
	n.mu.Lock()
	delete(n.streams, name)
	n.mu.Unlock()
	n.parts.dropStream(name)
	return nil
}

// deletePrefix deletes every object whose key starts with prefix.
func deletePrefix(ctx context.Context, store upload.BlobStore, prefix string) error {
	for o, err := range upload.Walk(ctx, store, prefix, "") {
		if err != nil {
			return err
		}
		// A delete is idempotent: a transient failure (which may have
		// landed) is simply tried again, a few times, before the caller is
		// told to retry the whole deletion.
		for attempt := 1; ; attempt++ {
			err := store.Delete(ctx, o.Key)
			if err == nil {
				break
			}
			if !upload.IsTransient(err) || attempt == maxDeleteAttempts || ctx.Err() != nil {
				return err
			}
		}
	}
	return nil
}

// maxDeleteAttempts bounds the attempts at deleting one object of a
// deleted stream on transient errors (the S3 SDK retries underneath too).
const maxDeleteAttempts = 4

// checkNoLeftovers refuses to create a stream whose name still has objects
// of a deleted incarnation (a deletion that did not finish).
func checkNoLeftovers(ctx context.Context, store upload.BlobStore, name string) error {
	page, err := store.List(ctx, streamNamePrefix(name), "", 1)
	if err != nil {
		return fmt.Errorf("stream %s: %w", name, err)
	}
	if len(page.Objects) > 0 {
		return fmt.Errorf("stream %s: objects of a deleted stream of that name remain (%s); delete it again: %w", name, page.Objects[0].Key, ErrStreamBusy)
	}
	return nil
}

// collectDeadIncarnations deletes the objects of every incarnation of name
// but the current one: late writes of a writer (or journal, GC, pin) that
// had not noticed a delete and create of the name. They land in their own,
// dead incarnation's prefix (streams/<name>/<incarnation>/), which
// DeleteStream emptied and nothing reads, so without this they would leak
// (invariant 5). The current incarnation is read from the definition, never
// from a cached handle: a stale view must not take the live incarnation for
// a dead one. Only objects older than GCGrace go: an incarnation created
// between that read and the deletion (a delete and create meanwhile) has
// only younger objects. A definition without an incarnation keeps its
// objects directly under streams/<name>/: nothing to do.
func (n *Node) collectDeadIncarnations(ctx context.Context, name string, st *GCStats, deadline time.Time) error {
	cfg, err := getStream(ctx, n.store, name)
	if errors.Is(err, ErrStreamNotFound) {
		return nil // deleted meanwhile: DeleteStream clears the name
	}
	if err != nil || cfg.Incarnation == "" {
		return err
	}
	base, live := streamNamePrefix(name), cfg.Incarnation
	cutoff := n.clock.Now().Add(-n.opts.GCGrace)
	after := ""
	for n.clock.Now().Before(deadline) {
		page, err := n.store.List(ctx, base, after, 1)
		if err != nil {
			return fmt.Errorf("gc: stream %s: list incarnations: %w", name, err)
		}
		if len(page.Objects) == 0 {
			return nil
		}
		inc, _, ok := strings.Cut(strings.TrimPrefix(page.Objects[0].Key, base), "/")
		if !ok {
			after = page.Objects[0].Key // not an incarnation's object: leave it
			continue
		}
		// '~' sorts after every character of a key: skip the whole prefix.
		after = base + inc + "/~"
		if inc == live {
			continue
		}
		for o, err := range upload.Walk(ctx, n.store, base+inc+"/", "") {
			if err != nil {
				return fmt.Errorf("gc: stream %s: list incarnation %s: %w", name, inc, err)
			}
			if !o.ModTime.Before(cutoff) {
				continue // maybe a new incarnation's, or still being written: next round
			}
			if err := n.store.Delete(ctx, o.Key); err != nil {
				return fmt.Errorf("gc: stream %s: delete %s of a deleted incarnation: %w", name, o.Key, err)
			}
			st.DeadIncarnationObjects++
		}
	}
	return nil
}
