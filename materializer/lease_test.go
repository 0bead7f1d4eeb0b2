package materializer_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// leaseEnv is a blob store, a writer node with stream "s" (4 key groups)
// holding checkpoint 1 of 2000 changes, and a way to open more nodes.
type leaseEnv struct {
	t     *testing.T
	ctx   context.Context
	dir   string
	blob  upload.BlobStore
	wn    *changelog.Node
	w     *changelog.Writer
	inc   string
	count int
}

func newLeaseEnv(t *testing.T) *leaseEnv {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	blob, err := file.Open(filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	e := &leaseEnv{t: t, ctx: ctx, dir: dir, blob: blob}
	e.wn = e.node(blob)
	cfg, err := e.wn.CreateStream(ctx, "s", 4)
	if err != nil {
		t.Fatal(err)
	}
	e.inc = cfg.Incarnation
	e.w, err = e.wn.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	var batch []changelog.Change
	for i := range 2000 {
		batch = append(batch, changelog.Change{KeyGroup: uint16(i % 4), State: "st", Op: changelog.OpPut, Key: fmt.Appendf(nil, "key%05d", i), Value: []byte(strings.Repeat("x", 80))})
	}
	if _, _, err := e.w.Append(ctx, batch, changelog.Buffered); err != nil {
		t.Fatal(err)
	}
	if res, err := e.w.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint 1: %+v %v", res, err)
	}
	return e
}

func (e *leaseEnv) node(store upload.BlobStore) *changelog.Node {
	e.t.Helper()
	e.count++
	o := changelog.Options{Store: store, DataDir: filepath.Join(e.dir, fmt.Sprintf("node%d", e.count)), GCInterval: -1, GCGrace: time.Nanosecond}
	o.Scheduler.BatchDelay = time.Millisecond
	o.Scheduler.Interval = -1
	n, err := changelog.Open(e.ctx, o)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { n.Close(context.Background()) })
	return n
}

func (e *leaseEnv) materializer(n *changelog.Node, cfg materializer.Config) *materializer.Materializer {
	e.t.Helper()
	cfg.Store.TargetFileSize = 4 << 10
	m, err := materializer.New(n, filepath.Join(e.dir, fmt.Sprintf("mat%d", e.count)), cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { m.Close() })
	return m
}

func (e *leaseEnv) put(key string) {
	e.t.Helper()
	if err := e.blob.PutIfAbsent(e.ctx, key, bytes.NewReader([]byte("x")), 1); err != nil {
		e.t.Fatal(err)
	}
}

func (e *leaseEnv) exists(key string) bool {
	e.t.Helper()
	_, err := e.blob.Stat(e.ctx, key)
	if errors.Is(err, upload.ErrNotFound) {
		return false
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return true
}

func (e *leaseEnv) keys(prefix string) []string {
	e.t.Helper()
	var out []string
	for o, err := range upload.Walk(e.ctx, e.blob, prefix, "") {
		if err != nil {
			e.t.Fatal(err)
		}
		out = append(out, o.Key)
	}
	return out
}

// R3(a): CollectFiles never deletes a file of a round with a live lease,
// whatever its age and the collector's own configuration (the lease's
// lifetime is in its key); an expired lease is deleted, and its round's
// files then get the full GCGrace from their first unreferenced sighting.
func TestCollectFilesHonoursRoundLease(t *testing.T) {
	e := newLeaseEnv(t)
	const grace = 200 * time.Millisecond
	m := e.materializer(e.node(e.blob), materializer.Config{GCGrace: grace, ReleasedGrace: grace})
	files, leases := changelog.SnapshotFilePrefix("s"), changelog.SnapshotLeasePrefix("s")
	leased := files + "00000000000000000009-0a0b0c0d-000001.sst"
	unleased := files + "00000000000000000009-cafef00d-000001.sst"
	e.put(leased)
	e.put(unleased)
	live := leases + "00000000000000000009-0a0b0c0d.0000000001.3600000"
	e.put(live)
	collect := func() materializer.FileGCStats {
		t.Helper()
		st, err := m.CollectFiles(e.ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("CollectFiles: %+v", st)
		return st
	}
	time.Sleep(grace + 50*time.Millisecond)
	collect()
	time.Sleep(grace + 50*time.Millisecond)
	if st := collect(); st.Leased != 1 || st.Deleted != 1 {
		t.Fatalf("collection with a live lease: %+v, want the leased file kept and the other deleted", st)
	}
	if !e.exists(leased) || e.exists(unleased) {
		t.Fatalf("leased file exists %v, unleased %v", e.exists(leased), e.exists(unleased))
	}
	// The round renews (a new lease with a 1 ms lifetime) and dies.
	expired := leases + "00000000000000000009-0a0b0c0d.0000000002.1"
	e.put(expired)
	if err := e.blob.Delete(e.ctx, live); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	if st := collect(); st.LeasesDeleted != 1 || st.Deleted != 0 || st.Young != 1 {
		t.Fatalf("collection after the lease expired: %+v, want the lease deleted and the file young", st)
	}
	if e.exists(expired) || !e.exists(leased) {
		t.Fatal("expired lease kept, or the file deleted at its first unreferenced sighting")
	}
	time.Sleep(grace + 50*time.Millisecond)
	if st := collect(); st.Deleted != 1 || e.exists(leased) {
		t.Fatalf("collection GCGrace after the lease ended: %+v, want the file deleted", st)
	}
}

// slowSecondSST delays the second snapshot-file upload; leases (keys under
// sst-leases/) after the first fail while failLeases is set, unstored.
type slowSecondSST struct {
	upload.BlobStore
	delay      time.Duration
	failLeases bool
	mu         sync.Mutex
	ssts       int
	leases     int
	leaseFails atomic.Int64
}

func (s *slowSecondSST) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	s.mu.Lock()
	var n, l int
	switch {
	case strings.Contains(key, "/sst/"):
		s.ssts++
		n = s.ssts
	case strings.Contains(key, "/sst-leases/"):
		s.leases++
		l = s.leases
	}
	s.mu.Unlock()
	if l > 1 && s.failLeases {
		s.leaseFails.Add(1)
		return fmt.Errorf("put %s: injected: %w", key, upload.ErrTransient)
	}
	if n == 2 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return s.BlobStore.PutIfAbsent(ctx, key, r, size)
}

// R3(a, b): a round that outlasts its lease's lifetime keeps its files
// protected by renewing the lease, and publishes; its leases are gone
// afterwards. A round that cannot renew its lease does not publish once
// the protection may have ended.
func TestRoundLeaseRenewedOrRoundRefused(t *testing.T) {
	t.Run("renewed", func(t *testing.T) {
		e := newLeaseEnv(t)
		slow := &slowSecondSST{BlobStore: e.blob, delay: 2 * time.Second}
		a := e.materializer(e.node(slow), materializer.Config{RoundLease: time.Second, GCGrace: 100 * time.Millisecond, ReleasedGrace: 100 * time.Millisecond})
		b := e.materializer(e.node(e.blob), materializer.Config{GCGrace: 100 * time.Millisecond, ReleasedGrace: 100 * time.Millisecond})
		done := make(chan error, 1)
		var res materializer.SnapshotResult
		go func() {
			var err error
			res, err = a.MaterializeStream(e.ctx, "s", true)
			done <- err
		}()
		// B collects every 300 ms while A's round runs, well past A's
		// first lease's lifetime.
		for range 6 {
			time.Sleep(300 * time.Millisecond)
			st, err := b.CollectFiles(e.ctx, "s")
			if err != nil {
				t.Fatal(err)
			}
			if st.Deleted != 0 {
				t.Fatalf("B deleted %d files of A's round in flight: %+v", st.Deleted, st)
			}
		}
		if err := <-done; err != nil {
			t.Fatalf("A's round: %v", err)
		}
		if res.Snapshot == nil || res.Files < 2 {
			t.Fatalf("A published %+v", res)
		}
		if slow.leases < 3 {
			t.Fatalf("%d leases written during a round of over 2 s with a 1 s lease, want renewals", slow.leases)
		}
		for _, f := range res.Snapshot.Files {
			if !e.exists(f.Key) {
				t.Fatalf("published file %s is gone", f.Key)
			}
		}
		if left := e.keys(changelog.SnapshotLeasePrefix("s")); len(left) != 0 {
			t.Fatalf("leases left after the round: %v", left)
		}
		if got := restoreOnEmptyStore(t, e.ctx, e.wn, "s", 1, keygroup.Range{Lo: 0, Hi: 3}); len(got) != 2000 {
			t.Fatalf("restore of checkpoint 1: %d keys, want 2000", len(got))
		}
	})
	t.Run("lapsed", func(t *testing.T) {
		e := newLeaseEnv(t)
		slow := &slowSecondSST{BlobStore: e.blob, delay: 1500 * time.Millisecond, failLeases: true}
		a := e.materializer(e.node(slow), materializer.Config{RoundLease: time.Second})
		res, err := a.MaterializeStream(e.ctx, "s", true)
		if !errors.Is(err, materializer.ErrLeaseLapsed) || res.Snapshot != nil {
			t.Fatalf("round whose lease lapsed: %+v, %v; want ErrLeaseLapsed and nothing published", res, err)
		}
		if slow.leaseFails.Load() == 0 {
			t.Fatal("no lease renewal was attempted")
		}
		if snaps, err := e.wn.Snapshots(e.ctx, "s"); err != nil || len(snaps) != 0 {
			t.Fatalf("snapshots after a lapsed round: %v %v", snaps, err)
		}
		if keys := e.keys(changelog.SnapshotFilePrefix("s")); len(keys) < 2 {
			t.Fatalf("the round uploaded %d files; the test needs a long round", len(keys))
		}
	})
}

// R5 (materializer import) and the record's file list: ImportSnapshot
// refuses a record of another incarnation than the one restored, and one
// of none; DecodeManifest refuses a record whose file list is not the
// manifest's (the changelog checks the list, so it must be complete).
func TestImportRefusesForeignSnapshot(t *testing.T) {
	e := newLeaseEnv(t)
	m := e.materializer(e.node(e.blob), materializer.Config{})
	res, err := m.MaterializeStream(e.ctx, "s", true)
	if err != nil || res.Snapshot == nil {
		t.Fatalf("materialize: %+v %v", res, err)
	}
	snap := *res.Snapshot
	if snap.Incarnation != e.inc {
		t.Fatalf("published incarnation %q, stream is %q", snap.Incarnation, e.inc)
	}
	all := []keygroup.Range{{Lo: 0, Hi: 3}}
	importInto := func(s changelog.Snapshot, inc string) error {
		st, err := materializer.Open(t.TempDir(), materializer.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		return st.ImportSnapshot(e.ctx, e.blob, s, all, materializer.ImportOptions{SkipApplied: true, Incarnation: inc})
	}
	if err := importInto(snap, "another-incarnation"); !errors.Is(err, changelog.ErrForeignSnapshot) {
		t.Fatalf("import into another incarnation: %v, want ErrForeignSnapshot", err)
	}
	legacy := snap
	legacy.Incarnation = ""
	if err := importInto(legacy, ""); !errors.Is(err, changelog.ErrForeignSnapshot) {
		t.Fatalf("import of a record without an incarnation: %v, want ErrForeignSnapshot", err)
	}
	if err := importInto(snap, e.inc); err != nil {
		t.Fatalf("import of the stream's own snapshot: %v", err)
	}
	short := snap
	short.Files = snap.Files[1:]
	if _, err := materializer.DecodeManifest(short); !errors.Is(err, materializer.ErrCorrupt) {
		t.Fatalf("record listing fewer files than its manifest: %v, want ErrCorrupt", err)
	}
	resized := snap
	resized.Files = append([]changelog.SnapshotFileRef(nil), snap.Files...)
	resized.Files[0].Size++
	if _, err := materializer.DecodeManifest(resized); !errors.Is(err, materializer.ErrCorrupt) {
		t.Fatalf("record listing a file with another size: %v, want ErrCorrupt", err)
	}
}
