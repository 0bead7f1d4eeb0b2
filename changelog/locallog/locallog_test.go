package locallog

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/segments"
)

// TestRoundTrip: 64 goroutines append to 128 logs concurrently; after Close
// and reopen every acknowledged change is recovered once, in SQN order, with
// its metadata, and again after a second reopen.
func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	l, rec := mustOpen(t, Options{Dir: dir, NoSync: true, FileSize: 256 << 10})
	if len(rec.Logs) != 0 || rec.Records != 0 {
		t.Fatalf("fresh dir recovered %+v", rec)
	}
	const goroutines, perLog, appends, batch, vlen = 64, 2, 20, 7, 50
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for k := range perLog {
				log := fmt.Sprintf("log-%d-%d", g, k)
				if err := l.SetMeta(context.Background(), log, []byte("meta-"+log)); err != nil {
					t.Error(err)
					return
				}
			}
			for a := range appends {
				for k := range perLog {
					log := fmt.Sprintf("log-%d-%d", g, k)
					if err := l.Append(context.Background(), log, batchOf(log, uint64(a*batch+1), batch, vlen)); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	st := l.Stats()
	mustClose(t, l)
	if st.Changes != goroutines*perLog*appends*batch || st.Files < 2 {
		t.Fatalf("stats %+v: want %d changes over several files", st, goroutines*perLog*appends*batch)
	}
	for round := range 2 {
		l, rec = mustOpen(t, Options{Dir: dir, NoSync: true})
		if len(rec.Logs) != goroutines*perLog {
			t.Fatalf("round %d: %d logs recovered, want %d", round, len(rec.Logs), goroutines*perLog)
		}
		for g := range goroutines {
			for k := range perLog {
				log := fmt.Sprintf("log-%d-%d", g, k)
				checkLog(t, rec, log, 1, appends*batch, vlen)
				if m := string(rec.Logs[log].Meta); m != "meta-"+log {
					t.Fatalf("log %s: meta %q", log, m)
				}
			}
		}
		mustClose(t, l)
	}
}

// TestGroupCommit: 64 concurrent appenders with real fsync share fsyncs.
func TestGroupCommit(t *testing.T) {
	l, _ := mustOpen(t, Options{Dir: t.TempDir()})
	const goroutines, appends = 64, 20
	start := l.Stats()
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			log := fmt.Sprintf("log-%d", g)
			for a := range appends {
				if err := l.Append(context.Background(), log, batchOf(log, uint64(a*10+1), 10, 100)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	st := l.Stats()
	mustClose(t, l)
	appendsDone, fsyncs := st.Appends-start.Appends, st.Fsyncs-start.Fsyncs
	t.Logf("%d appends, %d records, %d fsyncs (%.1f appends per fsync)", appendsDone, st.Records-start.Records, fsyncs, float64(appendsDone)/float64(fsyncs))
	if appendsDone != goroutines*appends {
		t.Fatalf("%d appends counted, want %d", appendsDone, goroutines*appends)
	}
	if fsyncs >= appendsDone/2 {
		t.Fatalf("%d fsyncs for %d appends: group commit does not batch", fsyncs, appendsDone)
	}
}

// TestRepeatedAppends: a retried Append with overlapping SQNs is recovered
// once, first copy winning; an empty Append is a barrier.
func TestRepeatedAppends(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, Options{Dir: dir, NoSync: true})
	mustAppend(t, l, "a", batchOf("a", 1, 10, 20))
	mustAppend(t, l, "a", batchOf("a", 1, 10, 20))
	dup := batchOf("a", 5, 11, 20)
	for i := range dup[:6] {
		dup[i].Value = []byte("second copy") // must lose against the first copy
	}
	mustAppend(t, l, "a", dup)
	mustAppend(t, l, "a", nil)
	st := l.Stats()
	mustClose(t, l)
	if st.Changes != 15 {
		t.Fatalf("%d changes written, want 15", st.Changes)
	}
	_, rec := mustOpen(t, Options{Dir: dir, NoSync: true})
	checkLog(t, rec, "a", 1, 15, 20)
}

// TestReappendAfterReopen: SQNs at or below those recovered are repeats.
func TestReappendAfterReopen(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, Options{Dir: dir, NoSync: true})
	mustAppend(t, l, "a", batchOf("a", 1, 10, 20))
	mustClose(t, l)
	l, _ = mustOpen(t, Options{Dir: dir, NoSync: true})
	mustAppend(t, l, "a", batchOf("a", 8, 5, 20))
	mustClose(t, l)
	l, rec := mustOpen(t, Options{Dir: dir, NoSync: true})
	defer mustClose(t, l)
	checkLog(t, rec, "a", 1, 12, 20)
}

func TestInvalidRequests(t *testing.T) {
	l, _ := mustOpen(t, Options{Dir: t.TempDir(), NoSync: true})
	ctx := context.Background()
	bad := map[string][]segments.Change{
		"sqn zero":       {{SQN: 0, Op: segments.OpPut}},
		"sqn backwards":  {{SQN: 2, Op: segments.OpPut}, {SQN: 1, Op: segments.OpPut}},
		"other log":      {{LogID: "b", SQN: 1, Op: segments.OpPut}},
		"bad op":         {{SQN: 1}},
		"bad key group":  {{SQN: 1, Op: segments.OpPut, KeyGroup: segments.MaxKeyGroup + 1}},
		"long state":     {{SQN: 1, Op: segments.OpPut, State: string(make([]byte, segments.MaxStateLen+1))}},
		"huge value":     {{SQN: 1, Op: segments.OpPut, Value: make([]byte, segments.MaxBlockRawSize)}},
		"valid then bad": {{SQN: 1, Op: segments.OpPut}, {SQN: 1, Op: segments.OpPut}},
	}
	for name, cs := range bad {
		if err := l.Append(ctx, "a", cs); !errors.Is(err, segments.ErrInvalidChange) {
			t.Errorf("%s: got %v, want ErrInvalidChange", name, err)
		}
	}
	if err := l.Append(ctx, "", batchOf("", 1, 1, 1)); !errors.Is(err, segments.ErrInvalidChange) {
		t.Errorf("empty log id: %v", err)
	}
	if err := l.SetMeta(ctx, "a", make([]byte, MaxMetaLen+1)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("huge meta: %v", err)
	}
	// The log still works after refusing bad requests.
	mustAppend(t, l, "a", batchOf("a", 1, 3, 10))
	mustClose(t, l)
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := l.Append(ctx, "a", batchOf("a", 4, 1, 10)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close: %v", err)
	}
	if err := l.SetMeta(ctx, "a", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("SetMeta after Close: %v", err)
	}
	l.MarkUploaded("a", 3) // ignored, no panic
	l.Forget("a")
}

func TestLocked(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, Options{Dir: dir, NoSync: true})
	if _, _, err := Open(Options{Dir: dir, NoSync: true}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	mustClose(t, l)
	l, _ = mustOpen(t, Options{Dir: dir, NoSync: true})
	mustClose(t, l)
}

// TestContext: an Append whose ctx ended before it was taken is withdrawn
// and never recovered; one that returned nil always is.
func TestContext(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, Options{Dir: dir})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Append(ctx, "dead", batchOf("dead", 1, 1, 10)); !errors.Is(err, ErrWithdrawn) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Append: %v", err)
	}
	// Many appenders with deadlines shorter than an fsync: some are
	// withdrawn, some are unknown, some succeed.
	const goroutines = 32
	var mu sync.Mutex
	withdrawn := map[string]bool{}
	acked := map[string]bool{}
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for a := range 20 {
				log := fmt.Sprintf("log-%d-%d", g, a) // one Append per log: outcomes are independent
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(a*20)*time.Microsecond)
				err := l.Append(ctx, log, batchOf(log, 1, 5, 10))
				cancel()
				mu.Lock()
				switch {
				case err == nil:
					acked[log] = true
				case errors.Is(err, ErrWithdrawn):
					withdrawn[log] = true
				case !errors.Is(err, context.DeadlineExceeded):
					t.Errorf("Append %s: %v", log, err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	mustClose(t, l)
	t.Logf("%d acknowledged, %d withdrawn", len(acked), len(withdrawn))
	l, rec := mustOpen(t, Options{Dir: dir, NoSync: true})
	defer mustClose(t, l)
	for log := range acked {
		checkLog(t, rec, log, 1, 5, 10)
	}
	for log := range withdrawn {
		if rec.Logs[log] != nil && len(rec.Logs[log].Changes) > 0 {
			t.Fatalf("withdrawn append of %s was recovered", log)
		}
	}
	if rec.Logs["dead"] != nil {
		t.Fatal("cancelled append recovered")
	}
}
