package changelog

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
)

// offsetClock is the real clock moved forward by an offset tests advance.
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) Now() time.Time                       { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *offsetClock) NewTimer(d time.Duration) clock.Timer { return clock.Real{}.NewTimer(d) }
func (c *offsetClock) advance(d time.Duration)              { c.off.Add(int64(d)) }

// newSubEnv is newSnapEnv with options changed by opt, on store (nil: a
// new file store).
func newSubEnv(t *testing.T, store upload.BlobStore, groups int, opt func(*Options)) *snapEnv {
	t.Helper()
	ctx := context.Background()
	if store == nil {
		store = newFileStore(t)
	}
	opts := testNodeOptions(store, t.TempDir())
	opts.RetainCheckpoints = 1
	if opt != nil {
		opt(&opts)
	}
	n, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	cfg, err := n.CreateStream(ctx, "s", groups)
	if err != nil {
		t.Fatal(err)
	}
	return &snapEnv{t: t, ctx: ctx, store: store, n: n, stream: "s", inc: cfg.Incarnation, groups: groups, want: map[uint64]map[string]string{}}
}

// steps appends two changes to sw and completes checkpoint id, for each id.
func (e *snapEnv) steps(sw *snapWriter, ids ...uint64) {
	e.t.Helper()
	for _, id := range ids {
		e.append(sw, put(uint16(id%uint64(e.groups)), "k", fmt.Sprint(id)), put(uint16((id+3)%uint64(e.groups)), fmt.Sprint("k", id), "x"))
		e.checkpoint(id, sw)
	}
}

func (e *snapEnv) subKeys(name string) []uint64 {
	e.t.Helper()
	seqs, err := listNumbered(e.ctx, e.store, subscriptionPrefix(e.ns(), name))
	if err != nil {
		e.t.Fatal(err)
	}
	return seqs
}

func TestSubscriptionRegistry(t *testing.T) {
	e := newSubEnv(t, nil, 8, nil)
	a := e.open(e.full(), 0)
	e.steps(a, 1, 2)
	ctx, n := e.ctx, e.n

	for _, bad := range []string{"", ".x", "-x", "a/b", "a b", string(make([]byte, 129))} {
		if _, err := n.CreateSubscription(ctx, "s", SubscriptionRecord{Name: bad}); !errors.Is(err, ErrInvalidSubscriptionName) {
			t.Errorf("create %q: %v, want ErrInvalidSubscriptionName", bad, err)
		}
	}
	if _, err := n.CreateSubscription(ctx, "nope", SubscriptionRecord{Name: "x"}); !errors.Is(err, ErrStreamNotFound) {
		t.Errorf("create on unknown stream: %v", err)
	}
	if _, err := n.CreateSubscription(ctx, "s", SubscriptionRecord{Name: "x", Hold: 9}); !errors.Is(err, ErrCheckpointNotFound) {
		t.Errorf("create holding an incomplete checkpoint: %v", err)
	}
	if len(e.subKeys("x")) != 0 {
		t.Fatal("a refused create left a record")
	}

	rec, err := n.CreateSubscription(ctx, "s", SubscriptionRecord{Name: "x", Token: []byte("t1"), Hold: 1})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Seq != 1 || rec.Hold != 1 || rec.Expired || rec.CreatedAtMs == 0 {
		t.Fatalf("created %+v", rec)
	}
	if _, err := e.store.Stat(ctx, fmt.Sprintf("streams/s/%s/subscriptions/x/%020d", e.inc, 1)); err != nil {
		t.Fatalf("record not at the documented key: %v", err)
	}
	if _, err := n.CreateSubscription(ctx, "s", SubscriptionRecord{Name: "x", Hold: 2}); !errors.Is(err, ErrSubscriptionExists) {
		t.Fatalf("second create: %v, want ErrSubscriptionExists", err)
	}
	if _, err := n.CreateSubscription(ctx, "s", SubscriptionRecord{Name: "y", Hold: 0}); err != nil {
		t.Fatal(err)
	}

	got, err := n.CommitSubscription(ctx, "s", "x", []byte("t2"), 2)
	if err != nil {
		t.Fatal(err)
	}
	if got.Seq != 2 || got.Hold != 2 || string(got.Token) != "t2" || got.CreatedAtMs != rec.CreatedAtMs {
		t.Fatalf("committed %+v", got)
	}
	if seqs := e.subKeys("x"); !slices.Equal(seqs, []uint64{2}) {
		t.Fatalf("records after commit: %v, want only the newest", seqs)
	}
	if _, err := n.CommitSubscription(ctx, "s", "x", nil, 7); !errors.Is(err, ErrCheckpointNotFound) {
		t.Fatalf("commit to an incomplete checkpoint: %v", err)
	}
	if _, err := n.CommitSubscription(ctx, "s", "zz", nil, 1); !errors.Is(err, ErrSubscriptionNotFound) {
		t.Fatalf("commit of unknown: %v", err)
	}
	// Backwards (checked): the data is all there.
	if got, err = n.CommitSubscription(ctx, "s", "x", []byte("t3"), 1); err != nil || got.Hold != 1 {
		t.Fatalf("commit backwards: %+v %v", got, err)
	}

	one, err := n.Subscription(ctx, "s", "x")
	if err != nil || one.Hold != 1 || string(one.Token) != "t3" || one.Seq != 3 {
		t.Fatalf("get: %+v %v", one, err)
	}
	all, err := n.Subscriptions(ctx, "s")
	if err != nil || len(all) != 2 || all[0].Name != "x" || all[1].Name != "y" {
		t.Fatalf("list: %+v %v", all, err)
	}
	lag, err := n.SubscriptionLag(ctx, "s", one)
	if err != nil || lag.Checkpoints != 1 || lag.Changes != 2 || lag.Bytes == 0 || lag.Newest != 2 || lag.Seconds < 0 {
		t.Fatalf("lag of x at 1: %+v %v", lag, err)
	}
	if lag, err := n.SubscriptionLag(ctx, "s", all[1]); err != nil || lag.Checkpoints != 2 || lag.Changes != 4 {
		t.Fatalf("lag of y at 0: %+v %v", lag, err)
	}
	if lag, err := n.SubscriptionLag(ctx, "s", SubscriptionRecord{Hold: 2}); err != nil || lag != (SubscriptionLag{Newest: 2}) {
		t.Fatalf("lag caught up: %+v %v", lag, err)
	}

	if err := n.DeleteSubscription(ctx, "s", "x"); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteSubscription(ctx, "s", "x"); !errors.Is(err, ErrSubscriptionNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := n.Subscription(ctx, "s", "x"); !errors.Is(err, ErrSubscriptionNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	// The name is free again.
	if _, err := n.CreateSubscription(ctx, "s", SubscriptionRecord{Name: "x", Hold: 2}); err != nil {
		t.Fatal(err)
	}
}

// Creates and commits whose put reported an error are resolved by reading
// the record back: a lost acknowledgement or a late write is the caller's
// own record, never a second one or a refusal.
func TestSubscriptionUnknownOutcome(t *testing.T) {
	for _, f := range []faulty.Faults{{LostAck: 1}, {LateWrite: 1, MaxLateOps: 1}, {Transient: 1}} {
		t.Run(fmt.Sprintf("%+v", f), func(t *testing.T) {
			store := faulty.Wrap(newFileStore(t), faulty.Options{Seed: 7})
			e := newSubEnv(t, store, 4, nil)
			a := e.open(e.full(), 0)
			e.steps(a, 1, 2)

			store.SetFaults(faulty.OpPut, f)
			rec, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 1})
			if f.Transient == 1 {
				// Nothing can land: an honest error, and no record.
				store.SetFaults(faulty.OpPut, faulty.Faults{})
				store.Settle(e.ctx)
				if err == nil || len(e.subKeys("x")) != 0 {
					t.Fatalf("create under failing puts: %+v %v, records %v", rec, err, e.subKeys("x"))
				}
				return
			}
			if err != nil {
				t.Fatalf("create: %v", err)
			}
			got, err := e.n.CommitSubscription(e.ctx, "s", "x", []byte("t"), 2)
			store.SetFaults(faulty.OpPut, faulty.Faults{})
			store.Settle(e.ctx)
			if err != nil || got.Seq != 2 || got.Hold != 2 {
				t.Fatalf("commit: %+v %v", got, err)
			}
			if store.Count(faulty.OpPut, faulty.LostAck)+store.Count(faulty.OpPut, faulty.LateWrite) < 2 {
				t.Fatal("no fault injected")
			}
			now, err := e.n.Subscription(e.ctx, "s", "x")
			if err != nil || now.Seq != 2 || now.Hold != 2 || string(now.Token) != "t" {
				t.Fatalf("after: %+v %v", now, err)
			}
			if seqs := e.subKeys("x"); !slices.Equal(seqs, []uint64{2}) {
				t.Fatalf("records %v", seqs)
			}
		})
	}
}

// A registered subscription at H holds truncation: a log with a part in H
// not past that part's SQN, a log opened after H not at all; H = 0 holds
// everything; without one the log is truncated to the snapshot.
func TestSubscriptionHoldsTruncation(t *testing.T) {
	e := newSubEnv(t, nil, 8, nil)
	a := e.open(e.full(), 0)
	e.steps(a, 1, 2, 3)
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "zero", Hold: 0}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "two", Hold: 2}); err != nil {
		t.Fatal(err)
	}
	snap := e.publish(3)
	e.adopt(0) // "zero" holds everything
	if got := e.truncatedBefore(a); got > 1 {
		t.Fatalf("truncated before %d while a subscription at 0 is registered", got)
	}
	if err := e.n.DeleteSubscription(e.ctx, "s", "zero"); err != nil {
		t.Fatal(err)
	}
	e.adopt(1)
	if got, want := e.truncatedBefore(a), e.part(2, a.w.LogID()).UpToSQN+1; got != want {
		t.Fatalf("truncated before %d with a subscription at 2, want %d", got, want)
	}
	if _, err := e.n.CommitSubscription(e.ctx, "s", "two", nil, 3); err != nil {
		t.Fatal(err)
	}
	e.adopt(1)
	if got, want := e.truncatedBefore(a), snap.Logs[a.w.LogID()]+1; got != want {
		t.Fatalf("truncated before %d with a subscription at 3, want the snapshot's %d", got, want)
	}

	// A log opened after the hold point is not truncated at all.
	b := e.open(e.full(), 0) // fences a
	e.steps(b, 4, 5)
	e.publish(5)
	e.adopt(0)
	if got := e.truncatedBefore(b); got > 1 {
		t.Fatalf("log opened after the hold truncated before %d", got)
	}
	if err := e.n.DeleteSubscription(e.ctx, "s", "two"); err != nil {
		t.Fatal(err)
	}
	e.adopt(1) // unregistered: no hold
}

// A registered subscription at H keeps checkpoint H and every later one
// through garbage collection (RetainCheckpoints 1, no grace), with their
// segments and snapshots and journal records; deleted, it releases them.
func TestSubscriptionHoldsGC(t *testing.T) {
	e := newSubEnv(t, nil, 8, func(o *Options) { o.JournalKeepCheckpoints = 1 })
	a := e.open(e.full(), 0)
	e.steps(a, 1, 2, 3, 4)
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 2}); err != nil {
		t.Fatal(err)
	}
	e.publish(4)
	e.adopt(1)
	b := e.open(e.full(), 0) // fences a: only checkpoints reference its segments now
	for id := uint64(5); id <= 14; id++ {
		e.steps(b, id)
	}
	aSegs := segmentKeys(e.part(4, a.w.LogID()).Segments)
	if len(aSegs) < 4 {
		t.Fatalf("checkpoint 4 lists %d segments of a", len(aSegs))
	}
	e.gc()
	for _, k := range aSegs {
		if !e.exists(k) {
			t.Errorf("segment %s of a held checkpoint was collected", k)
		}
	}
	ids := func() []uint64 {
		cps, err := e.n.Checkpoints(e.ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		var out []uint64
		for _, c := range cps {
			out = append(out, c.ID)
		}
		return out
	}
	if got := ids(); len(got) == 0 || got[0] > 2 {
		t.Fatalf("journal forgot held checkpoints: %v", got)
	}
	for _, id := range []uint64{2, 3, 4} {
		if got := restoreMap(t, e.n, "s", id, e.full()); !maps.Equal(got, e.want[id]) {
			t.Fatalf("held checkpoint %d restores to %v, want %v", id, got, e.want[id])
		}
	}
	if err := e.n.checkHold(e.ctx, "s", 2); err != nil {
		t.Fatalf("hold 2 after gc: %v", err)
	}

	// Deleted, it holds nothing: a's segments go (the newest checkpoint
	// restores from snapshot 4 and b's log), and the records are forgotten.
	if err := e.n.DeleteSubscription(e.ctx, "s", "x"); err != nil {
		t.Fatal(err)
	}
	e.gc()
	for _, k := range aSegs {
		if e.exists(k) {
			t.Errorf("segment %s survived gc after the subscription was deleted", k)
		}
	}
	if got := ids(); slices.Contains(got, 2) || slices.Contains(got, 3) {
		t.Fatalf("journal still has %v", got)
	}
	e.plan(e.n, 14, e.full())
	// Its data gone, H = 2 is refused and leaves no record; so is a
	// commit back to a checkpoint whose data is gone.
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 4}); !errors.Is(err, ErrCheckpointNotRestorable) {
		t.Fatalf("create at a collected position: %v, want ErrCheckpointNotRestorable", err)
	}
	if len(e.subKeys("x")) != 0 {
		t.Fatal("refused create left its record")
	}
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 14}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.n.CommitSubscription(e.ctx, "s", "x", nil, 4); !errors.Is(err, ErrCheckpointNotRestorable) {
		t.Fatalf("commit back to a collected position: %v", err)
	}
	if rec, err := e.n.Subscription(e.ctx, "s", "x"); err != nil || rec.Hold != 14 || rec.Seq != 1 {
		t.Fatalf("after a refused commit: %+v %v", rec, err)
	}
}

// Past the cap (the oldest unconsumed checkpoint completed longer ago than
// SubscriptionMaxHold) a subscription is expired: it holds nothing, says
// so, stays so (recorded by GC), and a commit to a fresh position revives
// it.
func TestSubscriptionExpiry(t *testing.T) {
	clk := &offsetClock{}
	e := newSubEnv(t, nil, 8, func(o *Options) { o.Clock = clk })
	a := e.open(e.full(), 0)
	e.steps(a, 1, 2)
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 2}); err != nil {
		t.Fatal(err)
	}
	e.steps(a, 3, 4)
	snap := e.publish(4)
	e.adopt(1)
	held := e.part(2, a.w.LogID()).UpToSQN + 1
	if got := e.truncatedBefore(a); got != held {
		t.Fatalf("truncated before %d, want %d", got, held)
	}
	clk.advance(DefaultSubscriptionMaxHold - time.Minute)
	if rec, err := e.n.Subscription(e.ctx, "s", "x"); err != nil || rec.Expired {
		t.Fatalf("before the cap: %+v %v", rec, err)
	}
	e.adopt(0)
	clk.advance(2 * time.Minute)
	rec, err := e.n.Subscription(e.ctx, "s", "x")
	if err != nil || !rec.Expired {
		t.Fatalf("past the cap: %+v %v", rec, err)
	}
	if lag, err := e.n.SubscriptionLag(e.ctx, "s", rec); err != nil || lag.Seconds < DefaultSubscriptionMaxHold.Seconds() || lag.Checkpoints != 2 {
		t.Fatalf("lag: %+v %v", lag, err)
	}
	e.adopt(1)
	if got := e.truncatedBefore(a); got != snap.Logs[a.w.LogID()]+1 {
		t.Fatalf("expired subscription still holds truncation: before %d", got)
	}
	part2 := segmentKeys(e.part(2, a.w.LogID()).Segments)
	e.gc()
	stored, _, err := e.n.readSubscription(e.ctx, e.ns(), "x")
	if err != nil || !stored.Expired || stored.Hold != 2 {
		t.Fatalf("gc did not record the expiry: %+v %v", stored, err)
	}
	gone := 0
	for _, k := range part2 {
		if !e.exists(k) {
			gone++
		}
	}
	if gone == 0 {
		t.Fatal("expired subscription still holds its segments")
	}
	// Sticky: even where the clock says otherwise now.
	clk.advance(-DefaultSubscriptionMaxHold)
	if rec, err := e.n.Subscription(e.ctx, "s", "x"); err != nil || !rec.Expired {
		t.Fatalf("expiry not sticky: %+v %v", rec, err)
	}
	clk.advance(DefaultSubscriptionMaxHold)
	// A commit to an expired position stays expired; to the newest, it
	// is checked and revived.
	if rec, err := e.n.CommitSubscription(e.ctx, "s", "x", nil, 3); err != nil || !rec.Expired {
		t.Fatalf("commit to 3: %+v %v", rec, err)
	}
	if rec, err := e.n.CommitSubscription(e.ctx, "s", "x", nil, 4); err != nil || rec.Expired {
		t.Fatalf("commit to 4: %+v %v", rec, err)
	}
	// Creating at a position past the cap is refused.
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "y", Hold: 1}); !errors.Is(err, ErrSubscriptionExpired) {
		t.Fatalf("create past the cap: %v", err)
	}
}

// Deleting the stream removes its subscriptions; the name recreated has
// none.
func TestSubscriptionStreamDelete(t *testing.T) {
	e := newSubEnv(t, nil, 4, nil)
	a := e.open(e.full(), 0)
	e.steps(a, 1)
	if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 1}); err != nil {
		t.Fatal(err)
	}
	if err := a.w.Close(e.ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.n.DeleteStream(e.ctx, "s"); err != nil {
		t.Fatal(err)
	}
	for o, err := range upload.Walk(e.ctx, e.store, "streams/s/", "") {
		if err != nil {
			t.Fatal(err)
		}
		t.Errorf("left after delete: %s", o.Key)
	}
	if _, err := e.n.Subscriptions(e.ctx, "s"); !errors.Is(err, ErrStreamNotFound) {
		t.Fatalf("subscriptions of a deleted stream: %v", err)
	}
	if _, err := e.n.CreateStream(e.ctx, "s", 4); err != nil {
		t.Fatal(err)
	}
	if recs, err := e.n.Subscriptions(e.ctx, "s"); err != nil || len(recs) != 0 {
		t.Fatalf("recreated stream has subscriptions %+v %v", recs, err)
	}
}

// SubscriptionMaxHoldFor gives a stream its own cap: a stream with a short
// one expires where the node's default would still hold, and one with no
// cap (negative) never does.
func TestSubscriptionMaxHoldPerStream(t *testing.T) {
	for _, c := range []struct {
		name    string
		cap     time.Duration
		expired bool
	}{{"short", time.Hour, true}, {"none", -1, false}, {"default", 0, false}} {
		t.Run(c.name, func(t *testing.T) {
			clk := &offsetClock{}
			e := newSubEnv(t, nil, 8, func(o *Options) {
				o.Clock = clk
				if c.cap != 0 {
					o.SubscriptionMaxHoldFor = map[string]time.Duration{"s": c.cap}
				}
			})
			a := e.open(e.full(), 0)
			e.steps(a, 1, 2)
			if _, err := e.n.CreateSubscription(e.ctx, "s", SubscriptionRecord{Name: "x", Hold: 1}); err != nil {
				t.Fatal(err)
			}
			clk.advance(2 * time.Hour) // past the short cap, far inside the default 24h
			rec, err := e.n.Subscription(e.ctx, "s", "x")
			if err != nil || rec.Expired != c.expired {
				t.Fatalf("after 2h with cap %v: %+v %v, want expired %v", c.cap, rec, err, c.expired)
			}
		})
	}
}
