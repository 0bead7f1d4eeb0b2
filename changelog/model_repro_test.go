package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// Minimal reproductions of the bugs TestModelRandomized found that issue 9
// does not list. Each asserts the correct behaviour and fails on the code it
// was found on. They share one cause: a stream deleted and created again
// numbers its epochs from 1 again, and log ids ("<stream>/<epoch>"), part
// keys (checkpoints/<id>/<epoch>, final/<epoch>) and a node's view of its
// writers do not tell the incarnations apart.

func mustOpenWriter(t *testing.T, n *Node, stream string, r keygroup.Range) *Writer {
	t.Helper()
	w, err := n.OpenWriter(context.Background(), WriterConfig{Stream: stream, KeyGroups: r})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func mustAppend(t *testing.T, w *Writer, d Durability, cs ...Change) {
	t.Helper()
	if _, _, err := w.Append(context.Background(), cs, d); err != nil {
		t.Fatal(err)
	}
}

// TestModelReproRecoveryAdoptsDeletedIncarnationsSegments (model seeds 5, 7
// with DSTL_MODEL_SKIP="bad checkpoint id"): after a delete and re-create,
// the new stream's first epoch has the log id of the old one's ("s/1").
// Crash recovery (recover.go, scanSegments by log id) then attributes the
// old incarnation's segments, still on the blob store, to the new log: the
// new log's change acknowledged Local, SQN 1, is dropped as "already
// uploaded", and the old incarnation's change takes its place in replays
// and checkpoints (invariants 1 and 4).
func TestModelReproRecoveryAdoptsDeletedIncarnationsSegments(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	dir := t.TempDir()
	n, err := Open(ctx, testNodeOptions(store, dir))
	if err != nil {
		t.Fatal(err)
	}
	full := keygroup.Full(4)
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	old := mustOpenWriter(t, n, "s", full)
	mustAppend(t, old, Buffered, put(0, "k", "old"))
	if _, err := old.Persist(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w := mustOpenWriter(t, n, "s", full)
	mustAppend(t, w, Local, put(1, "k", "new"))
	epoch := w.Epoch()
	n.crash()

	n, err = Open(ctx, testNodeOptions(store, dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	w, err = n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: full, Resume: epoch})
	if err != nil {
		t.Fatal(err)
	}
	got, err := collect(w.Replay(ctx, 0, 0, full))
	if err != nil {
		t.Fatal(err)
	}
	state := map[string]string{}
	for _, c := range got {
		applyChange(state, c)
	}
	if want := map[string]string{"1/s/k": "new"}; !maps.Equal(state, want) {
		t.Fatalf("after a restart, log %s replays %v, want %v: the deleted incarnation's segments were taken for the new log's", w.LogID(), state, want)
	}
}

// TestModelReproStalePartLandsInNewIncarnation (model seed 3, step 10, and
// seed 5, step 93, for a final part): a writer on another node that has not
// noticed the delete and re-create still records its part at
// checkpoints/<id>/<epoch> in the new stream's prefix before its journal
// append fails (Checkpoint: recordPart before tryComplete; Close: the final
// part before the journal entry). The new incarnation's writer of the same
// epoch number then finds the key taken: with a different SQN its every
// checkpoint of that id fails with ErrCheckpointConflict; with the same SQN
// writePart accepts the old part as its own and the checkpoint restores the
// deleted stream's data.
func TestModelReproStalePartLandsInNewIncarnation(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	observer := openTestNode(t, store, t.TempDir())
	full := keygroup.Full(4)
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	old := mustOpenWriter(t, a, "s", full)
	mustAppend(t, old, Buffered, put(0, "k", "old"))
	// Deleted and created again from another node, under the writer's feet.
	if err := b.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Checkpoint(ctx, 1, nil); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("checkpoint of the deleted incarnation's writer = %v, want ErrStreamNotFound", err)
	}
	w := mustOpenWriter(t, b, "s", full)
	if w.Epoch() != old.Epoch() {
		t.Fatalf("epochs %d and %d: the reproduction needs equal epoch numbers", w.Epoch(), old.Epoch())
	}
	mustAppend(t, w, Buffered, put(1, "k", "new"))
	res, err := w.Checkpoint(ctx, 1, nil)
	if err != nil {
		t.Fatalf("checkpoint 1 of the new incarnation: %v", err)
	}
	if !res.Complete {
		t.Fatal("checkpoint 1 of the new incarnation did not complete")
	}
	if got, want := restoreMap(t, observer, "s", 1, full), map[string]string{"1/s/k": "new"}; !maps.Equal(got, want) {
		t.Fatalf("checkpoint 1 of the new incarnation restores to %v, want %v: the deleted incarnation's part was taken for the new one's", got, want)
	}
}

// TestModelReproDeletedIncarnationsWriterBlocksCheckpoints (model seeds 1,
// 4, 6, 8, 10): a writer of the deleted incarnation whose epoch number is
// above the new incarnation's writers' stays registered on its node (its Checkpoint and Close fail with ErrStreamNotFound but nothing
// detaches it), and lastLocalPart (checkpoint.go) counts every live writer
// of the stream's name on the node, so the new incarnation's writer on that
// node never tries to complete a checkpoint: every checkpoint of the new
// stream stays incomplete while every writer reports success.
func TestModelReproDeletedIncarnationsWriterBlocksCheckpoints(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	full := keygroup.Full(4)
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	// The old writer has epoch 3, above the new incarnation's epochs (a
	// new writer of a lower epoch does not fence it locally).
	var old *Writer
	for range 3 {
		old = mustOpenWriter(t, a, "s", full)
	}
	mustAppend(t, old, Buffered, put(0, "k", "old"))
	if err := b.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	// What a client does when its writer's stream is gone.
	if err := old.Close(ctx); err != nil && !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("close of the deleted incarnation's writer: %v", err)
	}
	// The new incarnation: epoch 1 on b, epoch 2 on a (epoch 1 on a is
	// the old writer's number; b's part comes first, a's completes).
	wb := mustOpenWriter(t, b, "s", keygroup.Range{Lo: 0, Hi: 1})
	wa := mustOpenWriter(t, a, "s", keygroup.Range{Lo: 2, Hi: 3})
	mustAppend(t, wa, Buffered, put(2, "k", "new"))
	if _, err := wb.Checkpoint(ctx, 5, nil); err != nil {
		t.Fatal(err)
	}
	res, err := wa.Checkpoint(ctx, 5, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Complete {
		t.Fatal("checkpoint 5 of the new incarnation: both writers recorded their parts, but it is not complete: the deleted incarnation's writer still counts as a live writer of node a")
	}
}

// TestModelReproStaleJournalBlocksOpen (model seed 50, step 13): a node
// whose cached journal of a stream is older than a delete and re-create
// elsewhere, and shorter than the new journal, can never open a writer of
// the new stream: journal.refresh reads the new incarnation's next entry,
// apply refuses it ("belongs to another incarnation": ErrStreamNotFound),
// but nothing marks the cached journal gone (journal.append returns on the
// refresh error before checkCatalog), so OpenWriter's one retry on
// ErrStreamNotFound takes the same stale handle and fails again, forever.
func TestModelReproStaleJournalBlocksOpen(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	a := openTestNode(t, store, t.TempDir())
	b := openTestNode(t, store, t.TempDir())
	full := keygroup.Full(4)
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	old := mustOpenWriter(t, a, "s", full) // a reads the journal: seq 1
	if err := old.Close(ctx); err != nil { // seq 2
		t.Fatal(err)
	}
	if err := b.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	for lo := uint16(0); lo < 3; lo++ { // the new journal: seq 1..3
		mustOpenWriter(t, b, "s", keygroup.Range{Lo: lo, Hi: lo})
	}
	for attempt := range 3 {
		if _, err := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 3, Hi: 3}}); err != nil {
			if attempt == 2 {
				t.Fatalf("node a cannot open a writer of the re-created stream (3 attempts): %v", err)
			}
			continue
		}
		return
	}
}

// lateCatalogStore fails the first put of the stream definition with a
// deadline error and stores it just before the next put of that key: the
// PUT a client timed out on that the server carried out a moment later.
type lateCatalogStore struct {
	upload.BlobStore
	pending []byte
	done    bool
}

func (s *lateCatalogStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	if key != catalogKey("s") {
		return s.BlobStore.PutIfAbsent(ctx, key, r, size)
	}
	if !s.done && s.pending == nil {
		data, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		s.pending = data
		return fmt.Errorf("put %s: %w: %w", key, context.DeadlineExceeded, upload.ErrTransient)
	}
	if s.pending != nil && !s.done {
		s.done = true
		if err := s.BlobStore.PutIfAbsent(ctx, key, bytes.NewReader(s.pending), int64(len(s.pending))); err != nil {
			return err
		}
	}
	return s.BlobStore.PutIfAbsent(ctx, key, r, size)
}

// TestModelReproCreateStreamLateWrite (model seed 32, setup): CreateStream
// retries a put of the definition that failed with a deadline error; when
// that put lands between the retry's existence check and its own put, the
// retry's PutIfAbsent finds the key taken and tryCreateStream (catalog.go)
// reports ErrStreamExists ("a racing creator won") without reading the
// definition back: the caller is told its stream exists already when it
// created it (a lost acknowledgement it could resolve by comparing the
// stored definition, as the existence check does).
func TestModelReproCreateStreamLateWrite(t *testing.T) {
	ctx := context.Background()
	store := &lateCatalogStore{BlobStore: newFileStore(t)}
	n := openTestNode(t, store, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatalf("CreateStream whose first put landed late: %v, want success", err)
	}
}
