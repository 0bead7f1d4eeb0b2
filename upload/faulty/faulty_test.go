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
func outcome(t *testing.T, seed uint64) (string, [5]int64) {
	s := faulty.Wrap(newFile(t), faulty.Options{Seed: seed, All: faulty.Faults{
		Transient: 0.2, LostAck: 0.2, TornWrite: 0.1, LostWrite: 0.1, Latency: 0.3,
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
	var counts [5]int64
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
