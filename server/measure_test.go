package server

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestAppendCostPerChange measures what one tiny change of an Append
// allocates while it is decoded and applied (through the PebbleState read
// view `dstl serve` uses), and what stays live until it is uploaded, and
// checks the prices admission (changeCostBytes) and the scheduler
// (upload.ChangeBytes) charge cover them: the memory bound of
// docs/operations.md rests on these two constants.
func TestAppendCostPerChange(t *testing.T) {
	ctx := context.Background()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	nodeOpts := changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1}
	// Nothing is uploaded during the measurement.
	nodeOpts.Scheduler.MaxInFlightBytes = 4 << 30
	nodeOpts.Scheduler.FlushBytes = 4 << 30
	nodeOpts.Scheduler.Interval = time.Hour
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close(ctx)
	s, err := New(node, Options{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := node.CreateStream(ctx, "s", 1); err != nil {
		t.Fatal(err)
	}
	hooks := s.hooks
	// measure appends n tiny changes to a new writer: what the append
	// allocates, and what stays live after it, per change.
	measure := func(view bool) (wireBytes, decodeAlloc, applyAlloc, live, charged int64) {
		t.Helper()
		s.hooks = nil
		if view {
			s.hooks = hooks
		}
		w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s"})
		if err != nil {
			t.Fatal(err)
		}
		if view {
			if err := s.hooks.WriterOpened(ctx, w); err != nil {
				t.Fatal(err)
			}
		}
		s.mu.Lock()
		s.writers[w.LogID()] = w
		s.mu.Unlock()
		const n = 200_000
		req := &dstlv1.AppendRequest{WriterId: w.LogID()}
		for i := range n {
			c := &dstlv1.Change{State: "s", Op: dstlv1.Op_OP_PUT, Key: fmt.Appendf(nil, "k%06d", i), Value: []byte("v")}
			req.Changes = append(req.Changes, c)
			charged += upload.ChangeBytes(segments.Change{Key: c.Key, Value: c.Value, State: c.State})
		}
		wire, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		req = nil
		var before, decoded, applied, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		msg := &dstlv1.AppendRequest{}
		if err := proto.Unmarshal(wire, msg); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&decoded)
		if _, _, err := s.append(ctx, msg); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&applied)
		msg = nil
		runtime.GC()
		runtime.ReadMemStats(&after)
		return int64(len(wire)) / n, int64(decoded.TotalAlloc-before.TotalAlloc) / n, int64(applied.TotalAlloc-decoded.TotalAlloc) / n,
			(int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n, charged / n
	}
	// With the read view `dstl serve` uses (PebbleState): what a request
	// allocates while it is decoded and applied.
	wire, decode, apply, _, _ := measure(true)
	total := decode + apply
	// Without it: what the writer's tail keeps until the upload (Pebble's
	// memtables are bounded by Pebble, not per change).
	_, _, _, live, charged := measure(false)
	t.Logf("per tiny change: wire %d B, decode allocates %d B, apply %d B, total %d B (admission charges %d B + %d x wire); the writer's tail keeps %d B until uploaded (scheduler charges %d B)",
		wire, decode, apply, total, changeCostBytes, appendBytesFactor, live, charged)
	if total > changeCostBytes+appendBytesFactor*wire {
		t.Errorf("a change allocates %d B while it is appended; admission charges %d B + %d x its wire size: raise changeCostBytes", total, changeCostBytes, appendBytesFactor)
	}
	if live > charged {
		t.Errorf("a change keeps %d B live until it is uploaded; the scheduler charges %d B: raise upload's changeOverhead", live, charged)
	}
}
