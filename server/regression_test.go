// Regression test for a review finding: see changelog/regression_test.go.

package server

import (
	"context"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"
	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

// A Local append that fails after its SQNs were assigned (here: the
// request's context ended while waiting for the local log) leaves a gap in
// the LiveState writer view: every later acknowledged append waits in
// pending forever and reads never see it.
func TestRegressionFailedAppendWedgesReadView(t *testing.T) {
	ctx := context.Background()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	nodeOpts := changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close(ctx)
	s, err := New(node, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := node.CreateStream(ctx, "s", 8); err != nil {
		t.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Full(8)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.hooks.WriterOpened(ctx, w); err != nil {
		t.Fatal(err)
	}
	s.writers[w.LogID()] = w
	req := func(v string) *dstlv1.AppendRequest {
		return &dstlv1.AppendRequest{WriterId: w.LogID(), Durability: dstlv1.Durability_DURABILITY_LOCAL,
			Changes: []*dstlv1.Change{{KeyGroup: 0, State: "s", Op: dstlv1.Op(changelog.OpPut), Key: []byte("k"), Value: []byte(v)}}}
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, _, err = s.append(cctx, req("lost"))
	t.Logf("append with ended ctx: %v (writer LastSQN now %d)", err, w.LastSQN())
	first, last, err := s.append(ctx, req("v2"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("acknowledged append: SQN %d..%d", first, last)
	val, found, err := s.state.Get(ctx, "s", 0, "s", []byte("k"))
	t.Logf("Get k = %q found=%v err=%v", val, found, err)
	if string(val) != "v2" {
		t.Errorf("read view wedged: acknowledged put k=v2 (SQN %d) is not visible; Get = %q, %v", first, val, found)
	}
}

// A checkpoint GC already collected is refused as a failed precondition on
// the wire (issue 9 R2), not as an internal error.
func TestCodeOfCheckpointNotRestorable(t *testing.T) {
	err := fmt.Errorf("stream s: open from checkpoint 1: %w", changelog.ErrCheckpointNotRestorable)
	if got := codeOf(err); got != connect.CodeFailedPrecondition {
		t.Fatalf("codeOf(%v) = %v, want failed_precondition", err, got)
	}
}
