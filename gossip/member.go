package gossip

import (
	"fmt"
	"time"
)

// State is a member's state as this node last learned it.
//
// memberlist also has a "suspect" state (a node that missed its probes,
// before the suspicion timeout declares it dead), but it reports no event
// for it and its node structs cannot be read outside its callbacks without
// a data race, so the view shows a suspected node as alive until
// memberlist declares it dead (docs/cluster.md).
type State uint8

const (
	// StateAlive: the member answers (or has not yet been found failing).
	StateAlive State = iota + 1
	// StateDead: the member stopped answering probes and the suspicion
	// timeout ran out, or it was shut down without leaving.
	StateDead
	// StateLeft: the member left gracefully (Leave).
	StateLeft
)

func (s State) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	default:
		return fmt.Sprintf("State(%d)", uint8(s))
	}
}

// States lists every State, in order.
func States() []State { return []State{StateAlive, StateDead, StateLeft} }

// Member is one node of the cluster as this node sees it. It is a copy:
// nothing changes it after Members returns it.
type Member struct {
	// ID is the node's id (the changelog node id), its memberlist name.
	ID string
	// Addr is the node's gossip address, host:port.
	Addr string
	// State is the member's state, and StateSince when this node learned
	// it.
	State      State
	StateSince time.Time
	// Meta is the member's metadata; the zero Meta if it did not decode
	// (MetaErr says why).
	Meta    Meta
	MetaErr error
	// Incarnation numbers the member's process: the Unix time in ms at
	// which its Cluster opened, carried in its metadata. A node restarted
	// with the same ID has a higher incarnation. (memberlist's own
	// incarnation counter is internal to it.)
	Incarnation uint64
	// Leaving: the member announced it is leaving (Cluster.Leave); it
	// is alive until its leave is gossiped, then left.
	Leaving bool
	// Self is true for this node's own entry.
	Self bool
}

// Alive reports whether the member is alive.
func (m Member) Alive() bool { return m.State == StateAlive }
