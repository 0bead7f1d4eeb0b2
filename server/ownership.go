package server

import (
	"errors"
	"fmt"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/gossip"
)

// ErrNotOwner: OpenWriter on a node that does not own the writer's
// (stream, key-group range) in its membership view. On the wire it is
// FAILED_PRECONDITION with a dstl.v1.NotOwner error detail naming the
// owner (docs/cluster.md, "Ownership").
var ErrNotOwner = errors.New("not the owner")

// checkOwner returns nil if this node may open the writer of key groups r
// of stream: gossip is off, this node is the owner in its view, or no
// member can own (then the node serves it rather than refuse). Otherwise
// it returns ErrNotOwner as a connect error with a NotOwner detail.
//
// Ownership only routes: the blob-store epoch stays the only authority for
// fencing, so two nodes whose views disagree can at worst both open an
// epoch, and the later one fences the earlier exactly as on one node.
func (s *Server) checkOwner(stream string, r keygroup.Range) error {
	ms := s.opts.Cluster.Members
	if ms == nil {
		return nil
	}
	owner, ok := gossip.WriterOwner(stream, uint32(r.Lo), uint32(r.Hi), ms.Members())
	if !ok || owner.Self {
		return nil
	}
	s.metrics.redirects.Inc()
	ce := connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf(
		"writer of stream %s key groups %s: owned by node %s at %s, not by this node %s (open it there, or set any_node): %w",
		stream, r, owner.ID, owner.Meta.RPC, s.selfID(), ErrNotOwner))
	if d, err := connect.NewErrorDetail(&dstlv1.NotOwner{OwnerNode: owner.ID, OwnerRpc: owner.Meta.RPC}); err == nil {
		ce.AddDetail(d)
	}
	return ce
}

// selfID is this node's member id (its changelog node id without gossip).
func (s *Server) selfID() string {
	if ms := s.opts.Cluster.Members; ms != nil {
		for _, m := range ms.Members() {
			if m.Self {
				return m.ID
			}
		}
	}
	return s.node.ID()
}
