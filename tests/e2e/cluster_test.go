package e2e

import (
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// TestClusterMembers starts three `dstl serve` processes gossiping on
// loopback (fast timings), the second and third joining the first (the
// third lists every node in --join, itself included), and checks with
// `dstl cluster members --json` that each lists all three alive with their
// RPC URLs and zones; then SIGTERM of the third is seen as "left" and
// SIGKILL of the second as "dead"; the second, restarted on its data
// directory (same node id), is seen alive again.
func TestClusterMembers(t *testing.T) {
	t.Parallel()
	requireCLI(t, "cluster", "members")
	gossipPorts := make([]string, 3)
	for i := range gossipPorts {
		p, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		gossipPorts[i] = net.JoinHostPort("127.0.0.1", fmt.Sprint(p))
	}
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	args := func(i int) []string {
		a := []string{"--gossip-listen", gossipPorts[i], "--gossip-timings", "fast", "--zone", fmt.Sprintf("zone-%d", i)}
		switch i {
		case 1:
			a = append(a, "--join", gossipPorts[0])
		case 2:
			a = append(a, "--join", strings.Join(gossipPorts, ","))
		}
		return a
	}
	nodes := make([]*node, 3)
	for i := range nodes {
		nodes[i] = startNode(t, fmt.Sprintf("node%d", i), nodeConfig{dataDir: dirs[i], args: args(i)})
	}
	urls := []string{nodes[0].URL, nodes[1].URL, nodes[2].URL}

	// members lists what n sees: rpc URL → state ("alive", …), zone.
	members := func(n *node) map[string]*dstlv1.Member {
		out := cliOK(t, "cluster", "members", "--server", n.URL, "--json")
		var res dstlv1.ListMembersResponse
		if err := protojson.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("cluster members --json: %v\n%s", err, out)
		}
		if !res.GetGossip() {
			t.Fatalf("%s: gossip off: %s", n.name, out)
		}
		m := map[string]*dstlv1.Member{}
		for _, mb := range res.GetMembers() {
			m[mb.GetRpcUrl()] = mb
		}
		return m
	}
	// waitMembers waits until n lists want (rpc URL → state).
	waitMembers := func(n *node, want map[string]dstlv1.MemberState) map[string]*dstlv1.Member {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			got := members(n)
			ok := len(got) == len(want)
			for url, st := range want {
				ok = ok && got[url] != nil && got[url].GetState() == st
			}
			if ok {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s lists %v, want %v", n.name, got, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	alive := dstlv1.MemberState_MEMBER_STATE_ALIVE
	allAlive := map[string]dstlv1.MemberState{urls[0]: alive, urls[1]: alive, urls[2]: alive}
	for _, n := range nodes {
		got := waitMembers(n, allAlive)
		for i, url := range urls {
			m := got[url]
			if m.GetZone() != fmt.Sprintf("zone-%d", i) || m.GetGossipAddr() != gossipPorts[i] || m.GetSelf() != (url == n.URL) {
				t.Errorf("%s lists node%d as %v", n.name, i, m)
			}
		}
	}
	// The table form.
	table := cliOK(t, "cluster", "members", "--server", nodes[0].URL)
	if strings.Count(table, " alive ") != 3 || !strings.Contains(table, "zone-2") || strings.Count(table, "*") != 1 {
		t.Errorf("cluster members table:\n%s", table)
	}
	// /metrics.
	if m := scrape(t, nodes[1], "dstl_cluster_members"); !strings.Contains(m, `dstl_cluster_members{state="alive"} 3`) {
		t.Errorf("metrics: %s", m)
	}

	// Graceful stop of node2: left. Crash of node1: dead.
	if code := nodes[2].Terminate(30 * time.Second); code != 0 {
		t.Fatalf("node2 exited %d on SIGTERM", code)
	}
	waitMembers(nodes[0], map[string]dstlv1.MemberState{urls[0]: alive, urls[1]: alive, urls[2]: dstlv1.MemberState_MEMBER_STATE_LEFT})
	nodes[1].Kill()
	killed := time.Now()
	waitMembers(nodes[0], map[string]dstlv1.MemberState{urls[0]: alive, urls[1]: dstlv1.MemberState_MEMBER_STATE_DEAD, urls[2]: dstlv1.MemberState_MEMBER_STATE_LEFT})
	t.Logf("SIGKILL of node1 listed dead by node0 after %v (fast timings, 50 ms polling)", time.Since(killed).Round(10*time.Millisecond))

	// node1 restarts on its data directory: the same node id, alive again.
	before := members(nodes[0])[urls[1]]
	restarted := startNode(t, "node1-again", nodeConfig{dataDir: dirs[1], args: args(1)})
	want := map[string]dstlv1.MemberState{urls[0]: alive, restarted.URL: alive, urls[2]: dstlv1.MemberState_MEMBER_STATE_LEFT}
	if restarted.URL != urls[1] {
		delete(want, urls[1]) // a new API port: the same member, a new RPC URL
	}
	after := waitMembers(nodes[0], want)[restarted.URL]
	if after.GetNodeId() != before.GetNodeId() || after.GetIncarnation() <= before.GetIncarnation() {
		t.Errorf("restarted node1: %v, before: %v", after, before)
	}
}

// scrape returns the lines of n's /metrics that start with prefix.
func scrape(t *testing.T, n *node, prefix string) string {
	t.Helper()
	resp, err := h2cClient().Get(n.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	lines := slices.DeleteFunc(strings.Split(string(body), "\n"), func(l string) bool { return !strings.HasPrefix(l, prefix) })
	return strings.Join(lines, "\n")
}
