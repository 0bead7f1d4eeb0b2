package changelog

import (
	"context"
	"errors"
	"fmt"

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
	if _, err := getStream(ctx, n.store, name); errors.Is(err, ErrStreamNotFound) {
		// Objects a writer on another node stored after an earlier delete
		// would keep the name from being created again: clear them.
		if leftovers := checkNoLeftovers(ctx, n.store, name); errors.Is(leftovers, ErrStreamBusy) {
			if err := deletePrefix(ctx, n.store, streamPrefix(name)); err != nil {
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
		if w.cfg.Stream == name {
			n.mu.Unlock()
			return fmt.Errorf("stream %s: writer %s is open: %w", name, w.logID, ErrStreamBusy)
		}
	}
	delete(n.streams, name)
	n.mu.Unlock()
	if err := deletePrefix(ctx, n.store, streamPrefix(name)); err != nil {
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
		if err := store.Delete(ctx, o.Key); err != nil {
			return err
		}
	}
	return nil
}

// checkNoLeftovers refuses to create a stream whose name still has objects
// of a deleted incarnation (a deletion that did not finish).
func checkNoLeftovers(ctx context.Context, store upload.BlobStore, name string) error {
	page, err := store.List(ctx, streamPrefix(name), "", 1)
	if err != nil {
		return fmt.Errorf("stream %s: %w", name, err)
	}
	if len(page.Objects) > 0 {
		return fmt.Errorf("stream %s: objects of a deleted stream of that name remain (%s); delete it again: %w", name, page.Objects[0].Key, ErrStreamBusy)
	}
	return nil
}
