// Package gossiptest has test helpers for clusters on loopback: a Network
// whose transports can partition nodes (gossip.Config.Transport).
package gossiptest

import (
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Network partitions the memberlist transports it wraps. Every node of a
// test cluster must be wrapped by the same Network: a wrapper drops what
// its node sends to an isolated node, and everything an isolated node
// sends, so outgoing filtering on every node cuts both directions.
type Network struct {
	mu       sync.Mutex
	isolated map[string]bool // gossip addresses, host:port
	dropped  atomic.Int64
}

// NewNetwork returns a Network with nothing isolated.
func NewNetwork() *Network { return &Network{isolated: map[string]bool{}} }

// Wrap wraps a node's transport (a gossip.TransportWrapper).
func (n *Network) Wrap(t memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
	ip, port, err := t.FinalAdvertiseAddr("", 0)
	self := ""
	if err == nil {
		self = net.JoinHostPort(ip.String(), strconv.Itoa(port))
	}
	return &transport{NodeAwareTransport: t, net: n, self: self}
}

// Isolate cuts addr (a node's gossip address) off from every other node,
// both ways, until Heal.
func (n *Network) Isolate(addr string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.isolated[addr] = true
}

// Heal ends every isolation.
func (n *Network) Heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	clear(n.isolated)
}

// Dropped is how many packets and dials the network refused.
func (n *Network) Dropped() int64 { return n.dropped.Load() }

func (n *Network) cut(from, to string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if from == to {
		return false
	}
	if n.isolated[from] || n.isolated[to] {
		n.dropped.Add(1)
		return true
	}
	return false
}

// transport drops packets and refuses dials across a cut.
type transport struct {
	memberlist.NodeAwareTransport
	net  *Network
	self string
}

func (t *transport) WriteTo(b []byte, addr string) (time.Time, error) {
	if t.net.cut(t.self, addr) {
		return time.Now(), nil // lost on the way, as UDP is
	}
	return t.NodeAwareTransport.WriteTo(b, addr)
}

func (t *transport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if t.net.cut(t.self, a.Addr) {
		return time.Now(), nil
	}
	return t.NodeAwareTransport.WriteToAddress(b, a)
}

func (t *transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if t.net.cut(t.self, addr) {
		return nil, fmt.Errorf("gossiptest: %s → %s is partitioned", t.self, addr)
	}
	return t.NodeAwareTransport.DialTimeout(addr, timeout)
}

func (t *transport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if t.net.cut(t.self, a.Addr) {
		return nil, fmt.Errorf("gossiptest: %s → %s is partitioned", t.self, a.Addr)
	}
	return t.NodeAwareTransport.DialAddressTimeout(a, timeout)
}
