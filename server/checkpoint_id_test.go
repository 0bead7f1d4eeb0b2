package server

import (
	"context"
	"math"
	"testing"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// D1: a checkpoint id far above the newest complete one is
// INVALID_ARGUMENT, and the stream keeps checkpointing afterwards.
func TestCheckpointIDOutOfRangeOverTheWire(t *testing.T) {
	ctx := context.Background()
	c := startServer(t)
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 4})); err != nil {
		t.Fatal(err)
	}
	w, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	id := w.Msg.WriterId
	if _, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(1, "k", "v")}})); err != nil {
		t.Fatal(err)
	}
	_, err = c.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: id, CheckpointId: math.MaxUint64}))
	wantCode(t, "checkpoint id 2^64-1", err, connect.CodeInvalidArgument, "out of range")
	res, err := c.checkpoint.CreateCheckpoint(ctx, connect.NewRequest(&dstlv1.CreateCheckpointRequest{Stream: "s"}))
	if err != nil || !res.Msg.Complete || res.Msg.Checkpoint.GetId() != 1 {
		t.Fatalf("checkpoint after the refused one: %+v %v", res, err)
	}
}
