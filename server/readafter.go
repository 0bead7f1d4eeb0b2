package server

import (
	"context"
	"fmt"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// MaxReadsPerAppend bounds the reads an Append carries: each answer may be
// a large value, and the response is not admitted like a request.
const MaxReadsPerAppend = 64

// checkReads validates the reads of an Append before anything is
// appended, so that a bad read never leaves half a request applied.
func (s *Server) checkReads(ctx context.Context, msg *dstlv1.AppendRequest) error {
	reads := msg.GetReads()
	if len(reads) == 0 {
		return nil
	}
	if len(reads) > MaxReadsPerAppend {
		return fmt.Errorf("append with %d reads: at most %d: %w", len(reads), MaxReadsPerAppend, errInvalid)
	}
	cfg, err := s.node.Stream(ctx, streamOf(msg.GetWriterId()))
	if err != nil {
		return err
	}
	for i, r := range reads {
		if r.GetKeyGroup() >= uint32(cfg.KeyGroups) {
			return fmt.Errorf("read %d: key group %d in a stream of %d: %w", i, r.GetKeyGroup(), cfg.KeyGroups, errInvalid)
		}
	}
	return nil
}

// readsAfterAppend serves an Append's reads once its batch is appended,
// through the read path (which waits for the fold to reach the writer's
// acknowledged SQN: the batch is visible). A read that fails leaves every
// read unserved (nil): the append succeeded and must be reported so; the
// client reads again with Get, which reports the error.
func (s *Server) readsAfterAppend(ctx context.Context, msg *dstlv1.AppendRequest) []*dstlv1.ReadResult {
	stream := streamOf(msg.GetWriterId())
	out := make([]*dstlv1.ReadResult, len(msg.GetReads()))
	for i, r := range msg.GetReads() {
		v, found, err := s.state.Get(ctx, stream, uint16(r.GetKeyGroup()), r.GetState(), r.GetKey())
		if err != nil {
			return nil
		}
		out[i] = &dstlv1.ReadResult{Found: found, Value: v}
	}
	return out
}
