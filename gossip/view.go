package gossip

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Event kinds, the label of the membership event counter.
const (
	eventJoin   = "join"   // a member became alive (new, or back from dead/left)
	eventUpdate = "update" // an alive member's metadata changed
	eventDead   = "dead"   // a member was declared dead
	eventLeft   = "left"   // a member left gracefully
	eventForget = "forget" // a dead or left member was dropped from the view
)

var eventKinds = []string{eventJoin, eventUpdate, eventDead, eventLeft, eventForget}

// view is the Cluster's own membership view. memberlist calls its Notify*
// methods (memberlist.EventDelegate) with its node lock held: they copy
// what they need out of the *memberlist.Node and never call back into
// memberlist or block.
type view struct {
	self string
	now  func() time.Time
	log  *slog.Logger

	mu       sync.Mutex
	members  map[string]*Member
	events   map[string]uint64
	watchers map[*watcher]struct{}
	closed   bool
}

type watcher struct{ ch chan struct{} }

func newView(self string, now func() time.Time, log *slog.Logger) *view {
	return &view{self: self, now: now, log: log, members: map[string]*Member{}, events: map[string]uint64{}, watchers: map[*watcher]struct{}{}}
}

var _ memberlist.EventDelegate = (*view)(nil)

// NotifyJoin: a node became alive.
func (v *view) NotifyJoin(n *memberlist.Node) { v.set(n, StateAlive, eventJoin) }

// NotifyUpdate: an alive node's metadata (or address) changed.
func (v *view) NotifyUpdate(n *memberlist.Node) { v.set(n, StateAlive, eventUpdate) }

// NotifyLeave: a node was declared dead, or left. memberlist v0.7.0 does
// not say which (the Node's State field is not maintained: its nodeState
// shadows it), so a node that leaves first gossips metadata saying so
// (wireMeta.Leaving, set by Cluster.Leave).
func (v *view) NotifyLeave(n *memberlist.Node) {
	if w, err := decodeMeta(n.Meta); err == nil && w.Leaving {
		v.set(n, StateLeft, eventLeft)
		return
	}
	v.set(n, StateDead, eventDead)
}

// set copies n into the view.
func (v *view) set(n *memberlist.Node, state State, event string) {
	m := Member{ID: n.Name, Addr: n.Address(), State: state, StateSince: v.now(), Self: n.Name == v.self}
	w, err := decodeMeta(n.Meta) // copies: n.Meta is memberlist's
	if err != nil {
		m.MetaErr = err
	} else {
		m.Meta, m.Incarnation, m.Leaving = w.Meta, w.Incarnation, w.Leaving
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if old, ok := v.members[m.ID]; ok && old.State == state {
		m.StateSince = old.StateSince
	}
	v.members[m.ID] = &m
	v.events[event]++
	v.notifyLocked()
	v.log.Info("gossip: member "+event, "node", m.ID, "addr", m.Addr, "rpc", m.Meta.RPC, "zone", m.Meta.Zone, "incarnation", m.Incarnation)
	if err != nil {
		v.log.Warn("gossip: member metadata does not decode", "node", m.ID, "err", err)
	}
}

// forget drops dead and left members last changed before cutoff.
func (v *view) forget(cutoff time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	changed := false
	for id, m := range v.members {
		if m.State != StateAlive && !m.Self && m.StateSince.Before(cutoff) {
			delete(v.members, id)
			v.events[eventForget]++
			changed = true
			v.log.Info("gossip: member forgotten", "node", id, "state", m.State, "since", m.StateSince)
		}
	}
	if changed {
		v.notifyLocked()
	}
}

// snapshot returns copies of every member, in ID order.
func (v *view) snapshot() []Member {
	v.mu.Lock()
	out := make([]Member, 0, len(v.members))
	for _, m := range v.members {
		out = append(out, *m)
	}
	v.mu.Unlock()
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// get returns a copy of one member.
func (v *view) get(id string) (Member, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	m, ok := v.members[id]
	if !ok {
		return Member{}, false
	}
	return *m, true
}

// eventCounts returns the event counters.
func (v *view) eventCounts() map[string]uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make(map[string]uint64, len(eventKinds))
	for _, k := range eventKinds {
		out[k] = v.events[k]
	}
	return out
}

// watch registers a watcher until ctx ends or the view closes.
func (v *view) watch(ctx context.Context) <-chan struct{} {
	w := &watcher{ch: make(chan struct{}, 1)}
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		close(w.ch)
		return w.ch
	}
	v.watchers[w] = struct{}{}
	v.mu.Unlock()
	context.AfterFunc(ctx, func() {
		v.mu.Lock()
		defer v.mu.Unlock()
		if _, ok := v.watchers[w]; ok {
			delete(v.watchers, w)
			close(w.ch)
		}
	})
	return w.ch
}

func (v *view) notifyLocked() {
	for w := range v.watchers {
		select {
		case w.ch <- struct{}{}:
		default: // a signal is pending: the reader will see this change too
		}
	}
}

// close closes every watcher's channel.
func (v *view) close() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.closed = true
	for w := range v.watchers {
		delete(v.watchers, w)
		close(w.ch)
	}
}
