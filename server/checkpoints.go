package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

type checkpointService struct{ s *Server }

// checkpointProto describes complete checkpoint cp, with its parts if
// withParts (reading them from the blob store).
func (s *Server) checkpointProto(ctx context.Context, stream string, cp changelog.CheckpointComplete, retained []uint64, withParts bool) (*dstlv1.Checkpoint, error) {
	out := &dstlv1.Checkpoint{
		Stream: stream, Id: cp.ID, CompletedAtMs: cp.CompletedAtMs, Retained: slices.Contains(retained, cp.ID),
		PartCount: uint32(len(cp.Parts)),
	}
	if !withParts {
		return out, nil
	}
	parts, err := s.node.CheckpointParts(ctx, stream, cp.ID)
	if err != nil {
		return nil, err
	}
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
	return s.checkpointProto(ctx, stream, cps[i], retained, true)
}

// CreateCheckpoint checkpoints every open writer of the stream on this node
// under the id after the newest complete one.
func (x *checkpointService) CreateCheckpoint(ctx context.Context, req *connect.Request[dstlv1.CreateCheckpointRequest]) (*connect.Response[dstlv1.CreateCheckpointResponse], error) {
	s := x.s
	defer s.cpSignal.notify() // the checkpoint may be complete: wake the CDC feeds
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
		return s.nothingToCheckpoint(ctx, stream)
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

// errNoWriters: a checkpoint was asked of a stream with changes no complete
// checkpoint covers, and no open writer here that could checkpoint them.
var errNoWriters = errors.New("no open writers")

// nothingToCheckpoint answers CreateCheckpoint on a node without open
// writers of the stream: fine (up_to_date) if the newest complete checkpoint
// already holds every change (e.g. right after `dstl put`, whose writer
// checkpointed and closed), FAILED_PRECONDITION naming the epochs otherwise.
func (s *Server) nothingToCheckpoint(ctx context.Context, stream string) (*connect.Response[dstlv1.CreateCheckpointResponse], error) {
	newest, epochs, err := s.node.Coverage(ctx, stream)
	if err != nil {
		return nil, toConnect(err)
	}
	var open, closed []string
	for _, ep := range epochs {
		switch {
		case ep.Covered:
		case ep.Closed:
			closed = append(closed, fmt.Sprintf("%d (key groups %s)", ep.Epoch, ep.KeyGroups))
		case ep.Node == s.node.ID():
			open = append(open, fmt.Sprintf("%d (key groups %s, recovered on this node: resume it with OpenWriter resume_epoch)", ep.Epoch, ep.KeyGroups))
		default:
			open = append(open, fmt.Sprintf("%d (key groups %s, on node %s)", ep.Epoch, ep.KeyGroups, ep.Node))
		}
	}
	switch {
	case len(open) > 0:
		return nil, toConnect(fmt.Errorf("stream %s: no open writer on this node; live epochs %s may hold changes after checkpoint %d, and only their writers can checkpoint them: %w",
			stream, strings.Join(open, ", "), newest, errNoWriters))
	case len(closed) > 0:
		return nil, toConnect(fmt.Errorf("stream %s: closed epochs %s hold changes after checkpoint %d; the next checkpoint a writer of the stream records includes them (open a writer and checkpoint): %w",
			stream, strings.Join(closed, ", "), newest, errNoWriters))
	}
	out := &dstlv1.CreateCheckpointResponse{UpToDate: true}
	if newest != 0 {
		if out.Checkpoint, err = s.checkpoint(ctx, stream, newest); err != nil {
			return nil, toConnect(err)
		}
		out.Complete = true
	}
	return connect.NewResponse(out), nil
}

// Bounds of a ListCheckpoints page.
const (
	defaultCheckpointPage = 100
	maxCheckpointPage     = 1000
	// maxPartsPerPage ends a page with include_parts early (after at least
	// one checkpoint), so a stream of many writers still gets bounded pages.
	maxPartsPerPage = 10000
)

func (x *checkpointService) ListCheckpoints(ctx context.Context, req *connect.Request[dstlv1.ListCheckpointsRequest]) (*connect.Response[dstlv1.ListCheckpointsResponse], error) {
	s, stream, newestFirst := x.s, req.Msg.GetStream(), req.Msg.GetNewestFirst()
	size, err := pageSize(req.Msg.GetPageSize(), defaultCheckpointPage, maxCheckpointPage)
	if err != nil {
		return nil, toConnect(err)
	}
	// The token is the id of the previous page's last checkpoint: ids only
	// grow, so a page never repeats or skips one that existed before it.
	var after uint64
	if tok := req.Msg.GetPageToken(); tok != "" {
		if after, err = strconv.ParseUint(tok, 10, 64); err != nil || after == 0 {
			return nil, toConnect(fmt.Errorf("page_token %q is not one this server returned: %w", tok, errInvalid))
		}
	}
	cps, err := s.node.Checkpoints(ctx, stream)
	if err != nil {
		return nil, toConnect(err)
	}
	retained, err := s.node.RetainedCheckpoints(ctx, stream)
	if err != nil {
		return nil, toConnect(err)
	}
	// cps is in ascending id order.
	var page []changelog.CheckpointComplete
	if newestFirst {
		end := len(cps)
		if after != 0 {
			end, _ = slices.BinarySearchFunc(cps, after, cmpID)
		}
		page = slices.Clone(cps[:end])
		slices.Reverse(page)
	} else {
		start := 0
		if after != 0 {
			start, _ = slices.BinarySearchFunc(cps, after+1, cmpID)
		}
		page = cps[start:]
	}
	out := &dstlv1.ListCheckpointsResponse{}
	parts := 0
	for i, cp := range page {
		if i == size || (req.Msg.GetIncludeParts() && i > 0 && parts+len(cp.Parts) > maxPartsPerPage) {
			out.NextPageToken = strconv.FormatUint(page[i-1].ID, 10)
			break
		}
		p, err := s.checkpointProto(ctx, stream, cp, retained, req.Msg.GetIncludeParts())
		if err != nil {
			return nil, toConnect(err)
		}
		parts += len(cp.Parts)
		out.Checkpoints = append(out.Checkpoints, p)
	}
	return connect.NewResponse(out), nil
}

func cmpID(c changelog.CheckpointComplete, id uint64) int { return cmp.Compare(c.ID, id) }

func (x *checkpointService) GetCheckpoint(ctx context.Context, req *connect.Request[dstlv1.GetCheckpointRequest]) (*connect.Response[dstlv1.GetCheckpointResponse], error) {
	cp, err := x.s.checkpoint(ctx, req.Msg.GetStream(), req.Msg.GetId())
	if err != nil {
		return nil, toConnect(err)
	}
	if cp.Materialization, err = x.s.materialization(ctx, req.Msg.GetStream(), req.Msg.GetId()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&dstlv1.GetCheckpointResponse{Checkpoint: cp, Hydration: x.s.hydration(req.Msg.GetStream())}), nil
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
