package changelog

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

func newFileStore(t *testing.T) upload.BlobStore {
	t.Helper()
	s, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// testJournal returns a journal of cfg's stream, creating the stream's
// definition first if it does not exist (appends check it).
func testJournal(store upload.BlobStore, cfg StreamConfig, node string) *journal {
	if cfg.Incarnation == "" {
		cfg.Incarnation = "test"
	}
	if err := createStream(context.Background(), store, cfg); err != nil && !errors.Is(err, ErrStreamExists) {
		panic(err)
	}
	var n atomic.Uint64
	return newJournal(store, cfg, time.Now, func() string { return fmt.Sprintf("%s-%d", node, n.Add(1)) })
}

func proposeOpen(r keygroup.Range, node string) func(*journalState) (JournalEntry, error) {
	return func(s *journalState) (JournalEntry, error) {
		return JournalEntry{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: r, Node: node, FromCheckpoint: s.lastCheckpoint()}}, nil
	}
}

// proposeComplete completes checkpoint id for a writer of epoch, refusing
// with ErrFenced once a newer epoch has fenced it.
func proposeComplete(epoch, id uint64) func(*journalState) (JournalEntry, error) {
	return func(s *journalState) (JournalEntry, error) {
		if by, ok := s.fenced(epoch); ok {
			return JournalEntry{}, fmt.Errorf("epoch %d fenced by %d: %w", epoch, by, ErrFenced)
		}
		var parts []PartRef
		for _, ep := range s.live {
			parts = append(parts, PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: id})
		}
		return JournalEntry{Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: id, Parts: parts}}, nil
	}
}

// Nodes racing to open writers over the same key groups each get a distinct
// epoch; the last one is the only live writer and every other is fenced.
func TestJournalRacingOpens(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	cfg := StreamConfig{Name: "orders", KeyGroups: 128}
	const nodes = 8
	epochs := make([]uint64, nodes)
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() {
			j := testJournal(store, cfg, fmt.Sprintf("n%d", i))
			e, err := j.append(ctx, proposeOpen(keygroup.Full(128), fmt.Sprintf("n%d", i)))
			if err != nil {
				t.Errorf("node %d: %v", i, err)
				return
			}
			epochs[i] = e.Seq
		})
	}
	wg.Wait()
	seen := map[uint64]bool{}
	for _, e := range epochs {
		if e == 0 || seen[e] {
			t.Fatalf("epochs %v are not distinct and non-zero", epochs)
		}
		seen[e] = true
	}
	j := testJournal(store, cfg, "reader")
	if err := j.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	st := j.snapshot()
	if len(st.live) != 1 || st.live[0].Epoch != nodes {
		t.Fatalf("live %+v, want only epoch %d", st.live, nodes)
	}
	for e := uint64(1); e < nodes; e++ {
		if _, ok := st.fenced(e); !ok {
			t.Errorf("epoch %d not fenced", e)
		}
	}
}

// A writer that was fenced while it was about to complete a checkpoint can
// never complete it: whichever of the two entries lands first, the
// checkpoint never names the fenced epoch after the fencing epoch opened.
func TestJournalFencedCheckpointNeverCompletes(t *testing.T) {
	ctx := context.Background()
	for round := range 20 {
		store := newFileStore(t)
		cfg := StreamConfig{Name: "s", KeyGroups: 16}
		old := testJournal(store, cfg, "old")
		e, err := old.append(ctx, proposeOpen(keygroup.Full(16), "old"))
		if err != nil {
			t.Fatal(err)
		}
		zombie := e.Seq
		var wg sync.WaitGroup
		var completeErr error
		wg.Go(func() {
			_, completeErr = old.append(ctx, proposeComplete(zombie, 1))
		})
		wg.Go(func() {
			nj := testJournal(store, cfg, "new")
			if _, err := nj.append(ctx, proposeOpen(keygroup.Full(16), "new")); err != nil {
				t.Error(err)
			}
		})
		wg.Wait()
		reader := testJournal(store, cfg, "reader")
		if err := reader.refresh(ctx); err != nil {
			t.Fatal(err)
		}
		st := reader.snapshot()
		fencedAt, _ := st.fenced(zombie)
		for _, cp := range st.checkpoints {
			for _, p := range cp.Parts {
				if p.Epoch == zombie && completeSeq(t, reader, cp.ID) > fencedAt {
					t.Fatalf("round %d: checkpoint %d completed by fenced epoch %d after the fence", round, cp.ID, zombie)
				}
			}
		}
		if completeErr != nil && !errors.Is(completeErr, ErrFenced) {
			t.Fatalf("round %d: completion failed with %v, want ErrFenced", round, completeErr)
		}
	}
}

func completeSeq(t *testing.T, j *journal, id uint64) uint64 {
	t.Helper()
	ctx := context.Background()
	for seq := uint64(1); seq <= j.snapshot().seq; seq++ {
		e, err := j.readEntry(ctx, journalKey(j.ns(), seq))
		if err != nil {
			t.Fatal(err)
		}
		if e.Checkpoint != nil && e.Checkpoint.ID == id {
			return seq
		}
	}
	t.Fatalf("checkpoint %d not in the journal", id)
	return 0
}

// A journal opened on an empty disk folds to the same state as the writer's.
func TestJournalRebuildFromBlobStore(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	cfg := StreamConfig{Name: "s", KeyGroups: 4}
	w := testJournal(store, cfg, "w")
	mustAppend := func(p func(*journalState) (JournalEntry, error)) JournalEntry {
		t.Helper()
		e, err := w.append(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	e1 := mustAppend(proposeOpen(keygroup.Full(4), "w"))
	for id := uint64(1); id <= 1200; id++ { // more than one listing page
		mustAppend(proposeComplete(e1.Seq, id))
	}
	if _, err := w.append(ctx, proposeComplete(e1.Seq, 1200)); !errors.Is(err, ErrCheckpointTooOld) {
		t.Fatalf("repeated checkpoint id: %v, want ErrCheckpointTooOld", err)
	}
	r := testJournal(store, cfg, "r")
	if err := r.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	got, want := r.snapshot(), w.snapshot()
	if got.seq != want.seq || got.lastCheckpoint() != 1200 || len(got.checkpoints) != 1200 {
		t.Fatalf("rebuilt seq %d last %d, want seq %d last 1200", got.seq, got.lastCheckpoint(), want.seq)
	}
}

// Under lost acknowledgements and transient errors on puts, every append
// that returns success is in the journal exactly once: an attempt that
// landed without an acknowledgement is recognised by its nonce.
func TestJournalLostAcks(t *testing.T) {
	ctx := context.Background()
	inner := newFileStore(t)
	store := faulty.Wrap(inner, faulty.Options{Seed: 42, PerOp: map[faulty.Op]faulty.Faults{
		faulty.OpPut: {Transient: 0.2, LostAck: 0.3},
	}})
	cfg := StreamConfig{Name: "s", KeyGroups: 8}
	const nodes, perNode = 4, 25
	var wg sync.WaitGroup
	var ok atomic.Int64
	for i := range nodes {
		wg.Go(func() {
			j := testJournal(store, cfg, fmt.Sprintf("n%d", i))
			for range perNode {
				if _, err := j.append(ctx, proposeOpen(keygroup.Full(8), "n")); err != nil {
					t.Errorf("append: %v", err)
					return
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	if store.Total(faulty.LostAck) == 0 {
		t.Fatal("no lost acks were injected; the test proves nothing")
	}
	r := testJournal(inner, cfg, "r")
	if err := r.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if got := r.snapshot().seq; got != uint64(ok.Load()) {
		t.Fatalf("journal has %d entries for %d successful appends (%d lost acks injected)", got, ok.Load(), store.Total(faulty.LostAck))
	}
	nonces := map[string]bool{}
	for seq := uint64(1); seq <= r.snapshot().seq; seq++ {
		e, err := r.readEntry(ctx, journalKey(r.ns(), seq))
		if err != nil {
			t.Fatal(err)
		}
		if nonces[e.Nonce] {
			t.Fatalf("nonce %s appended twice", e.Nonce)
		}
		nonces[e.Nonce] = true
	}
}
