package upload_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

// testLog is a changelog log as the scheduler sees it: a tail of appended
// changes, the changes of the drain in flight, and what was acknowledged.
type testLog struct {
	t  testing.TB
	id string

	mu       sync.Mutex
	nextSQN  uint64
	tail     []segments.Change // appended, not drained
	inflight []segments.Change // drained, awaiting Uploaded
	acked    uint64            // highest SQN uploaded
	results  []upload.FlushResult
	changed  chan struct{} // closed and replaced on every Uploaded
	problems []string
}

func newTestLog(t testing.TB, id string) *testLog {
	return &testLog{t: t, id: id, nextSQN: 1, changed: make(chan struct{})}
}

func (l *testLog) LogID() string { return l.id }

func (l *testLog) Drain() []segments.Change {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inflight != nil {
		l.problems = append(l.problems, "drained again before the Uploaded callback")
	}
	out := l.tail
	l.tail = nil
	if len(out) > 0 {
		l.inflight = out
	}
	return out
}

func (l *testLog) Uploaded(res upload.FlushResult) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inflight == nil {
		l.problems = append(l.problems, "Uploaded without a drain")
	}
	l.results = append(l.results, res)
	if res.Err != nil {
		l.tail = append(l.inflight, l.tail...) // hand them again, first
	} else {
		first, last := l.inflight[0].SQN, l.inflight[len(l.inflight)-1].SQN
		var n uint64
		for i, b := range res.Blocks {
			n += b.Count
			if b.LogID != l.id || (i == 0 && b.FirstSQN != first) || (i > 0 && b.FirstSQN != res.Blocks[i-1].LastSQN+1) {
				l.problems = append(l.problems, fmt.Sprintf("block %d %+v does not continue SQN %d..%d", i, b, first, last))
			}
		}
		if n != uint64(len(l.inflight)) || len(res.Blocks) == 0 || res.Blocks[len(res.Blocks)-1].LastSQN != last {
			l.problems = append(l.problems, fmt.Sprintf("blocks %+v do not cover SQN %d..%d", res.Blocks, first, last))
		}
		if first != l.acked+1 {
			l.problems = append(l.problems, fmt.Sprintf("uploaded SQN %d after %d", first, l.acked))
		}
		l.acked = last
	}
	l.inflight = nil
	close(l.changed)
	l.changed = make(chan struct{})
}

// change makes the change with the given SQN; its content is derived from
// the log and SQN so that read-back can check it.
func (l *testLog) change(sqn uint64, valueLen int) segments.Change {
	v := bytes.Repeat([]byte{byte(sqn)}, valueLen)
	return segments.Change{
		LogID: l.id, SQN: sqn, KeyGroup: uint16(sqn % 128), State: "s", Op: segments.OpPut,
		Key: fmt.Appendf(nil, "%s/k%d", l.id, sqn), Value: v, TimestampMs: int64(sqn),
	}
}

// Append reserves room for n changes and buffers them; it returns the last SQN.
func (l *testLog) Append(ctx context.Context, s *upload.Scheduler, n, valueLen int) (uint64, error) {
	l.mu.Lock()
	sqn := l.nextSQN
	l.mu.Unlock()
	cs := make([]segments.Change, n)
	var size int64
	for i := range cs {
		cs[i] = l.change(sqn+uint64(i), valueLen)
		size += upload.ChangeBytes(cs[i])
	}
	if err := s.Reserve(ctx, size); err != nil {
		return 0, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.nextSQN != sqn {
		l.t.Errorf("log %s: concurrent appends", l.id)
	}
	l.tail = append(l.tail, cs...)
	l.nextSQN += uint64(n)
	return l.nextSQN - 1, nil
}

// Persist asks for a flush and waits until sqn is uploaded.
func (l *testLog) Persist(ctx context.Context, s *upload.Scheduler, sqn uint64) error {
	s.RequestFlush()
	return l.WaitAcked(ctx, sqn)
}

func (l *testLog) WaitAcked(ctx context.Context, sqn uint64) error {
	for {
		l.mu.Lock()
		acked, ch := l.acked, l.changed
		l.mu.Unlock()
		if acked >= sqn {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("log %s: waiting for SQN %d (acked %d): %w", l.id, sqn, acked, ctx.Err())
		}
	}
}

// waitResults waits until the log got n callbacks.
func (l *testLog) waitResults(t testing.TB, n int) []upload.FlushResult {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		l.mu.Lock()
		got, ch := slices.Clone(l.results), l.changed
		l.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("log %s: %d callbacks, want %d", l.id, len(got), n)
		}
	}
}

func (l *testLog) check(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range l.problems {
		t.Errorf("log %s: %s", l.id, p)
	}
}

func (l *testLog) lastSQN() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nextSQN - 1
}

func newFileStore(t testing.TB) upload.BlobStore {
	t.Helper()
	s, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// harness runs a scheduler for one test and stops it at the end.
type harness struct {
	t       testing.TB
	s       *upload.Scheduler
	store   upload.BlobStore
	node    string
	metrics *upload.SchedulerMetrics
	cancel  context.CancelFunc
	runErr  chan error
}

func start(t testing.TB, opts upload.SchedulerOptions) *harness {
	t.Helper()
	if opts.Node == "" {
		opts.Node = "node-1"
	}
	if opts.Metrics == nil {
		opts.Metrics = upload.NewSchedulerMetrics()
	}
	if opts.Rand == nil {
		opts.Rand = rand.New(rand.NewPCG(1, 2))
	}
	s, err := upload.NewScheduler(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, s: s, store: opts.Store, node: opts.Node, metrics: opts.Metrics, cancel: cancel, runErr: make(chan error, 1)}
	go func() { h.runErr <- s.Run(ctx) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	h.cancel()
	if err := <-h.runErr; err != nil {
		h.t.Errorf("Run: %v", err)
	}
	h.runErr <- nil // stop is idempotent
}

func (h *harness) logs(n int) []*testLog {
	out := make([]*testLog, n)
	for i := range out {
		out[i] = newTestLog(h.t, fmt.Sprintf("log-%03d", i))
		h.s.Register(out[i])
	}
	return out
}

// objects lists the node's segments in key (= upload) order.
func (h *harness) objects() []upload.ObjectInfo {
	h.t.Helper()
	var out []upload.ObjectInfo
	after := ""
	for {
		page, err := h.store.List(context.Background(), "segments/"+h.node+"/", after, 0)
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, page.Objects...)
		if page.Next == "" {
			return out
		}
		after = page.Next
	}
}

// verify reads every segment back and checks that each log's changes 1..last
// appear exactly once, in SQN order, with their content.
func (h *harness) verify(logs []*testLog) {
	h.t.Helper()
	byID := make(map[string]*testLog, len(logs))
	for _, l := range logs {
		byID[l.id] = l
		l.check(h.t)
	}
	seen := make(map[string]uint64)
	for _, obj := range h.objects() {
		r, err := segments.Open(upload.ReaderAt(context.Background(), h.store, obj.Key, obj.Size), obj.Size, obj.Key)
		if err != nil {
			h.t.Fatal(err)
		}
		for c, err := range r.All() {
			if err != nil {
				h.t.Fatal(err)
			}
			l := byID[c.LogID]
			if l == nil {
				h.t.Fatalf("%s: change of unknown log %q", obj.Key, c.LogID)
			}
			if c.SQN != seen[c.LogID]+1 {
				h.t.Fatalf("%s: log %s SQN %d after %d (duplicate or gap)", obj.Key, c.LogID, c.SQN, seen[c.LogID])
			}
			seen[c.LogID] = c.SQN
			want := l.change(c.SQN, len(c.Value))
			if !bytes.Equal(c.Key, want.Key) || !bytes.Equal(c.Value, want.Value) || c.KeyGroup != want.KeyGroup {
				h.t.Fatalf("%s: log %s SQN %d: content differs", obj.Key, c.LogID, c.SQN)
			}
		}
	}
	for _, l := range logs {
		if got, want := seen[l.id], l.lastSQN(); got != want {
			h.t.Errorf("log %s: segments hold SQN 1..%d, appended 1..%d", l.id, got, want)
		}
	}
}

// metric sums the values of the named metric family.
func metric(t testing.TB, m *upload.SchedulerMetrics, name string, labels ...string) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m.Collectors()...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, mt := range mf.GetMetric() {
			match := true
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range mt.GetLabel() {
					found = found || (lp.GetName() == labels[i] && lp.GetValue() == labels[i+1])
				}
				match = match && found
			}
			if match {
				sum += mt.GetCounter().GetValue() + mt.GetGauge().GetValue() + float64(mt.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum
}

func TestManyLogsOneObjectPerFlush(t *testing.T) {
	h := start(t, upload.SchedulerOptions{Store: newFileStore(t), BatchDelay: 5 * time.Millisecond, MaxInFlightBytes: 1 << 20})
	manyLogsOneObjectPerFlush(t, h, 128, 40)
}

// manyLogsOneObjectPerFlush has every log append and persist concurrently,
// then checks object counts and read-back.
func manyLogsOneObjectPerFlush(t *testing.T, h *harness, nLogs, rounds int) {
	logs := h.logs(nLogs)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, nLogs)
	for i, l := range logs {
		wg.Go(func() {
			for r := range rounds {
				last, err := l.Append(ctx, h.s, 1+(i+r)%5, 100)
				if err != nil {
					errs <- err
					return
				}
				if r%4 == 3 { // persist every few appends, like checkpoints
					if err := l.Persist(ctx, h.s, last); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := h.s.FlushNow(ctx); err != nil {
		t.Fatal(err)
	}

	objects := h.objects()
	flushes := metric(t, h.metrics, "dstl_upload_flushes_total", "outcome", "success")
	if float64(len(objects)) != flushes || flushes == 0 {
		t.Fatalf("%d objects for %v successful flushes", len(objects), flushes)
	}
	// Every callback names one of the objects, and objects were shared.
	keys := map[string]int{}
	for _, l := range logs {
		for _, r := range l.results {
			if r.Err != nil {
				t.Fatalf("log %s: %v", l.id, r.Err)
			}
			keys[r.Segment.Key]++
		}
	}
	if len(keys) != len(objects) {
		t.Fatalf("callbacks name %d segments, %d objects exist", len(keys), len(objects))
	}
	maxLogs := 0
	for _, n := range keys {
		maxLogs = max(maxLogs, n)
	}
	if maxLogs < 2 {
		t.Fatalf("no segment carried more than one log: %v", keys)
	}
	t.Logf("%d logs: %d objects, up to %d logs in one object", nLogs, len(objects), maxLogs)
	h.verify(logs)
	if got := metric(t, h.metrics, "dstl_upload_inflight_bytes"); got != 0 {
		t.Fatalf("%v bytes still in flight after everything was uploaded", got)
	}
}

// fakeOptions are scheduler options on a fake clock with hedging off, so
// that the timers the test sees are the scheduler's delays alone.
func fakeOptions(t testing.TB, f *clock.Fake) upload.SchedulerOptions {
	return upload.SchedulerOptions{Store: newFileStore(t), Clock: f, HedgeAfter: -1}
}

// waitTimers waits until the fake clock holds n timers (a goroutine reached
// its wait).
func waitTimers(t testing.TB, f *clock.Fake, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for f.Pending() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d fake timers pending, want %d", f.Pending(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestBatchDelayCoalescesRequests(t *testing.T) {
	f := clock.NewFake(time.Unix(0, 0))
	opts := fakeOptions(t, f)
	opts.BatchDelay = 10 * time.Millisecond
	h := start(t, opts)
	logs := h.logs(8)
	waitTimers(t, f, 1) // the interval timer
	for _, l := range logs {
		if _, err := l.Append(context.Background(), h.s, 3, 10); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(h.s.RequestFlush)
	}
	wg.Wait()
	waitTimers(t, f, 2) // interval + one batch timer for all 50 requests
	f.Advance(opts.BatchDelay - time.Nanosecond)
	if n := len(h.objects()); n != 0 {
		t.Fatalf("%d objects before the batch delay passed", n)
	}
	f.Advance(time.Nanosecond)
	for _, l := range logs {
		l.waitResults(t, 1)
	}
	if n := len(h.objects()); n != 1 {
		t.Fatalf("50 requests within the delay made %d objects, want 1", n)
	}
	// A request with nothing pending writes nothing.
	waitTimers(t, f, 1)
	h.s.RequestFlush()
	f.Advance(opts.BatchDelay)
	if err := h.s.FlushNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := len(h.objects()); n != 1 {
		t.Fatalf("%d objects after an empty flush, want 1", n)
	}
	h.verify(logs)
}

func TestIntervalFlushesPending(t *testing.T) {
	f := clock.NewFake(time.Unix(0, 0))
	opts := fakeOptions(t, f)
	opts.Interval = time.Second
	h := start(t, opts)
	logs := h.logs(4)
	waitTimers(t, f, 1)
	f.Advance(time.Second) // nothing pending: no object
	waitTimers(t, f, 1)    // re-armed
	for _, l := range logs {
		if _, err := l.Append(context.Background(), h.s, 2, 10); err != nil {
			t.Fatal(err)
		}
	}
	f.Advance(time.Second - time.Nanosecond)
	if n := len(h.objects()); n != 0 {
		t.Fatalf("%d objects before the interval passed", n)
	}
	f.Advance(time.Nanosecond)
	for _, l := range logs {
		l.waitResults(t, 1)
	}
	if n := len(h.objects()); n != 1 {
		t.Fatalf("%d objects after one interval, want 1", n)
	}
	waitTimers(t, f, 1)
	if _, err := logs[0].Append(context.Background(), h.s, 1, 10); err != nil {
		t.Fatal(err)
	}
	f.Advance(time.Second)
	logs[0].waitResults(t, 2)
	if n := len(h.objects()); n != 2 {
		t.Fatalf("%d objects after two intervals, want 2", n)
	}
	h.verify(logs)
}

func TestFlushBytesThreshold(t *testing.T) {
	f := clock.NewFake(time.Unix(0, 0))
	opts := fakeOptions(t, f)
	opts.FlushBytes = 10_000
	h := start(t, opts)
	logs := h.logs(2)
	waitTimers(t, f, 1)
	per := upload.ChangeBytes(logs[0].change(1, 100))
	below := int(opts.FlushBytes/per) - 1
	if _, err := logs[0].Append(context.Background(), h.s, below, 100); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // room for a wrong flush to happen
	if n := len(h.objects()); n != 0 {
		t.Fatalf("%d objects below the threshold", n)
	}
	if _, err := logs[1].Append(context.Background(), h.s, 2, 100); err != nil {
		t.Fatal(err)
	}
	logs[0].waitResults(t, 1) // no clock movement: the threshold alone flushed
	// The reservation that crosses the threshold triggers the flush before
	// the appender hands its changes over (Reserve, then the log's tail), so
	// the flush may start without them: they then go with the next
	// interval, never on a flush of their own (one object per interval).
	logs[1].mu.Lock()
	missed := len(logs[1].tail) > 0 // the flush drained every log before logs[0]'s callback
	logs[1].mu.Unlock()
	want := 1
	if missed {
		waitTimers(t, f, 1)
		f.Advance(upload.DefaultFlushInterval)
		want = 2
	}
	logs[1].waitResults(t, 1)
	if n := len(h.objects()); n != want {
		t.Fatalf("%d objects after crossing the threshold, want %d", n, want)
	}
	h.verify(logs)
}

// recordingClock records the durations of the timers it creates.
type recordingClock struct {
	*clock.Fake
	mu        sync.Mutex
	durations []time.Duration
}

func (c *recordingClock) NewTimer(d time.Duration) clock.Timer {
	c.mu.Lock()
	c.durations = append(c.durations, d)
	c.mu.Unlock()
	return c.Fake.NewTimer(d)
}

func (c *recordingClock) recorded() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.durations)
}

// backoffSequence fails every put and returns the backoff sleeps of one
// flush, driving the fake clock through them.
func backoffSequence(t *testing.T, seed uint64) []time.Duration {
	c := &recordingClock{Fake: clock.NewFake(time.Unix(0, 0))}
	store := faulty.Wrap(newFileStore(t), faulty.Options{PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {Transient: 1}}})
	h := start(t, upload.SchedulerOptions{
		Store: store, Clock: c, HedgeAfter: -1, Interval: -1, BatchDelay: -1,
		MaxAttempts: 6, BaseBackoff: 100 * time.Millisecond, MaxBackoff: time.Second,
		Rand: rand.New(rand.NewPCG(seed, 7)),
	})
	logs := h.logs(1)
	if _, err := logs[0].Append(context.Background(), h.s, 1, 10); err != nil {
		t.Fatal(err)
	}
	h.s.RequestFlush() // BatchDelay < 0: at once
	done := make(chan []upload.FlushResult, 1)
	go func() { done <- logs[0].waitResults(t, 1) }()
	for slept := 0; ; {
		select {
		case res := <-done:
			if !upload.IsTransient(res[0].Err) || !errors.Is(res[0].Err, faulty.ErrInjected) {
				t.Fatalf("flush error %v, want the injected transient error", res[0].Err)
			}
			if got := metric(t, h.metrics, "dstl_upload_attempts_total"); got != 6 {
				t.Fatalf("%v attempts, want 6", got)
			}
			if got := metric(t, h.metrics, "dstl_upload_retries_total"); got != 5 {
				t.Fatalf("%v retries, want 5", got)
			}
			return c.recorded()
		default:
		}
		if d := c.recorded(); len(d) > slept && c.Pending() == 1 {
			c.Advance(d[slept])
			slept++
			continue
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func TestBackoffIsExponentialWithFullJitter(t *testing.T) {
	a := backoffSequence(t, 42)
	if len(a) != 5 {
		t.Fatalf("%d backoff sleeps for 6 attempts, want 5: %v", len(a), a)
	}
	for i, d := range a {
		limit := min(100*time.Millisecond<<i, time.Second)
		if d <= 0 || d > limit {
			t.Fatalf("sleep %d = %v, want in (0, %v]", i+1, d, limit)
		}
	}
	if b := backoffSequence(t, 42); !slices.Equal(a, b) {
		t.Fatalf("same seed, different sleeps: %v vs %v", a, b)
	}
	if b := backoffSequence(t, 43); slices.Equal(a, b) {
		t.Fatalf("different seeds, same sleeps: %v", a)
	}
	t.Logf("backoff sleeps: %v", a)
}

func TestTransientErrorsAreRetried(t *testing.T) {
	store := faulty.Wrap(newFileStore(t), faulty.Options{Seed: 3, PerOp: map[faulty.Op]faulty.Faults{
		faulty.OpPut: {Transient: 0.4, TornWrite: 0.2},
	}})
	h := start(t, upload.SchedulerOptions{Store: store, BaseBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, MaxAttempts: 30, HedgeAfter: -1})
	logs := h.logs(16)
	for range 20 {
		for _, l := range logs {
			if _, err := l.Append(context.Background(), h.s, 3, 50); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.s.FlushNow(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if store.Total(faulty.Transient)+store.Total(faulty.TornWrite) == 0 {
		t.Fatal("no faults injected")
	}
	if n := len(h.objects()); n != 20 {
		t.Fatalf("%d objects for 20 flushes", n)
	}
	h.verify(logs)
}

func TestLostAcksLeaveNoDuplicates(t *testing.T) {
	store := faulty.Wrap(newFileStore(t), faulty.Options{Seed: 11, PerOp: map[faulty.Op]faulty.Faults{
		faulty.OpPut: {LostAck: 0.5, Transient: 0.1},
	}})
	h := start(t, upload.SchedulerOptions{Store: store, BaseBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond, MaxAttempts: 30, HedgeAfter: -1})
	logs := h.logs(8)
	for range 20 {
		for _, l := range logs {
			if _, err := l.Append(context.Background(), h.s, 2, 50); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.s.FlushNow(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if store.Count(faulty.OpPut, faulty.LostAck) == 0 {
		t.Fatal("no lost acks injected")
	}
	if n := len(h.objects()); n != 20 {
		t.Fatalf("%d objects for 20 flushes", n)
	}
	h.verify(logs)
}

// conflictStore answers the first put with ErrAlreadyExists after storing
// different bytes under the key.
type conflictStore struct {
	upload.BlobStore
	once sync.Once
}

func (c *conflictStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	taken := false
	c.once.Do(func() {
		taken = true
		if err := c.BlobStore.PutIfAbsent(ctx, key, strings.NewReader("someone else"), 12); err != nil {
			panic(err)
		}
	})
	if taken {
		return fmt.Errorf("put %s: %w", key, upload.ErrAlreadyExists)
	}
	return c.BlobStore.PutIfAbsent(ctx, key, r, size)
}

func TestExistingDifferentObjectIsPermanent(t *testing.T) {
	h := start(t, upload.SchedulerOptions{Store: &conflictStore{BlobStore: newFileStore(t)}, HedgeAfter: -1})
	logs := h.logs(2)
	for _, l := range logs {
		if _, err := l.Append(context.Background(), h.s, 2, 10); err != nil {
			t.Fatal(err)
		}
	}
	err := h.s.FlushNow(context.Background())
	if !errors.Is(err, upload.ErrAlreadyExists) || upload.IsTransient(err) {
		t.Fatalf("flush error %v, want a permanent ErrAlreadyExists", err)
	}
	if got := metric(t, h.metrics, "dstl_upload_attempts_total"); got != 1 {
		t.Fatalf("%v attempts for a permanent error, want 1", got)
	}
	for _, l := range logs {
		if res := l.waitResults(t, 1); res[0].Err == nil {
			t.Fatalf("log %s: callback without the error", l.id)
		}
	}
	if err := h.s.FlushNow(context.Background()); err != nil { // the changes go out again
		t.Fatal(err)
	}
	for _, l := range logs {
		if err := l.WaitAcked(context.Background(), 2); err != nil {
			t.Fatal(err)
		}
	}
}

func TestStoreDownThenRecovers(t *testing.T) {
	store := faulty.Wrap(newFileStore(t), faulty.Options{Seed: 5})
	h := start(t, upload.SchedulerOptions{Store: store, BaseBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond, MaxAttempts: 3, HedgeAfter: -1})
	logs := h.logs(4)
	ctx := context.Background()
	for _, l := range logs {
		if _, err := l.Append(ctx, h.s, 3, 20); err != nil {
			t.Fatal(err)
		}
	}
	store.SetFaults(faulty.OpPut, faulty.Faults{Transient: 1})
	for i := range 3 {
		err := h.s.FlushNow(ctx)
		if !upload.IsTransient(err) {
			t.Fatalf("flush %d with the store down: %v, want a transient error", i, err)
		}
		for _, l := range logs { // more appends while it is down
			if _, err := l.Append(ctx, h.s, 1, 20); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, l := range logs {
		res := l.waitResults(t, 3)
		for _, r := range res {
			if r.Err == nil {
				t.Fatalf("log %s: success while the store was down", l.id)
			}
		}
	}
	if n := len(h.objects()); n != 0 {
		t.Fatalf("%d objects while the store was down", n)
	}
	if got := metric(t, h.metrics, "dstl_upload_flushes_total", "outcome", "failure"); got != 3 {
		t.Fatalf("%v failed flushes, want 3", got)
	}
	store.SetFaults(faulty.OpPut, faulty.Faults{})
	for _, l := range logs {
		if err := l.Persist(ctx, h.s, l.lastSQN()); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(h.objects()); n != 1 {
		t.Fatalf("%d objects after recovery, want 1 holding everything", n)
	}
	h.verify(logs)
}

// blockingSleep makes the faulty store's injected latency wait until
// released (or the put's context ends); calls after the first `blocked`
// pass at once.
type blockingSleep struct {
	calls   atomic.Int64
	blocked int64
	release chan struct{}
}

func (b *blockingSleep) sleep(ctx context.Context, _ time.Duration) error {
	if b.calls.Add(1) > b.blocked {
		return nil
	}
	select {
	case <-b.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func TestHedgedPutWritesOneObject(t *testing.T) {
	slow := &blockingSleep{blocked: 1, release: make(chan struct{})} // never released: only cancellation ends it
	store := faulty.Wrap(newFileStore(t), faulty.Options{
		Seed:  9,
		PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {Latency: 1, MaxDelay: time.Hour}},
		Sleep: slow.sleep,
	})
	h := start(t, upload.SchedulerOptions{Store: store, HedgeAfter: 20 * time.Millisecond})
	logs := h.logs(4)
	for _, l := range logs {
		if _, err := l.Append(context.Background(), h.s, 5, 30); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.s.FlushNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := metric(t, h.metrics, "dstl_upload_hedges_total"); got != 1 {
		t.Fatalf("%v hedges, want 1", got)
	}
	if got := metric(t, h.metrics, "dstl_upload_attempts_total"); got != 2 {
		t.Fatalf("%v put attempts, want 2 (the slow one and its hedge)", got)
	}
	if n := len(h.objects()); n != 1 {
		t.Fatalf("%d objects after a hedged flush, want 1", n)
	}
	h.verify(logs)
}

func TestReserveBlocksUntilUploaded(t *testing.T) {
	gate := &blockingSleep{blocked: 1 << 62, release: make(chan struct{})}
	store := faulty.Wrap(newFileStore(t), faulty.Options{
		PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {Latency: 1}},
		Sleep: gate.sleep,
	})
	h := start(t, upload.SchedulerOptions{Store: store, MaxInFlightBytes: 1000, HedgeAfter: -1, Interval: -1})
	logs := h.logs(1)
	ctx := context.Background()
	per := upload.ChangeBytes(logs[0].change(1, 100))
	fit := int(1000 / per)
	if _, err := logs[0].Append(ctx, h.s, fit, 100); err != nil {
		t.Fatal(err)
	}
	if err := h.s.TryReserve(per); !errors.Is(err, upload.ErrBackpressure) {
		t.Fatalf("TryReserve beyond the bound: %v, want ErrBackpressure", err)
	}
	// The bound is reached, and the store hangs: Reserve waits and honours ctx.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	err := h.s.Reserve(cctx, per)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Reserve with a hung store: %v, want DeadlineExceeded", err)
	}
	reserved := make(chan error, 1)
	go func() { reserved <- h.s.Reserve(ctx, per) }()
	select {
	case err := <-reserved:
		t.Fatalf("Reserve returned %v while the upload hangs", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(gate.release) // the store answers: the flush (started by the waiting Reserve) completes
	if err := <-reserved; err != nil {
		t.Fatal(err)
	}
	if err := logs[0].WaitAcked(ctx, uint64(fit)); err != nil {
		t.Fatal(err)
	}
	if got := metric(t, h.metrics, "dstl_upload_backpressure_waits_total"); got != 3 {
		t.Fatalf("%v back-pressure waits, want 3", got)
	}
	if got := metric(t, h.metrics, "dstl_upload_inflight_bytes"); got != float64(per) {
		t.Fatalf("in flight %v, want the one reservation of %d", got, per)
	}
	h.s.Release(per) // the test never buffers those bytes
	if got := metric(t, h.metrics, "dstl_upload_inflight_bytes"); got != 0 {
		t.Fatalf("in flight %v after release, want 0", got)
	}
	h.verify(logs)
}

func TestRunStopsAndLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	gate := &blockingSleep{blocked: 1 << 62, release: make(chan struct{})} // puts hang until cancelled
	store := faulty.Wrap(newFileStore(t), faulty.Options{
		PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {Latency: 1}},
		Sleep: gate.sleep,
	})
	s, err := upload.NewScheduler(upload.SchedulerOptions{Store: store, Node: "n", HedgeAfter: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	l := newTestLog(t, "log")
	s.Register(l)
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- s.Run(ctx) }()
	if _, err := l.Append(ctx, s, 3, 10); err != nil {
		t.Fatal(err)
	}
	flushErr := make(chan error, 1)
	go func() { flushErr <- s.FlushNow(context.Background()) }()
	for gate.calls.Load() < 2 { // the put and its hedge hang
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-runErr; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := <-flushErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("in-flight flush: %v, want context.Canceled", err)
	}
	if res := l.waitResults(t, 1); !errors.Is(res[0].Err, context.Canceled) {
		t.Fatalf("callback: %v, want context.Canceled", res[0].Err)
	}
	if err := s.FlushNow(context.Background()); !errors.Is(err, upload.ErrSchedulerStopped) {
		t.Fatalf("FlushNow after Run: %v", err)
	}
	if err := s.Reserve(context.Background(), 1); !errors.Is(err, upload.ErrSchedulerStopped) {
		t.Fatalf("Reserve after Run: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReserveWaitersFailWhenRunStops(t *testing.T) {
	f := clock.NewFake(time.Unix(0, 0))
	opts := fakeOptions(t, f)
	opts.MaxInFlightBytes = 100
	opts.Store = faulty.Wrap(newFileStore(t), faulty.Options{PerOp: map[faulty.Op]faulty.Faults{faulty.OpPut: {Transient: 1}}})
	opts.MaxAttempts = 1
	h := start(t, opts)
	ctx := context.Background()
	if err := h.s.Reserve(ctx, 100); err != nil {
		t.Fatal(err)
	}
	waiting := make(chan error, 1)
	go func() { waiting <- h.s.Reserve(ctx, 1) }()
	for metric(t, h.metrics, "dstl_upload_backpressure_waits_total") == 0 {
		time.Sleep(time.Millisecond)
	}
	h.stop()
	if err := <-waiting; !errors.Is(err, upload.ErrSchedulerStopped) {
		t.Fatalf("waiting Reserve after stop: %v", err)
	}
}

func TestInvalidChangeFailsFlushForDrainedLogs(t *testing.T) {
	h := start(t, upload.SchedulerOptions{Store: newFileStore(t), HedgeAfter: -1})
	logs := h.logs(3)
	ctx := context.Background()
	for _, l := range logs {
		if _, err := l.Append(ctx, h.s, 2, 10); err != nil {
			t.Fatal(err)
		}
	}
	logs[1].mu.Lock()
	logs[1].tail[1].Op = 0 // a change the changelog should never accept
	logs[1].mu.Unlock()
	if err := h.s.FlushNow(ctx); !errors.Is(err, segments.ErrInvalidChange) {
		t.Fatalf("flush with an invalid change: %v, want ErrInvalidChange", err)
	}
	for _, l := range logs[:2] {
		if res := l.waitResults(t, 1); !errors.Is(res[0].Err, segments.ErrInvalidChange) {
			t.Fatalf("log %s: %v", l.id, res[0].Err)
		}
	}
	if got := len(logs[2].results); got != 0 {
		t.Fatalf("log after the bad one was drained (%d callbacks)", got)
	}
	if n := len(h.objects()); n != 0 {
		t.Fatalf("%d objects from a failed flush", n)
	}
	// Unregistering the bad log lets the others through.
	h.s.Unregister(logs[1])
	if err := h.s.FlushNow(ctx); err != nil {
		t.Fatal(err)
	}
	h.verify([]*testLog{logs[0], logs[2]})
}

func TestNewSchedulerRejectsBadOptions(t *testing.T) {
	for _, opts := range []upload.SchedulerOptions{
		{Node: "n"},
		{Store: newFileStore(t)},
		{Store: newFileStore(t), Node: "a/b"},
		{Store: newFileStore(t), Node: ".."},
	} {
		if _, err := upload.NewScheduler(opts); err == nil {
			t.Errorf("NewScheduler(%+v) succeeded", opts)
		}
	}
}

// unregisteringLog unregisters itself while being drained.
type unregisteringLog struct {
	*testLog
	s *upload.Scheduler
}

func (l unregisteringLog) Drain() []segments.Change {
	l.s.Unregister(l)
	return l.testLog.Drain()
}

func TestUnregisteredLogStillGetsItsCallback(t *testing.T) {
	h := start(t, upload.SchedulerOptions{Store: newFileStore(t), HedgeAfter: -1})
	l := unregisteringLog{testLog: newTestLog(t, "leaving"), s: h.s}
	h.s.Register(l)
	if _, err := l.Append(context.Background(), h.s, 3, 10); err != nil {
		t.Fatal(err)
	}
	if err := h.s.FlushNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if res := l.waitResults(t, 1); res[0].Err != nil || len(res[0].Blocks) != 1 {
		t.Fatalf("callback %+v, want the segment", res[0])
	}
	if _, err := l.Append(context.Background(), h.s, 1, 10); err != nil {
		t.Fatal(err)
	}
	if err := h.s.FlushNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := len(l.results); n != 1 {
		t.Fatalf("unregistered log drained again (%d callbacks)", n)
	}
}
