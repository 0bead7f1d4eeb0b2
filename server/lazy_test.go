package server

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload/file"
)

// A read of a lazily imported snapshot file that failed after retries is
// UNAVAILABLE (retry later), never data and never INTERNAL.
func TestLazyReadUnavailable(t *testing.T) {
	err := fmt.Errorf("get s/1/st: snapshot file f: 4 attempts: %w: %w", materializer.ErrUnavailable, fmt.Errorf("boom"))
	if code := connect.CodeOf(toConnect(err)); code != connect.CodeUnavailable {
		t.Fatalf("code %v, want unavailable", code)
	}
}

// TestPebbleStateLazyBase: the read store imports a checkpoint's snapshot
// lazily (by reference, hydrated in the background) and serves the
// checkpoint's state from it, before and after hydration.
func TestPebbleStateLazyBase(t *testing.T) {
	ctx := context.Background()
	ps := snapshottedPebbleState(t, 500, func(i int) string { return "st" })
	check := func(what string) {
		t.Helper()
		for i := 0; i < 500; i += 7 {
			v, ok, err := ps.Get(ctx, "s", uint16(i%4), "st", fmt.Appendf(nil, "k%04d", i))
			if err != nil || !ok || string(v) != fmt.Sprintf("v%d", i) {
				t.Fatalf("%s: key %d = %q %v %v", what, i, v, ok, err)
			}
		}
	}
	check("before hydration")
	h := ps.store.Hydration()
	if len(h) != 1 || h[0].TotalFiles == 0 {
		t.Fatalf("the base was not imported lazily: %+v", h)
	}
	hctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := ps.store.WaitHydrated(hctx); err != nil {
		t.Fatal(err)
	}
	check("after hydration")
}

// TestPebbleStateFoldsOnlyWhatItReads: a read of some key groups without a
// writer imports the checkpoint into those key groups only, not into the
// whole stream (after a rescale, a node owning a third of the key groups
// would otherwise import and hydrate every other node's state); the
// imported ranges' state names are learnt by the first scan of every
// state, which then sees them all.
func TestPebbleStateFoldsOnlyWhatItReads(t *testing.T) {
	ctx := context.Background()
	ps := snapshottedPebbleState(t, 400, func(i int) string { return fmt.Sprintf("st%d", i%4) })

	if v, ok, err := ps.Get(ctx, "s", 1, "st1", []byte("k0001")); err != nil || !ok || string(v) != "v1" {
		t.Fatalf("get: %q %v %v", v, ok, err)
	}
	// The store itself (no refresh): key group 1 only.
	for i := range 4 {
		_, ok, err := ps.store.Get("s", uint16(i%4), fmt.Sprintf("st%d", i%4), fmt.Appendf(nil, "k%04d", i))
		if err != nil || ok != (i == 1) {
			t.Fatalf("key group %d after a read of key group 1: present %v, %v", i, ok, err)
		}
	}
	entries, more, err := ps.Scan(ctx, ScanQuery{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}, Limit: 1000})
	if err != nil || more || len(entries) != 400 {
		t.Fatalf("scan of every state: %d entries, more %v, %v", len(entries), more, err)
	}
	for _, e := range entries {
		if want := fmt.Sprintf("st%d", e.KeyGroup); e.State != want {
			t.Fatalf("entry %+v: state %s, want %s", e, e.State, want)
		}
	}
}

// snapshottedPebbleState writes n puts (key k%04d = v%d in key group i%4,
// state stateOf(i)) to a 4-key-group stream "s", completes checkpoint 1,
// snapshots it, and opens a read store on the node: it imports the
// snapshot lazily when a read needs it. Everything closes with the test.
func snapshottedPebbleState(t *testing.T, n int, stateOf func(i int) string) *PebbleState {
	t.Helper()
	ctx := context.Background()
	dirs := newPebbleDirs(t)
	store, err := file.Open(dirs.blob)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	nodeOpts := changelog.Options{Store: store, DataDir: dirs.data, GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close(ctx) })
	if _, err := node.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	var batch []changelog.Change
	for i := range n {
		batch = append(batch, changelog.Change{KeyGroup: uint16(i % 4), State: stateOf(i), Op: changelog.OpPut, Key: fmt.Appendf(nil, "k%04d", i), Value: fmt.Appendf(nil, "v%d", i)})
	}
	if _, _, err := w.Append(ctx, batch, changelog.Buffered); err != nil {
		t.Fatal(err)
	}
	if res, err := w.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint: %+v %v", res, err)
	}
	m, err := materializer.New(node, filepath.Join(dirs.data, "mat"), materializer.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if res, err := m.MaterializeStream(ctx, "s", true); err != nil || res.Snapshot == nil {
		t.Fatalf("materialize: %+v %v", res, err)
	}
	ps, err := OpenPebbleState(node, dirs.state, PebbleStateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ps.Close() })
	return ps
}
