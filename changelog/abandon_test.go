package changelog

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// cancelAfterPutStore ends the caller's context right after a matching put
// lands: the client's deadline strikes between the journal write and the
// local-log record.
type cancelAfterPutStore struct {
	upload.BlobStore
	mu     sync.Mutex
	match  string
	cancel context.CancelFunc
}

func (s *cancelAfterPutStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	err := s.BlobStore.PutIfAbsent(ctx, key, r, size)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil && s.cancel != nil && strings.Contains(key, s.match) {
		s.cancel()
		s.cancel = nil
	}
	return err
}

// S1: the epoch-open entry lands, recording the epoch in the local log
// fails (SetMeta on an ended context). The orphaned epoch is closed at once,
// so the other writer's checkpoints still complete.
func TestOrphanedEpochAfterSetMetaFailure(t *testing.T) {
	ctx := context.Background()
	cs := &cancelAfterPutStore{BlobStore: newFileStore(t), match: "/journal/"}
	n := openTestNode(t, cs, t.TempDir())
	if _, err := n.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	w1, err := n.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := w1.Append(ctx, []Change{put(0, "a", "1")}, Local); err != nil {
		t.Fatal(err)
	}
	octx, cancel := context.WithCancel(ctx)
	cs.mu.Lock()
	cs.cancel = cancel
	cs.mu.Unlock()
	_, err = n.OpenWriter(octx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	t.Logf("open with a failing local-log record: %v", err)
	if err == nil {
		t.Fatal("open succeeded")
	}
	res, err := w1.Checkpoint(ctx, 1, nil)
	if err != nil || !res.Complete {
		t.Fatalf("checkpoint 1 after the failed open: %+v %v, want complete", res, err)
	}
	if got := restoreMap(t, n, "s", 1, keygroup.Full(4)); got["0/s/a"] != "1" || len(got) != 1 {
		t.Fatalf("restore of checkpoint 1: %v", got)
	}
}

// S1 after a crash: the epoch-open entry landed, the node crashed before
// its local log recorded the epoch. After the restart the node closes the
// orphan by itself (with its part of the newest complete checkpoint), and
// a writer on another node checkpoints again.
func TestOrphanedEpochAfterCrash(t *testing.T) {
	ctx := context.Background()
	store := newFileStore(t)
	dirA := t.TempDir()
	a, err := Open(ctx, testNodeOptions(store, dirA))
	if err != nil {
		t.Fatal(err)
	}
	b := openTestNode(t, store, t.TempDir())
	if _, err := b.CreateStream(ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	wb, err := b.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}})
	if err != nil {
		t.Fatal(err)
	}
	wa, err := a.OpenWriter(ctx, WriterConfig{Stream: "s", KeyGroups: keygroup.Range{Lo: 2, Hi: 3}})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []*Writer{wb, wa} {
		if _, _, err := w.Append(ctx, []Change{put(w.KeyGroups().Lo, "k", "1")}, Buffered); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Node a reopens 2..3 and crashes between the journal entry and the
	// local-log record (the entry written as openWriter writes it).
	h, err := a.streamHandle(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		return JournalEntry{Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: keygroup.Range{Lo: 2, Hi: 3}, Node: a.ID(), FromCheckpoint: s.lastCheckpoint()}}, nil
	}); err != nil {
		t.Fatal(err)
	}
	a.crash()
	if _, _, err := wb.Append(ctx, []Change{put(1, "k2", "2")}, Buffered); err != nil {
		t.Fatal(err)
	}
	if res, err := wb.Checkpoint(ctx, 2, nil); err != nil || res.Complete {
		t.Fatalf("checkpoint 2 with the orphan live: %+v %v (want recorded, incomplete)", res, err)
	}
	a2, err := Open(ctx, testNodeOptions(store, dirA))
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close(ctx)
	// The restarted node closes the orphan in the background; the next
	// checkpoint of b completes (checkpoint 2 too, once b retries it).
	deadline := time.Now().Add(10 * time.Second)
	for {
		res, err := wb.Checkpoint(ctx, 2, nil)
		if err == nil && res.Complete {
			break
		}
		if err != nil && !errors.Is(err, ErrCheckpointTooOld) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("checkpoint 2 never completed: %+v %v", res, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := restoreMap(t, b, "s", 2, keygroup.Full(4))
	want := map[string]string{"0/s/k": "1", "1/s/k2": "2", "2/s/k": "1"}
	if len(got) != len(want) || got["0/s/k"] != "1" || got["1/s/k2"] != "2" || got["2/s/k"] != "1" {
		t.Fatalf("restore of checkpoint 2: %v, want %v", got, want)
	}
}
