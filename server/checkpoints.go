package server

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

type checkpointService struct{ s *Server }

// checkpointProto describes complete checkpoint cp with its parts.
func (s *Server) checkpointProto(ctx context.Context, stream string, cp changelog.CheckpointComplete, retained []uint64) (*dstlv1.Checkpoint, error) {
	parts, err := s.node.CheckpointParts(ctx, stream, cp.ID)
	if err != nil {
		return nil, err
	}
	out := &dstlv1.Checkpoint{Stream: stream, Id: cp.ID, CompletedAtMs: cp.CompletedAtMs, Retained: slices.Contains(retained, cp.ID)}
	for _, p := range parts {
		out.Parts = append(out.Parts, &dstlv1.CheckpointPart{
			Epoch: p.Epoch, KeyGroups: rangeProto(p.KeyGroups), LogId: p.LogID, UpToSqn: p.UpToSQN,
			FromCheckpoint: p.FromCheckpoint, TruncatedBefore: p.TruncatedBefore, Segments: uint32(len(p.Segments)), Metadata: p.Metadata,
		})
	}
	return out, nil
}

func (s *Server) checkpoint(ctx context.Context, stream string, id uint64) (*dstlv1.Checkpoint, error) {
	cps, err := s.node.Checkpoints(ctx, stream)
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(cps, func(c changelog.CheckpointComplete) bool { return c.ID == id })
	if i < 0 {
		return nil, fmt.Errorf("stream %s: checkpoint %d: %w", stream, id, changelog.ErrCheckpointNotFound)
	}
	retained, err := s.node.RetainedCheckpoints(ctx, stream)
	if err != nil {
		return nil, err
	}
	return s.checkpointProto(ctx, stream, cps[i], retained)
}

// CreateCheckpoint checkpoints every open writer of the stream on this node
// under the id after the newest complete one.
func (x *checkpointService) CreateCheckpoint(ctx context.Context, req *connect.Request[dstlv1.CreateCheckpointRequest]) (*connect.Response[dstlv1.CreateCheckpointResponse], error) {
	s := x.s
	stream := req.Msg.GetStream()
	cps, err := s.node.Checkpoints(ctx, stream)
	if err != nil {
		return nil, toConnect(err)
	}
	id := uint64(1)
	if len(cps) > 0 {
		last := cps[len(cps)-1].ID
		if last == math.MaxUint64 {
			// Unreachable while the changelog bounds ids
			// (Limits.MaxCheckpointIDStep); never wrap around to 0.
			return nil, toConnect(fmt.Errorf("stream %s: newest checkpoint id %d leaves no next id: %w", stream, last, changelog.ErrCheckpointIDOutOfRange))
		}
		id = last + 1
	}
	s.mu.Lock()
	var writers []*changelog.Writer
	for wid, w := range s.writers {
		if streamOf(wid) == stream {
			writers = append(writers, w)
		}
	}
	s.mu.Unlock()
	if len(writers) == 0 {
		return nil, toConnect(fmt.Errorf("stream %s has no open writer on this node to checkpoint: %w", stream, errNoWriters))
	}
	complete := false
	for _, w := range writers {
		res, err := w.Checkpoint(ctx, id, req.Msg.GetMetadata())
		if err != nil {
			s.writerFailed(w, err)
			return nil, toConnect(err)
		}
		complete = complete || res.Complete
	}
	out := &dstlv1.CreateCheckpointResponse{Complete: complete, Checkpoint: &dstlv1.Checkpoint{Stream: stream, Id: id}}
	if complete {
		if out.Checkpoint, err = s.checkpoint(ctx, stream, id); err != nil {
			return nil, toConnect(err)
		}
	}
	return connect.NewResponse(out), nil
}

// errNoWriters: a checkpoint was asked of a stream without open writers here.
var errNoWriters = errors.New("no open writers")

func (x *checkpointService) ListCheckpoints(ctx context.Context, req *connect.Request[dstlv1.ListCheckpointsRequest]) (*connect.Response[dstlv1.ListCheckpointsResponse], error) {
	s := x.s
	cps, err := s.node.Checkpoints(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, toConnect(err)
	}
	retained, err := s.node.RetainedCheckpoints(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, toConnect(err)
	}
	out := &dstlv1.ListCheckpointsResponse{}
	for _, cp := range cps {
		p, err := s.checkpointProto(ctx, req.Msg.GetStream(), cp, retained)
		if err != nil {
			return nil, toConnect(err)
		}
		out.Checkpoints = append(out.Checkpoints, p)
	}
	return connect.NewResponse(out), nil
}

func (x *checkpointService) GetCheckpoint(ctx context.Context, req *connect.Request[dstlv1.GetCheckpointRequest]) (*connect.Response[dstlv1.GetCheckpointResponse], error) {
	cp, err := x.s.checkpoint(ctx, req.Msg.GetStream(), req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	if cp.Materialization, err = x.s.materialization(ctx, req.Msg.GetStream(), req.Msg.GetId()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&dstlv1.GetCheckpointResponse{Checkpoint: cp}), nil
}

// materialization reports what a restore of checkpoint id reads (its
// snapshot and the changelog tail after it) and the stream's materializer
// lag, from the blob store alone: it is the same whether the materializer
// runs in this daemon or in another process.
func (s *Server) materialization(ctx context.Context, stream string, id uint64) (*dstlv1.Materialization, error) {
	cfg, err := s.node.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	all := keygroup.Range{Lo: 0, Hi: uint16(cfg.KeyGroups - 1)}
	out := &dstlv1.Materialization{}
	pl, err := s.node.PlanRestore(ctx, stream, id, all)
	if err != nil {
		return nil, err
	}
	if snap, ok := pl.NewestBase(); ok {
		out.SnapshotCheckpoint, out.SnapshotCreatedAtMs = snap.Checkpoint, snap.CreatedAt.UnixMilli()
		out.SnapshotBytes, out.SnapshotNewBytes = uint64(snap.Bytes), uint64(snap.NewBytes)
	}
	out.TailChanges, out.TailBytes = pl.TailChanges(), uint64(pl.TailBytes())
	snaps, err := s.node.Snapshots(ctx, stream)
	if err != nil {
		return nil, err
	}
	out.Snapshots = uint32(len(snaps))
	if len(snaps) > 0 {
		newest := snaps[len(snaps)-1]
		out.NewestSnapshotCheckpoint, out.NewestSnapshotCreatedAtMs = newest.Checkpoint, newest.CreatedAt.UnixMilli()
	}
	cps, err := s.node.Checkpoints(ctx, stream)
	if err != nil {
		return nil, err
	}
	if len(cps) > 0 {
		latest := pl
		if last := cps[len(cps)-1].ID; last != id {
			if latest, err = s.node.PlanRestore(ctx, stream, last, all); err != nil {
				return nil, err
			}
		}
		out.LagChanges, out.LagBytes = latest.TailChanges(), uint64(latest.TailBytes())
	}
	return out, nil
}

func (x *checkpointService) RetainCheckpoint(ctx context.Context, req *connect.Request[dstlv1.RetainCheckpointRequest]) (*connect.Response[dstlv1.RetainCheckpointResponse], error) {
	if err := x.s.node.RetainCheckpoint(ctx, req.Msg.GetStream(), req.Msg.GetId(), req.Msg.GetRetained()); err != nil {
		return nil, toConnect(err)
	}
	cp, err := x.s.checkpoint(ctx, req.Msg.GetStream(), req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&dstlv1.RetainCheckpointResponse{Checkpoint: cp}), nil
}
