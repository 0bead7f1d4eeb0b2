package gossip

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/gossip/gossiptest"
)

// testNode opens a Cluster on a loopback port with the Fast timings.
func testNode(t *testing.T, id string, mod func(*Config)) *Cluster {
	t.Helper()
	cfg := Config{
		NodeID:  id,
		Bind:    "127.0.0.1:0",
		Meta:    Meta{RPC: "http://" + id + ".test:7600", Zone: "zone-" + id},
		Timings: FastTimings(),
		Logger:  testLogger(t, id),
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Open(ctx, cfg)
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// testLogger logs memberlist's and the view's lines with -v and
// DSTL_GOSSIP_LOG=1 only: they are many.
func testLogger(t *testing.T, id string) *slog.Logger {
	if os.Getenv("DSTL_GOSSIP_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("self", id)
}

// startCluster opens n nodes (n1..nn) that join the first.
func startCluster(t *testing.T, n int, mod func(*Config)) []*Cluster {
	t.Helper()
	var nodes []*Cluster
	for i := range n {
		nodes = append(nodes, testNode(t, fmt.Sprintf("n%d", i+1), func(c *Config) {
			if i > 0 {
				c.Join = []string{nodes[0].Addr()}
			}
			if mod != nil {
				mod(c)
			}
		}))
	}
	return nodes
}

// waitFor waits until pred holds for c's view (woken by Watch, and every
// 50ms in case a change raced the subscription); it returns how long that
// took.
func waitFor(t *testing.T, c *Cluster, timeout time.Duration, what string, pred func([]Member) bool) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	w := c.Watch(ctx)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if pred(c.Members()) {
			return time.Since(start)
		}
		select {
		case <-w:
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("%s: %s not reached within %v; view: %s", c, what, timeout, describe(c.Members()))
		}
	}
}

func describe(ms []Member) string {
	s := ""
	for _, m := range ms {
		s += fmt.Sprintf("[%s %s %s inc=%d rpc=%s] ", m.ID, m.Addr, m.State, m.Incarnation, m.Meta.RPC)
	}
	return s
}

// stateOf returns a predicate: member id is in state s.
func stateOf(id string, s State) func([]Member) bool {
	return func(ms []Member) bool {
		for _, m := range ms {
			if m.ID == id {
				return m.State == s
			}
		}
		return false
	}
}

// allAlive: exactly the ids are members and alive.
func allAlive(ids ...string) func([]Member) bool {
	return func(ms []Member) bool {
		if len(ms) != len(ids) {
			return false
		}
		for i, m := range ms {
			if m.ID != ids[i] || m.State != StateAlive {
				return false
			}
		}
		return true
	}
}

// Three nodes converge; each sees every member's metadata and incarnation,
// and itself as Self.
func TestClusterConverges(t *testing.T) {
	start := time.Now()
	nodes := startCluster(t, 3, nil)
	for _, c := range nodes {
		waitFor(t, c, 5*time.Second, "3 alive", allAlive("n1", "n2", "n3"))
	}
	t.Logf("3 nodes converged %v after the first Open (Fast timings)", time.Since(start).Round(time.Millisecond))
	for _, c := range nodes {
		for _, m := range c.Members() {
			if m.Meta.RPC != "http://"+m.ID+".test:7600" || m.Meta.Zone != "zone-"+m.ID || m.MetaErr != nil {
				t.Errorf("%s sees %s with metadata %+v (%v)", c, m.ID, m.Meta, m.MetaErr)
			}
			if m.Incarnation == 0 || m.Addr == "" || m.StateSince.IsZero() {
				t.Errorf("%s sees %s incomplete: %+v", c, m.ID, m)
			}
			if m.Self != (m.ID == c.Self().ID) {
				t.Errorf("%s: Self of %s is %v", c, m.ID, m.Self)
			}
		}
		if s := c.Self(); s.ID != c.cfg.NodeID || !s.Self || s.Addr != c.Addr() {
			t.Errorf("Self of %s: %+v", c, s)
		}
	}
}

// UpdateMeta reaches every member, and Watch wakes on it.
func TestUpdateMeta(t *testing.T) {
	nodes := startCluster(t, 3, nil)
	for _, c := range nodes {
		waitFor(t, c, 5*time.Second, "3 alive", allAlive("n1", "n2", "n3"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w := nodes[1].Watch(ctx)
	if err := nodes[2].UpdateMeta(ctx, Meta{RPC: "http://n3.test:7601", Zone: "zone-n3", Load: 99}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w:
	case <-ctx.Done():
		t.Fatal("Watch did not wake on a metadata update")
	}
	for _, c := range nodes {
		waitFor(t, c, 5*time.Second, "n3's new metadata", func(ms []Member) bool {
			return ms[2].Meta.Load == 99 && ms[2].Meta.RPC == "http://n3.test:7601"
		})
	}
	if err := nodes[0].UpdateMeta(ctx, Meta{RPC: string(make([]byte, MaxMetaSize))}); err == nil {
		t.Fatal("oversized metadata accepted")
	}
	if got := nodes[0].EventCounts()[eventUpdate]; got == 0 {
		t.Fatalf("no update event counted: %v", nodes[0].EventCounts())
	}
}

// A node shut down without leaving is seen dead; one that leaves is seen
// left; a node restarted with the same id (same address, then another
// one) is seen alive again with a higher incarnation.
func TestFailLeaveRejoin(t *testing.T) {
	nodes := startCluster(t, 4, nil)
	for _, c := range nodes {
		waitFor(t, c, 5*time.Second, "4 alive", allAlive("n1", "n2", "n3", "n4"))
	}
	oldInc := nodes[2].Self().Incarnation
	n3addr := nodes[2].Addr()

	// Crash: Close without Leave.
	killed := time.Now()
	if err := nodes[2].Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*Cluster{nodes[0], nodes[1], nodes[3]} {
		waitFor(t, c, 10*time.Second, "n3 dead", stateOf("n3", StateDead))
	}
	t.Logf("crash of n3 seen dead by all 3 others %v after Close (Fast timings)", time.Since(killed).Round(time.Millisecond))

	// Graceful leave.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	left := time.Now()
	if err := nodes[3].Leave(ctx); err != nil {
		t.Fatal(err)
	}
	if err := nodes[3].Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*Cluster{nodes[0], nodes[1]} {
		waitFor(t, c, 10*time.Second, "n4 left", stateOf("n4", StateLeft))
	}
	t.Logf("leave of n4 seen by both others %v after Leave was called", time.Since(left).Round(time.Millisecond))

	// Restart n3 on the same address, same id.
	time.Sleep(2 * time.Millisecond) // a new incarnation (ms clock)
	back := time.Now()
	n3 := testNode(t, "n3", func(c *Config) { c.Bind = n3addr; c.Join = []string{nodes[0].Addr()} })
	for _, c := range []*Cluster{nodes[0], nodes[1], n3} {
		waitFor(t, c, 10*time.Second, "n3 alive again", stateOf("n3", StateAlive))
	}
	t.Logf("restarted n3 seen alive by both others %v after Open", time.Since(back).Round(time.Millisecond))
	for _, c := range []*Cluster{nodes[0], nodes[1]} {
		for _, m := range c.Members() {
			if m.ID == "n3" && m.Incarnation <= oldInc {
				t.Errorf("%s sees restarted n3 at incarnation %d, not above %d", c, m.Incarnation, oldInc)
			}
		}
	}

	// Crash again and come back on another port (DeadNodeReclaimTime).
	if err := n3.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, nodes[0], 10*time.Second, "n3 dead", stateOf("n3", StateDead))
	n3b := testNode(t, "n3", func(c *Config) { c.Join = []string{nodes[1].Addr()} })
	for _, c := range []*Cluster{nodes[0], nodes[1]} {
		waitFor(t, c, 10*time.Second, "n3 alive on its new address", func(ms []Member) bool {
			return stateOf("n3", StateAlive)(ms) && ms[2].Addr == n3b.Addr()
		})
	}
	if c := nodes[0].EventCounts(); c[eventDead] < 2 || c[eventLeft] != 1 || c[eventJoin] < 5 {
		t.Errorf("event counts: %v", c)
	}
}

// An isolated node is declared dead by the majority (and sees them dead);
// once the partition heals, the reconnect loop brings everyone back.
func TestPartitionHeals(t *testing.T) {
	network := gossiptest.NewNetwork()
	nodes := startCluster(t, 3, func(c *Config) { c.Transport = network.Wrap })
	for _, c := range nodes {
		waitFor(t, c, 5*time.Second, "3 alive", allAlive("n1", "n2", "n3"))
	}
	cut := time.Now()
	network.Isolate(nodes[2].Addr())
	for _, c := range nodes[:2] {
		waitFor(t, c, 10*time.Second, "n3 dead", stateOf("n3", StateDead))
	}
	t.Logf("isolated n3 seen dead by the majority %v after the cut", time.Since(cut).Round(time.Millisecond))
	waitFor(t, nodes[2], 10*time.Second, "n1, n2 dead", func(ms []Member) bool {
		return stateOf("n1", StateDead)(ms) && stateOf("n2", StateDead)(ms)
	})
	// Longer than memberlist gossips to the dead: only the reconnect loop
	// can bring the sides together again.
	time.Sleep(FastTimings().GossipToTheDeadTime + 200*time.Millisecond)
	healed := time.Now()
	network.Heal()
	for _, c := range nodes {
		waitFor(t, c, 10*time.Second, "3 alive after healing", allAlive("n1", "n2", "n3"))
	}
	t.Logf("healed in %v (reconnect interval %v); %d packets/dials dropped", time.Since(healed).Round(time.Millisecond), FastTimings().ReconnectInterval, network.Dropped())
}

// A node whose seeds are all down starts alone and joins them once one
// comes up.
func TestSeedDownStartsAloneThenJoins(t *testing.T) {
	seed := freeLoopbackAddr(t)
	opened := time.Now()
	b := testNode(t, "b", func(c *Config) { c.Join = []string{seed} })
	if d := time.Since(opened); d > 5*time.Second {
		t.Fatalf("Open with a dead seed took %v", d)
	}
	if ms := b.Members(); len(ms) != 1 || !ms[0].Self {
		t.Fatalf("alone: %s", describe(ms))
	}
	a := testNode(t, "a", func(c *Config) { c.Bind = seed })
	for _, c := range []*Cluster{a, b} {
		waitFor(t, c, 10*time.Second, "a and b alive", allAlive("a", "b"))
	}
}

// A node lists itself in its seeds (every node started with the same
// --join list): that is not a join.
func TestSelfInSeedsIgnored(t *testing.T) {
	addr := freeLoopbackAddr(t)
	c := testNode(t, "solo", func(c *Config) { c.Bind = addr; c.Join = []string{addr} })
	if len(c.seeds) != 0 {
		t.Fatalf("seeds %v include the node's own address %s", c.seeds, addr)
	}
}

func TestWatchStops(t *testing.T) {
	c := testNode(t, "w", nil)
	ctx, cancel := context.WithCancel(context.Background())
	w := c.Watch(ctx)
	cancel()
	for range w { // drains a pending signal, ends when closed
	}
	w2 := c.Watch(context.Background())
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for range w2 {
	}
	if _, ok := <-c.Watch(context.Background()); ok {
		t.Fatal("Watch after Close is open")
	}
	if err := c.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
}

func TestOpenRejectsBadConfig(t *testing.T) {
	ctx := context.Background()
	for name, cfg := range map[string]Config{
		"no id":        {Bind: "127.0.0.1:0"},
		"no port":      {NodeID: "x", Bind: "127.0.0.1"},
		"bad join":     {NodeID: "x", Bind: "127.0.0.1:0", Join: []string{"nope"}},
		"bad port":     {NodeID: "x", Bind: "127.0.0.1:99999"},
		"huge meta":    {NodeID: "x", Bind: "127.0.0.1:0", Meta: Meta{Zone: string(make([]byte, 600))}},
		"bad advert.":  {NodeID: "x", Bind: "127.0.0.1:0", Advertise: "1.2.3.4"},
		"port in use":  {NodeID: "x", Bind: inUse(t)},
		"no such host": {NodeID: "x", Bind: "no-such-host.invalid:0"},
	} {
		if c, err := Open(ctx, cfg); err == nil {
			_ = c.Close()
			t.Errorf("%s: Open succeeded", name)
		}
	}
}

func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// inUse returns an address whose TCP port stays taken until the test ends.
func inUse(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l.Addr().String()
}
