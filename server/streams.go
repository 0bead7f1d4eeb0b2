package server

import (
	"context"
	"fmt"
	"sort"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
)

type streamService struct{ s *Server }

func streamProto(c changelog.StreamConfig) *dstlv1.Stream {
	return &dstlv1.Stream{Name: c.Name, KeyGroups: uint32(c.KeyGroups), CreatedAtMs: c.CreatedAtMs}
}

func (x *streamService) CreateStream(ctx context.Context, req *connect.Request[dstlv1.CreateStreamRequest]) (*connect.Response[dstlv1.CreateStreamResponse], error) {
	cfg, err := x.s.node.CreateStream(ctx, req.Msg.GetName(), int(req.Msg.GetKeyGroups()))
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&dstlv1.CreateStreamResponse{Stream: streamProto(cfg)}), nil
}

func (x *streamService) GetStream(ctx context.Context, req *connect.Request[dstlv1.GetStreamRequest]) (*connect.Response[dstlv1.GetStreamResponse], error) {
	cfg, err := x.s.node.Stream(ctx, req.Msg.GetName())
	if err != nil {
		return nil, toConnect(err)
	}
	st := streamProto(cfg)
	st.Hydration = x.s.hydration(cfg.Name)
	return connect.NewResponse(&dstlv1.GetStreamResponse{Stream: st}), nil
}

func (x *streamService) ListStreams(ctx context.Context, req *connect.Request[dstlv1.ListStreamsRequest]) (*connect.Response[dstlv1.ListStreamsResponse], error) {
	size, err := pageSize(req.Msg.GetPageSize(), 100, 1000)
	if err != nil {
		return nil, toConnect(err)
	}
	names, err := x.s.node.ListStreams(ctx)
	if err != nil {
		return nil, toConnect(err)
	}
	// Names are sorted; the token is the last name of the previous page.
	start := sort.SearchStrings(names, req.Msg.GetPageToken())
	if start < len(names) && names[start] == req.Msg.GetPageToken() {
		start++
	}
	out := &dstlv1.ListStreamsResponse{}
	for _, name := range names[start:] {
		if len(out.Streams) == size {
			out.NextPageToken = out.Streams[len(out.Streams)-1].Name
			break
		}
		cfg, err := x.s.node.Stream(ctx, name)
		if err != nil {
			continue // deleted since listed
		}
		out.Streams = append(out.Streams, streamProto(cfg))
	}
	return connect.NewResponse(out), nil
}

func (x *streamService) DeleteStream(ctx context.Context, req *connect.Request[dstlv1.DeleteStreamRequest]) (*connect.Response[dstlv1.DeleteStreamResponse], error) {
	if err := x.s.node.DeleteStream(ctx, req.Msg.GetName()); err != nil {
		return nil, toConnect(err)
	}
	if x.s.hooks != nil {
		x.s.hooks.Forget(req.Msg.GetName())
	}
	return connect.NewResponse(&dstlv1.DeleteStreamResponse{}), nil
}

// pageSize validates a requested page size.
func pageSize(n int32, def, limit int) (int, error) {
	switch {
	case n < 0:
		return 0, fmt.Errorf("page_size %d is negative: %w", n, errInvalid)
	case n == 0:
		return def, nil
	case int(n) > limit:
		return limit, nil
	}
	return int(n), nil
}
