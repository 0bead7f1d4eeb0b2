package gossip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// TransportWrapper wraps the memberlist transport a Cluster makes (see
// Config.Transport).
type TransportWrapper func(memberlist.NodeAwareTransport) memberlist.NodeAwareTransport

// Cluster is this node's membership in a cluster: a memberlist instance,
// the view it keeps of the members, and the reconnect loop. Open starts
// it; Leave then Close stops it.
type Cluster struct {
	cfg         Config
	ml          *memberlist.Memberlist
	view        *view
	meta        *metaDelegate
	incarnation uint64
	addr        string   // this node's advertised gossip address
	seeds       []string // Config.Join without this node's own address

	stopLoop context.CancelFunc // the reconnect loop's owner
	loopDone chan struct{}

	stopOnce  sync.Once
	closeOnce sync.Once
	closeErr  error
}

// Open starts gossip on cfg.Bind and joins cfg.Join. It tries the seeds
// Timings.JoinAttempts times (JoinBackoff apart, doubling); if none
// answers, the node starts alone (logged at warn) and the reconnect loop
// keeps trying them every ReconnectInterval: a node never fails to start
// because its seeds are down, so any subset of a cluster can (re)start in
// any order. Open fails only on bad configuration, a bind error or a
// cancelled ctx.
func Open(ctx context.Context, cfg Config) (*Cluster, error) {
	cfg, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg, incarnation: uint64(cfg.Now().UnixMilli())}
	c.view = newView(cfg.NodeID, cfg.Now, cfg.Logger)
	c.meta = &metaDelegate{}
	if err := c.meta.update(func(w *wireMeta) { *w = wireMeta{Meta: cfg.Meta, Incarnation: c.incarnation} }); err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}
	nt, err := newNetTransport(ctx, cfg.Bind, cfg.Logger)
	if err != nil {
		return nil, err
	}
	var transport memberlist.NodeAwareTransport = nt
	if cfg.Transport != nil {
		transport = cfg.Transport(nt)
	}
	mc, err := memberlistConfig(ctx, cfg, nt.GetAutoBindPort())
	if err != nil {
		_ = transport.Shutdown()
		return nil, err
	}
	mc.Transport = transport
	mc.Delegate = c.meta
	mc.Events = c.view
	ml, err := memberlist.Create(mc)
	if err != nil {
		_ = transport.Shutdown()
		return nil, fmt.Errorf("gossip: start memberlist: %w", err)
	}
	c.ml = ml
	ip, port, err := transport.FinalAdvertiseAddr(mc.AdvertiseAddr, mc.AdvertisePort)
	if err != nil { // memberlist.Create made the same call: not reached
		_ = ml.Shutdown()
		return nil, fmt.Errorf("gossip: advertise address: %w", err)
	}
	c.addr = net.JoinHostPort(ip.String(), strconv.Itoa(port))
	for _, s := range cfg.Join {
		if !sameAddr(s, c.addr) {
			c.seeds = append(c.seeds, s)
		}
	}
	cfg.Logger.Info("gossip: started", "node", cfg.NodeID, "addr", c.addr, "seeds", c.seeds, "incarnation", c.incarnation)

	if len(c.seeds) > 0 {
		if err := c.joinWithRetries(ctx); err != nil {
			if ctx.Err() != nil {
				_ = ml.Shutdown()
				c.view.close()
				return nil, fmt.Errorf("gossip: join: %w", ctx.Err())
			}
			cfg.Logger.Warn("gossip: no seed answered; starting alone and retrying in the background",
				"seeds", c.seeds, "attempts", cfg.Timings.JoinAttempts, "retry_every", cfg.Timings.ReconnectInterval, "err", err)
		}
	}
	loopCtx, stop := context.WithCancel(context.Background())
	c.stopLoop, c.loopDone = stop, make(chan struct{})
	go c.reconnectLoop(loopCtx)
	return c, nil
}

// memberlistConfig maps a Config to memberlist's.
func memberlistConfig(ctx context.Context, cfg Config, boundPort int) (*memberlist.Config, error) {
	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.NodeID
	host, _, _ := splitHostPort(cfg.Bind)
	mc.BindAddr, mc.BindPort = host, boundPort // BindPort: the default port of join addresses
	if cfg.Advertise != "" {
		host, port, _ := splitHostPort(cfg.Advertise)
		ip, err := resolveIP(ctx, host)
		if err != nil {
			return nil, fmt.Errorf("gossip: advertise address: %w", err)
		}
		if port == 0 {
			port = boundPort
		}
		mc.AdvertiseAddr, mc.AdvertisePort = ip.String(), port
	}
	t := cfg.Timings
	mc.ProbeInterval, mc.ProbeTimeout, mc.SuspicionMult = t.ProbeInterval, t.ProbeTimeout, t.SuspicionMult
	mc.GossipInterval, mc.PushPullInterval = t.GossipInterval, t.PushPullInterval
	mc.GossipToTheDeadTime, mc.TCPTimeout = t.GossipToTheDeadTime, t.TCPTimeout
	// A dead member may come back on another address at once (a restart
	// with a new port): names are node ids, unique per data directory.
	mc.DeadNodeReclaimTime = time.Nanosecond
	mc.Logger = newStdLogger(cfg.Logger)
	return mc, nil
}

// newNetTransport binds memberlist's UDP+TCP transport; port 0 picks a
// port free for both (retried, as memberlist.Create does).
func newNetTransport(ctx context.Context, bind string, log *slog.Logger) (*memberlist.NetTransport, error) {
	host, port, _ := splitHostPort(bind)
	ip, err := resolveIP(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("gossip: bind address: %w", err)
	}
	attempts := 1
	if port == 0 {
		attempts = 10 // the TCP port may be taken for UDP
	}
	var lastErr error
	for range attempts {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{ip.String()}, BindPort: port, Logger: newStdLogger(log),
		})
		if err == nil {
			return nt, nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("gossip: listen on %s: %w", bind, lastErr)
}

// resolveIP returns host as an IP (unspecified for ""), resolving a name.
func resolveIP(ctx context.Context, host string) (net.IP, error) {
	if host == "" {
		return net.IPv4zero, nil
	}
	if ip := net.ParseIP(host); ip != nil {
		return ip, nil
	}
	ips, err := net.DefaultResolver.LookupIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("resolve %q: %w", host, err)
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("resolve %q: no address", host)
	}
	return ips[0], nil
}

// sameAddr reports whether two host:port strings name the same address.
func sameAddr(a, b string) bool {
	ah, ap, err1 := net.SplitHostPort(a)
	bh, bp, err2 := net.SplitHostPort(b)
	if err1 != nil || err2 != nil || ap != bp {
		return false
	}
	aip, bip := net.ParseIP(ah), net.ParseIP(bh)
	if aip != nil && bip != nil {
		return aip.Equal(bip)
	}
	return ah == bh
}

// join contacts addrs (push/pull of the full state with each); it returns
// how many answered. memberlist's Join takes no context: each address is
// bounded by TCPTimeout.
func (c *Cluster) join(addrs []string) (int, error) {
	n, err := c.ml.Join(addrs)
	if n > 0 {
		return n, nil // some answered: that is a join
	}
	if err == nil {
		err = errors.New("no address answered")
	}
	return 0, err
}

// joinWithRetries tries the seeds JoinAttempts times.
func (c *Cluster) joinWithRetries(ctx context.Context) error {
	t := c.cfg.Timings
	backoff := t.JoinBackoff
	var err error
	for attempt := 1; attempt <= t.JoinAttempts; attempt++ {
		var n int
		if n, err = c.join(c.seeds); err == nil {
			c.cfg.Logger.Info("gossip: joined", "seeds_answered", n, "attempt", attempt)
			return nil
		}
		c.cfg.Logger.Debug("gossip: join attempt failed", "attempt", attempt, "err", err)
		if attempt == t.JoinAttempts {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff *= 2
	}
	return err
}

// Members returns a copy of every member in the view (this node included,
// dead and left members until Timings.ForgetAfter), in ID order.
func (c *Cluster) Members() []Member { return c.view.snapshot() }

// Self returns this node's own entry.
func (c *Cluster) Self() Member {
	if m, ok := c.view.get(c.cfg.NodeID); ok {
		return m
	}
	// Not reachable after Open (memberlist reports itself joining), but
	// never return an empty entry.
	w := c.meta.get()
	return Member{ID: c.cfg.NodeID, Addr: c.addr, State: StateAlive, Meta: w.Meta, Incarnation: w.Incarnation, Leaving: w.Leaving, Self: true}
}

// Addr is this node's advertised gossip address, host:port.
func (c *Cluster) Addr() string { return c.addr }

// Watch returns a channel that receives a value after each change of the
// view: coalesced, so a slow reader gets one value for many changes and
// must call Members for the current view. The channel is closed when ctx
// ends or the cluster closes; cancelling ctx is how its owner stops it.
func (c *Cluster) Watch(ctx context.Context) <-chan struct{} { return c.view.watch(ctx) }

// EventCounts returns how many membership events this node has seen, by
// kind (join, update, dead, left, forget).
func (c *Cluster) EventCounts() map[string]uint64 { return c.view.eventCounts() }

// UpdateMeta replaces this node's metadata and gossips it; it waits (at
// most until ctx's deadline, else TCPTimeout) for the update to be sent.
func (c *Cluster) UpdateMeta(ctx context.Context, m Meta) error {
	if err := c.meta.update(func(w *wireMeta) { w.Meta = m }); err != nil {
		return fmt.Errorf("gossip: update metadata: %w", err)
	}
	if err := c.ml.UpdateNode(c.timeout(ctx)); err != nil {
		return fmt.Errorf("gossip: update metadata: %w", err)
	}
	return nil
}

// timeout is what is left of ctx's deadline, or TCPTimeout.
func (c *Cluster) timeout(ctx context.Context) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		return max(time.Until(d), time.Millisecond)
	}
	return c.cfg.Timings.TCPTimeout
}

// Leave leaves the cluster gracefully: the other members see this node
// "left" rather than "dead". It stops the reconnect loop and waits (at
// most until ctx's deadline, else TCPTimeout) for the leave to be
// gossiped. Close must still be called.
func (c *Cluster) Leave(ctx context.Context) error {
	c.stopReconnect()
	// First say so in the metadata: memberlist's leave callback does not
	// tell a leave from a death (view.NotifyLeave).
	if err := c.meta.update(func(w *wireMeta) { w.Leaving = true }); err != nil {
		return fmt.Errorf("gossip: leave: %w", err)
	}
	if err := c.ml.UpdateNode(c.timeout(ctx)); err != nil {
		c.cfg.Logger.Warn("gossip: leave: the leaving flag may not have reached every member (they may see this node dead)", "err", err)
	}
	if err := c.ml.Leave(c.timeout(ctx)); err != nil {
		return fmt.Errorf("gossip: leave: %w", err)
	}
	return nil
}

// Close stops gossip at once. Without a Leave first, the other members
// see this node die (as after a crash).
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		c.stopReconnect()
		if err := c.ml.Shutdown(); err != nil {
			c.closeErr = fmt.Errorf("gossip: shutdown: %w", err)
		}
		c.view.close()
	})
	return c.closeErr
}

func (c *Cluster) stopReconnect() {
	c.stopOnce.Do(func() {
		c.stopLoop()
		<-c.loopDone
	})
}

// String names the node for logs.
func (c *Cluster) String() string { return c.cfg.NodeID + "@" + c.addr }
