package server

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/gossip"
)

// With gossip off, ListMembers lists this node alone.
func TestListMembersSingleNode(t *testing.T) {
	c, srv := startServerWith(t, Options{Cluster: ClusterOptions{RPC: "http://127.0.0.1:7600", Zone: "z1"}})
	cl := dstlv1connect.NewClusterServiceClient(c.http, c.url)
	res, err := cl.ListMembers(context.Background(), connect.NewRequest(&dstlv1.ListMembersRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	ms := res.Msg.GetMembers()
	if res.Msg.GetGossip() || len(ms) != 1 {
		t.Fatalf("single node: %v", res.Msg)
	}
	m := ms[0]
	if m.GetNodeId() != srv.node.ID() || m.GetRpcUrl() != "http://127.0.0.1:7600" || m.GetZone() != "z1" ||
		m.GetState() != dstlv1.MemberState_MEMBER_STATE_ALIVE || !m.GetSelf() {
		t.Fatalf("single node member: %v", m)
	}
	// In process too.
	inp, err := srv.InProcess().Cluster.ListMembers(context.Background(), connect.NewRequest(&dstlv1.ListMembersRequest{}))
	if err != nil || len(inp.Msg.GetMembers()) != 1 {
		t.Fatalf("in process: %v, %v", inp, err)
	}
}

// With gossip on, ListMembers reports the gossip view: two real memberlist
// nodes on loopback.
func TestListMembersGossip(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	open := func(id string, join []string) *gossip.Cluster {
		g, err := gossip.Open(ctx, gossip.Config{NodeID: id, Bind: "127.0.0.1:0", Join: join, Timings: gossip.FastTimings(),
			Meta: gossip.Meta{RPC: "http://" + id + ":7600", Zone: "zone-" + id, Load: 5}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = g.Close() })
		return g
	}
	a := open("a", nil)
	b := open("b", []string{a.Addr()})
	c, _ := startServerWith(t, Options{Cluster: ClusterOptions{Members: a}})
	cl := dstlv1connect.NewClusterServiceClient(c.http, c.url, connect.WithGRPC())
	for {
		res, err := cl.ListMembers(ctx, connect.NewRequest(&dstlv1.ListMembersRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		ms := res.Msg.GetMembers()
		if len(ms) == 2 && ms[1].GetState() == dstlv1.MemberState_MEMBER_STATE_ALIVE {
			if !res.Msg.GetGossip() || ms[0].GetNodeId() != "a" || !ms[0].GetSelf() || ms[1].GetSelf() ||
				ms[1].GetRpcUrl() != "http://b:7600" || ms[1].GetZone() != "zone-b" || ms[1].GetLoad() != 5 ||
				ms[1].GetGossipAddr() != b.Addr() || ms[1].GetIncarnation() == 0 || ms[1].GetStateSinceMs() == 0 {
				t.Fatalf("members: %v", res.Msg)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("b not listed alive: %v", res.Msg)
		case <-time.After(20 * time.Millisecond):
		}
	}
	// b dies: listed dead.
	_ = b.Close()
	for {
		res, err := cl.ListMembers(ctx, connect.NewRequest(&dstlv1.ListMembersRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		if ms := res.Msg.GetMembers(); len(ms) == 2 && ms[1].GetState() == dstlv1.MemberState_MEMBER_STATE_DEAD {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("b not listed dead: %v", res.Msg)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
