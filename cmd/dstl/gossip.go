package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/dstl-dev/dstl/gossip"
	"github.com/dstl-dev/dstl/server"
)

// defaultGossipPort is the gossip port of --join addresses without one,
// and of the gossip listener when --join is given without
// --gossip-listen (memberlist's customary port).
const defaultGossipPort = 7946

// gossipFlags are serve's cluster membership flags.
type gossipFlags struct {
	listen    string
	join      []string
	advertise string
	zone      string
	timings   string
}

func (g *gossipFlags) add(f *pflag.FlagSet) {
	f.StringVar(&g.listen, "gossip-listen", "", "host:port to gossip on (TCP and UDP); empty with no --join: gossip off, a single node (default with --join: the host of --listen, port 7946)")
	f.StringSliceVar(&g.join, "join", nil, "host:port[,host:port…] of cluster members to join (port default 7946); turns gossip on. Seeds that do not answer are retried in the background: the node starts alone meanwhile")
	f.StringVar(&g.advertise, "advertise", "", "host:port the other members reach this node's gossip at (default: the --gossip-listen address); its host is also the host of the RPC URL this node gossips")
	f.StringVar(&g.zone, "zone", "", "this node's zone (failure domain), gossiped to the other members")
	f.StringVar(&g.timings, "gossip-timings", "default", "failure-detector timings: default (memberlist's LAN defaults) or fast (tests on loopback)")
}

// enabled: gossip is on when --gossip-listen or --join is given.
func (g *gossipFlags) enabled() bool { return g.listen != "" || len(g.join) > 0 }

// config builds the gossip Config of a node: nodeID, the API's listen
// address and whether it serves TLS.
func (g *gossipFlags) config(nodeID, apiListen string, tls bool, log *slog.Logger) (gossip.Config, error) {
	var t gossip.Timings
	switch g.timings {
	case "default", "":
		t = gossip.DefaultTimings()
	case "fast":
		t = gossip.FastTimings()
	default:
		return gossip.Config{}, fmt.Errorf("--gossip-timings %q: want default or fast", g.timings)
	}
	apiHost, _, err := net.SplitHostPort(apiListen)
	if err != nil {
		return gossip.Config{}, fmt.Errorf("--listen %q: %w", apiListen, err)
	}
	bind := g.listen
	if bind == "" {
		bind = net.JoinHostPort(apiHost, strconv.Itoa(defaultGossipPort))
	}
	if _, _, err := net.SplitHostPort(bind); err != nil {
		return gossip.Config{}, fmt.Errorf("--gossip-listen %q: want host:port: %w", bind, err)
	}
	var join []string
	for _, j := range g.join {
		j = strings.TrimSpace(j)
		if j == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(j); err != nil {
			j = net.JoinHostPort(strings.Trim(j, "[]"), strconv.Itoa(defaultGossipPort))
		}
		join = append(join, j)
	}
	if g.advertise != "" {
		if _, _, err := net.SplitHostPort(g.advertise); err != nil {
			return gossip.Config{}, fmt.Errorf("--advertise %q: want host:port: %w", g.advertise, err)
		}
	}
	rpc, err := g.rpcURL(apiListen, bind, tls)
	if err != nil {
		return gossip.Config{}, err
	}
	return gossip.Config{
		NodeID: nodeID, Bind: bind, Advertise: g.advertise, Join: join,
		Meta:    gossip.Meta{RPC: rpc, Zone: g.zone},
		Timings: t, Logger: log,
	}, nil
}

// rpcURL is the API URL this node gossips: http(s)://HOST:PORT with the
// port of --listen and the first specific host of --advertise, --listen,
// the gossip bind address, then the machine's host name.
func (g *gossipFlags) rpcURL(apiListen, gossipBind string, tls bool) (string, error) {
	_, port, err := net.SplitHostPort(apiListen)
	if err != nil {
		return "", fmt.Errorf("--listen %q: %w", apiListen, err)
	}
	var candidates []string
	if g.advertise != "" {
		h, _, _ := net.SplitHostPort(g.advertise)
		candidates = append(candidates, h)
	}
	h1, _, _ := net.SplitHostPort(apiListen)
	h2, _, _ := net.SplitHostPort(gossipBind)
	candidates = append(candidates, h1, h2)
	host := ""
	for _, h := range candidates {
		if specificHost(h) {
			host = h
			break
		}
	}
	if host == "" {
		if host, err = os.Hostname(); err != nil || host == "" {
			return "", errors.New("no host for this node's RPC URL: set --advertise (or a specific --listen host)")
		}
	}
	scheme := "http"
	if tls {
		scheme = "https"
	}
	return scheme + "://" + net.JoinHostPort(host, port), nil
}

// specificHost: not empty and not an unspecified address (0.0.0.0, ::).
func specificHost(h string) bool {
	if h == "" {
		return false
	}
	ip := net.ParseIP(h)
	return ip == nil || !ip.IsUnspecified()
}

// withPort replaces the port of an RPC URL (the API listened on port 0).
func withPort(rpc string, port int) string {
	scheme, hostport, ok := strings.Cut(rpc, "://")
	if !ok {
		return rpc
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return rpc
	}
	return scheme + "://" + net.JoinHostPort(host, strconv.Itoa(port))
}

// openGossip starts gossip if the flags turn it on (nil, nil if not).
func openGossip(ctx context.Context, g *gossipFlags, nodeID, apiListen string, tls bool, log *slog.Logger) (*gossip.Cluster, error) {
	if !g.enabled() {
		return nil, nil
	}
	cfg, err := g.config(nodeID, apiListen, tls, log)
	if err != nil {
		return nil, err
	}
	c, err := gossip.Open(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("start gossip: %w", err)
	}
	return c, nil
}

// startGossip opens gossip if the flags turn it on, registers its metrics,
// and returns what ListMembers reports either way.
func startGossip(ctx context.Context, o serveOptions, nodeID string, reg prometheus.Registerer, log *slog.Logger) (*gossip.Cluster, server.ClusterOptions, error) {
	tls := o.tlsCert != ""
	cluster, err := openGossip(ctx, &o.gossip, nodeID, o.listen, tls, log)
	if err != nil {
		return nil, server.ClusterOptions{}, err
	}
	if cluster == nil {
		rpc, err := o.gossip.rpcURL(o.listen, "", tls)
		if err != nil {
			return nil, server.ClusterOptions{}, err
		}
		return nil, server.ClusterOptions{RPC: rpc, Zone: o.gossip.zone}, nil
	}
	if err := reg.Register(gossip.NewCollector(cluster)); err != nil {
		_ = cluster.Close()
		return nil, server.ClusterOptions{}, fmt.Errorf("register cluster metrics: %w", err)
	}
	return cluster, server.ClusterOptions{Members: cluster}, nil
}

// updateGossipPort gossips the API's real port when --listen asked for
// port 0.
func updateGossipPort(ctx context.Context, c *gossip.Cluster, addr net.Addr, log *slog.Logger) {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return
	}
	meta := c.Self().Meta
	rpc := withPort(meta.RPC, tcp.Port)
	if rpc == meta.RPC {
		return
	}
	meta.RPC = rpc
	ctx, cancel := context.WithTimeout(ctx, gossipLeaveTimeout)
	defer cancel()
	if err := c.UpdateMeta(ctx, meta); err != nil {
		log.Warn("gossip: update RPC URL", "rpc", rpc, "err", err)
	}
}

// gossipLeaveTimeout bounds the graceful leave of a shutdown.
const gossipLeaveTimeout = 5 * time.Second

// leaveGossip leaves the cluster gracefully (nil: gossip off).
func leaveGossip(ctx context.Context, c *gossip.Cluster, log *slog.Logger) {
	if c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, gossipLeaveTimeout)
	defer cancel()
	if err := c.Leave(ctx); err != nil {
		log.Warn("gossip: leave", "err", err)
	}
}

// closeGossip stops gossip (nil: gossip off).
func closeGossip(c *gossip.Cluster, log *slog.Logger) {
	if c == nil {
		return
	}
	if err := c.Close(); err != nil {
		log.Warn("gossip: close", "err", err)
	}
}

// gossipAddr is the node's gossip address for the startup log ("off").
func gossipAddr(c *gossip.Cluster) string {
	if c == nil {
		return "off"
	}
	return c.Addr()
}
