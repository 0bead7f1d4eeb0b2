// Regression tests for the findings of an independent review of the
// changelog core. Each reproduced its bug on the tree before the fix (the
// review ran them there and recorded the failures in the session note).

package changelog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// blockingStore blocks PutIfAbsent of keys containing match until release
// is closed; entered is closed when the first such put arrives.
type blockingStore struct {
	upload.BlobStore
	match   string
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (s *blockingStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	if s.match != "" && strings.Contains(key, s.match) {
		s.once.Do(func() { close(s.entered) })
		<-s.release
	}
	return s.BlobStore.PutIfAbsent(ctx, key, r, size)
}

// Regression (found by review): a Local append that races with a fence (or Close/detach) panics in
// syncLocal: kill() cut the tail to tail[:drained] but syncLocal still
// slices up to w.next-1. The test holds walMu to stand in for another
// appender of the same log whose local-log fsync is in progress.
func TestRegressionSyncLocalPanicsAfterFence(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	w.walMu.Lock() // a concurrent Local appender of w is inside wal.Append
	res := make(chan any, 1)
	go func() {
		defer func() { res <- recover() }()
		_, _, err := w.Append(ctx, []Change{put(0, "k", "v")}, Local)
		res <- err
	}()
	for w.LastSQN() == 0 { // the batch has its SQN and sits in the tail
		time.Sleep(time.Millisecond)
	}
	// A new epoch over the same key groups fences w (on this node at once).
	if _, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)}); err != nil {
		t.Fatal(err)
	}
	w.walMu.Unlock() // the other appender's fsync returns
	got := <-res
	t.Logf("Append of the fenced writer ended with: %v", got)
	if got == nil {
		t.Errorf("fenced writer: Append(Local) acknowledged (nil error) after the new epoch opened; its change is in no part")
	}
	if _, isErr := got.(error); !isErr && got != nil {
		// w.mu was held when the panic unwound: it is never unlocked.
		locked := !w.mu.TryLock()
		t.Errorf("PANIC in Append/syncLocal: %v (w.mu still locked afterwards: %v)", got, locked)
	}
}

// Regression: Close persisted, then wrote the final part and the
// epoch-close entry; an Append(Local) landing in between was acknowledged
// but in no segment, no part and (after Forget) not in the local log.
func TestRegressionCloseDropsAcknowledgedLocalAppend(t *testing.T) {
	ctx := context.Background()
	bs := &blockingStore{BlobStore: newFileStore(t), match: "/final/", entered: make(chan struct{}), release: make(chan struct{})}
	dir := t.TempDir()
	n, err := Open(ctx, testNodeOptions(bs, dir))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "1")}, Local); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- w.Close(ctx) }()
	<-bs.entered // Close has persisted and is storing its final part
	first, last, err := w.Append(ctx, []Change{put(1, "b", "2")}, Local)
	t.Logf("concurrent Append(Local) during Close: first=%d last=%d err=%v", first, last, err)
	close(bs.release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if err != nil {
		// The contract: an append during a close is refused (ErrClosing:
		// the writer is not closed until the Close succeeds)...
		if !errors.Is(err, ErrClosing) {
			t.Fatalf("append during Close: %v, want ErrClosing", err)
		}
		return
	}
	// ... or, if acknowledged, covered by the final part (checked below).
	p, err := readPart(ctx, bs, partKey("s", 0, w.Epoch()))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("final part covers up to SQN %d; acknowledged SQN %d", p.UpToSQN, last)
	// Restart the node on the same data dir: is SQN 2 recovered?
	n.crash()
	n2, err := Open(ctx, testNodeOptions(bs, dir))
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close(ctx)
	t.Logf("recovered logs after restart: %d", len(n2.recovered))
	nw, err := n2.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nw.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	got := restoreMap(t, n2, "s", 1, keygroup.Full(8))
	t.Logf("state after reopen = %v", got)
	if p.UpToSQN < last {
		t.Errorf("LOST: Append(Local) acknowledged SQN %d, but the closed epoch's final part stops at %d and the state is %v", last, p.UpToSQN, got)
	}
}

// Regression: Append returned an error after it assigned SQNs and buffered
// the batch; the batch was uploaded anyway, so a client retry applied it
// twice.
func TestRegressionFailedAppendIsStillCommitted(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel() // e.g. the RPC deadline passed while waiting for the local log
	merge := Change{KeyGroup: 0, State: "s", Op: OpMerge, Key: []byte("k"), Value: []byte("x")}
	_, _, err = w.Append(cctx, []Change{merge}, Local)
	t.Logf("Append(Local) with an ended ctx: %v", err)
	// The contract: an append either succeeds, or fails without effect, so
	// a client retries exactly the appends that failed.
	if err != nil {
		if _, _, err := w.Append(ctx, []Change{merge}, Local); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	got := restoreMap(t, n, "s", 1, keygroup.Full(8))
	t.Logf("checkpoint 1 = %v", got)
	if got["0/s/k"] != "x" {
		t.Errorf("DOUBLE APPLY: a failed Append was committed; after one retry the merge value is %q, want %q", got["0/s/k"], "x")
	}
}

// Regression (found by review): DeleteStream on one node while a writer of another node keeps
// checkpointing: the checkpoint reports Complete although the stream is
// gone, and the name can then neither be created nor deleted.
func TestRegressionCheckpointAfterDeleteRecreatesStream(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	if _, err := a.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "k", "v")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	res, err := w.Checkpoint(ctx, 1, nil)
	t.Logf("checkpoint on the deleted stream: %+v err=%v", res, err)
	if err == nil && res.Complete {
		t.Errorf("Checkpoint of a deleted stream reported Complete (docs: 'their next checkpoint fails with ErrStreamNotFound')")
	}
	_, cerr := b.CreateStream(ctx, "s", 8)
	derr := b.DeleteStream(ctx, "s")
	t.Logf("recreate: %v; delete again: %v", cerr, derr)
	if cerr != nil && derr != nil {
		t.Errorf("stream name wedged: create -> %v, delete -> %v", cerr, derr)
	}
}

// Regression (found by review): a writer reopened from an older checkpoint (rollback) is not a GC
// root for its base: after a truncation, GC deletes the base's segment and
// the new epoch's checkpoints cannot be restored.
func TestRegressionGCDeletesBaseOfLiveEpoch(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	a, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 5; id++ {
		if _, _, err := a.Append(ctx, []Change{put(0, fmt.Sprint("k", id), "v")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Checkpoint(ctx, id, nil); err != nil {
			t.Fatal(err)
		}
		if id == 2 {
			// The materializer snapshotted SQN 1: release it.
			if err := a.Truncate(ctx, 2); err != nil {
				t.Fatal(err)
			}
		}
	}
	b, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8), FromCheckpoint: 1})
	if err != nil {
		t.Fatal(err)
	}
	st, err := n.CollectGarbage(ctx)
	t.Logf("gc: %+v err=%v", st, err)
	if _, _, err := b.Append(ctx, []Change{put(1, "x", "y")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Checkpoint(ctx, 6, nil); err != nil {
		t.Fatal(err)
	}
	for _, err := range n.RestoreChanges(ctx, "s", 6, keygroup.Full(8)) {
		if err != nil {
			if errors.Is(err, upload.ErrNotFound) {
				t.Errorf("acknowledged checkpoint 6 is not restorable: %v", err)
			} else {
				t.Error(err)
			}
			return
		}
	}
}

// Regression (found by review): RestoreChanges of a checkpoint whose part was truncated yields the
// base + the log suffix, silently skipping the released prefix.
func TestRegressionRestoreOfTruncatedPartIsSilentlyIncomplete(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	a, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	a.Append(ctx, []Change{put(0, "k1", "v")}, Buffered)
	a.Checkpoint(ctx, 1, nil)
	a.Append(ctx, []Change{put(0, "k2", "v")}, Buffered)
	a.Persist(ctx, 0)
	if err := a.Truncate(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Checkpoint(ctx, 2, nil); err != nil {
		t.Fatal(err)
	}
	var restoreErr error
	for _, err := range n.RestoreChanges(ctx, "s", 2, keygroup.Full(8)) {
		if err != nil {
			restoreErr = err
			break
		}
	}
	if !errors.Is(restoreErr, ErrLogTruncated) {
		t.Errorf("restore of a checkpoint whose log was truncated: %v, want ErrLogTruncated (never a state lacking the prefix)", restoreErr)
	}
}

// failingStore blocks the first segment put until release, then fails it
// with a permanent error.
type failingStore struct {
	upload.BlobStore
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (s *failingStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	if strings.HasPrefix(key, "segments/") {
		first := false
		s.once.Do(func() { first = true; close(s.entered) })
		if first {
			<-s.release
			return errors.New("injected permanent error")
		}
	}
	return s.BlobStore.PutIfAbsent(ctx, key, r, size)
}

// Regression (found by review): the same race, when the fenced writer's in-flight flush fails
// (Uploaded sets tail = nil): syncLocal slices a nil tail and panics with
// w.mu held.
func TestRegressionSyncLocalPanicsAfterFenceAndFailedFlush(t *testing.T) {
	ctx := context.Background()
	fs := &failingStore{BlobStore: newFileStore(t), entered: make(chan struct{}), release: make(chan struct{})}
	n := openTestNode(t, fs, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.Append(ctx, []Change{put(0, "a", "1")}, Buffered); err != nil {
		t.Fatal(err)
	}
	persisted := make(chan error, 1)
	go func() { _, err := w.Persist(ctx, 0); persisted <- err }()
	<-fs.entered // SQN 1 drained, its upload in flight
	w.walMu.Lock()
	res := make(chan any, 2)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				res <- fmt.Sprintf("panic: %v", r)
			}
		}()
		_, _, err := w.Append(ctx, []Change{put(0, "b", "2")}, Local)
		res <- err
	}()
	for w.LastSQN() < 2 {
		time.Sleep(time.Millisecond)
	}
	if _, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)}); err != nil {
		t.Fatal(err)
	}
	close(fs.release)
	t.Logf("persist: %v", <-persisted)
	w.walMu.Unlock()
	got := <-res
	t.Logf("Append(Local) of the fenced writer: %v", got)
	if s, ok := got.(string); ok {
		t.Errorf("%s; w.mu left locked: %v", s, !w.mu.TryLock())
	}
}

// Regression (found by review): another node's cached stream handle outlives DeleteStream; after the
// name is re-created, that node appends to the new journal at the old
// incarnation's position, and every other node then fails to read it.
func TestRegressionStaleStreamHandleAfterRecreate(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	if _, err := a.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	w.Append(ctx, []Change{put(0, "old", "1")}, Buffered)
	if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w2, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err == nil {
		t.Logf("node b opened epoch %d from checkpoint %d on the NEW stream", w2.Epoch(), w2.FromCheckpoint())
	} else {
		t.Logf("node b open: %v", err)
	}
	_, err = a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	t.Logf("node a open on the new stream: %v", err)
	if err != nil || (w2 != nil && w2.Epoch() != 1) {
		t.Errorf("stale stream handle on node b corrupted the re-created stream (b epoch %v), node a: %v", w2.Epoch(), err)
	}
}

// Regression (found by review): a recovered log that is never resumed (its epoch was fenced or
// closed) is never dropped: its segments stay GC roots and the local log
// keeps it forever.
func TestRegressionRecoveredLogNeverReleased(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	dir := t.TempDir()
	n, err := Open(ctx, testNodeOptions(store, dir))
	if err != nil {
		t.Fatal(err)
	}
	n.CreateStream(ctx, "s", 8)
	w, _ := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	w.Append(ctx, []Change{put(0, "a", "1")}, Local)
	if _, err := w.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	n.crash()
	n2 := openTestNode(t, store, dir)
	nw, err := n2.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)}) // fences epoch 1
	if err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 5; id++ {
		nw.Append(ctx, []Change{put(0, "a", fmt.Sprint(id))}, Buffered)
		if _, err := nw.Checkpoint(ctx, id, nil); err != nil {
			t.Fatal(err)
		}
	}
	n2.releaseRecovered(ctx) // what the background loop does every JournalRefresh
	st, _ := n2.CollectGarbage(ctx)
	t.Logf("gc: %+v; recovered logs still held: %d", st, len(n2.recovered))
	if len(n2.recovered) > 0 {
		t.Errorf("fenced epoch 1 is still a recovered log (GC root, never forgotten in the local log)")
	}
}

// flakyOnce fails the first Get and the first List with a transient error.
type flakyOnce struct {
	upload.BlobStore
	getFailed, listFailed atomic.Bool
}

func (f *flakyOnce) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	if f.getFailed.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("get %s: %w", key, upload.ErrTransient)
	}
	return f.BlobStore.Get(ctx, key)
}

func (f *flakyOnce) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	if f.listFailed.CompareAndSwap(false, true) {
		return upload.ListPage{}, fmt.Errorf("list %s: %w", prefix, upload.ErrTransient)
	}
	return f.BlobStore.List(ctx, prefix, startAfter, limit)
}

// Regression (found by a soak of the model test): CreateStream failed on a
// transient error of its existence read or leftover listing instead of
// retrying them like its put.
func TestRegressionCreateStreamRetriesItsChecks(t *testing.T) {
	store := &flakyOnce{BlobStore: newFileStore(t)}
	cfg := StreamConfig{Name: "s", KeyGroups: 4, Incarnation: "x"}
	if err := createStream(context.Background(), store, cfg); err != nil {
		t.Fatalf("create with one transient read and one transient listing: %v", err)
	}
	if !store.getFailed.Load() || !store.listFailed.Load() {
		t.Fatal("the faults were not injected; the test proves nothing")
	}
	if got, err := getStream(context.Background(), store, "s"); err != nil || got != cfg {
		t.Fatalf("stored definition %+v, %v", got, err)
	}
}
