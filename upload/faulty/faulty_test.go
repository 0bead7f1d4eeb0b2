package faulty_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobtest"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

func newFile(t *testing.T) upload.BlobStore {
	s, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformanceWithoutFaults(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) upload.BlobStore {
		return faulty.Wrap(newFile(t), faulty.Options{Seed: 1})
	})
}

func stat(t *testing.T, s upload.BlobStore, key string) error {
	t.Helper()
	_, err := s.Stat(context.Background(), key)
	return err
}

func TestTransientFailsBeforeTheStore(t *testing.T) {
	inner := newFile(t)
	s := faulty.Wrap(inner, faulty.Options{Seed: 7, All: faulty.Faults{Transient: 1}})
	ctx := context.Background()
	err := s.PutIfAbsent(ctx, "k", strings.NewReader("v"), 1)
	if !errors.Is(err, faulty.ErrInjected) || !upload.IsTransient(err) {
		t.Fatalf("PutIfAbsent = %v, want an injected transient error", err)
	}
	if err := stat(t, inner, "k"); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("object stored despite a transient failure: %v", err)
	}
	_, err = s.Get(ctx, "k")
	_, err2 := s.List(ctx, "", "", 0)
	if !upload.IsTransient(err) || !upload.IsTransient(err2) || !upload.IsTransient(s.Delete(ctx, "k")) {
		t.Fatalf("Get, List, Delete: %v, %v", err, err2)
	}
	if got := s.Total(faulty.Transient); got != 4 {
		t.Errorf("Total(Transient) = %d, want 4", got)
	}
	if got := s.Count(faulty.OpPut, faulty.Transient); got != 1 {
		t.Errorf("Count(put, Transient) = %d, want 1", got)
	}
}

func TestLostAckTakesEffect(t *testing.T) {
	inner := newFile(t)
	s := faulty.Wrap(inner, faulty.Options{Seed: 7, All: faulty.Faults{LostAck: 1}})
	ctx := context.Background()
	err := s.PutIfAbsent(ctx, "k", strings.NewReader("v"), 1)
	if !errors.Is(err, faulty.ErrInjected) || !upload.IsTransient(err) {
		t.Fatalf("PutIfAbsent = %v, want an injected error", err)
	}
	if err := stat(t, inner, "k"); err != nil {
		t.Fatalf("lost-ack put did not store: %v", err)
	}
	// The retry sees the object: the caller must treat that as success.
	if err := s.PutIfAbsent(ctx, "k", strings.NewReader("v"), 1); !errors.Is(err, upload.ErrAlreadyExists) {
		t.Fatalf("retry = %v, want ErrAlreadyExists", err)
	}
	if _, err := s.Get(ctx, "k"); !errors.Is(err, faulty.ErrInjected) {
		t.Fatalf("Get = %v", err)
	}
	if err := s.Delete(ctx, "k"); !errors.Is(err, faulty.ErrInjected) {
		t.Fatalf("Delete = %v", err)
	}
	if err := stat(t, inner, "k"); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("lost-ack delete did not delete: %v", err)
	}
}

func TestTornWriteStoresNothing(t *testing.T) {
	inner := newFile(t)
	s := faulty.Wrap(inner, faulty.Options{Seed: 3, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {TornWrite: 1}}})
	r := strings.NewReader(strings.Repeat("x", 1000))
	err := s.PutIfAbsent(context.Background(), "k", r, 1000)
	if !errors.Is(err, faulty.ErrInjected) || !upload.IsTransient(err) {
		t.Fatalf("PutIfAbsent = %v", err)
	}
	if err := stat(t, inner, "k"); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("torn write visible: %v", err)
	}
	if r.Len() == 1000 {
		t.Error("torn write read nothing from its reader")
	}
	if s.Count(faulty.OpPut, faulty.TornWrite) != 1 {
		t.Error("torn write not counted")
	}
}

func TestLostWriteReportsSuccess(t *testing.T) {
	inner := newFile(t)
	s := faulty.Wrap(inner, faulty.Options{Seed: 3, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {LostWrite: 1}}})
	if err := s.PutIfAbsent(context.Background(), "k", strings.NewReader("v"), 1); err != nil {
		t.Fatal(err)
	}
	if err := stat(t, inner, "k"); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("lost write stored: %v", err)
	}
	if s.Total(faulty.LostWrite) != 1 {
		t.Error("lost write not counted")
	}
}

func TestLatencyUsesSleepAndHonoursContext(t *testing.T) {
	var slept []time.Duration
	sleep := func(ctx context.Context, d time.Duration) error {
		slept = append(slept, d)
		return ctx.Err()
	}
	s := faulty.Wrap(newFile(t), faulty.Options{Seed: 5, All: faulty.Faults{Latency: 1, MaxDelay: time.Second}, Sleep: sleep})
	for i := range 5 {
		if err := s.PutIfAbsent(context.Background(), fmt.Sprint(i), strings.NewReader("v"), 1); err != nil {
			t.Fatal(err)
		}
	}
	if len(slept) != 5 {
		t.Fatalf("slept %d times, want 5", len(slept))
	}
	for _, d := range slept {
		if d <= 0 || d > time.Second {
			t.Errorf("delay %v outside (0, 1s]", d)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.PutIfAbsent(ctx, "c", strings.NewReader("v"), 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled = %v", err)
	}

	// The real sleep returns when the context ends.
	realStore := faulty.Wrap(newFile(t), faulty.Options{All: faulty.Faults{Latency: 1, MaxDelay: time.Hour}})
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := realStore.Stat(ctx, "k")
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 10*time.Second {
		t.Fatalf("Stat with an hour of latency = %v after %v", err, time.Since(start))
	}
}

// outcome runs a fixed sequence of calls and records which failed.
func outcome(t *testing.T, seed uint64) (string, [faulty.NumFaults]int64) {
	s := faulty.Wrap(newFile(t), faulty.Options{Seed: seed, All: faulty.Faults{
		Transient: 0.2, LostAck: 0.2, TornWrite: 0.1, LostWrite: 0.1, LateWrite: 0.1, Latency: 0.3,
	}, Sleep: func(context.Context, time.Duration) error { return nil }})
	var b strings.Builder
	ctx := context.Background()
	for i := range 200 {
		key := fmt.Sprint("k", i%20)
		var err error
		switch i % 3 {
		case 0:
			err = s.PutIfAbsent(ctx, key, strings.NewReader("value"), 5)
		case 1:
			var rc io.ReadCloser
			if rc, err = s.Get(ctx, key); err == nil {
				err = rc.Close()
			}
		case 2:
			_, err = s.Stat(ctx, key)
		}
		switch {
		case err == nil:
			b.WriteByte('.')
		case errors.Is(err, faulty.ErrInjected):
			b.WriteByte('F')
		default:
			b.WriteByte('e')
		}
	}
	var counts [faulty.NumFaults]int64
	for f := range counts {
		counts[f] = s.Total(faulty.Fault(f))
	}
	return b.String(), counts
}

func TestDeterministicForASeed(t *testing.T) {
	a, ca := outcome(t, 99)
	b, cb := outcome(t, 99)
	if a != b || ca != cb {
		t.Fatalf("same seed, different runs:\n%s %v\n%s %v", a, ca, b, cb)
	}
	c, _ := outcome(t, 100)
	if a == c {
		t.Error("different seeds gave the same run")
	}
	for f, n := range ca {
		if n == 0 {
			t.Errorf("no %v faults injected in 200 calls", faulty.Fault(f))
		}
	}
}

func TestLateWriteLandsAfterTheCallFailed(t *testing.T) {
	inner := newFile(t)
	s := faulty.Wrap(inner, faulty.Options{Seed: 11, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {LateWrite: 1, MaxLateOps: 3}}})
	ctx := context.Background()
	err := s.PutIfAbsent(ctx, "k", strings.NewReader("late"), 4)
	if !errors.Is(err, faulty.ErrInjected) || !upload.IsTransient(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("PutIfAbsent = %v, want an injected transient deadline error", err)
	}
	if err := stat(t, inner, "k"); !errors.Is(err, upload.ErrNotFound) {
		t.Fatalf("late write stored before the call returned: %v", err)
	}
	if _, _, pending := s.LateWrites(); pending != 1 {
		t.Fatalf("pending late writes = %d, want 1", pending)
	}
	// It lands at the start of one of the next 3 operations, whatever they
	// are (here: stats of another key, which do not count as late writes).
	landedAt := 0
	for i := 1; i <= 3 && landedAt == 0; i++ {
		if _, err := s.Stat(ctx, "other"); !errors.Is(err, upload.ErrNotFound) {
			t.Fatalf("Stat = %v", err)
		}
		if stat(t, inner, "k") == nil {
			landedAt = i
		}
	}
	if landedAt == 0 {
		t.Fatal("late write did not land within MaxLateOps operations")
	}
	rc, err := inner.Get(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(rc)
	rc.Close()
	if string(data) != "late" {
		t.Fatalf("landed %q, want %q", data, "late")
	}
	if landed, lost, pending := s.LateWrites(); landed != 1 || lost != 0 || pending != 0 {
		t.Fatalf("LateWrites = %d landed, %d lost, %d pending", landed, lost, pending)
	}
	if got := s.Count(faulty.OpPut, faulty.LateWrite); got != 1 {
		t.Errorf("Count(put, LateWrite) = %d, want 1", got)
	}
}

func TestLateWriteRacesTheRetry(t *testing.T) {
	ctx := context.Background()
	// Landing before the retry: the retry finds the key taken.
	s := faulty.Wrap(newFile(t), faulty.Options{Seed: 1, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {LateWrite: 1, MaxLateOps: 1}}})
	if err := s.PutIfAbsent(ctx, "k", strings.NewReader("first"), 5); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("PutIfAbsent = %v", err)
	}
	s.SetFaults(faulty.OpPut, faulty.Faults{})
	if err := s.PutIfAbsent(ctx, "k", strings.NewReader("retry"), 5); !errors.Is(err, upload.ErrAlreadyExists) {
		t.Fatalf("retry = %v, want ErrAlreadyExists (the late write landed first)", err)
	}

	// Landing after the retry: create-only, so the late write is lost and
	// the retry's content stays.
	inner := newFile(t)
	s = faulty.Wrap(inner, faulty.Options{Seed: 1, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {LateWrite: 1, MaxLateOps: 1}}})
	if err := s.PutIfAbsent(ctx, "k", strings.NewReader("first"), 5); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("PutIfAbsent = %v", err)
	}
	if err := inner.PutIfAbsent(ctx, "k", strings.NewReader("other"), 5); err != nil {
		t.Fatal(err)
	}
	// A cancelled caller still carries the late write it lands.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, _ = s.Stat(cctx, "k") // fails: cancelled; the landing does not

	if landed, lost, pending := s.LateWrites(); landed != 0 || lost != 1 || pending != 0 {
		t.Fatalf("LateWrites = %d landed, %d lost, %d pending; want 0, 1, 0", landed, lost, pending)
	}
}

func TestSettleAndCloseLandPendingLateWrites(t *testing.T) {
	ctx := context.Background()
	inner := newFile(t)
	s := faulty.Wrap(inner, faulty.Options{Seed: 2, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {LateWrite: 1, MaxLateOps: 1000}}})
	for i := range 3 {
		if err := s.PutIfAbsent(ctx, fmt.Sprint("k", i), strings.NewReader("v"), 1); !errors.Is(err, faulty.ErrInjected) {
			t.Fatalf("PutIfAbsent = %v", err)
		}
	}
	s.Settle(ctx)
	for i := range 3 {
		if err := stat(t, inner, fmt.Sprint("k", i)); err != nil {
			t.Fatalf("k%d after Settle: %v", i, err)
		}
	}
	dir := t.TempDir()
	inner2, err := file.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s = faulty.Wrap(inner2, faulty.Options{Seed: 2, PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {LateWrite: 1, MaxLateOps: 1000}}})
	if err := s.PutIfAbsent(ctx, "c", strings.NewReader("v"), 1); !errors.Is(err, faulty.ErrInjected) {
		t.Fatalf("PutIfAbsent = %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	reopened := newFileAt(t, dir)
	if err := stat(t, reopened, "c"); err != nil {
		t.Fatalf("late write not landed by Close: %v", err)
	}
}

func newFileAt(t *testing.T, dir string) upload.BlobStore {
	s, err := file.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
