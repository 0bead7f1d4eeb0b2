package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

type writerService struct{ s *Server }

func rangeFromProto(r *dstlv1.KeyGroupRange, keyGroups int) (keygroup.Range, error) {
	if r == nil {
		return keygroup.Full(keyGroups), nil
	}
	if r.GetLo() > r.GetHi() || r.GetHi() >= uint32(keyGroups) {
		return keygroup.Range{}, fmt.Errorf("key groups %d..%d in a stream of %d: %w", r.GetLo(), r.GetHi(), keyGroups, keygroup.ErrInvalidRange)
	}
	return keygroup.Range{Lo: uint16(r.GetLo()), Hi: uint16(r.GetHi())}, nil
}

func rangeProto(r keygroup.Range) *dstlv1.KeyGroupRange {
	return &dstlv1.KeyGroupRange{Lo: uint32(r.Lo), Hi: uint32(r.Hi)}
}

func (x *writerService) OpenWriter(ctx context.Context, req *connect.Request[dstlv1.OpenWriterRequest]) (*connect.Response[dstlv1.OpenWriterResponse], error) {
	s := x.s
	cfg, err := s.node.Stream(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, toConnect(err)
	}
	r, err := rangeFromProto(req.Msg.GetKeyGroups(), cfg.KeyGroups)
	if err != nil {
		return nil, toConnect(err)
	}
	// Ownership routes new epochs to the owner (ownership.go). A resume
	// reattaches to a log only this node holds, and any_node asks for this
	// node whatever the owner: neither is routed.
	if !req.Msg.GetAnyNode() && req.Msg.GetResumeEpoch() == 0 {
		if err := s.checkOwner(cfg.Name, r); err != nil {
			return nil, err
		}
	}
	w, err := s.node.OpenWriter(ctx, changelog.WriterConfig{
		Stream: cfg.Name, KeyGroups: r, FromCheckpoint: req.Msg.GetFromCheckpoint(), Resume: req.Msg.GetResumeEpoch(),
	})
	if err != nil {
		return nil, toConnect(err)
	}
	s.mu.Lock()
	already := s.writers[w.LogID()] == w // a resume of a writer this server holds
	s.mu.Unlock()
	// abandon closes a writer this call opened but cannot hand out, so that
	// no live writer is left that nobody can reach (it would block deleting
	// the stream and completing checkpoints).
	abandon := func(err error) error {
		if !already {
			_ = w.Close(context.WithoutCancel(ctx))
		}
		return toConnect(err)
	}
	if s.hooks != nil && !already {
		if err := s.hooks.WriterOpened(ctx, w); err != nil {
			return nil, abandon(fmt.Errorf("writer %s: build read view: %w", w.LogID(), err))
		}
	}
	var metadata [][]byte
	if from := w.FromCheckpoint(); from != 0 {
		parts, err := s.node.CheckpointParts(ctx, cfg.Name, from)
		if err != nil {
			return nil, abandon(err)
		}
		for _, p := range parts {
			if p.KeyGroups.Overlaps(r) && len(p.Metadata) > 0 {
				metadata = append(metadata, p.Metadata)
			}
		}
	}
	// Older writers of this node over the same key groups are fenced now;
	// they stay in the table so that their next call says so (FAILED_PRECONDITION),
	// and writerFailed drops them then.
	s.mu.Lock()
	s.writers[w.LogID()] = w
	s.mu.Unlock()
	s.log.Info("writer opened", "writer", w.LogID(), "key_groups", r.String(), "from_checkpoint", w.FromCheckpoint(), "resumed", req.Msg.GetResumeEpoch() != 0)
	return connect.NewResponse(&dstlv1.OpenWriterResponse{
		WriterId: w.LogID(), Epoch: w.Epoch(), KeyGroups: rangeProto(r), FromCheckpoint: w.FromCheckpoint(),
		LastSqn: w.LastSQN(), RestoredMetadata: metadata,
	}), nil
}

func (s *Server) durability(d dstlv1.Durability) (changelog.Durability, error) {
	switch d {
	case dstlv1.Durability_DURABILITY_UNSPECIFIED:
		return s.opts.DefaultDurability, nil
	case dstlv1.Durability_DURABILITY_BUFFERED:
		return changelog.Buffered, nil
	case dstlv1.Durability_DURABILITY_LOCAL:
		return changelog.Local, nil
	case dstlv1.Durability_DURABILITY_REPLICATED:
		return changelog.Replicated, nil
	}
	return 0, fmt.Errorf("durability %d: %w", d, errInvalid)
}

// append runs one batch: convert, append, update the read view.
func (s *Server) append(ctx context.Context, msg *dstlv1.AppendRequest) (first, last uint64, err error) {
	w, err := s.writer(msg.GetWriterId())
	if err != nil {
		return 0, 0, err
	}
	d, err := s.durability(msg.GetDurability())
	if err != nil {
		return 0, 0, err
	}
	if n := len(msg.GetChanges()); n > s.opts.MaxBatchChanges {
		// Counted before decoding already, unless the request was
		// compressed or JSON.
		return 0, 0, fmt.Errorf("append of %d changes: at most %d changes per batch: %w", n, s.opts.MaxBatchChanges, errInvalid)
	}
	batch := make([]changelog.Change, len(msg.GetChanges()))
	now := time.Now().UnixMilli()
	var bytes int
	for i, c := range msg.GetChanges() {
		if c.GetKeyGroup() > keygroup.Max-1 {
			return 0, 0, fmt.Errorf("change %d: key group %d: %w", i, c.GetKeyGroup(), changelog.ErrKeyGroupOutOfRange)
		}
		ts := c.GetTimestampMs()
		if ts == 0 {
			ts = now
		}
		batch[i] = changelog.Change{KeyGroup: uint16(c.GetKeyGroup()), State: c.GetState(), Op: changelog.Op(c.GetOp()), Key: c.GetKey(), Value: c.GetValue(), TimestampMs: ts}
		bytes += len(c.GetKey()) + len(c.GetValue())
	}
	wctx, cancel := context.WithTimeout(ctx, s.opts.BackpressureWait)
	defer cancel()
	first, last, err = w.Append(wctx, batch, d)
	if err != nil {
		s.writerFailed(w, err)
		return 0, 0, err
	}
	s.metrics.appended(d, len(batch), bytes)
	if s.hooks != nil {
		s.hooks.Appended(streamOf(w.LogID()), w.LogID(), first, batch)
	}
	return first, last, nil
}

func (x *writerService) Append(ctx context.Context, req *connect.Request[dstlv1.AppendRequest]) (*connect.Response[dstlv1.AppendResponse], error) {
	if err := x.s.checkReads(ctx, req.Msg); err != nil {
		return nil, toConnect(err)
	}
	first, last, err := x.s.append(ctx, req.Msg)
	if err != nil {
		return nil, toConnect(err)
	}
	res := &dstlv1.AppendResponse{FirstSqn: first, LastSqn: last}
	if len(req.Msg.GetReads()) > 0 {
		res.Reads = x.s.readsAfterAppend(ctx, req.Msg)
	}
	return connect.NewResponse(res), nil
}

// AppendStream appends each message as one batch, in order. A client that
// disconnects mid-stream loses nothing it was told was appended: every batch
// received before is appended (its durability as asked), the rest never is.
func (x *writerService) AppendStream(ctx context.Context, stream *connect.ClientStream[dstlv1.AppendRequest]) (*connect.Response[dstlv1.AppendStreamResponse], error) {
	out := &dstlv1.AppendStreamResponse{}
	for stream.Receive() {
		if err := ctx.Err(); err != nil {
			// The client is gone: append nothing more it sent.
			return nil, toConnect(err)
		}
		if len(stream.Msg().GetReads()) > 0 {
			// The stream answers once, at its end: nowhere to put them.
			return nil, toConnect(fmt.Errorf("batch %d: reads are answered by Append only, not AppendStream: %w", out.Batches, errInvalid))
		}
		_, last, err := x.s.append(ctx, stream.Msg())
		if err != nil {
			return nil, toConnect(fmt.Errorf("batch %d: %w", out.Batches, err))
		}
		out.LastSqn = last
		out.Batches++
		out.Changes += uint64(len(stream.Msg().GetChanges()))
	}
	if err := stream.Err(); err != nil && !errors.Is(err, io.EOF) {
		return nil, toConnect(err)
	}
	return connect.NewResponse(out), nil
}

func (x *writerService) Persist(ctx context.Context, req *connect.Request[dstlv1.PersistRequest]) (*connect.Response[dstlv1.PersistResponse], error) {
	w, err := x.s.writer(req.Msg.GetWriterId())
	if err != nil {
		return nil, toConnect(err)
	}
	start := time.Now()
	h, err := w.Persist(ctx, req.Msg.GetUpToSqn())
	if err != nil {
		x.s.writerFailed(w, err)
		return nil, toConnect(err)
	}
	x.s.metrics.persistSeconds.Observe(time.Since(start).Seconds())
	out := &dstlv1.PersistResponse{UpToSqn: h.UpToSQN}
	for _, sb := range h.Segments {
		out.Segments = append(out.Segments, segmentBlocksProto(sb))
	}
	return connect.NewResponse(out), nil
}

func segmentBlocksProto(sb changelog.SegmentBlocks) *dstlv1.SegmentBlocks {
	p := &dstlv1.SegmentBlocks{Key: sb.Key, Size: sb.Size}
	for _, b := range sb.Blocks {
		p.Blocks = append(p.Blocks, &dstlv1.BlockSpan{Offset: b.Offset, Length: b.Length, FirstSqn: b.FirstSQN, LastSqn: b.LastSQN})
	}
	return p
}

func (x *writerService) Checkpoint(ctx context.Context, req *connect.Request[dstlv1.CheckpointRequest]) (*connect.Response[dstlv1.CheckpointResponse], error) {
	defer x.s.cpSignal.notify() // the checkpoint may be complete: wake the CDC feeds
	w, err := x.s.writer(req.Msg.GetWriterId())
	if err != nil {
		return nil, toConnect(err)
	}
	start := time.Now()
	res, err := w.Checkpoint(ctx, req.Msg.GetCheckpointId(), req.Msg.GetMetadata())
	if err != nil {
		x.s.writerFailed(w, err)
		return nil, toConnect(err)
	}
	x.s.metrics.checkpointSeconds.Observe(time.Since(start).Seconds())
	return connect.NewResponse(&dstlv1.CheckpointResponse{CheckpointId: res.ID, Complete: res.Complete}), nil
}

func (x *writerService) CloseWriter(ctx context.Context, req *connect.Request[dstlv1.CloseWriterRequest]) (*connect.Response[dstlv1.CloseWriterResponse], error) {
	w, err := x.s.writer(req.Msg.GetWriterId())
	if err != nil {
		return nil, toConnect(err)
	}
	if err := w.Close(ctx); err != nil {
		x.s.writerFailed(w, err)
		return nil, toConnect(err)
	}
	x.s.mu.Lock()
	delete(x.s.writers, w.LogID())
	x.s.mu.Unlock()
	if x.s.hooks != nil {
		x.s.hooks.WriterClosed(streamOf(w.LogID()), w.LogID())
	}
	return connect.NewResponse(&dstlv1.CloseWriterResponse{}), nil
}
