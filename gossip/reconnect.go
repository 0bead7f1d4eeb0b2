package gossip

import (
	"context"
	"time"
)

// reconnectLoop runs until the Cluster's Leave or Close. Every
// ReconnectInterval it
//   - joins the seeds again while no other member is alive (a node that
//     started alone, or lost everyone), and the addresses of dead (not
//     left) members: memberlist stops probing a member it declared dead,
//     so after a partition heals the two sides would stay apart without
//     this (Serf does the same);
//   - forgets dead and left members older than ForgetAfter.
func (c *Cluster) reconnectLoop(ctx context.Context) {
	defer close(c.loopDone)
	t := time.NewTicker(c.cfg.Timings.ReconnectInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.view.forget(c.cfg.Now().Add(-c.cfg.Timings.ForgetAfter))
		targets := c.reconnectTargets()
		if len(targets) == 0 {
			continue
		}
		if n, err := c.join(targets); err != nil {
			c.cfg.Logger.Debug("gossip: reconnect failed", "targets", targets, "err", err)
		} else {
			c.cfg.Logger.Info("gossip: reconnected", "targets", targets, "answered", n)
		}
	}
}

// reconnectTargets: the seeds if no other member is alive, plus every dead
// member's address.
func (c *Cluster) reconnectTargets() []string {
	var targets []string
	othersAlive := false
	for _, m := range c.view.snapshot() {
		switch {
		case m.Self:
		case m.State == StateAlive:
			othersAlive = true
		case m.State == StateDead:
			targets = append(targets, m.Addr)
		}
	}
	if !othersAlive {
		for _, s := range c.seeds {
			dup := false
			for _, t := range targets {
				dup = dup || sameAddr(s, t)
			}
			if !dup {
				targets = append(targets, s)
			}
		}
	}
	return targets
}
