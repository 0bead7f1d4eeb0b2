package materializer_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
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
