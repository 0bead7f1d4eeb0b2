package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
)

// setFoldHook installs f to run before each run of batches the fold
// goroutine applies (nil: none).
func (p *PebbleState) setFoldHook(f func(ctx context.Context, writerID string, first, last uint64) error) {
	if f == nil {
		p.foldHook.Store(nil)
		return
	}
	p.foldHook.Store(&f)
}

// stall makes the fold of writer id block, from its next run on, until
// release is called (or the store closes); entered receives each run that
// blocked.
func stall(p *PebbleState, id string) (release func(), entered <-chan struct{}) {
	ch := make(chan struct{})
	in := make(chan struct{}, 16)
	p.setFoldHook(func(ctx context.Context, writerID string, first, last uint64) error {
		if writerID != id {
			return nil
		}
		select {
		case in <- struct{}{}:
		default:
		}
		select {
		case <-ch:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }, in
}

// waitFor polls cond (state the fold goroutine reaches on its own) for up
// to 10 s; the polling only saves a hook per condition, it asserts nothing
// by timing.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// A reader always sees its writer's acknowledged changes, with appends and
// reads running concurrently on several writers and a fold slower than the
// appends. (Without the wait in awaitFold the reads see stale values.)
func TestFoldReadYourWrites(t *testing.T) {
	n, _ := startPebbleNode(t, newPebbleDirs(t), false)
	// Slow the fold down so that it lags: each run yields the processor
	// a few times.
	n.ps.setFoldHook(func(ctx context.Context, writerID string, first, last uint64) error {
		for range 20 {
			runtime.Gosched()
		}
		return nil
	})
	const keyGroups, writers, perWriter, rounds = 8, 4, 2, 60
	n.create(t, "s", keyGroups)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, writers*perWriter)
	for wi := range writers {
		lo := uint32(wi * keyGroups / writers)
		hi := uint32((wi+1)*keyGroups/writers - 1)
		id := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: lo, Hi: hi}}).WriterId
		for g := range perWriter {
			wg.Go(func() {
				kg := lo + uint32(g)%(hi-lo+1)
				key := fmt.Sprintf("w%d-g%d", wi, g)
				for i := range rounds {
					val := strconv.Itoa(i)
					// Another key in the batch, so that batches are not
					// all one change.
					if _, err := n.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{
						change(dstlv1.Op_OP_MERGE, kg, "log", key, "."), change(dstlv1.Op_OP_PUT, kg, "v", key, val),
					}})); err != nil {
						errs <- err
						return
					}
					res, err := n.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: "s", KeyGroup: &kg, State: "v", Key: []byte(key)}))
					if err != nil {
						errs <- err
						return
					}
					if !res.Msg.Found || string(res.Msg.Value) != val {
						errs <- fmt.Errorf("writer %d goroutine %d: get after append %d: %q found=%v", wi, g, i, res.Msg.Value, res.Msg.Found)
						return
					}
					sc, err := n.state.Scan(ctx, connect.NewRequest(&dstlv1.ScanRequest{Stream: "s", State: "log", Prefix: []byte(key), KeyGroups: &dstlv1.KeyGroupRange{Lo: kg, Hi: kg}}))
					if err != nil {
						errs <- err
						return
					}
					if len(sc.Msg.Entries) != 1 || len(sc.Msg.Entries[0].Value) != i+1 {
						errs <- fmt.Errorf("writer %d goroutine %d: scan after append %d: %v", wi, g, i, sc.Msg.Entries)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A fold that fails breaks the writer's view: reads of its key groups fail
// with a typed error (never the view without the batch) until a writer
// opens them again.
func TestFoldErrorBreaksView(t *testing.T) {
	n, _ := startPebbleNode(t, newPebbleDirs(t), false)
	n.create(t, "s", 4)
	ctx := context.Background()
	w := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 0, Hi: 1}})
	other := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 2, Hi: 3}})
	P := dstlv1.Op_OP_PUT
	n.append(t, w.WriterId, change(P, 0, "a", "k", "1"))
	n.append(t, other.WriterId, change(P, 2, "a", "k", "other"))
	wantGet(t, n, "s", 0, "a", "k", "1", true)
	injected := errors.New("injected fold failure")
	var failing atomic.Bool
	failing.Store(true)
	n.ps.setFoldHook(func(ctx context.Context, writerID string, first, last uint64) error {
		if writerID == w.WriterId && failing.Load() {
			return injected
		}
		return nil
	})
	n.append(t, w.WriterId, change(P, 0, "a", "k", "2"), change(P, 1, "a", "k", "2"))
	kg := uint32(0)
	_, err := n.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: "s", KeyGroup: &kg, State: "a", Key: []byte("k")}))
	wantCode(t, "get of a broken view", err, connect.CodeFailedPrecondition, "read view broken")
	if !strings.Contains(err.Error(), injected.Error()) {
		t.Fatalf("error does not say why: %v", err)
	}
	_, err = n.state.Scan(ctx, connect.NewRequest(&dstlv1.ScanRequest{Stream: "s"}))
	wantCode(t, "scan over a broken view", err, connect.CodeFailedPrecondition, "read view broken")
	if _, _, err := n.ps.Get(ctx, "s", 1, "a", []byte("k")); !errors.Is(err, ErrReadViewBroken) {
		t.Fatalf("direct get: %v, want ErrReadViewBroken", err)
	}
	// The other writer's key groups are not harmed.
	wantScan(t, "other writer", n.scan(t, &dstlv1.ScanRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 2, Hi: 3}}), "2/a/k=other")
	// Later batches of the broken view are not queued.
	n.append(t, w.WriterId, change(P, 0, "a", "k", "3"))
	if q := n.ps.queuedBatches.Load(); q != 0 {
		t.Fatalf("%d batches queued on a broken view", q)
	}
	// A writer opening the key groups again (it fences the broken one)
	// serves them.
	failing.Store(false)
	w2 := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 0, Hi: 1}})
	wantGet(t, n, "s", 0, "a", "k", "", false) // no checkpoint: the new epoch starts empty
	n.append(t, w2.WriterId, change(P, 1, "a", "k", "new"))
	wantScan(t, "after the reopen", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), "1/a/k=new", "2/a/k=other")
}

// A read waits for a stalled fold at most ReadWait, then fails with
// UNAVAILABLE; once the fold resumes, the read sees the batch. The fold
// lag shows in the metrics meanwhile.
func TestFoldStalledReadTimesOut(t *testing.T) {
	n, _ := startPebbleNodeWith(t, newPebbleDirs(t), false, Options{ReadWait: 50 * time.Millisecond})
	n.create(t, "s", 2)
	ctx := context.Background()
	w := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"})
	P := dstlv1.Op_OP_PUT
	n.append(t, w.WriterId, change(P, 0, "a", "k", "1"))
	wantGet(t, n, "s", 0, "a", "k", "1", true)
	release, _ := stall(n.ps, w.WriterId)
	defer release()
	n.append(t, w.WriterId, change(P, 0, "a", "k", "2"), change(P, 1, "a", "k", "2"))
	kg := uint32(0)
	_, err := n.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: "s", KeyGroup: &kg, State: "a", Key: []byte("k")}))
	wantCode(t, "get while the fold is stalled", err, connect.CodeUnavailable, "the read needs 3")
	_, _, err = n.ps.Get(ctx, "s", 0, "a", []byte("k"))
	if !errors.Is(err, ErrFoldBehind) {
		t.Fatalf("direct get: %v, want ErrFoldBehind", err)
	}
	_, _, err = n.ps.Scan(ctx, ScanQuery{Stream: "s", KeyGroups: keygroup.Full(2), Limit: 10})
	if !errors.Is(err, ErrFoldBehind) {
		t.Fatalf("scan: %v, want ErrFoldBehind", err)
	}
	// The caller's deadline, if shorter, ends the wait first.
	short, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := n.ps.Get(short, "s", 0, "a", []byte("k")); !errors.Is(err, context.Canceled) {
		t.Fatalf("get with a canceled context: %v", err)
	}
	col := foldCollectors(n.ps)
	if lag := metricValue(t, col[0]); lag != 2 {
		t.Fatalf("fold lag %v SQNs, want 2", lag)
	}
	if q := metricValue(t, col[1]); q != 1 {
		// The stalled run counts until it is folded.
		t.Fatalf("%v batches queued, want 1", q)
	}
	n.append(t, w.WriterId, change(P, 1, "a", "k", "3"))
	if q := metricValue(t, col[1]); q != 2 {
		t.Fatalf("%v batches queued, want 2", q)
	}
	if b := metricValue(t, col[2]); b <= 0 {
		t.Fatalf("%v bytes queued", b)
	}
	release()
	wantGet(t, n, "s", 0, "a", "k", "2", true)
	wantGet(t, n, "s", 1, "a", "k", "3", true)
	if lag := n.ps.foldLag(); lag != 0 {
		t.Fatalf("fold lag %d after the reads waited it out", lag)
	}
	if q, b := n.ps.queuedBatches.Load(), n.ps.queued.Load(); q != 0 || b != 0 {
		t.Fatalf("%d batches, %d bytes queued after the fold caught up", q, b)
	}
	var h dto.Metric
	if err := n.ps.waits.Write(&h); err != nil {
		t.Fatal(err)
	}
	// The reads that waited: three that failed, the one canceled, and
	// the ones that saw the values (at least the first after release).
	if c := h.GetHistogram().GetSampleCount(); c < 5 {
		t.Fatalf("wait histogram holds %d reads", c)
	}
}

// A writer fenced while batches of it are queued: none of them reaches the
// store (the new writer's key groups hold its own state). A writer closed
// while batches are queued: they all fold, its view serves on. Both with
// the batches kept in the queue and read back from the changelog.
func TestFoldWriterFencedOrClosedWhileQueued(t *testing.T) {
	for _, queue := range []int64{DefaultFoldQueueBytes, 1} {
		t.Run(fmt.Sprintf("queue=%d", queue), func(t *testing.T) { testFoldFencedOrClosed(t, queue) })
	}
}

func testFoldFencedOrClosed(t *testing.T, queue int64) {
	n, _ := startPebbleNodeWith(t, newPebbleDirs(t), false, Options{FoldQueueBytes: queue})
	n.create(t, "s", 4)
	ctx := context.Background()
	P := dstlv1.Op_OP_PUT
	a := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 0, Hi: 1}})
	n.append(t, a.WriterId, change(P, 0, "s", "k", "cp"))
	must(n.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: a.WriterId, CheckpointId: 1}))).get(t)
	releaseA, enteredA := stall(n.ps, a.WriterId)
	defer releaseA()
	// Two runs: the first stalls in the hook, the second waits queued.
	n.append(t, a.WriterId, change(P, 0, "s", "k", "zombie1"))
	<-enteredA
	n.append(t, a.WriterId, change(P, 1, "s", "k", "zombie2"))
	if q := n.ps.queuedBatches.Load(); q != 2 {
		t.Fatalf("%d batches queued, want 2", q)
	}
	// A newer writer from checkpoint 1 fences a: its queued batch goes.
	b := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 0, Hi: 1}, FromCheckpoint: 1})
	if q := n.ps.queuedBatches.Load(); q != 1 {
		t.Fatalf("after the fence: %d batches queued, want 1 (the stalled run)", q)
	}
	releaseA() // the stalled run finds its view retired and applies nothing
	n.append(t, b.WriterId, change(P, 1, "s", "b", "new"))
	wantScan(t, "after the fence", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), "0/s/k=cp", "1/s/b=new")
	if q, by := n.ps.queuedBatches.Load(), n.ps.queued.Load(); q != 0 || by != 0 {
		t.Fatalf("after the fence: %d batches, %d bytes queued", q, by)
	}
	_, err := n.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: a.WriterId, Changes: []*dstlv1.Change{change(P, 0, "s", "k", "x")}}))
	wantCode(t, "append of the fenced writer", err, connect.CodeFailedPrecondition, "")

	// Closed: its queued batches fold and its view serves.
	c := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 2, Hi: 3}})
	releaseC, _ := stall(n.ps, c.WriterId)
	defer releaseC()
	n.append(t, c.WriterId, change(P, 2, "s", "k", "c1"))
	n.append(t, c.WriterId, change(P, 3, "s", "k", "c2"))
	must(n.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: c.WriterId}))).get(t)
	releaseC()
	wantScan(t, "after the close", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), "0/s/k=cp", "1/s/b=new", "2/s/k=c1", "3/s/k=c2")
}

// Close with batches queued and the fold stalled: Close returns, the fold
// goroutine ends, the queue's memory is released, and waiting reads end.
func TestFoldCloseWithQueuedBatches(t *testing.T) {
	n, _ := startPebbleNode(t, newPebbleDirs(t), false)
	n.create(t, "s", 2)
	w := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"})
	release, _ := stall(n.ps, w.WriterId)
	defer release()
	for i := range 5 {
		n.append(t, w.WriterId, change(dstlv1.Op_OP_PUT, uint32(i%2), "a", "k", strconv.Itoa(i)))
	}
	if q := n.ps.queuedBatches.Load(); q == 0 {
		t.Fatal("nothing queued")
	}
	// A read waiting for the stalled fold when the store closes.
	readErr := make(chan error, 1)
	go func() {
		_, _, err := n.ps.Get(context.Background(), "s", 0, "a", []byte("k"))
		readErr <- err
	}()
	waitFor(t, "the read to wait", func() bool {
		return strings.Contains(stacks(), "(*PebbleState).awaitFold")
	})
	ps := n.ps
	n.stop() // Shutdown, node.Close, then Server.Close closes the PebbleState
	select {
	case <-ps.done:
	default:
		t.Fatal("the fold goroutine did not end")
	}
	if err := <-readErr; err == nil {
		t.Fatal("a read waiting for the fold succeeded after Close")
	}
	if q, b := ps.queuedBatches.Load(), ps.queued.Load(); q != 0 || b != 0 {
		t.Fatalf("after Close: %d batches, %d bytes queued", q, b)
	}
	if st := stacks(); strings.Contains(st, "(*PebbleState).run") || strings.Contains(st, "(*PebbleState).awaitFold") {
		t.Fatalf("goroutines of the PebbleState left after Close:\n%s", st)
	}
	// Close again is harmless; appends after Close are ignored.
	if err := ps.Close(); err != nil {
		t.Fatal(err)
	}
}

// metricValue reads a gauge or counter.
func metricValue(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 1)
	c.Collect(ch)
	var m dto.Metric
	if err := (<-ch).Write(&m); err != nil {
		t.Fatal(err)
	}
	if g := m.GetGauge(); g != nil {
		return g.GetValue()
	}
	return m.GetCounter().GetValue()
}

func stacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// Random batches (puts, deletes, merges, clears) appended by concurrent
// writers, each reading back after every append and comparing with its own
// map model (read-your-writes, key by key and by scans), with a queue
// bound drawn at random so that batches are kept, read back from the
// changelog, or both, and a fold that randomly lags.
func TestFoldRandomized(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("DSTL_MODEL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (DSTL_MODEL_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	queue := []int64{1, 2 << 10, 64 << 20}[rng.IntN(3)]
	t.Logf("fold queue bound %d bytes", queue)
	n, _ := startPebbleNodeWith(t, newPebbleDirs(t), false, Options{FoldQueueBytes: queue})
	const keyGroups, writers, steps = 8, 3, 80
	n.create(t, "s", keyGroups)
	var lagging atomic.Uint64
	n.ps.setFoldHook(func(ctx context.Context, writerID string, first, last uint64) error {
		for range lagging.Add(1) % 7 * 10 {
			runtime.Gosched()
		}
		return nil
	})
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for wi := range writers {
		lo := uint16(wi * keyGroups / writers)
		hi := uint16((wi+1)*keyGroups/writers - 1)
		id := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: uint32(lo), Hi: uint32(hi)}}).WriterId
		wrng := rand.New(rand.NewPCG(seed, uint64(wi)))
		wg.Go(func() {
			if err := randomWriter(ctx, n, id, keygroup.Range{Lo: lo, Hi: hi}, wrng, steps); err != nil {
				errs <- fmt.Errorf("writer %d: %w", wi, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d batches read back from the changelog", n.ps.spilled.Load())
}

// randomWriter appends random batches to writer id over key groups r and
// checks after each that reads return its map model.
func randomWriter(ctx context.Context, n *pebbleNode, id string, r keygroup.Range, rng *rand.Rand, steps int) error {
	model := stateModel{}
	states := []string{"", "a", "bb"}
	keys := []string{"k", "k1", "p/x", "p/y", "z"}
	for step := range steps {
		var changes []*dstlv1.Change
		for range 1 + rng.IntN(30) {
			op := []dstlv1.Op{dstlv1.Op_OP_PUT, dstlv1.Op_OP_PUT, dstlv1.Op_OP_MERGE, dstlv1.Op_OP_MERGE, dstlv1.Op_OP_DELETE, dstlv1.Op_OP_CLEAR}[rng.IntN(6)]
			if op == dstlv1.Op_OP_CLEAR && rng.IntN(3) > 0 {
				op = dstlv1.Op_OP_PUT // clears are rare
			}
			kg := r.Lo + uint16(rng.IntN(int(r.Hi-r.Lo)+1))
			c := change(op, uint32(kg), states[rng.IntN(len(states))], keys[rng.IntN(len(keys))], strconv.Itoa(rng.IntN(100)))
			changes = append(changes, c)
		}
		if _, err := n.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: changes})); err != nil {
			return err
		}
		for _, c := range changes {
			model.apply(c)
		}
		// A get of a key just written, or of any key.
		k := modelKey{changes[0].KeyGroup, changes[0].State, string(changes[0].Key)}
		if rng.IntN(2) == 0 {
			k = modelKey{uint32(r.Lo) + uint32(rng.IntN(int(r.Hi-r.Lo)+1)), states[rng.IntN(len(states))], keys[rng.IntN(len(keys))]}
		}
		kg := k.kg
		res, err := n.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: "s", KeyGroup: &kg, State: k.state, Key: []byte(k.key)}))
		if err != nil {
			return err
		}
		if want, ok := model[k]; res.Msg.Found != ok || string(res.Msg.Value) != want {
			return fmt.Errorf("step %d: get %v: %q found=%v, want %q found=%v", step, k, res.Msg.Value, res.Msg.Found, want, ok)
		}
		if rng.IntN(4) > 0 {
			continue
		}
		var want []Entry
		for k, v := range model {
			want = append(want, Entry{KeyGroup: uint16(k.kg), State: k.state, Key: []byte(k.key), Value: []byte(v)})
		}
		slices.SortFunc(want, func(a, b Entry) int { return compareEntries(&a, &b) })
		got, _, err := n.ps.Scan(ctx, ScanQuery{Stream: "s", KeyGroups: r, Limit: 1 << 20})
		if err != nil {
			return err
		}
		if !slices.EqualFunc(got, want, func(a, b Entry) bool { return compareEntries(&a, &b) == 0 && bytes.Equal(a.Value, b.Value) }) {
			return fmt.Errorf("step %d: scan of %s:\n got  %v\n want %v", step, r, got, want)
		}
	}
	return nil
}

// Dropping the changes a later put or delete of the same key overrides
// leaves the state after the whole Apply unchanged: random runs of
// changes over few keys, applied in full and filtered, to a map model.
func TestSupersededFilter(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	var f supersededFilter
	ops := []segments.Op{segments.OpPut, segments.OpPut, segments.OpDelete, segments.OpMerge, segments.OpMerge, segments.OpClear}
	for round := range 2000 {
		base := kvState{}
		for i := range 5 {
			base.apply(&segments.Change{Op: segments.OpPut, KeyGroup: uint16(i % 2), State: "a", Key: []byte{byte('k' + i%3)}, Value: []byte("base")})
		}
		var (
			changes []segments.Change
			run     []*queuedBatch
		)
		sqn := uint64(1)
		for range 1 + rng.IntN(4) { // batches of the run
			qb := &queuedBatch{first: sqn}
			for range 1 + rng.IntN(5) {
				c := changelog.Change{Op: ops[rng.IntN(len(ops))], KeyGroup: uint16(rng.IntN(2)), State: []string{"a", "b"}[rng.IntN(2)], Key: []byte{byte('k' + rng.IntN(3))}, Value: []byte{byte('0' + sqn%10)}}
				qb.changes = append(qb.changes, c)
				changes = append(changes, segments.Change{SQN: sqn, Op: c.Op, KeyGroup: c.KeyGroup, State: c.State, Key: c.Key, Value: c.Value})
				sqn++
			}
			qb.last = sqn - 1
			run = append(run, qb)
		}
		full, filtered := maps.Clone(base), maps.Clone(base)
		for i := range changes {
			full.apply(&changes[i])
		}
		kept := slices.Clone(f.collect(run))
		f.reset()
		for i := range kept {
			filtered.apply(&kept[i])
		}
		if !maps.EqualFunc(full, filtered, bytes.Equal) {
			t.Fatalf("round %d: changes %v\n kept %v\n full %v\n filtered %v", round, changes, kept, full, filtered)
		}
		if kept[len(kept)-1].SQN != changes[len(changes)-1].SQN {
			t.Fatalf("round %d: the last change was dropped", round)
		}
		for i := 1; i < len(kept); i++ {
			if kept[i].SQN <= kept[i-1].SQN {
				t.Fatalf("round %d: SQNs out of order: %v", round, kept)
			}
		}
	}
}

func TestPebbleStateCheckpointAdvanceModel(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("DSTL_MODEL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (DSTL_MODEL_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	d := t.TempDir()
	blob := d + "/blob"
	a, _ := startPebbleNode(t, pebbleDirs{blob: blob, data: d + "/a", state: d + "/a/state"}, false)
	b, _ := startPebbleNode(t, pebbleDirs{blob: blob, data: d + "/b", state: d + "/b/state"}, false)
	b.ps.refreshEvery = 0
	const keyGroups = 8
	a.create(t, "s", keyGroups)
	ctx := context.Background()
	model := stateModel{}
	cps := map[uint64]stateModel{0: {}}
	var cpIDs []uint64
	type writer struct {
		id string
		r  keygroup.Range
	}
	open := func(from uint64) []writer {
		cut := uint16(rng.IntN(keyGroups))
		var ws []writer
		for i, r := range []keygroup.Range{{Lo: 0, Hi: max(cut, 1) - 1}, {Lo: cut, Hi: keyGroups - 1}} {
			if i == 0 && cut == 0 {
				continue
			}
			w := a.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: uint32(r.Lo), Hi: uint32(r.Hi)}, FromCheckpoint: from})
			ws = append(ws, writer{w.WriterId, r})
		}
		return ws
	}
	check := func(what string) {
		t.Helper()
		latest := uint64(0)
		if len(cpIDs) > 0 {
			latest = cpIDs[len(cpIDs)-1]
		}
		var want []string
		for k, v := range cps[latest] {
			want = append(want, fmt.Sprintf("%d/%s/%s=%s", k.kg, k.state, k.key, v))
		}
		slices.SortFunc(want, func(x, y string) int {
			kx, ky := splitEntry(x), splitEntry(y)
			return compareEntries(&kx, &ky)
		})
		wantScan(t, fmt.Sprintf("%s: node b at checkpoint %d", what, latest), b.scan(t, &dstlv1.ScanRequest{Stream: "s", PageSize: 50}), want...)
	}
	writers := open(0)
	rollbacks := 0
	for step := range 50 {
		switch x := rng.IntN(10); {
		case x < 5: // a few batches
			for range 1 + rng.IntN(3) {
				w := writers[rng.IntN(len(writers))]
				var changes []*dstlv1.Change
				for range 1 + rng.IntN(10) {
					op := []dstlv1.Op{dstlv1.Op_OP_PUT, dstlv1.Op_OP_PUT, dstlv1.Op_OP_MERGE, dstlv1.Op_OP_DELETE, dstlv1.Op_OP_CLEAR}[rng.IntN(5)]
					if op == dstlv1.Op_OP_CLEAR && rng.IntN(3) > 0 {
						op = dstlv1.Op_OP_MERGE
					}
					kg := uint32(w.r.Lo) + uint32(rng.IntN(int(w.r.Hi-w.r.Lo)+1))
					c := change(op, kg, []string{"a", "b"}[rng.IntN(2)], []string{"k", "k1", "z"}[rng.IntN(3)], strconv.Itoa(rng.IntN(100)))
					changes = append(changes, c)
					model.apply(c)
				}
				a.append(t, w.id, changes...)
			}
		case x < 8: // a checkpoint of every writer
			id := uint64(len(cpIDs)) + 1
			if n := len(cpIDs); n > 0 {
				id = cpIDs[n-1] + 1
			}
			for _, w := range writers {
				must(a.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: w.id, CheckpointId: id}))).get(t)
			}
			cpIDs = append(cpIDs, id)
			cps[id] = maps.Clone(model)
		default: // reopen: from the newest checkpoint, or roll back
			for _, w := range writers {
				must(a.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: w.id}))).get(t)
			}
			from := uint64(0)
			if n := len(cpIDs); n > 0 {
				from = cpIDs[n-1]
				if n > 1 && rng.IntN(3) == 0 {
					from = cpIDs[n-2] // within the retained checkpoints
					rollbacks++
				}
			}
			writers = open(from)
			model = maps.Clone(cps[from])
		}
		check(fmt.Sprintf("step %d", step))
	}
	t.Logf("node b: %d incremental advances, %d refolds, %d rollbacks", b.ps.advances.Load(), b.ps.refolds.Load(), rollbacks)
	if len(cpIDs) > 1 && b.ps.advances.Load() == 0 {
		t.Fatal("no checkpoint change was folded incrementally")
	}
}
