package e2e

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/gossip"
	dstl "github.com/dstl-dev/dstl/sdk/go"
)

// TestClusterOwnership starts three `dstl serve` processes gossiping on
// loopback (fast timings) over one blob store, and checks writer ownership
// (docs/cluster.md, "Ownership"): an OpenWriter on a member that is not
// the owner is FAILED_PRECONDITION with a NotOwner detail naming it; the Go
// SDK connected to any member opens the writer on the owner and appends
// and checkpoints there; `dstl put` sent to a non-owner follows the owner
// too; after SIGKILL of the owner, once the others see it dead, a new
// writer goes to the member that was second for the key.
func TestClusterOwnership(t *testing.T) {
	t.Parallel()
	requireCLI(t, "cluster", "members")
	blob := "file://" + t.TempDir()
	gossipPorts := make([]string, 3)
	for i := range gossipPorts {
		p, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		gossipPorts[i] = net.JoinHostPort("127.0.0.1", fmt.Sprint(p))
	}
	nodes := make([]*node, 3)
	for i := range nodes {
		args := []string{"--gossip-listen", gossipPorts[i], "--gossip-timings", "fast", "--join", strings.Join(gossipPorts, ",")}
		nodes[i] = startNode(t, fmt.Sprintf("node%d", i), nodeConfig{dataDir: t.TempDir(), blob: blob, args: args})
	}
	byURL := map[string]*node{}
	for _, n := range nodes {
		byURL[n.URL] = n
	}
	// view is what n lists, as gossip members (ids, RPC URLs, states).
	view := func(n *node) []gossip.Member {
		out := cliOK(t, "cluster", "members", "--server", n.URL, "--json")
		var res dstlv1.ListMembersResponse
		if err := protojson.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("cluster members --json: %v\n%s", err, out)
		}
		var ms []gossip.Member
		for _, m := range res.GetMembers() {
			st := gossip.StateDead
			if m.GetState() == dstlv1.MemberState_MEMBER_STATE_ALIVE {
				st = gossip.StateAlive
			}
			ms = append(ms, gossip.Member{ID: m.GetNodeId(), State: st, Meta: gossip.Meta{RPC: m.GetRpcUrl()}, Leaving: m.GetLeaving()})
		}
		return ms
	}
	waitView := func(n *node, ok func([]gossip.Member) bool) []gossip.Member {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			v := view(n)
			if ok(v) {
				return v
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s lists %+v", n.name, v)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	alive := func(want int) func([]gossip.Member) bool {
		return func(v []gossip.Member) bool {
			n := 0
			for _, m := range v {
				if m.Alive() {
					n++
				}
			}
			return n == want
		}
	}
	var members []gossip.Member
	for _, n := range nodes {
		members = waitView(n, alive(3))
	}
	const stream = "owned"
	o, _ := gossip.WriterOwner(stream, 0, testKeyGroups-1, members)
	owner := byURL[o.Meta.RPC]
	var others []*node
	for _, n := range nodes {
		if n != owner {
			others = append(others, n)
		}
	}
	ctx := ctxT(t)
	createStream(t, nodes[0].clients("connect"), stream)

	// The raw API: the non-owner refuses, naming the owner.
	_, err := others[0].clients("grpc").writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: stream}))
	wantCode(t, "OpenWriter on a non-owner", err, connect.CodeFailedPrecondition)
	var ce *connect.Error
	if !errors.As(err, &ce) || !strings.Contains(ce.Message(), o.ID) {
		t.Fatalf("NotOwner message does not name owner %s: %v", o.ID, err)
	}
	found := false
	for _, d := range ce.Details() {
		if v, err := d.Value(); err == nil {
			if no, ok := v.(*dstlv1.NotOwner); ok && no.GetOwnerNode() == o.ID && no.GetOwnerRpc() == owner.URL {
				found = true
			}
		}
	}
	if !found {
		t.Fatalf("no NotOwner detail naming %s at %s: %v", o.ID, owner.URL, ce.Details())
	}
	if got := nodeMetric(t, others[0], "dstl_server_writer_redirects_total"); got != 1 {
		t.Errorf("redirects on the non-owner: %v, want 1", got)
	}

	// The SDK, connected to each member in turn: the writer lives on the
	// owner; each writer checkpoints one more key.
	for i, n := range nodes {
		c := dialSDK(t, n.URL)
		w, err := c.OpenWriter(ctx, stream, dstl.WriterOptions{})
		if err != nil {
			t.Fatalf("OpenWriter via %s: %v", n.name, err)
		}
		if w.Node() != owner.URL {
			t.Fatalf("writer opened via %s lives on %s, want the owner %s", n.name, w.Node(), owner.URL)
		}
		if err := w.Put(ctx, "s", []byte("k"+strconv.Itoa(i)), []byte("v")); err != nil {
			t.Fatal(err)
		}
		if complete, err := w.Checkpoint(ctx, uint64(i+1), nil); err != nil || !complete {
			t.Fatalf("checkpoint via %s: %v %v", n.name, complete, err)
		}
		if err := w.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := nodeMetric(t, owner, "dstl_server_appended_changes_total"); got != 3 {
		t.Errorf("owner's appended changes: %v, want 3", got)
	}
	for _, n := range others {
		if got := nodeMetric(t, n, "dstl_server_appended_changes_total"); got != 0 {
			t.Errorf("%s appended changes: %v, want 0", n.name, got)
		}
	}
	// `dstl put` to a non-owner follows the owner.
	cliOK(t, "put", "--server", others[1].URL, stream, "cli-key", "cli-value")
	if got := nodeMetric(t, owner, "dstl_server_appended_changes_total"); got != 4 {
		t.Errorf("owner's appended changes after dstl put: %v, want 4", got)
	}

	// SIGKILL of the owner: once the survivors see it dead, the writer
	// goes to the member second for the key.
	second := gossip.Owners(gossip.WriterKey(stream, 0, testKeyGroups-1), members, 2)[1]
	owner.Kill()
	for _, n := range others {
		waitView(n, alive(2))
	}
	c := dialSDK(t, others[0].URL)
	w, err := c.OpenWriter(ctx, stream, dstl.WriterOptions{})
	if err != nil {
		t.Fatalf("OpenWriter after the owner died: %v", err)
	}
	if w.Node() != second.Meta.RPC {
		t.Fatalf("writer after the owner died on %s, want %s", w.Node(), second.Meta.RPC)
	}
	for _, k := range []string{"k0", "k1", "k2"} {
		if v, ok, err := w.Get(ctx, "s", []byte(k)); err != nil || !ok || string(v) != "v" {
			t.Fatalf("%s on the new owner: %q %v %v", k, v, ok, err)
		}
	}
	if v, ok, err := w.Get(ctx, "default", []byte("cli-key")); err != nil || !ok || string(v) != "cli-value" {
		t.Fatalf("cli-key on the new owner: %q %v %v", v, ok, err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// nodeMetric sums the samples of metric name on n's /metrics (0 if it
// has none).
func nodeMetric(t *testing.T, n *node, name string) float64 {
	t.Helper()
	sum, _, err := metricSum(t.Context(), n.URL, name)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}
