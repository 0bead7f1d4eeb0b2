package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// recordingStore remembers every journal entry ever created, so a test can
// fold all of them after compaction deleted some, and fails the test if a
// journal key is ever created twice (a position won twice). before, if
// set, runs before each put.
type recordingStore struct {
	upload.BlobStore
	mu      sync.Mutex
	entries map[string][]byte
	twice   []string
	before  func(key string)
	// stateFault, if set, decides the outcome of compacted-state puts and
	// lists: "lost-ack" (the put lands, an error is returned), "fail" (a
	// transient error, nothing happens) or "" (normal).
	stateFault func(op string) string
}

func newRecordingStore(inner upload.BlobStore) *recordingStore {
	return &recordingStore{BlobStore: inner, entries: map[string][]byte{}}
}

var errTestTransient = fmt.Errorf("test fault: %w", upload.ErrTransient)

func (s *recordingStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	s.mu.Lock()
	before, fault := s.before, s.stateFault
	s.mu.Unlock()
	if before != nil {
		before(key)
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if fault != nil && strings.Contains(key, "/journal-state/") {
		switch fault("put") {
		case "fail":
			return errTestTransient
		case "lost-ack":
			if err := s.BlobStore.PutIfAbsent(ctx, key, bytes.NewReader(data), size); err != nil {
				return err
			}
			return errTestTransient
		}
	}
	err = s.BlobStore.PutIfAbsent(ctx, key, bytes.NewReader(data), size)
	if err == nil && strings.Contains(key, "/journal/") {
		s.mu.Lock()
		if _, ok := s.entries[key]; ok {
			s.twice = append(s.twice, key)
		}
		s.entries[key] = data
		s.mu.Unlock()
	}
	return err
}

func (s *recordingStore) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	s.mu.Lock()
	fault := s.stateFault
	s.mu.Unlock()
	if fault != nil && strings.HasSuffix(prefix, "/journal-state/") && fault("list") == "fail" {
		return upload.ListPage{}, errTestTransient
	}
	return s.BlobStore.List(ctx, prefix, startAfter, limit)
}

// fullFold folds every entry the store ever created, in order: the state a
// node that read every entry would have.
func (s *recordingStore) fullFold(t *testing.T, cfg StreamConfig) journalState {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.twice) > 0 {
		t.Fatalf("journal positions created twice: %v", s.twice)
	}
	keys := make([]string, 0, len(s.entries))
	for k := range s.entries {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	st := newJournalState(cfg.KeyGroups)
	st.incarnation = cfg.Incarnation
	for _, k := range keys {
		var e JournalEntry
		if err := envelope.Open(k, s.entries[k], journalEntryKind, &e); err != nil {
			t.Fatal(err)
		}
		if err := st.apply(e); err != nil {
			t.Fatalf("full fold: %v", err)
		}
	}
	return st
}

// sameFold fails unless a and b are the same state (compared in their
// stored form, which is canonical).
func sameFold(t *testing.T, what string, a, b journalState) {
	t.Helper()
	da, err := encodeJournalState("s", &a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := encodeJournalState("s", &b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(da, db) {
		t.Fatalf("%s: folds differ\n got  %s\n want %s", what, da, db)
	}
}

func compactJournalOf(store upload.BlobStore, cfg StreamConfig, node string, every int, grace time.Duration) *journal {
	return testJournal(store, cfg, node).withCompaction(every, grace)
}

// randomStep appends one random entry that follows from the state: an
// epoch open, a close, a checkpoint completion or a forget.
func randomStep(ctx context.Context, j *journal, rng *rand.Rand, node string, mu *sync.Mutex) error {
	mu.Lock()
	op, lo, width := rng.IntN(10), uint16(rng.IntN(8)), uint16(rng.IntN(3))
	mu.Unlock()
	_, err := j.append(ctx, func(s *journalState) (JournalEntry, error) {
		switch {
		case op < 2 || len(s.live) == 0:
			r := keygroup.Range{Lo: lo, Hi: min(lo+width, 7)}
			return JournalEntry{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: r, Node: node, FromCheckpoint: s.lastCheckpoint()}}, nil
		case op < 4:
			for _, ep := range s.live {
				if !ep.Closed {
					return JournalEntry{Kind: EntryEpochClose, Close: &EpochClose{Epoch: ep.Epoch, FinalPart: PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: s.lastCheckpoint(), Key: fmt.Sprintf("final/%d", ep.Epoch)}}}, nil
				}
			}
			return JournalEntry{}, errNothingToAppend
		case op < 9:
			if len(s.orphaned()) > 0 {
				// Reopen the orphaned key groups instead.
				r := s.orphaned()[0]
				return JournalEntry{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: r, Node: node, FromCheckpoint: s.lastCheckpoint()}}, nil
			}
			id := s.lastCheckpoint() + 1
			var parts []PartRef
			for _, ep := range s.live {
				parts = append(parts, PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: id, Key: fmt.Sprintf("p/%d/%d", id, ep.Epoch)})
			}
			return JournalEntry{Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: id, Parts: parts}}, nil
		default:
			ids := forgettable(s, 2, nil, math.MaxInt64)
			if len(ids) == 0 {
				return JournalEntry{}, errNothingToAppend
			}
			return JournalEntry{Kind: EntryCheckpointsForget, Forget: &CheckpointsForget{IDs: ids, FencedBelow: s.seq}}, nil
		}
	})
	return err
}

// TestJournalCompactionModel: two nodes append concurrently across many
// compaction boundaries while a third compacts and deletes old entries; a
// node opening from scratch (a compacted state and the entries after it)
// and both appenders agree with the fold of every entry ever written, and
// no position is ever won twice.
func TestJournalCompactionModel(t *testing.T) {
	for seed := uint64(1); seed <= 8; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			ctx := context.Background()
			store := newRecordingStore(newFileStore(t))
			cfg := StreamConfig{Name: "s", KeyGroups: 8, Incarnation: "test"}
			// The test assumes appends far inside the grace (no withdrawal,
			// no unknown outcome): 20 ms failed once in CI on a loaded
			// machine with a 135 ms put; 100 ms keeps deletions happening
			// during the run.
			const every, grace = 5, 100 * time.Millisecond
			a := compactJournalOf(store, cfg, "a", every, grace)
			b := compactJournalOf(store, cfg, "b", every, grace)
			gc := compactJournalOf(store, cfg, "gc", every, grace)
			rng := rand.New(rand.NewPCG(seed, 7))
			var rngMu sync.Mutex
			var wg sync.WaitGroup
			errs := make(chan error, 3)
			stop := make(chan struct{})
			for _, w := range []struct {
				j    *journal
				node string
			}{{a, "a"}, {b, "b"}} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range 60 {
						if err := randomStep(ctx, w.j, rng, w.node, &rngMu); err != nil {
							errs <- fmt.Errorf("node %s: %w", w.node, err)
							return
						}
					}
				}()
			}
			gcDone := make(chan struct{})
			go func() {
				defer close(gcDone)
				for {
					select {
					case <-stop:
						return
					case <-time.After(3 * time.Millisecond):
					}
					if err := gc.refresh(ctx); err != nil {
						errs <- fmt.Errorf("gc refresh: %w", err)
						return
					}
					states, err := gc.listStates(ctx, "")
					if err != nil {
						errs <- err
						return
					}
					if err := gc.deleteCompacted(ctx, states, time.Now(), grace); err != nil {
						errs <- err
						return
					}
				}
			}()
			wg.Wait()
			close(stop)
			<-gcDone
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			want := store.fullFold(t, cfg)
			// Everything old enough is collectable now: delete, then open.
			time.Sleep(grace)
			states, err := gc.listStates(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			if err := gc.deleteCompacted(ctx, states, time.Now(), grace); err != nil {
				t.Fatal(err)
			}
			fresh := compactJournalOf(store, cfg, "c", every, grace)
			if err := fresh.refresh(ctx); err != nil {
				t.Fatal(err)
			}
			sameFold(t, "fresh node", fresh.snapshot(), want)
			for _, j := range []*journal{a, b, gc} {
				if err := j.refresh(ctx); err != nil {
					t.Fatal(err)
				}
				sameFold(t, "appender", j.snapshot(), want)
			}
			written := a.stats.StatesWritten.Load() + b.stats.StatesWritten.Load()
			if written == 0 || gc.stats.EntriesDeleted.Load() == 0 {
				t.Fatalf("states written %d, entries deleted %d: compaction did not run", written, gc.stats.EntriesDeleted.Load())
			}
			if got := fresh.stats.EntriesRead.Load(); got > 2*every {
				t.Fatalf("fresh node read %d entries of %d, want at most %d", got, want.seq, 2*every)
			}
			if w := a.stats.Withdrawn.Load() + b.stats.Withdrawn.Load(); w != 0 {
				t.Fatalf("%d entries withdrawn with appends far inside the grace", w)
			}
		})
	}
}

// TestJournalStaleAppendWithdrawn: an append whose position was taken,
// compacted and deleted between its journal read and its put (a put
// slower than the grace) re-creates the deleted key; it notices, withdraws
// the entry and appends at the real head.
func TestJournalStaleAppendWithdrawn(t *testing.T) {
	ctx := context.Background()
	store := newRecordingStore(newFileStore(t))
	cfg := StreamConfig{Name: "s", KeyGroups: 4, Incarnation: "test"}
	// The slow node's clock jumps by more than a quarter of its grace
	// during its put: it verifies its position.
	slow := compactJournalOf(store, cfg, "slow", 4, time.Minute)
	var skew atomic.Int64
	slow.now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	fast := compactJournalOf(store, cfg, "fast", 4, time.Hour)
	if _, err := slow.append(ctx, proposeOpen(keygroup.Range{Lo: 0, Hi: 3}, "slow")); err != nil {
		t.Fatal(err)
	}
	var armed atomic.Bool
	armed.Store(true)
	store.before = func(key string) {
		if key != journalKey(cfg.ns(), 2) || !armed.CompareAndSwap(true, false) {
			return
		}
		skew.Store(int64(20 * time.Second))
		func() {
			// Meanwhile: 8 entries, states at 4 and 8, entries <= 4 gone.
			for id := uint64(1); id <= 8; id++ {
				if _, err := fast.append(ctx, proposeComplete(1, id)); err != nil {
					t.Error(err)
				}
			}
			states, err := fast.listStates(ctx, "")
			if err != nil {
				t.Error(err)
			}
			if err := fast.deleteCompacted(ctx, states, time.Now(), 0); err != nil {
				t.Error(err)
			}
		}()
	}
	e, err := slow.append(ctx, proposeComplete(1, 100))
	if err != nil {
		t.Fatal(err)
	}
	if e.Seq != 10 || slow.stats.Withdrawn.Load() != 1 {
		t.Fatalf("slow append landed at %d with %d withdrawn, want 10 and 1", e.Seq, slow.stats.Withdrawn.Load())
	}
	if _, err := store.Stat(ctx, journalKey(cfg.ns(), 2)); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("stale entry 2 still stored: %v", err)
	}
	fresh := compactJournalOf(store, cfg, "c", 4, time.Hour)
	if err := fresh.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	sameFold(t, "fresh node", fresh.snapshot(), slow.snapshot())
	if fs := fresh.snapshot(); fs.lastCheckpoint() != 100 {
		last := fs.lastCheckpoint()
		t.Fatalf("newest checkpoint %d, want 100", last)
	}
}

// TestJournalStateWriteFaults: a compacted-state write whose ack is lost
// landed (readers use it, a retry finds it written), a failed one leaves
// nothing and does not fail the append, and a failing list of states fails
// a from-scratch read cleanly: after the fault, the read agrees.
func TestJournalStateWriteFaults(t *testing.T) {
	ctx := context.Background()
	store := newRecordingStore(newFileStore(t))
	cfg := StreamConfig{Name: "s", KeyGroups: 4, Incarnation: "test"}
	j := compactJournalOf(store, cfg, "a", 4, time.Hour)
	if _, err := j.append(ctx, proposeOpen(keygroup.Range{Lo: 0, Hi: 3}, "a")); err != nil {
		t.Fatal(err)
	}
	var mode string
	store.stateFault = func(op string) string {
		if op == "put" {
			return mode
		}
		if op == "list" && mode == "fail-list" {
			return "fail"
		}
		return ""
	}
	mode = "lost-ack"
	for id := uint64(1); id <= 3; id++ { // entries 2..4: state 4's ack is lost
		if _, err := j.append(ctx, proposeComplete(1, id)); err != nil {
			t.Fatalf("append with a lost state ack: %v", err)
		}
	}
	if err := j.stateErr(); !upload.IsTransient(err) {
		t.Fatalf("state error %v, want the lost ack kept", err)
	}
	if _, err := store.Stat(ctx, journalStateKey(cfg.ns(), 4)); err != nil {
		t.Fatalf("state 4 after a lost ack: %v", err)
	}
	st := j.snapshot()
	if err := j.writeState(ctx, &st); err != nil {
		t.Fatalf("retrying a state that landed: %v", err)
	}
	mode = "fail"
	for id := uint64(4); id <= 7; id++ { // entries 5..8: state 8 fails
		if _, err := j.append(ctx, proposeComplete(1, id)); err != nil {
			t.Fatalf("append with a failing state write: %v", err)
		}
	}
	if _, err := store.Stat(ctx, journalStateKey(cfg.ns(), 8)); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("state 8 after a failed write: %v", err)
	}
	mode = "fail-list"
	fresh := compactJournalOf(store, cfg, "c", 4, time.Hour)
	if err := fresh.refresh(ctx); !upload.IsTransient(err) {
		t.Fatalf("from-scratch read with failing state lists: %v, want the list error", err)
	}
	if s := fresh.snapshot(); s.seq != 0 {
		t.Fatalf("failed read left state at %d", s.seq)
	}
	mode = ""
	if err := fresh.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	sameFold(t, "fresh node", fresh.snapshot(), store.fullFold(t, cfg))
	if got := fresh.stats.EntriesRead.Load(); got != 4 {
		t.Fatalf("fresh node read %d entries, want 4 (after state 4)", got)
	}
}

// TestJournalStateCorrupt: a corrupt compacted state is an error naming
// the object; a reader falls back to an older state and the entries while
// they exist, and fails (naming it) once they were deleted.
func TestJournalStateCorrupt(t *testing.T) {
	ctx := context.Background()
	fs := newFileStore(t)
	cfg := StreamConfig{Name: "s", KeyGroups: 4, Incarnation: "test"}
	j := compactJournalOf(fs, cfg, "a", 4, time.Hour)
	if _, err := j.append(ctx, proposeOpen(keygroup.Range{Lo: 0, Hi: 3}, "a")); err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 11; id++ { // entries up to 12: states 4, 8, 12
		if _, err := j.append(ctx, proposeComplete(1, id)); err != nil {
			t.Fatal(err)
		}
	}
	want := j.snapshot()
	corrupt := func(seq uint64) string {
		t.Helper()
		key := journalStateKey(cfg.ns(), seq)
		path := filepath.Join(fs.(*file.Store).Root(), filepath.FromSlash(key))
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		data[len(data)/2] ^= 0xff
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return key
	}
	bad12 := corrupt(12)
	r := compactJournalOf(fs, cfg, "r", 4, time.Hour)
	if err := r.refresh(ctx); err != nil {
		t.Fatalf("read with a corrupt newest state: %v", err)
	}
	sameFold(t, "fallback to state 8", r.snapshot(), want)
	if err := r.stateErr(); !errors.Is(err, envelope.ErrCorrupt) || !strings.Contains(err.Error(), bad12) {
		t.Fatalf("state error %v, want corruption naming %s", err, bad12)
	}
	// Entries <= 8 deleted, state 8 corrupt too: nothing covers 1..8.
	states, err := j.listStates(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := j.deleteCompacted(ctx, states, time.Now().Add(time.Hour), time.Minute); err != nil {
		t.Fatal(err)
	}
	bad8 := corrupt(8)
	r2 := compactJournalOf(fs, cfg, "r2", 4, time.Hour)
	err = r2.refresh(ctx)
	if !errors.Is(err, envelope.ErrCorrupt) || !strings.Contains(err.Error(), bad8) || !strings.Contains(err.Error(), bad12) {
		t.Fatalf("read with every covering state corrupt: %v, want corruption naming %s and %s", err, bad8, bad12)
	}
	if s := r2.snapshot(); s.seq != 0 {
		t.Fatalf("failed read left state at %d", s.seq)
	}
}

// TestJournalForgetFold: a forget entry drops what nothing needs and is
// refused for the newest checkpoint, a live epoch's base or the base of a
// remaining checkpoint's part.
func TestJournalForgetFold(t *testing.T) {
	s := newJournalState(4)
	seq := uint64(0)
	must := func(e JournalEntry) {
		t.Helper()
		seq++
		e.Seq = seq
		if err := s.apply(e); err != nil {
			t.Fatal(err)
		}
	}
	open := func(r keygroup.Range, from uint64) {
		must(JournalEntry{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: r, FromCheckpoint: from}})
	}
	complete := func(id uint64) {
		var parts []PartRef
		for _, ep := range s.live {
			parts = append(parts, PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: id})
		}
		must(JournalEntry{Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: id, Parts: parts}})
	}
	open(keygroup.Range{Lo: 0, Hi: 1}, 0) // epoch 1
	open(keygroup.Range{Lo: 2, Hi: 3}, 0) // epoch 2
	for id := uint64(1); id <= 5; id++ {
		complete(id)
	}
	open(keygroup.Range{Lo: 2, Hi: 3}, 2) // epoch 8 fences 2, starts from 2
	for id := uint64(6); id <= 9; id++ {
		complete(id)
	}
	refuse := func(ids ...uint64) {
		t.Helper()
		c := s.clone()
		if err := c.apply(JournalEntry{Seq: seq + 1, Kind: EntryCheckpointsForget, Forget: &CheckpointsForget{IDs: ids}}); !errors.Is(err, errJournalInvalid) {
			t.Fatalf("forget %v: %v, want refused", ids, err)
		}
	}
	refuse(9)    // newest
	refuse(2)    // epoch 8 starts from it
	refuse(4, 3) // not ascending
	refuse(42)   // not complete
	ids := forgettable(&s, 2, map[uint64]bool{5: true}, math.MaxInt64)
	if !slices.Equal(ids, []uint64{1, 3, 4, 6, 7}) {
		t.Fatalf("forgettable %v", ids)
	}
	must(JournalEntry{Kind: EntryCheckpointsForget, Forget: &CheckpointsForget{IDs: ids, FencedBelow: seq}})
	var left []uint64
	for _, cp := range s.checkpoints {
		left = append(left, cp.ID)
	}
	if !slices.Equal(left, []uint64{2, 5, 8, 9}) {
		t.Fatalf("checkpoints left %v", left)
	}
	if !s.forgotten(3) || s.forgotten(2) || s.forgotten(10) {
		t.Fatal("forgotten() wrong")
	}
	if _, ok := s.fenced(2); !ok {
		t.Fatal("epoch 2 no longer fenced after its fencing record was forgotten")
	}
	if _, ok := s.fenced(8); ok {
		t.Fatal("live epoch 8 reported fenced")
	}
	// Opening from a forgotten checkpoint is invalid for every node alike.
	c := s.clone()
	if err := c.apply(JournalEntry{Seq: seq + 1, Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: keygroup.Range{Lo: 0, Hi: 0}, FromCheckpoint: 3}}); !errors.Is(err, errJournalInvalid) {
		t.Fatalf("open from a forgotten checkpoint: %v", err)
	}
}

// TestNodeJournalCompaction: garbage collection on a node forgets the
// checkpoint records nothing needs (a forgotten one restores to a clear
// ErrCheckpointNotFound, a retained one restores exactly), writes compacted
// states and deletes old entries; a node opening the stream from scratch
// agrees and reads few entries.
func TestNodeJournalCompaction(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	opts := testNodeOptions(store, t.TempDir())
	opts.JournalCompactEvery = 4
	opts.JournalKeepCheckpoints = 2
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= 30; id++ {
		if _, _, err := w.Append(ctx, []Change{put(uint16(id%4), fmt.Sprint("k", id), fmt.Sprint(id))}, Buffered); err != nil {
			t.Fatal(err)
		}
		if res, err := w.Checkpoint(ctx, id, nil); err != nil || !res.Complete {
			t.Fatalf("checkpoint %d: %+v %v", id, res, err)
		}
	}
	all := keygroup.Range{Lo: 0, Hi: 3}
	want5 := restoreMap(t, n, "s", 5, all)
	if err := n.RetainCheckpoint(ctx, "s", 5, true); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second pass deletes what the first one's state allows
		if _, err := n.CollectGarbage(ctx); err != nil {
			t.Fatal(err)
		}
	}
	cps, err := n.Checkpoints(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, cp := range cps {
		ids = append(ids, cp.ID)
	}
	if !slices.Equal(ids, []uint64{5, 28, 29, 30}) {
		t.Fatalf("checkpoint records after gc: %v, want the retained one and the newest 3", ids)
	}
	if _, err := n.CheckpointParts(ctx, "s", 7); !errors.Is(err, ErrCheckpointNotFound) {
		t.Fatalf("parts of forgotten checkpoint 7: %v, want ErrCheckpointNotFound", err)
	}
	if err := n.RetainCheckpoint(ctx, "s", 7, true); !errors.Is(err, ErrCheckpointNotFound) {
		t.Fatalf("retain forgotten checkpoint 7: %v, want ErrCheckpointNotFound", err)
	}
	if got := restoreMap(t, n, "s", 5, all); !equalMaps(got, want5) {
		t.Fatalf("retained checkpoint 5 restores %v, want %v", got, want5)
	}
	h, err := n.streamHandle(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if h.journal.stats.EntriesDeleted.Load() == 0 {
		t.Fatal("gc deleted no journal entries")
	}
	other, err := Open(ctx, testNodeOptions(store, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	oh, err := other.streamHandle(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	// The node's background start (abandonAllOrphans) may have made the
	// handle and still be in its first read: streamHandle must not hand
	// it out before a read has reached the end of the journal.
	sameFold(t, "node opening from scratch", oh.journal.snapshot(), h.journal.snapshot())
	if got := oh.journal.stats.EntriesRead.Load(); got >= 8 {
		t.Fatalf("node opening from scratch read %d entries", got)
	}
	// The writer carries on: its next checkpoint completes for both.
	if res, err := w.Checkpoint(ctx, 31, nil); err != nil || !res.Complete {
		t.Fatalf("checkpoint after compaction: %+v %v", res, err)
	}
	if err := oh.journal.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if os := oh.journal.snapshot(); os.lastCheckpoint() != 31 {
		t.Fatal("other node does not see checkpoint 31")
	}
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

// FuzzDecodeJournalState: any bytes decode to a compacted state of the
// stream asked for, or to an error wrapping an envelope sentinel (or
// ErrStreamNotFound for another incarnation); never a panic. A decoded
// state re-encodes and decodes to itself.
func FuzzDecodeJournalState(f *testing.F) {
	cfg := StreamConfig{Name: "s", KeyGroups: 8, Incarnation: "i"}
	s := newJournalState(8)
	s.incarnation = "i"
	for i, e := range []JournalEntry{
		{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: keygroup.Range{Lo: 0, Hi: 3}, Node: "a"}},
		{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: keygroup.Range{Lo: 4, Hi: 7}, Node: "b"}},
		{Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: 1, Parts: []PartRef{{Epoch: 1, KeyGroups: keygroup.Range{Lo: 0, Hi: 3}, Checkpoint: 1, Key: "k1"}, {Epoch: 2, KeyGroups: keygroup.Range{Lo: 4, Hi: 7}, Checkpoint: 1, Key: "k2"}}}},
		{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: keygroup.Range{Lo: 0, Hi: 3}, Node: "c", FromCheckpoint: 1}},
		{Kind: EntryEpochClose, Close: &EpochClose{Epoch: 2, FinalPart: PartRef{Epoch: 2, KeyGroups: keygroup.Range{Lo: 4, Hi: 7}, Checkpoint: 1, Key: "k2"}}},
	} {
		e.Seq, e.Incarnation, e.TimeMs = uint64(i+1), "i", int64(1000*i)
		if err := s.apply(e); err != nil {
			f.Fatal(err)
		}
	}
	valid, err := encodeJournalState("s", &s)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(valid[:len(valid)/2])
	empty := newJournalState(8)
	empty.incarnation, empty.seq = "i", 1
	one, _ := encodeJournalState("s", &empty)
	f.Add(one)
	other, _ := encodeJournalState("t", &s)
	f.Add(other)
	wrongKind, _ := envelope.Seal(journalEntryKind, JournalEntry{Seq: 1})
	f.Add(wrongKind)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		key := journalStateKey(cfg.ns(), 5)
		st, err := decodeJournalState(key, data, cfg)
		if err != nil {
			if !errors.Is(err, envelope.ErrCorrupt) && !errors.Is(err, envelope.ErrUnknownVersion) && !errors.Is(err, envelope.ErrWrongKind) && !errors.Is(err, ErrStreamNotFound) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		// A decoded state is usable: these must not panic.
		st.orphaned()
		st.lastCheckpoint()
		_ = forgettable(&st, 1, nil, 0)
		again, err := encodeJournalState("s", &st)
		if err != nil {
			t.Fatal(err)
		}
		st2, err := decodeJournalState(key, again, cfg)
		if err != nil {
			t.Fatalf("re-encoded state does not decode: %v", err)
		}
		sameFold(t, "round trip", st2, st)
	})
}
