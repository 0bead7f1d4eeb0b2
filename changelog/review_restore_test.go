package changelog

// Review tests of restorability (issue 9 R2, S6, S4, S5), adapted from the
// adversarial review: each asserts the correct behaviour.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// restoreHookStore injects precise faults: a put that lands and then reports a
// transient error (lost acknowledgement), followed by one failing listing.
type restoreHookStore struct {
	upload.BlobStore
	mu          sync.Mutex
	lostAckPut  func(key string) bool // put lands, then a transient error
	failLists   int                   // the next n listings of failListOf fail
	failListOf  string
	deletedKeys []string
}

func (h *restoreHookStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	h.mu.Lock()
	f := h.lostAckPut
	h.mu.Unlock()
	err := h.BlobStore.PutIfAbsent(ctx, key, r, size)
	if err == nil && f != nil && f(key) {
		h.mu.Lock()
		h.failLists, h.failListOf = 1, "/journal/" // the re-read that would find the nonce fails
		h.lostAckPut = nil
		h.mu.Unlock()
		return fmt.Errorf("put %s: connection reset after the request was sent: %w", key, upload.ErrTransient)
	}
	return err
}

func (h *restoreHookStore) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	h.mu.Lock()
	if h.failLists > 0 && strings.Contains(prefix, h.failListOf) {
		h.failLists--
		h.mu.Unlock()
		return upload.ListPage{}, fmt.Errorf("list %s: 503 slow down: %w", prefix, upload.ErrTransient)
	}
	h.mu.Unlock()
	return h.BlobStore.List(ctx, prefix, startAfter, limit)
}

func (h *restoreHookStore) Delete(ctx context.Context, key string) error {
	h.mu.Lock()
	h.deletedKeys = append(h.deletedKeys, key)
	h.mu.Unlock()
	return h.BlobStore.Delete(ctx, key)
}


// R2: a checkpoint whose data GC deleted must be refused by
// OpenWriter{FromCheckpoint} and RetainCheckpoint.
func TestReviewOpenFromCollectedCheckpoint(t *testing.T) {
	ctx := context.Background()
	hs := &restoreHookStore{BlobStore: newFileStore(t)}
	n := openTestNode(t, hs, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	all := keygroup.Range{Lo: 0, Hi: 3}
	w1, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all})
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 5; i++ {
		if _, _, err := w1.Append(ctx, []Change{put(0, fmt.Sprintf("k%d", i), "v")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := w1.Checkpoint(ctx, i, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", i, res, err)
		}
	}
	// A materializer published a snapshot of checkpoint 3 (the manifest is
	// opaque to the changelog); the node adopts it and collects.
	if _, err := n.PublishSnapshot(ctx, "s", 3, []byte(`{}`), 0, 0); err != nil {
		t.Fatal(err)
	}
	if k, err := n.AdoptSnapshots(ctx); err != nil || k != 1 {
		t.Fatalf("adopt: %d %v", k, err)
	}
	gst, err := n.CollectGarbage(ctx)
	t.Logf("GC: %+v (deleted %v)", gst, hs.deletedKeys)
	if err != nil || gst.Deleted == 0 {
		t.Fatalf("gc deleted nothing: %v", err)
	}
	// Checkpoint 1 is still "complete" in the journal, but unrestorable.
	rerr := func(id uint64) error {
		for _, err := range n.RestoreChanges(ctx, "s", id, all) {
			if err != nil {
				return err
			}
		}
		return nil
	}
	t.Logf("restore checkpoint 1 after GC: %v", rerr(1))

	// RetainCheckpoint(1) says yes.
	err = n.RetainCheckpoint(ctx, "s", 1, true)
	t.Logf("RetainCheckpoint(1): %v", err)
	retainAccepted := err == nil

	// OpenWriter from checkpoint 1: fences w1 and succeeds.
	w2, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: all, FromCheckpoint: 1})
	t.Logf("OpenWriter(FromCheckpoint=1): err=%v", err)
	if err != nil {
		if retainAccepted {
			t.Fatalf("VIOLATION: RetainCheckpoint(1) accepted a checkpoint that cannot be restored")
		}
		// Refused with the typed error, before anything was fenced, and
		// without leaving a retain mark or a pin behind.
		if !errors.Is(err, ErrCheckpointNotRestorable) {
			t.Fatalf("open from a collected checkpoint: %v, want ErrCheckpointNotRestorable", err)
		}
		if rerr := n.RetainCheckpoint(ctx, "s", 1, true); !errors.Is(rerr, ErrCheckpointNotRestorable) {
			t.Fatalf("retain of a collected checkpoint: %v, want ErrCheckpointNotRestorable", rerr)
		}
		if _, _, err := w1.Append(ctx, []Change{put(0, "z", "z")}, Buffered); err != nil {
			t.Fatalf("the healthy writer was harmed by the refused open: %v", err)
		}
		if ids, err := n.RetainedCheckpoints(ctx, "s"); err != nil || len(ids) != 0 {
			t.Fatalf("retained after refusals: %v %v", ids, err)
		}
		if pins, err := n.pinnedCheckpoints(ctx, "s"); err != nil || len(pins) != 0 {
			t.Fatalf("pins after refusals: %v %v", pins, err)
		}
		// A checkpoint that is still restorable is accepted.
		if err := n.RetainCheckpoint(ctx, "s", 3, true); err != nil {
			t.Fatalf("retain 3: %v", err)
		}
		return
	}
	_, _, aerr := w1.Append(ctx, []Change{put(0, "z", "z")}, Buffered)
	t.Logf("old writer after the open: %v", aerr)
	if _, _, err := w2.Append(ctx, []Change{put(1, "new", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	res, err := w2.Checkpoint(ctx, 6, nil)
	t.Logf("checkpoint 6 by the new writer: %+v err=%v", res, err)
	if err == nil && res.Complete {
		if rerr := rerr(6); rerr != nil {
			t.Fatalf("VIOLATION: checkpoint 6 was acknowledged Complete but cannot be restored: %v (retain of 1 accepted: %v; old writer fenced: %v)", rerr, retainAccepted, aerr)
		}
	}
}
