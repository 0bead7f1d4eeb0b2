package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/dstl-dev/dstl/upload"
)

// Retention marks live at streams/<stream>/retained/<id>: an empty object
// per retained checkpoint. Garbage collection keeps everything a retained
// checkpoint needs, in addition to the newest RetainCheckpoints ones.

func retainedPrefix(ns streamNS) string { return streamPrefix(ns) + "retained/" }

func retainedKey(ns streamNS, id uint64) string {
	return fmt.Sprintf("%s%020d", retainedPrefix(ns), id)
}

// RetainCheckpoint marks complete checkpoint id of stream retained (or
// releases the mark when retain is false). A checkpoint whose data garbage
// collection already deleted is refused with ErrCheckpointNotRestorable
// (and not marked). The mark is created first and the checkpoint checked
// after every GC round that may not have seen it ended (the GC/root
// protocol in restorable.go), so a retain that returns nil protects data
// that exists.
func (n *Node) RetainCheckpoint(ctx context.Context, stream string, id uint64, retain bool) error {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return err
	}
	if _, err := n.completeCheckpoint(ctx, stream, id); err != nil {
		return err
	}
	key := retainedKey(h.cfg.ns(), id)
	if !retain {
		if err := n.store.Delete(ctx, key); err != nil {
			return fmt.Errorf("stream %s: release checkpoint %d: %w", stream, id, err)
		}
		return nil
	}
	err = n.store.PutIfAbsent(ctx, key, bytes.NewReader(nil), 0)
	if err != nil && !errors.Is(err, upload.ErrAlreadyExists) {
		// The mark may have landed: a retain that failed must not leave
		// a mark that was never checked.
		if derr := n.store.Delete(context.WithoutCancel(ctx), key); derr != nil {
			err = errors.Join(err, derr)
		}
		return fmt.Errorf("stream %s: retain checkpoint %d: %w", stream, id, err)
	}
	if err := n.makeRoot(ctx, stream, id, nil, key); err != nil {
		return fmt.Errorf("stream %s: retain checkpoint %d: %w", stream, id, err)
	}
	return nil
}

// RetainedCheckpoints returns the ids of the checkpoints marked retained.
func (n *Node) RetainedCheckpoints(ctx context.Context, stream string) ([]uint64, error) {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return nil, err
	}
	return n.retainedCheckpoints(ctx, h.cfg.ns())
}

// retainedCheckpoints lists the retention marks of one incarnation.
func (n *Node) retainedCheckpoints(ctx context.Context, ns streamNS) ([]uint64, error) {
	ids, err := listNumbered(ctx, n.store, retainedPrefix(ns))
	if err != nil {
		return nil, fmt.Errorf("stream %s: list retained checkpoints: %w", ns.name, err)
	}
	return ids, nil
}
