package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func TestGossipFlags(t *testing.T) {
	if (&gossipFlags{zone: "a", advertise: "1.2.3.4:1"}).enabled() {
		t.Fatal("gossip on without --gossip-listen or --join")
	}
	for _, c := range []struct {
		name   string
		g      gossipFlags
		listen string
		tls    bool
		bind   string
		join   []string
		rpc    string
	}{
		{"join only: bind on the API host, port 7946", gossipFlags{join: []string{"10.0.0.1", "10.0.0.2:8000", " "}}, "10.0.0.9:7600", false,
			"10.0.0.9:7946", []string{"10.0.0.1:7946", "10.0.0.2:8000"}, "http://10.0.0.9:7600"},
		{"listen only", gossipFlags{listen: "127.0.0.1:9000"}, "127.0.0.1:7600", true, "127.0.0.1:9000", nil, "https://127.0.0.1:7600"},
		{"advertise names the RPC host", gossipFlags{listen: "0.0.0.0:7946", advertise: "node-3.example:7946"}, "0.0.0.0:7600", false,
			"0.0.0.0:7946", nil, "http://node-3.example:7600"},
		{"unspecified API host: the gossip host", gossipFlags{listen: "10.1.1.1:7946"}, ":7600", false, "10.1.1.1:7946", nil, "http://10.1.1.1:7600"},
		{"IPv6", gossipFlags{join: []string{"[::1]"}}, "[::1]:7600", false, "[::1]:7946", []string{"[::1]:7946"}, "http://[::1]:7600"},
	} {
		cfg, err := c.g.config("n1", c.listen, c.tls, nil)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if cfg.Bind != c.bind || strings.Join(cfg.Join, ",") != strings.Join(c.join, ",") || cfg.Meta.RPC != c.rpc || cfg.NodeID != "n1" {
			t.Errorf("%s: bind %s join %v rpc %s", c.name, cfg.Bind, cfg.Join, cfg.Meta.RPC)
		}
	}
	for _, g := range []gossipFlags{{listen: "nope"}, {listen: "127.0.0.1:1", advertise: "x"}, {listen: "127.0.0.1:1", timings: "slow"}} {
		if _, err := g.config("n1", "127.0.0.1:7600", false, nil); err == nil {
			t.Errorf("%+v accepted", g)
		}
	}
	if got := withPort("http://h:0", 4321); got != "http://h:4321" {
		t.Errorf("withPort: %s", got)
	}
}

// `dstl cluster members` of a single node lists it alone.
func TestClusterMembersSingleNode(t *testing.T) {
	n := startCLINode(t)
	out := n.mustCLI(t, "cluster", "members")
	if !strings.Contains(out, n.node.ID()+" *") || !strings.Contains(out, "alive") || !strings.Contains(out, "gossip is off") {
		t.Fatalf("single node:\n%s", out)
	}
	js := n.mustCLI(t, "cluster", "members", "--json")
	res := unmarshalCLIJSON[dstlv1.ListMembersResponse](t, js)
	if len(res.GetMembers()) != 1 || res.GetGossip() {
		t.Fatalf("json: %s", js)
	}
}

// Two in-process `dstl serve` with --gossip-listen and --join: each lists
// both; a graceful stop is listed "left" by the other.
func TestServeGossip(t *testing.T) {
	dir := t.TempDir()
	type proc struct {
		url    string
		cancel context.CancelFunc
		done   chan error
	}
	start := func(name, gossipAddr string, join []string) proc {
		addr := freeAddr(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- serve(ctx, serveOptions{
				dataDir: filepath.Join(dir, name), listen: addr, logFormat: "text", logLevel: "error",
				durability: "buffered", uploadInterval: time.Second, batchDelay: time.Millisecond,
				flushBytes: 1 << 20, maxInFlightBytes: 64 << 20, maxKeySize: 1024, maxValueSize: 1 << 20,
				retainCheckpoints: 3, gcInterval: -1, shutdownTimeout: 10 * time.Second,
				gossip: gossipFlags{listen: gossipAddr, join: join, zone: "z-" + name, timings: "fast"},
			})
		}()
		t.Cleanup(func() {
			cancel()
			<-done
		})
		return proc{url: "http://" + addr, cancel: cancel, done: done}
	}
	ga, gb := freeAddr(t), freeAddr(t)
	a := start("a", ga, nil)
	b := start("b", gb, []string{ga})
	list := func(p proc) *dstlv1.ListMembersResponse {
		out, err := runCLI(t, "--server", p.url, "cluster", "members", "--json")
		if err != nil {
			return nil // not serving yet
		}
		return unmarshalCLIJSON[dstlv1.ListMembersResponse](t, out)
	}
	waitList := func(p proc, what string, ok func(ms []*dstlv1.Member) bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			res := list(p)
			if res != nil && ok(res.GetMembers()) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s not reached: %v", p.url, what, res)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for _, p := range []proc{a, b} {
		waitList(p, "both alive", func(ms []*dstlv1.Member) bool {
			if len(ms) != 2 {
				return false
			}
			urls := map[string]bool{}
			for _, m := range ms {
				urls[m.GetRpcUrl()] = m.GetState() == dstlv1.MemberState_MEMBER_STATE_ALIVE && strings.HasPrefix(m.GetZone(), "z-")
			}
			return urls[a.url] && urls[b.url]
		})
	}
	b.cancel()
	if err := <-b.done; err != nil {
		t.Fatalf("b: %v", err)
	}
	b.done <- nil // for the cleanup
	waitList(a, "b left", func(ms []*dstlv1.Member) bool {
		for _, m := range ms {
			if m.GetRpcUrl() == b.url {
				return m.GetState() == dstlv1.MemberState_MEMBER_STATE_LEFT
			}
		}
		return false
	})
}
