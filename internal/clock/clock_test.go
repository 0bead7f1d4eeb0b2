package clock

import (
	"context"
	"testing"
	"time"
)

func TestFakeTimersFireInOrderOnAdvance(t *testing.T) {
	f := NewFake(time.Unix(1000, 0))
	a := f.NewTimer(2 * time.Second)
	b := f.NewTimer(1 * time.Second)
	c := f.NewTimer(5 * time.Second)
	if !c.Stop() {
		t.Fatal("stopping a pending timer reported false")
	}
	f.Advance(1500 * time.Millisecond)
	select {
	case <-b.C():
	default:
		t.Fatal("1s timer did not fire after 1.5s")
	}
	select {
	case <-a.C():
		t.Fatal("2s timer fired after 1.5s")
	default:
	}
	f.Advance(time.Second)
	if got := <-a.C(); !got.Equal(time.Unix(1002, 0)) {
		t.Fatalf("timer fired at %v", got)
	}
	if a.Stop() {
		t.Fatal("stopping a fired timer reported true")
	}
	if f.Pending() != 0 {
		t.Fatalf("%d timers pending", f.Pending())
	}
}

func TestSleepHonoursContext(t *testing.T) {
	f := NewFake(time.Unix(0, 0))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Sleep(ctx, f, time.Hour) }()
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("Sleep returned %v, want context.Canceled", err)
	}
	go func() { done <- Sleep(context.Background(), f, time.Second) }()
	for f.Pending() == 0 {
		time.Sleep(time.Millisecond)
	}
	f.Advance(time.Second)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
