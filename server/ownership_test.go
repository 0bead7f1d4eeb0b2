package server

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/gossip"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// clusterNode is one member of a test cluster: a real changelog node over
// the cluster's shared blob store, its API on a loopback h2c server, and a
// real memberlist gossiping the API's URL.
type clusterNode struct {
	url     string
	srv     *Server
	gossip  *gossip.Cluster
	writers dstlv1connect.WriterServiceClient
	streams dstlv1connect.StreamServiceClient
}

func startClusterNode(t *testing.T, store upload.BlobStore, join []string) *clusterNode {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nodeOpts := changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + ln.Addr().String()
	g, err := gossip.Open(ctx, gossip.Config{NodeID: node.ID(), Bind: "127.0.0.1:0", Join: join, Timings: gossip.FastTimings(),
		Meta: gossip.Meta{RPC: url}})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(node, Options{Cluster: ClusterOptions{Members: g}})
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), Protocols: new(http.Protocols)}
	hs.Protocols.SetUnencryptedHTTP2(true)
	go hs.Serve(ln)
	t.Cleanup(func() {
		_ = hs.Close()
		_ = g.Close()
		_ = srv.Close()
		_ = node.Close(context.Background())
	})
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: p}}
	return &clusterNode{url: url, srv: srv, gossip: g,
		writers: dstlv1connect.NewWriterServiceClient(hc, url), streams: dstlv1connect.NewStreamServiceClient(hc, url)}
}

// startCluster starts n members on one blob store and waits until each sees
// all of them alive.
func startCluster(t *testing.T, n int) []*clusterNode {
	t.Helper()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	var nodes []*clusterNode
	for i := range n {
		var join []string
		if i > 0 {
			join = []string{nodes[0].gossip.Addr()}
		}
		nodes = append(nodes, startClusterNode(t, store, join))
	}
	waitAlive(t, nodes, n)
	return nodes
}

// waitAlive waits until every node sees exactly want members alive.
func waitAlive(t *testing.T, nodes []*clusterNode, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, cn := range nodes {
		for {
			alive := 0
			for _, m := range cn.gossip.Members() {
				if m.Alive() {
					alive++
				}
			}
			if alive == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s sees %d members alive, want %d", cn.url, alive, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// ownerOf returns the node that owns the writer of lo..hi of stream in the
// view of nodes[0], and one that does not.
func ownerOf(t *testing.T, nodes []*clusterNode, stream string, lo, hi uint32) (owner, other *clusterNode) {
	t.Helper()
	o, ok := gossip.WriterOwner(stream, lo, hi, nodes[0].gossip.Members())
	if !ok {
		t.Fatal("no owner")
	}
	for _, cn := range nodes {
		if cn.gossip.Self().ID == o.ID {
			owner = cn
		} else if other == nil {
			other = cn
		}
	}
	return owner, other
}

// OpenWriter on a member that does not own the writer fails with
// FAILED_PRECONDITION and a NotOwner detail naming the owner; on the owner,
// or with any_node, it opens there. Two real memberlist nodes.
func TestOpenWriterNotOwner(t *testing.T) {
	ctx := t.Context()
	nodes := startCluster(t, 2)
	if _, err := nodes[0].streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "orders", KeyGroups: 16})); err != nil {
		t.Fatal(err)
	}
	owner, other := ownerOf(t, nodes, "orders", 0, 15)
	ownerID := owner.gossip.Self().ID

	_, err := other.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "orders"}))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeFailedPrecondition {
		t.Fatalf("open on the non-owner: %v, want FAILED_PRECONDITION", err)
	}
	if !strings.Contains(ce.Message(), ownerID) || !strings.Contains(ce.Message(), owner.url) {
		t.Fatalf("message does not name the owner %s at %s: %s", ownerID, owner.url, ce.Message())
	}
	var detail *dstlv1.NotOwner
	for _, d := range ce.Details() {
		if v, err := d.Value(); err == nil {
			detail, _ = v.(*dstlv1.NotOwner)
		}
	}
	if detail == nil || detail.GetOwnerNode() != ownerID || detail.GetOwnerRpc() != owner.url {
		t.Fatalf("NotOwner detail %v, want %s at %s", detail, ownerID, owner.url)
	}
	if got := metricValue(t, other.srv.metrics.redirects); got != 1 {
		t.Fatalf("redirects on the non-owner: %v, want 1", got)
	}
	// The same in process (the handlers the embedded client calls).
	if _, err := other.srv.InProcess().Writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "orders"})); connect.CodeOf(err) != connect.CodeFailedPrecondition || !errors.Is(err, ErrNotOwner) {
		t.Fatalf("in process: %v", err)
	}

	// any_node: opens on the non-owner.
	res, err := other.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "orders", AnyNode: true}))
	if err != nil {
		t.Fatalf("any_node: %v", err)
	}
	if _, ok := other.srv.writers[res.Msg.GetWriterId()]; !ok {
		t.Fatalf("any_node writer %s not on the node that answered", res.Msg.GetWriterId())
	}
	// The owner opens it (fencing the any_node writer, as any newer epoch).
	res2, err := owner.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "orders"}))
	if err != nil {
		t.Fatalf("open on the owner: %v", err)
	}
	if res2.Msg.GetEpoch() <= res.Msg.GetEpoch() {
		t.Fatalf("owner's epoch %d not above %d", res2.Msg.GetEpoch(), res.Msg.GetEpoch())
	}
	// Across nodes the fence is found in the stream's journal (at the
	// latest on a checkpoint): the old epoch cannot make its change visible.
	_, _ = other.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: res.Msg.GetWriterId(),
		Changes: []*dstlv1.Change{{Op: dstlv1.Op_OP_PUT, State: "s", Key: []byte("k"), Value: []byte("v")}}}))
	if _, err := other.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: res.Msg.GetWriterId(), CheckpointId: 1})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("checkpoint of the fenced any_node writer: %v, want FAILED_PRECONDITION", err)
	}
	if got := metricValue(t, owner.srv.metrics.redirects); got != 0 {
		t.Fatalf("redirects on the owner: %v", got)
	}

	// Ranges are owned separately: each of 16 single key groups has an
	// owner, and each node refuses exactly the ones it does not own.
	for kg := range uint32(16) {
		o, _ := gossip.WriterOwner("orders", kg, kg, nodes[1].gossip.Members())
		for _, cn := range nodes {
			_, err := cn.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "orders", KeyGroups: &dstlv1.KeyGroupRange{Lo: kg, Hi: kg}}))
			if mine := cn.gossip.Self().ID == o.ID; mine != (err == nil) {
				t.Fatalf("key group %d on %s (owner %s): %v", kg, cn.gossip.Self().ID, o.ID, err)
			}
		}
	}
}

// With gossip off a node owns everything.
func TestOpenWriterSingleNodeOwnsAll(t *testing.T) {
	c, srv := startServerWith(t, Options{})
	ctx := t.Context()
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 8})); err != nil {
		t.Fatal(err)
	}
	for kg := range uint32(8) {
		if _, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: kg, Hi: kg}})); err != nil {
			t.Fatalf("key group %d: %v", kg, err)
		}
	}
	if got := metricValue(t, srv.metrics.redirects); got != 0 {
		t.Fatalf("redirects: %v", got)
	}
}
