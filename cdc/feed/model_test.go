package feed

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// mkey is a row of the model.
type mkey struct {
	kg         uint16
	state, key string
}

type rows map[mkey]string

// modelWriter is a writer and the state it has built: the state of its
// key groups at the checkpoint it started from plus its own changes.
type modelWriter struct {
	w    *changelog.Writer
	r    keygroup.Range
	work rows
}

// workload drives one node through random puts, deletes, merges, clears,
// checkpoints, and reopens of every key group with a new partition (a
// rescale) from the newest checkpoint or an older one (a rollback), which
// fences the previous writers with their changes after their last
// checkpoint. It returns the model state of every complete checkpoint.
type workload struct {
	t         *testing.T
	node      *changelog.Node
	rng       *rand.Rand
	keyGroups int
	writers   []*modelWriter
	committed map[uint64]rows
	ids       []uint64
	// Generations of writers: each reopen starts one, from a checkpoint.
	gen     int
	genFrom []uint64
	genOf   map[uint64]int
	// afterCheckpoint, if set, runs after each checkpoint completes.
	afterCheckpoint func()
}

func openNode(t testing.TB) *changelog.Node {
	t.Helper()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return openNodeOn(t, store)
}

// openNodeOn opens a node with an empty disk on a blob store.
func openNodeOn(t testing.TB, store upload.BlobStore) *changelog.Node {
	t.Helper()
	opts := changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1}
	opts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close(context.Background()) })
	return node
}

func newWorkload(t *testing.T, seed uint64, keyGroups int) *workload {
	ctx := context.Background()
	node := openNode(t)
	if _, err := node.CreateStream(ctx, "s", keyGroups); err != nil {
		t.Fatal(err)
	}
	wl := &workload{t: t, node: node, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), keyGroups: keyGroups, committed: map[uint64]rows{0: {}}, genOf: map[uint64]int{}}
	wl.reopen(0)
	return wl
}

// reopen opens writers of a new random partition from checkpoint from (0:
// the empty state, only before the first checkpoint).
func (wl *workload) reopen(from uint64) {
	ctx := context.Background()
	n := []int{1, 2, 4}[wl.rng.IntN(3)]
	n = min(n, wl.keyGroups)
	bounds := []int{0}
	for i := 1; i < n; i++ {
		bounds = append(bounds, i*wl.keyGroups/n)
	}
	bounds = append(bounds, wl.keyGroups)
	var ws []*modelWriter
	for i := 0; i < n; i++ {
		r := keygroup.Range{Lo: uint16(bounds[i]), Hi: uint16(bounds[i+1] - 1)}
		w, err := wl.node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: r, FromCheckpoint: from})
		if err != nil {
			wl.t.Fatalf("open %s from %d: %v", r, from, err)
		}
		work := rows{}
		for k, v := range wl.committed[from] {
			if r.Contains(k.kg) {
				work[k] = v
			}
		}
		ws = append(ws, &modelWriter{w: w, r: r, work: work})
	}
	wl.writers = ws // the previous ones are fenced
	wl.gen = len(wl.genFrom)
	wl.genFrom = append(wl.genFrom, from)
}

// lineage returns the checkpoints the newest one descends from, oldest
// first: what a feed delivers (a rolled-back checkpoint is skipped).
func (wl *workload) lineage() []uint64 {
	if len(wl.ids) == 0 {
		return nil
	}
	keep := map[uint64]bool{}
	for cp := wl.ids[len(wl.ids)-1]; cp != 0; {
		g := wl.genOf[cp]
		for _, id := range wl.ids {
			if id <= cp && wl.genOf[id] == g {
				keep[id] = true
			}
		}
		cp = wl.genFrom[g]
	}
	var out []uint64
	for _, id := range wl.ids {
		if keep[id] {
			out = append(out, id)
		}
	}
	return out
}

func (wl *workload) change() {
	ctx := context.Background()
	mw := wl.writers[wl.rng.IntN(len(wl.writers))]
	var batch []changelog.Change
	for range 1 + wl.rng.IntN(6) {
		kg := mw.r.Lo + uint16(wl.rng.IntN(int(mw.r.Hi-mw.r.Lo)+1))
		k := mkey{kg: kg, state: []string{"a", "bb"}[wl.rng.IntN(2)], key: fmt.Sprintf("k%d", wl.rng.IntN(6))}
		v := fmt.Sprintf("v%d", wl.rng.IntN(1000))
		c := changelog.Change{KeyGroup: kg, State: k.state, Key: []byte(k.key), Value: []byte(v), TimestampMs: 1 + int64(wl.rng.IntN(1000))}
		switch p := wl.rng.IntN(100); {
		case p < 50:
			c.Op = changelog.OpPut
			mw.work[k] = v
		case p < 72:
			c.Op, c.Value = changelog.OpDelete, nil
			delete(mw.work, k)
		case p < 94:
			c.Op = changelog.OpMerge
			mw.work[k] += v
		default:
			c.Op, c.Key, c.Value = changelog.OpClear, nil, nil
			maps.DeleteFunc(mw.work, func(o mkey, _ string) bool { return o.kg == kg && o.state == k.state })
		}
		batch = append(batch, c)
	}
	if _, _, err := mw.w.Append(ctx, batch, changelog.Buffered); err != nil {
		wl.t.Fatal(err)
	}
}

func (wl *workload) checkpoint() {
	ctx := context.Background()
	id := uint64(len(wl.ids) + 1)
	if len(wl.ids) > 0 {
		id = wl.ids[len(wl.ids)-1] + 1 + uint64(wl.rng.IntN(2))
	}
	state := rows{}
	complete := false
	for _, mw := range wl.writers {
		res, err := mw.w.Checkpoint(ctx, id, nil)
		if err != nil {
			wl.t.Fatalf("checkpoint %d: %v", id, err)
		}
		complete = res.Complete
		maps.Copy(state, mw.work)
	}
	if !complete {
		wl.t.Fatalf("checkpoint %d did not complete", id)
	}
	wl.committed[id] = state
	wl.ids = append(wl.ids, id)
	wl.genOf[id] = wl.gen
	if wl.afterCheckpoint != nil {
		wl.afterCheckpoint()
	}
}

func (wl *workload) run(steps int) {
	for range steps {
		switch p := wl.rng.IntN(100); {
		case p < 75:
			wl.change()
		case p < 90:
			wl.checkpoint()
		default:
			if len(wl.ids) == 0 {
				wl.reopen(0)
				continue
			}
			from := wl.ids[len(wl.ids)-1]
			if wl.rng.IntN(3) == 0 {
				from = wl.ids[wl.rng.IntN(len(wl.ids))] // a rollback
			}
			wl.reopen(from)
		}
	}
	// Changes after the last checkpoint (never delivered), then one more
	// writer set whose changes are never checkpointed (fenced by nothing:
	// simply not committed).
	wl.change()
}

// delivered is one event as a consumer saw it.
type delivered struct {
	checkpoint uint64
	ev         Event
	token      cdc.Token
}

func (d delivered) String() string {
	return fmt.Sprintf("cp %d #%d %d %d/%s/%s=%q", d.checkpoint, d.ev.Ordinal, d.ev.Kind, d.ev.KeyGroup, d.ev.State, d.ev.Key, d.ev.Value)
}

// collect runs a feed with NoFollow and returns its events and messages.
func collect(t *testing.T, node *changelog.Node, req Request) (evs []delivered, batches []Batch) {
	t.Helper()
	return collectWith(t, Config{Node: node, Dir: t.TempDir()}, req)
}

// collectWith is collect with a feed configuration.
func collectWith(t *testing.T, cfg Config, req Request) (evs []delivered, batches []Batch) {
	t.Helper()
	req.NoFollow = true
	err := Run(context.Background(), cfg, req, func(b *Batch) error {
		for _, e := range b.Events {
			e.Key, e.Value = slices.Clone(e.Key), slices.Clone(e.Value)
			evs = append(evs, delivered{checkpoint: b.Checkpoint, ev: e, token: b.Base.WithOrdinal(e.Ordinal)})
		}
		c := *b
		c.Events = nil
		batches = append(batches, c)
		return nil
	})
	if err != nil {
		t.Fatalf("feed from %+v: %v", req.From, err)
	}
	return evs, batches
}

// TestFeedModel: the retract and the upsert events of a random workload
// (put, delete, merge, clear, checkpoints, rescales, rollbacks to older
// checkpoints, fenced writers' uncheckpointed changes), applied to an empty
// map, equal the model state at every checkpoint; a rolled-back checkpoint
// is skipped by a consumer that had not reached it and retracted for one
// that had; and a consumer that resumes from any event's token, or any
// message's, on another node, gets exactly the events after it (no
// duplicate, no gap).
func TestFeedModel(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			wl := newWorkload(t, seed, 8)
			// A live consumer reads each checkpoint as it completes, so it
			// also consumes checkpoints rolled back later: the next one it
			// gets retracts them (the difference of the two states).
			live := &liveConsumer{state: rows{}}
			wl.afterCheckpoint = func() { live.catchUp(t, wl) }
			wl.run(120)
			if live.diffs == 0 && live.rollbacks(wl) > 0 {
				t.Fatalf("the live consumer went through %d rollbacks without a diff", live.rollbacks(wl))
			}
			for _, form := range []cdc.Form{cdc.FormRetract, cdc.FormUpsert} {
				t.Run(form.String(), func(t *testing.T) {
					req := Request{Stream: "s", Form: form, MaxEvents: 7}
					evs, batches := collect(t, wl.node, req)
					checkState(t, wl, form, evs, batches)
					checkResume(t, wl, req, evs, batches)
					// A cache of a few hundred bytes: values are flushed to
					// Pebble and evicted all the time, with the same events.
					tiny, _ := collectWith(t, Config{Node: wl.node, Dir: t.TempDir(), CacheBytes: 600}, req)
					if len(tiny) != len(evs) {
						t.Fatalf("with a tiny cache: %d events, want %d", len(tiny), len(evs))
					}
					for i := range tiny {
						if tiny[i].String() != evs[i].String() {
							t.Fatalf("with a tiny cache, event %d is %v, want %v", i, tiny[i], evs[i])
						}
					}
				})
			}
		})
	}
}

// liveConsumer applies retract events as checkpoints complete, resuming
// each time from the token of the previous checkpoint-complete marker.
type liveConsumer struct {
	tok   *cdc.Token
	state rows
	seen  []uint64
	diffs int
}

func (c *liveConsumer) catchUp(t *testing.T, wl *workload) {
	t.Helper()
	evs, batches := collect(t, wl.node, Request{Stream: "s", Form: cdc.FormRetract, From: c.tok})
	i := 0
	for _, b := range batches {
		for ; i < len(evs) && evs[i].checkpoint == b.Checkpoint; i++ {
			e := evs[i].ev
			k := mkey{kg: e.KeyGroup, state: e.State, key: string(e.Key)}
			switch e.Kind {
			case KindInsert, KindUpdateAfter:
				c.state[k] = string(e.Value)
			case KindUpdateBefore, KindDelete:
				if c.state[k] != string(e.Value) {
					t.Fatalf("live: %v retracts %q, the consumer has %q", evs[i], e.Value, c.state[k])
				}
				delete(c.state, k)
			}
			if e.TimestampMs == 0 {
				c.diffs++ // diff events carry no timestamp
			}
		}
		if b.Complete {
			if want := wl.committed[b.Checkpoint]; !maps.Equal(c.state, want) {
				t.Fatalf("live consumer after checkpoint %d: %v, want %v", b.Checkpoint, c.state, want)
			}
			c.seen = append(c.seen, b.Checkpoint)
			tok := b.Token
			c.tok = &tok
		}
	}
}

// rollbacks counts the checkpoints the live consumer saw that are not in
// the newest checkpoint's lineage.
func (c *liveConsumer) rollbacks(wl *workload) int {
	n := 0
	lin := wl.lineage()
	for _, id := range c.seen {
		if !slices.Contains(lin, id) {
			n++
		}
	}
	return n
}

func checkState(t *testing.T, wl *workload, form cdc.Form, evs []delivered, batches []Batch) {
	t.Helper()
	state := rows{}
	i := 0
	var completed []uint64
	for _, b := range batches {
		for ; i < len(evs) && evs[i].checkpoint == b.Checkpoint && (b.Complete || evs[i].ev.Ordinal <= b.Token.Ordinal); i++ {
			e := evs[i].ev
			k := mkey{kg: e.KeyGroup, state: e.State, key: string(e.Key)}
			old, had := state[k]
			switch e.Kind {
			case KindPut, KindInsert, KindUpdateAfter:
				if e.Kind == KindInsert && had {
					t.Fatalf("%v: +I of a key that exists (%q)", evs[i], old)
				}
				state[k] = string(e.Value)
			case KindUpdateBefore:
				if !had || old != string(e.Value) {
					t.Fatalf("%v: -U with a before-image that is not the key's value (%q, %v)", evs[i], old, had)
				}
				delete(state, k)
			case KindDelete:
				if form == cdc.FormRetract && (!had || old != string(e.Value)) {
					t.Fatalf("%v: -D with a before-image that is not the key's value (%q, %v)", evs[i], old, had)
				}
				delete(state, k)
			}
		}
		if b.Complete {
			completed = append(completed, b.Checkpoint)
			if want := wl.committed[b.Checkpoint]; !maps.Equal(state, want) {
				t.Fatalf("after checkpoint %d the events give %v, want %v", b.Checkpoint, state, want)
			}
		}
	}
	if i != len(evs) {
		t.Fatalf("%d events outside their messages", len(evs)-i)
	}
	// Rolled-back checkpoints never appear: only the newest one's lineage.
	if want := wl.lineage(); !slices.Equal(completed, want) {
		t.Fatalf("checkpoints delivered %v, want %v (complete: %v)", completed, want, wl.ids)
	}
}

func checkResume(t *testing.T, wl *workload, req Request, evs []delivered, batches []Batch) {
	t.Helper()
	// Tokens are valid on any node sharing the blob store: the resumed
	// feeds run on another node, with an empty disk.
	observer := openNodeOn(t, wl.node.BlobStore())
	same := func(what string, got, want []delivered) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("resume %s: %d events, want %d", what, len(got), len(want))
		}
		for i := range got {
			g, w := got[i], want[i]
			if g.checkpoint != w.checkpoint || g.ev.Ordinal != w.ev.Ordinal || g.ev.Kind != w.ev.Kind || g.ev.KeyGroup != w.ev.KeyGroup ||
				g.ev.State != w.ev.State || string(g.ev.Key) != string(w.ev.Key) || string(g.ev.Value) != string(w.ev.Value) {
				t.Fatalf("resume %s: event %d is %v, want %v", what, i, g, w)
			}
		}
	}
	step := max(1, len(evs)/30)
	for i := 0; i < len(evs); i += step {
		tok := evs[i].token
		r := req
		r.From = &tok
		got, _ := collect(t, observer, r)
		same(fmt.Sprintf("after event %d (%v)", i, evs[i]), got, evs[i+1:])
	}
	for j, b := range batches {
		if j%max(1, len(batches)/10) != 0 {
			continue
		}
		tok := b.Token
		r := req
		r.From = &tok
		got, _ := collect(t, observer, r)
		// The events after the message: those of later checkpoints, or of
		// its checkpoint with a higher ordinal.
		var want []delivered
		for _, e := range evs {
			if (tok.Boundary() && e.checkpoint > tok.After) || (!tok.Boundary() && (e.checkpoint > tok.Checkpoint || (e.checkpoint == tok.Checkpoint && e.ev.Ordinal > tok.Ordinal))) {
				want = append(want, e)
			}
		}
		same(fmt.Sprintf("after message %d", j), got, want)
	}
}
