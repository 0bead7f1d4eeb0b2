package server

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

type stateService struct{ s *Server }

func (x *stateService) Get(ctx context.Context, req *connect.Request[dstlv1.GetRequest]) (*connect.Response[dstlv1.GetResponse], error) {
	cfg, err := x.s.node.Stream(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, toConnect(err)
	}
	kg := keygroup.Of(req.Msg.GetKey(), cfg.KeyGroups)
	if req.Msg.KeyGroup != nil {
		if req.Msg.GetKeyGroup() >= uint32(cfg.KeyGroups) {
			return nil, toConnect(fmt.Errorf("key group %d in a stream of %d: %w", req.Msg.GetKeyGroup(), cfg.KeyGroups, keygroup.ErrInvalidRange))
		}
		kg = uint16(req.Msg.GetKeyGroup())
	}
	val, found, err := x.s.state.Get(ctx, cfg.Name, kg, req.Msg.GetState(), req.Msg.GetKey())
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&dstlv1.GetResponse{Found: found, Value: val, KeyGroup: uint32(kg)}), nil
}

func (x *stateService) Scan(ctx context.Context, req *connect.Request[dstlv1.ScanRequest]) (*connect.Response[dstlv1.ScanResponse], error) {
	cfg, err := x.s.node.Stream(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, toConnect(err)
	}
	r, err := rangeFromProto(req.Msg.GetKeyGroups(), cfg.KeyGroups)
	if err != nil {
		return nil, toConnect(err)
	}
	size, err := pageSize(req.Msg.GetPageSize(), 100, 10000)
	if err != nil {
		return nil, toConnect(err)
	}
	q := ScanQuery{Stream: cfg.Name, State: req.Msg.GetState(), Prefix: req.Msg.GetPrefix(), KeyGroups: r, Limit: size}
	if tok := req.Msg.GetPageToken(); tok != "" {
		if q.After, err = decodePageToken(tok); err != nil {
			return nil, toConnect(err)
		}
	}
	entries, more, err := x.s.state.Scan(ctx, q)
	if err != nil {
		return nil, toConnect(err)
	}
	out := &dstlv1.ScanResponse{Entries: make([]*dstlv1.KeyValue, len(entries))}
	for i, e := range entries {
		out.Entries[i] = &dstlv1.KeyValue{KeyGroup: uint32(e.KeyGroup), State: e.State, Key: e.Key, Value: e.Value}
	}
	if more && len(entries) > 0 {
		out.NextPageToken = encodePageToken(&entries[len(entries)-1])
	}
	return connect.NewResponse(out), nil
}
