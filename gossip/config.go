package gossip

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"
)

// Config configures a Cluster.
type Config struct {
	// NodeID is the node's id (the changelog node id): its name in the
	// cluster, unique per node, the same across restarts.
	NodeID string
	// Bind is the host:port gossip listens on, TCP and UDP (host an IP
	// address or a name that resolves to one; port 0: a free port).
	Bind string
	// Advertise is the host:port the other nodes reach this node at
	// (default: the bound address; memberlist picks a private IP when
	// Bind's host is unspecified, 0.0.0.0 or ::).
	Advertise string
	// Join are host:port addresses of nodes to join (seeds). Empty: this
	// node starts a cluster of its own and waits to be joined.
	Join []string
	// Meta is the node's metadata (RPC URL, zone, load); UpdateMeta
	// changes it later.
	Meta Meta
	// Timings are the failure detector's and the join loop's timings
	// (zero fields: DefaultTimings's).
	Timings Timings
	// Logger receives the cluster's and memberlist's logs (memberlist's
	// DEBUG lines at slog's debug level). Default: discarded.
	Logger *slog.Logger
	// Now is the clock of the view's timestamps (default time.Now).
	Now func() time.Time
	// Transport, if set, wraps the memberlist transport the Cluster makes
	// (a memberlist NetTransport on Bind): a test's fault injection
	// (gossiptest.Network). It must pass everything else through.
	Transport TransportWrapper
}

// Timings are the failure detector's and the join loop's timings. The
// first group are memberlist's (see its Config for the details).
type Timings struct {
	// ProbeInterval is the period of the probes of random members, and
	// ProbeTimeout how long a probe waits for an ack before indirect
	// probes.
	ProbeInterval, ProbeTimeout time.Duration
	// SuspicionMult: a suspected member is declared dead after
	// SuspicionMult × max(1, log10(members)) × ProbeInterval (sooner as
	// other members confirm the suspicion).
	SuspicionMult int
	// GossipInterval is the period of gossip rounds, PushPullInterval of
	// full state syncs with a random member.
	GossipInterval, PushPullInterval time.Duration
	// GossipToTheDeadTime: memberlist keeps gossiping to a dead member for
	// this long, and forgets it after that.
	GossipToTheDeadTime time.Duration
	// TCPTimeout bounds a connection to one member (a join, a push/pull).
	TCPTimeout time.Duration

	// JoinAttempts is how many times Open tries the seeds (JoinBackoff
	// apart, doubling) before it starts alone; then the reconnect loop
	// keeps trying them.
	JoinAttempts int
	JoinBackoff  time.Duration
	// ReconnectInterval is the period of the reconnect loop: it joins the
	// seeds again while this node sees no other live member, and the
	// addresses of dead (not left) members, which is what heals a
	// partition after memberlist has given up on the other side.
	ReconnectInterval time.Duration
	// ForgetAfter: dead and left members are dropped from the view (and no
	// longer reconnected to) this long after they were last seen.
	ForgetAfter time.Duration
}

// DefaultTimings are the production defaults: memberlist's LAN defaults
// (DefaultLANConfig), and Serf's reconnect interval.
func DefaultTimings() Timings {
	return Timings{
		ProbeInterval:       time.Second,
		ProbeTimeout:        500 * time.Millisecond,
		SuspicionMult:       4,
		GossipInterval:      200 * time.Millisecond,
		PushPullInterval:    30 * time.Second,
		GossipToTheDeadTime: 30 * time.Second,
		TCPTimeout:          10 * time.Second,
		JoinAttempts:        5,
		JoinBackoff:         500 * time.Millisecond,
		ReconnectInterval:   30 * time.Second,
		ForgetAfter:         24 * time.Hour,
	}
}

// FastTimings are for tests on loopback: convergence in tens of ms, a
// crash detected in well under a second (docs/cluster.md has figures).
func FastTimings() Timings {
	return Timings{
		ProbeInterval:       100 * time.Millisecond,
		ProbeTimeout:        50 * time.Millisecond,
		SuspicionMult:       2,
		GossipInterval:      20 * time.Millisecond,
		PushPullInterval:    500 * time.Millisecond,
		GossipToTheDeadTime: 2 * time.Second,
		TCPTimeout:          500 * time.Millisecond,
		JoinAttempts:        3,
		JoinBackoff:         50 * time.Millisecond,
		ReconnectInterval:   200 * time.Millisecond,
		ForgetAfter:         time.Minute,
	}
}

// withDefaults fills the zero fields of t from DefaultTimings.
func (t Timings) withDefaults() Timings {
	d := DefaultTimings()
	dur := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	dur(&t.ProbeInterval, d.ProbeInterval)
	dur(&t.ProbeTimeout, d.ProbeTimeout)
	dur(&t.GossipInterval, d.GossipInterval)
	dur(&t.PushPullInterval, d.PushPullInterval)
	dur(&t.GossipToTheDeadTime, d.GossipToTheDeadTime)
	dur(&t.TCPTimeout, d.TCPTimeout)
	dur(&t.JoinBackoff, d.JoinBackoff)
	dur(&t.ReconnectInterval, d.ReconnectInterval)
	dur(&t.ForgetAfter, d.ForgetAfter)
	if t.SuspicionMult <= 0 {
		t.SuspicionMult = d.SuspicionMult
	}
	if t.JoinAttempts <= 0 {
		t.JoinAttempts = d.JoinAttempts
	}
	return t
}

// validate checks a Config and fills its defaults.
func (c Config) validate() (Config, error) {
	if c.NodeID == "" {
		return c, errors.New("gossip: NodeID is empty")
	}
	if _, _, err := splitHostPort(c.Bind); err != nil {
		return c, fmt.Errorf("gossip: bind address: %w", err)
	}
	if c.Advertise != "" {
		if _, _, err := splitHostPort(c.Advertise); err != nil {
			return c, fmt.Errorf("gossip: advertise address: %w", err)
		}
	}
	for _, j := range c.Join {
		if _, _, err := splitHostPort(j); err != nil {
			return c, fmt.Errorf("gossip: join address: %w", err)
		}
	}
	if _, err := encodeMeta(wireMeta{Meta: c.Meta}); err != nil {
		return c, fmt.Errorf("gossip: %w", err)
	}
	c.Timings = c.Timings.withDefaults()
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c, nil
}

// splitHostPort splits host:port with a numeric port.
func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%q: %w", addr, err)
	}
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("%q: port %q is not a number 0..65535", addr, p)
	}
	return host, int(port), nil
}
