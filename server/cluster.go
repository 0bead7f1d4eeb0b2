package server

import (
	"context"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/gossip"
)

// ClusterOptions say what ClusterService.ListMembers reports.
type ClusterOptions struct {
	// Members is the node's membership (a *gossip.Cluster). Nil: gossip is
	// off, and ListMembers lists this node alone, described by RPC and
	// Zone.
	Members Membership
	// RPC is this node's API URL and Zone its zone, for the single-node
	// answer.
	RPC, Zone string
}

// Membership is the view of the cluster ListMembers reports.
type Membership interface {
	Members() []gossip.Member
}

// clusterService implements ClusterService.
type clusterService struct{ s *Server }

var _ dstlv1connect.ClusterServiceHandler = (*clusterService)(nil)

func (c *clusterService) ListMembers(context.Context, *connect.Request[dstlv1.ListMembersRequest]) (*connect.Response[dstlv1.ListMembersResponse], error) {
	opts := c.s.opts.Cluster
	if opts.Members == nil {
		return connect.NewResponse(&dstlv1.ListMembersResponse{Members: []*dstlv1.Member{{
			NodeId: c.s.node.ID(), RpcUrl: opts.RPC, Zone: opts.Zone, State: dstlv1.MemberState_MEMBER_STATE_ALIVE, Self: true,
		}}}), nil
	}
	members := opts.Members.Members()
	res := &dstlv1.ListMembersResponse{Gossip: true, Members: make([]*dstlv1.Member, 0, len(members))}
	for _, m := range members {
		res.Members = append(res.Members, memberProto(m))
	}
	return connect.NewResponse(res), nil
}

func memberProto(m gossip.Member) *dstlv1.Member {
	p := &dstlv1.Member{
		NodeId: m.ID, GossipAddr: m.Addr, RpcUrl: m.Meta.RPC, Zone: m.Meta.Zone, Load: m.Meta.Load,
		State: memberStateProto(m.State), Incarnation: m.Incarnation, Self: m.Self, Leaving: m.Leaving,
	}
	if !m.StateSince.IsZero() {
		p.StateSinceMs = m.StateSince.UnixMilli()
	}
	if m.MetaErr != nil {
		p.MetaError = m.MetaErr.Error()
	}
	return p
}

func memberStateProto(s gossip.State) dstlv1.MemberState {
	switch s {
	case gossip.StateAlive:
		return dstlv1.MemberState_MEMBER_STATE_ALIVE
	case gossip.StateDead:
		return dstlv1.MemberState_MEMBER_STATE_DEAD
	case gossip.StateLeft:
		return dstlv1.MemberState_MEMBER_STATE_LEFT
	default:
		return dstlv1.MemberState_MEMBER_STATE_UNSPECIFIED
	}
}
