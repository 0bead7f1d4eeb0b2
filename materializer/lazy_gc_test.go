package materializer_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/materializer"
)

// TestLazyRefsProtectFromGC: GC racing a lazy open and its hydration. A
// store lazily imports snapshot 1 and has hydrated nothing yet when the
// snapshot's record goes (a newer snapshot superseded it and the node's GC
// deleted it); two file collections ReleasedGrace apart then find its
// files unreferenced by any record. With the store's references they keep
// every file (RefHeld), reads and the hydration see the whole state, and
// once hydrated the references go and the next collections delete the
// files. Without references (the "no refs" run, which shows the test
// catches the race) the collections delete files the store still reads,
// and reading the state fails with ErrSnapshotFileGone.
func TestLazyRefsProtectFromGC(t *testing.T) {
	for _, refs := range []bool{true, false} {
		name := "refs"
		if !refs {
			name = "no refs"
		}
		t.Run(name, func(t *testing.T) {
			deleted, readErr, hydrateErr := lazyGCRace(t, refs)
			t.Logf("files deleted while the store read them: %d; read: %v; hydration: %v", deleted, readErr, hydrateErr)
			if refs {
				if deleted != 0 || readErr != nil || hydrateErr != nil {
					t.Fatalf("with references: %d files deleted, read %v, hydration %v", deleted, readErr, hydrateErr)
				}
				return
			}
			if deleted == 0 || !errors.Is(readErr, materializer.ErrSnapshotFileGone) {
				t.Fatalf("without references: %d files deleted, read %v: the test does not reproduce the race", deleted, readErr)
			}
		})
	}
}

func lazyGCRace(t *testing.T, refs bool) (deleted int, readErr, hydrateErr error) {
	e := newLeaseEnv(t)
	ctx := e.ctx
	m := e.materializer(e.node(e.blob), materializer.Config{ReleasedGrace: time.Millisecond, GCGrace: time.Millisecond, GCInterval: -1})
	res, err := m.MaterializeStream(ctx, "s", true)
	if err != nil || res.Snapshot == nil {
		t.Fatalf("materialize: %+v %v", res, err)
	}
	snap := *res.Snapshot
	want := scanAll(t, m, e, snap)

	s, err := materializer.Open(filepath.Join(e.dir, "lazy"), materializer.Options{Remote: e.blob, HydrateBandwidth: -1, RefOwner: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	materializer.PauseHydration(s)
	if !refs {
		materializer.DisableRefs(s)
	}
	all := keygroup.Range{Lo: 0, Hi: 3}
	if err := s.ImportSnapshot(ctx, e.blob, snap, []keygroup.Range{all}, materializer.ImportOptions{Lazy: true, SkipApplied: true}); err != nil {
		t.Fatal(err)
	}
	refKeys := e.keys(changelog.SnapshotRefPrefix("s", e.inc))
	if refs != (len(refKeys) == 1) {
		t.Fatalf("references on the blob store: %v (refs %v)", refKeys, refs)
	}
	// A collection sees the files referenced; the record goes; two more
	// collections ReleasedGrace apart see them unreferenced.
	if _, err := m.CollectFiles(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if err := e.blob.Delete(ctx, snap.Key()); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		time.Sleep(5 * time.Millisecond)
		st, err := m.CollectFiles(ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("CollectFiles: %+v", st)
		deleted += st.Deleted
		if refs && st.RefHeld != len(snap.Files) {
			t.Fatalf("%d files held by references, want all %d", st.RefHeld, len(snap.Files))
		}
	}
	got, readErr := scanStore(ctx, s, all)
	if readErr == nil && !equalEntries(got, want) {
		t.Fatalf("lazy store read %d entries, want %d", len(got), len(want))
	}
	materializer.ResumeHydration(s)
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	hydrateErr = s.WaitHydrated(hctx)
	if hydrateErr != nil {
		hydrateErr = fmt.Errorf("%w: %+v", hydrateErr, s.Hydration())
	}
	if refs && hydrateErr == nil {
		// Hydrated: the data is local, the references are gone, and the
		// files are garbage now.
		if got, err := scanStore(ctx, s, all); err != nil || !equalEntries(got, want) {
			t.Fatalf("after hydration: %d entries, %v", len(got), err)
		}
		if k := e.keys(changelog.SnapshotRefPrefix("s", e.inc)); len(k) != 0 {
			t.Fatalf("references left after hydration: %v", k)
		}
		n := 0
		for range 2 {
			time.Sleep(5 * time.Millisecond)
			st, err := m.CollectFiles(ctx, "s")
			if err != nil {
				t.Fatal(err)
			}
			n += st.Deleted
		}
		if n != len(snap.Files) {
			t.Fatalf("after hydration %d of %d files collected", n, len(snap.Files))
		}
	}
	return deleted, readErr, hydrateErr
}

// scanAll reads snapshot snap's state through an eager import.
func scanAll(t *testing.T, m *materializer.Materializer, e *leaseEnv, snap changelog.Snapshot) []materializer.Entry {
	t.Helper()
	s, err := materializer.Open(filepath.Join(e.dir, "eager"), materializer.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	all := keygroup.Range{Lo: 0, Hi: 3}
	if err := s.ImportSnapshot(e.ctx, e.blob, snap, []keygroup.Range{all}, materializer.ImportOptions{SkipApplied: true}); err != nil {
		t.Fatal(err)
	}
	got, err := scanStore(e.ctx, s, all)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2000 {
		t.Fatalf("snapshot holds %d keys, want 2000", len(got))
	}
	return got
}

func scanStore(ctx context.Context, s *materializer.Store, r keygroup.Range) ([]materializer.Entry, error) {
	var out []materializer.Entry
	for e, err := range s.Scan(ctx, "s", r, "st", materializer.ScanOptions{}) {
		if err != nil {
			return out, err
		}
		out = append(out, e)
	}
	return out, nil
}

func equalEntries(a, b []materializer.Entry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].KeyGroup != b[i].KeyGroup || string(a[i].Key) != string(b[i].Key) || string(a[i].Value) != string(b[i].Value) {
			return false
		}
	}
	return true
}

// TestCollectFilesHonoursStoreRefs: a live reference keeps the files it
// lists whatever the collector's graces; an expired one (a store that
// died: its ttl is in the key) protects nothing and is deleted.
func TestCollectFilesHonoursStoreRefs(t *testing.T) {
	e := newLeaseEnv(t)
	// An hour ahead: every object is old, every short ttl expired.
	clk := clock.NewFake(time.Now().Add(time.Hour))
	m := e.materializer(e.node(e.blob), materializer.Config{GCGrace: time.Millisecond, ReleasedGrace: time.Millisecond, Clock: clk})
	files, refs := changelog.SnapshotFilePrefix("s", e.inc), changelog.SnapshotRefPrefix("s", e.inc)
	held := files + "00000000000000000009-0a0b0c0d-000001.sst"
	dead := files + "00000000000000000009-0a0b0c0d-000002.sst"
	e.put(held)
	e.put(dead)
	body := func(f string) string {
		return fmt.Sprintf(`{"ttl_ms":1000,"created_at":"2026-01-01T00:00:00Z","files":[%q]}`, f)
	}
	liveRef := refs + "node1-aabbcc.0000000003.7200000"
	deadRef := refs + "node2-ddeeff.0000000001.1000"
	for k, b := range map[string]string{liveRef: body(held), deadRef: body(dead)} {
		if err := e.blob.PutIfAbsent(e.ctx, k, strings.NewReader(b), int64(len(b))); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		st, err := m.CollectFiles(e.ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("CollectFiles: %+v", st)
		clk.Advance(time.Second)
	}
	if !e.exists(held) || !e.exists(liveRef) {
		t.Fatal("a file of a live reference, or the reference, was deleted")
	}
	if e.exists(dead) || e.exists(deadRef) {
		t.Fatal("the expired reference or its file was kept")
	}
	// A live reference whose body is unreadable: nothing is deleted.
	bad := refs + "node3-010203.0000000001.7200000"
	if err := e.blob.PutIfAbsent(e.ctx, bad, strings.NewReader("{"), 1); err != nil {
		t.Fatal(err)
	}
	e.put(dead)
	if _, err := m.CollectFiles(e.ctx, "s"); !errors.Is(err, materializer.ErrCorrupt) {
		t.Fatalf("collection with a corrupt live reference: %v", err)
	}
	if !e.exists(dead) {
		t.Fatal("a file was deleted although a live reference could not be read")
	}
}

// TestLazyRefRenewed: a store renews its reference every RefLease/3 (a new
// object, the old one deleted) while files are pending.
func TestLazyRefRenewed(t *testing.T) {
	e := newLeaseEnv(t)
	m := e.materializer(e.node(e.blob), materializer.Config{GCInterval: -1})
	res, err := m.MaterializeStream(e.ctx, "s", true)
	if err != nil || res.Snapshot == nil {
		t.Fatalf("materialize: %+v %v", res, err)
	}
	s, err := materializer.Open(filepath.Join(e.dir, "lazy"), materializer.Options{Remote: e.blob, RefLease: time.Second, RefOwner: "n.1/x"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	materializer.PauseHydration(s)
	if err := s.ImportSnapshot(e.ctx, e.blob, *res.Snapshot, []keygroup.Range{{Lo: 0, Hi: 3}}, materializer.ImportOptions{Lazy: true, SkipApplied: true}); err != nil {
		t.Fatal(err)
	}
	prefix := changelog.SnapshotRefPrefix("s", e.inc)
	first := e.keys(prefix)
	if len(first) != 1 || !strings.HasPrefix(first[0], prefix+"n_1_x-") || !strings.HasSuffix(first[0], ".0000000001.1000") {
		t.Fatalf("references %v", first)
	}
	time.Sleep(1500 * time.Millisecond)
	now := e.keys(prefix)
	if len(now) != 1 || now[0] == first[0] {
		t.Fatalf("references after 1.5 s: %v (first %v): not renewed", now, first)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if k := e.keys(prefix); len(k) != 0 {
		t.Fatalf("references after Close: %v", k)
	}
}
