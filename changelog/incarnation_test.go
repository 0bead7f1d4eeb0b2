package changelog

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// The bugs of model_repro_test.go that share one cause (a deleted and
// re-created stream numbers its epochs from 1 again, and keys and log ids
// did not tell the incarnations apart) are fixed by scoping every
// per-stream key (streams/<name>/<incarnation>/...) and every log id by the
// incarnation. What that scoping adds: late writes of a dead incarnation
// land in its own prefix, and garbage collection removes them.

// TestIncarnationGCCollectsLateWrites: objects a node with a stale view
// stores under a deleted incarnation's prefix after the name was created
// again (a part, a journal entry) are collected by garbage collection once
// older than GCGrace (invariant 5), and the live incarnation's objects are
// left alone.
func TestIncarnationGCCollectsLateWrites(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	dir := t.TempDir()
	opts := testNodeOptions(store, dir)
	opts.GCGrace = time.Hour
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	full := keygroup.Full(4)
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	dead := testNS(t, store, "s")
	if err := n.DeleteStream(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	live := testNS(t, store, "s")
	if live == dead {
		t.Fatal("the re-created stream has the deleted one's incarnation")
	}
	w := mustOpenWriter(t, n, "s", full)
	mustAppend(t, w, Buffered, put(1, "k", "new"))
	if res, err := w.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint 1: %+v %v", res, err)
	}
	late := []string{partKey(dead, 1, 1), partKey(dead, 0, 1), journalKey(dead, 3)}
	for _, k := range late {
		if err := store.PutIfAbsent(ctx, k, bytes.NewReader([]byte("late")), 4); err != nil {
			t.Fatal(err)
		}
	}
	exists := func(k string) bool {
		_, err := store.Stat(ctx, k)
		if err != nil && !errors.Is(err, upload.ErrNotFound) {
			t.Fatal(err)
		}
		return err == nil
	}
	// Younger than GCGrace: kept.
	if _, err := n.CollectGarbage(ctx); err != nil {
		t.Fatal(err)
	}
	for _, k := range late {
		if !exists(k) {
			t.Fatalf("%s collected before GCGrace", k)
		}
	}
	n.Close(ctx)
	n = openTestNode(t, store, dir) // GCGrace 1ns
	st, err := n.CollectGarbage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range late {
		if exists(k) {
			t.Fatalf("%s of the deleted incarnation leaked (gc %+v)", k, st)
		}
	}
	if st.DeadIncarnationObjects != len(late) {
		t.Fatalf("DeadIncarnationObjects = %d, want %d", st.DeadIncarnationObjects, len(late))
	}
	if left, err := store.List(ctx, streamPrefix(dead), "", 1); err != nil || len(left.Objects) != 0 {
		t.Fatalf("the deleted incarnation's prefix holds %v (%v)", left.Objects, err)
	}
	if got, want := restoreMap(t, n, "s", 1, full), map[string]string{"1/s/k": "new"}; !maps.Equal(got, want) {
		t.Fatalf("after the collection checkpoint 1 restores to %v, want %v", got, want)
	}
}
