package upload

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/segments"
)

// The upload scheduler multiplexes every log of a node into one segment
// object per flush. Invariants (each has a test in scheduler_test.go):
//
//   - Flushes are sequential (only Run's goroutine flushes), so the segments
//     carrying one log's changes are uploaded, and acknowledged through
//     Log.Uploaded, in SQN order.
//   - A flush writes at most one object, whatever the number of logs; a flush
//     with nothing drained writes nothing.
//   - Every drained log gets exactly one Uploaded callback per Drain, success
//     or failure, even if it was unregistered in between.
//   - No goroutine started by the scheduler outlives the flush that started
//     it; none outlives Run.
//
// Byte accounting (Reserve / Release): in-flight bytes are the bytes reserved
// and not yet released, that is pending (reserved, not yet in a flush) plus
// uploading (drained into the running flush). A change costs ChangeBytes(c).
//
//   - An appender calls Reserve (or TryReserve) with the ChangeBytes of the
//     changes it is about to buffer, before buffering them.
//   - When a flush succeeds, the scheduler releases the ChangeBytes of every
//     change it drained, after the Uploaded callbacks returned.
//   - When a flush fails, nothing is released: the changes go back to their
//     logs, which hand them again at the next Drain.
//   - A log calls Release only for changes it drops without handing them to
//     the scheduler again (a discarded tail, a log closed or unregistered
//     with changes it will never hand again).
//
// Releases never drive the count below zero (a log that drains changes it
// never reserved cannot make the scheduler owe bytes).

// Log is one changelog log as the scheduler sees it. The changelog
// implements it. LogIDs of registered logs must be distinct.
type Log interface {
	// LogID names the log inside segments.
	LogID() string
	// Drain returns the changes appended since the previous Drain, in SQN
	// order (consecutive SQNs), or nil. The scheduler owns nothing: the
	// slices stay valid until the log receives the Uploaded callback for
	// this drain.
	Drain() []segments.Change
	// Uploaded reports the outcome of the flush that carried the changes of
	// the last Drain: on success the segment and this log's blocks in it;
	// on failure res.Err != nil, and the log must hand the same changes
	// again (first) at its next Drain. It is called from Run's goroutine
	// and must not block on the scheduler's next flush.
	Uploaded(res FlushResult)
}

// SegmentRef names one uploaded segment.
type SegmentRef struct {
	Key  string // blob key: segments/<node>/<20-digit seq>-<8 hex>.seg
	Size int64  // object size in bytes
	Seq  uint64 // this node's flush sequence number (in the key)
}

// FlushResult is what a log learns about the flush that carried its changes.
type FlushResult struct {
	Segment SegmentRef
	// Blocks are this log's blocks in the segment (SQN ranges, offsets).
	Blocks []segments.BlockInfo
	// Err is non-nil if the flush failed; Segment and Blocks are then empty.
	Err error
}

// Scheduler errors.
var (
	// ErrBackpressure: TryReserve found the in-flight bytes at their bound.
	ErrBackpressure = errors.New("upload: in-flight bytes at their bound (back-pressure)")
	// ErrSchedulerStopped: Run has returned; nothing will be uploaded any more.
	ErrSchedulerStopped = errors.New("upload: scheduler stopped")
)

// Defaults of SchedulerOptions.
const (
	DefaultBatchDelay       = 10 * time.Millisecond
	DefaultFlushInterval    = 2 * time.Second
	DefaultFlushBytes       = 16 << 20
	DefaultMaxInFlightBytes = 256 << 20
	DefaultMaxAttempts      = 8
	DefaultBaseBackoff      = 50 * time.Millisecond
	DefaultMaxBackoff       = 5 * time.Second
	DefaultAttemptTimeout   = 30 * time.Second
	DefaultHedgeAfter       = 500 * time.Millisecond
)

// changeOverhead is the per-change memory a log keeps besides key, value
// and state name until the change is uploaded: its segments.Change (112 B)
// in a tail slice that grows by appending, and the state string's own
// allocation. Measured at ~118 B for tiny changes by
// server.TestAppendCostPerChange, which fails if it exceeds this.
const changeOverhead = 128

// ChangeBytes is what one change counts against the in-flight bound.
func ChangeBytes(c segments.Change) int64 {
	return int64(len(c.Key)+len(c.Value)+len(c.State)) + changeOverhead
}

// SchedulerOptions configure a Scheduler. Zero durations and sizes mean the
// defaults; a negative BatchDelay, Interval or HedgeAfter disables the delay,
// the periodic flush or hedging respectively.
type SchedulerOptions struct {
	Store BlobStore
	// Node names the node in segment keys: segments/<node>/<seq>-<rand>.seg.
	// It must be one valid key element (no "/").
	Node string
	// FirstSeq is the sequence number of the first segment (default 1). A
	// restarted node passes its last seq + 1 so that keys keep sorting in
	// upload order; uniqueness never depends on it (keys carry a random
	// suffix).
	FirstSeq uint64
	// Clock drives every delay and sleep (default clock.Real{}).
	Clock clock.Clock
	// Rand draws backoff jitter and key suffixes (default: seeded from
	// crypto/rand). Only Run's goroutine uses it.
	Rand *rand.Rand
	// BatchDelay is how long a RequestFlush waits so that concurrent persists
	// share one object. Negative: flush at once.
	BatchDelay time.Duration
	// Interval is the period of the flush of whatever is pending, counted
	// from the end of the previous flush. Negative: no periodic flush.
	Interval time.Duration
	// FlushBytes: flush as soon as this many bytes are pending.
	FlushBytes int64
	// MaxInFlightBytes bounds pending + uploading bytes; Reserve blocks
	// beyond it.
	MaxInFlightBytes int64
	// Codec compresses the blocks (default zstd).
	Codec segments.Codec
	// MaxAttempts is the number of put attempts of one flush before it fails.
	MaxAttempts int
	// BaseBackoff and MaxBackoff shape the sleep between attempts:
	// uniform in [0, min(MaxBackoff, BaseBackoff·2^(attempt-1))] ("full
	// jitter").
	BaseBackoff, MaxBackoff time.Duration
	// AttemptTimeout bounds one put (and its verification read).
	AttemptTimeout time.Duration
	// HedgeAfter: if a put is still running after this long, a second
	// identical put of the same key starts; the first success wins and the
	// other is cancelled. Negative disables hedging.
	HedgeAfter time.Duration
	// Metrics, if set, receives the scheduler's metrics.
	Metrics *SchedulerMetrics
}

func (o *SchedulerOptions) setDefaults() error {
	if o.Store == nil {
		return errors.New("upload: scheduler: no blob store")
	}
	if o.Node == "" || strings.Contains(o.Node, "/") {
		return fmt.Errorf("upload: scheduler: node name %q must be one non-empty key element", o.Node)
	}
	if err := ValidateKey(segmentKey(o.Node, 1, 0)); err != nil {
		return fmt.Errorf("upload: scheduler: node name %q: %w", o.Node, err)
	}
	if o.FirstSeq == 0 {
		o.FirstSeq = 1
	}
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	if o.Rand == nil {
		var seed [32]byte
		if _, err := crand.Read(seed[:]); err != nil {
			return fmt.Errorf("upload: scheduler: seed random source: %w", err)
		}
		o.Rand = rand.New(rand.NewChaCha8(seed))
	}
	setDuration(&o.BatchDelay, DefaultBatchDelay)
	setDuration(&o.Interval, DefaultFlushInterval)
	setDuration(&o.HedgeAfter, DefaultHedgeAfter)
	setDuration(&o.BaseBackoff, DefaultBaseBackoff)
	setDuration(&o.MaxBackoff, DefaultMaxBackoff)
	setDuration(&o.AttemptTimeout, DefaultAttemptTimeout)
	if o.FlushBytes <= 0 {
		o.FlushBytes = DefaultFlushBytes
	}
	if o.MaxInFlightBytes <= 0 {
		o.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = DefaultMaxAttempts
	}
	if o.MaxBackoff < o.BaseBackoff {
		o.MaxBackoff = o.BaseBackoff
	}
	if o.Metrics == nil {
		o.Metrics = NewSchedulerMetrics() // unregistered: keeps the code free of nil checks
	}
	return nil
}

func setDuration(d *time.Duration, def time.Duration) {
	if *d == 0 {
		*d = def
	}
}

func segmentKey(node string, seq uint64, suffix uint32) string {
	return fmt.Sprintf("segments/%s/%020d-%08x.seg", node, seq, suffix)
}

// Scheduler is a node's batching upload scheduler. Create it with
// NewScheduler, Register logs, and run Run in a goroutine.
type Scheduler struct {
	opts    SchedulerOptions
	store   BlobStore
	clock   clock.Clock
	metrics *SchedulerMetrics
	wake    chan struct{} // capacity 1: something for Run to look at

	// Owned by Run's goroutine.
	rng     *rand.Rand
	nextSeq uint64
	buf     bytes.Buffer
	writer  *segments.Writer
	drained []drainedLog

	mu         sync.Mutex
	logs       []Log
	running    bool
	stopped    bool
	flushDue   bool        // flush at once (FlushNow, FlushBytes, back-pressure)
	batchTimer clock.Timer // armed by RequestFlush; nil when none
	started    uint64      // flushes started; FlushNow waits for started+1
	reserved   int64       // in-flight bytes: pending + uploading
	uploading  int64       // bytes drained into the running flush
	reservers  []*reserver // FIFO: no reservation overtakes an earlier one
	flushWaits []flushWaiter
	// settledBelow: every segment with a smaller seq has been uploaded (or
	// failed) and its logs have had their Uploaded callbacks.
	settledBelow uint64
}

type drainedLog struct {
	log     Log
	id      string
	changes int
	bytes   int64
	blocks  []segments.BlockInfo // set once the segment is uploaded
}

// reserver is a Reserve call waiting for room. done receives nil when the
// bytes were granted, ErrSchedulerStopped when the scheduler stopped.
type reserver struct {
	n        int64
	done     chan error
	resolved bool
}

type flushWaiter struct {
	flush uint64 // the flush whose end this waiter wants
	done  chan error
}

// NewScheduler validates opts and returns a scheduler that is not yet
// running.
func NewScheduler(opts SchedulerOptions) (*Scheduler, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	s := &Scheduler{
		opts:         opts,
		store:        opts.Store,
		clock:        opts.Clock,
		metrics:      opts.Metrics,
		wake:         make(chan struct{}, 1),
		rng:          opts.Rand,
		nextSeq:      opts.FirstSeq,
		settledBelow: opts.FirstSeq,
	}
	s.writer = segments.NewWriter(&s.buf, segments.WriterOptions{Codec: opts.Codec})
	return s, nil
}

// Register adds l to the logs drained by every flush, after those already
// registered (logs are drained in registration order).
func (s *Scheduler) Register(l Log) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logs = append(s.logs, l)
}

// Unregister stops draining l. If a flush has already drained l, l still
// gets its Uploaded callback. Changes l still holds stay reserved until l
// releases them (Release).
func (s *Scheduler) Unregister(l Log) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, o := range s.logs {
		if o == l {
			s.logs = append(s.logs[:i:i], s.logs[i+1:]...) // copy: a flush may hold the old slice
			return
		}
	}
}

// notify wakes Run without blocking.
func (s *Scheduler) notify() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// RequestFlush asks for a flush after BatchDelay, so that the persists of
// many logs arriving within the delay share one object. Requests arriving
// while a flush uploads are served by the next flush.
func (s *Scheduler) RequestFlush() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.flushDue || s.batchTimer != nil {
		return // an earlier request (or a due flush) already covers this one
	}
	if s.opts.BatchDelay < 0 {
		s.flushDue = true
	} else {
		// Armed here rather than in Run, so a test's fake clock holds the
		// timer as soon as RequestFlush returns.
		s.batchTimer = s.clock.NewTimer(s.opts.BatchDelay)
	}
	s.notify()
}

// FlushNow starts a flush at once and waits for it: the flush that drains
// everything appended before the call. It returns that flush's error (nil
// also when there was nothing to upload), ctx's error, or
// ErrSchedulerStopped.
func (s *Scheduler) FlushNow(ctx context.Context) error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return ErrSchedulerStopped
	}
	// A flush that has started may have drained some logs before this call
	// appended; only the next one is sure to see everything.
	w := flushWaiter{flush: s.started + 1, done: make(chan error, 1)}
	s.flushWaits = append(s.flushWaits, w)
	s.flushDue = true
	s.notify()
	s.mu.Unlock()
	select {
	case err := <-w.done:
		return err
	case <-ctx.Done():
		s.mu.Lock()
		for i, o := range s.flushWaits {
			if o.done == w.done {
				s.flushWaits = append(s.flushWaits[:i], s.flushWaits[i+1:]...)
				break
			}
		}
		s.mu.Unlock()
		return fmt.Errorf("upload: flush now: %w", ctx.Err())
	}
}

// Reserve accounts n bytes that the caller is about to buffer. It blocks
// while the in-flight bytes (pending + uploading) plus n would exceed
// MaxInFlightBytes — except that a reservation is always admitted when
// nothing is in flight, so a change larger than the bound still moves.
// Waiting reservations are admitted in FIFO order and start a flush at once.
// On error nothing is reserved.
func (s *Scheduler) Reserve(ctx context.Context, n int64) error {
	if n <= 0 {
		return nil
	}
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return ErrSchedulerStopped
	}
	if len(s.reservers) == 0 && s.admissibleLocked(n) {
		s.reserveLocked(n)
		s.mu.Unlock()
		return nil
	}
	r := &reserver{n: n, done: make(chan error, 1)}
	s.reservers = append(s.reservers, r)
	s.metrics.BackpressureWaits.Inc()
	s.flushDue = true // uploading is the only thing that frees room
	s.notify()
	s.mu.Unlock()

	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.resolved {
		// Granted (or stopped) while ctx ended: give the bytes back so the
		// caller, who sees an error, owes nothing.
		if err := <-r.done; err == nil {
			s.releaseLocked(n)
		}
	} else {
		for i, o := range s.reservers {
			if o == r {
				s.reservers = append(s.reservers[:i], s.reservers[i+1:]...)
				break
			}
		}
		s.grantLocked() // r may have been the head blocking smaller ones
	}
	return fmt.Errorf("upload: reserve %d bytes: %w", n, ctx.Err())
}

// TryReserve is Reserve without waiting: it fails with ErrBackpressure
// (and starts a flush) when Reserve would block.
func (s *Scheduler) TryReserve(n int64) error {
	if n <= 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return ErrSchedulerStopped
	}
	if len(s.reservers) > 0 || !s.admissibleLocked(n) {
		s.metrics.BackpressureWaits.Inc()
		s.flushDue = true
		s.notify()
		return ErrBackpressure
	}
	s.reserveLocked(n)
	return nil
}

// Release returns n reserved bytes of changes that will never be handed
// to the scheduler (again). Bytes of uploaded changes are released by the
// scheduler itself.
func (s *Scheduler) Release(n int64) {
	if n <= 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked(n)
}

func (s *Scheduler) admissibleLocked(n int64) bool {
	return s.reserved == 0 || s.reserved+n <= s.opts.MaxInFlightBytes
}

func (s *Scheduler) reserveLocked(n int64) {
	s.reserved += n
	s.updateGaugesLocked()
	if s.reserved-s.uploading >= s.opts.FlushBytes && !s.flushDue {
		s.flushDue = true
		s.notify()
	}
}

func (s *Scheduler) releaseLocked(n int64) {
	s.reserved = max(s.reserved-n, 0)
	s.uploading = min(s.uploading, s.reserved)
	s.updateGaugesLocked()
	s.grantLocked()
}

// grantLocked admits waiting reservations in FIFO order while they fit.
func (s *Scheduler) grantLocked() {
	for len(s.reservers) > 0 {
		r := s.reservers[0]
		if !s.admissibleLocked(r.n) {
			return
		}
		s.reservers = s.reservers[1:]
		s.reserveLocked(r.n) // before waking r: its caller may look at the gauges
		r.resolved = true
		r.done <- nil
	}
}

func (s *Scheduler) updateGaugesLocked() {
	s.metrics.InFlightBytes.Set(float64(s.reserved))
	s.metrics.PendingBytes.Set(float64(s.reserved - s.uploading))
}

// Run is the flush loop. It returns nil once ctx is done, after the flush in
// progress (if any) has finished or failed — its upload uses ctx, so a
// cancelled ctx fails it promptly and its logs get the error. Flush errors
// go to the logs (Uploaded) and to FlushNow callers, not to Run. After Run
// returns the scheduler is stopped: waiting and later Reserve / FlushNow
// calls fail with ErrSchedulerStopped. Run may be called once.
func (s *Scheduler) Run(ctx context.Context) error {
	s.mu.Lock()
	switch {
	case s.stopped:
		s.mu.Unlock()
		return ErrSchedulerStopped
	case s.running:
		s.mu.Unlock()
		return errors.New("upload: scheduler: Run called twice")
	}
	s.running = true
	s.mu.Unlock()
	defer s.stop()

	var interval clock.Timer
	armInterval := func() {
		if interval != nil {
			interval.Stop()
		}
		if s.opts.Interval > 0 {
			interval = s.clock.NewTimer(s.opts.Interval)
		}
	}
	armInterval()
	defer func() {
		if interval != nil {
			interval.Stop()
		}
	}()

	for ctx.Err() == nil {
		s.mu.Lock()
		due := s.flushDue
		var batchC, intervalC <-chan time.Time
		if s.batchTimer != nil {
			batchC = s.batchTimer.C()
		}
		s.mu.Unlock()
		if interval != nil {
			intervalC = interval.C()
		}
		if !due {
			select {
			case <-ctx.Done():
				return nil
			case <-s.wake:
				continue // state changed: look again
			case <-batchC:
			case <-intervalC:
			}
		}
		s.flush(ctx)
		armInterval() // the interval counts from the last flush of any cause
	}
	return nil
}

// stop marks the scheduler stopped and fails everyone still waiting.
func (s *Scheduler) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped = true
	if s.batchTimer != nil {
		s.batchTimer.Stop()
		s.batchTimer = nil
	}
	for _, r := range s.reservers {
		r.resolved = true
		r.done <- ErrSchedulerStopped
	}
	s.reservers = nil
	for _, w := range s.flushWaits {
		w.done <- ErrSchedulerStopped
	}
	s.flushWaits = nil
}

// flush runs one flush: drain every registered log into one segment, upload
// it, report to the drained logs and to FlushNow waiters.
func (s *Scheduler) flush(ctx context.Context) {
	s.mu.Lock()
	s.flushDue = false
	if s.batchTimer != nil { // this flush serves every request made so far
		s.batchTimer.Stop()
		s.batchTimer = nil
	}
	s.started++
	gen := s.started
	logs := s.logs // Register appends, Unregister copies: safe to range unlocked
	s.mu.Unlock()

	start := s.clock.Now()
	seg, drained, err := s.buildAndUpload(ctx, logs)
	defer s.settle()
	if len(drained) > 0 {
		s.finish(seg, drained, err)
		outcome := flushSucceeded
		if err != nil {
			outcome = flushFailed
		}
		s.metrics.Flushes.WithLabelValues(outcome).Inc()
		s.metrics.FlushSeconds.Observe(s.clock.Now().Sub(start).Seconds())
		clear(drained) // keep no logs or blocks alive until the next flush
		s.drained = drained[:0]
	}

	s.mu.Lock()
	kept := s.flushWaits[:0]
	for _, w := range s.flushWaits {
		if w.flush <= gen {
			w.done <- err
		} else {
			kept = append(kept, w)
		}
	}
	s.flushWaits = kept
	s.mu.Unlock()
}

// settle records that every segment this node has started so far is done
// with: uploaded or failed, and reported to its logs.
func (s *Scheduler) settle() {
	s.mu.Lock()
	s.settledBelow = s.nextSeq
	s.mu.Unlock()
}

// SettledBelow returns a seq below which every segment of this node is
// settled: its upload finished or failed and its logs' Uploaded callbacks
// have returned. Garbage collection must not judge a segment at or above it
// unreferenced: its logs may not have recorded it yet.
func (s *Scheduler) SettledBelow() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.settledBelow
}

const (
	flushSucceeded = "success"
	flushFailed    = "failure"
)

// buildAndUpload drains the logs into a segment in s.buf and uploads it.
// drained lists every log whose changes were taken, including on error.
func (s *Scheduler) buildAndUpload(ctx context.Context, logs []Log) (SegmentRef, []drainedLog, error) {
	// Keep the buffer from pinning the memory of one unusually large flush.
	if s.buf.Cap() > 4*int(min(s.opts.FlushBytes, 1<<30)) {
		s.buf = bytes.Buffer{}
	}
	s.buf.Reset()
	s.writer.Reset(&s.buf)
	drained := s.drained[:0]

	var buildErr error
	var drainedBytes int64
	for _, l := range logs {
		changes := l.Drain()
		if len(changes) == 0 {
			continue
		}
		d := drainedLog{log: l, id: l.LogID(), changes: len(changes)}
		for _, c := range changes {
			d.bytes += ChangeBytes(c)
		}
		drained = append(drained, d)
		drainedBytes += d.bytes
		for _, c := range changes {
			if err := s.writer.Add(c); err != nil {
				// A change the changelog should never have accepted: fail
				// the flush (every drained log re-hands its changes), stop
				// draining so the other logs keep theirs.
				buildErr = fmt.Errorf("upload: flush: log %q: %w", d.id, err)
				break
			}
		}
		if buildErr != nil {
			break
		}
	}
	if len(drained) == 0 {
		return SegmentRef{}, nil, nil
	}
	s.mu.Lock()
	s.uploading += drainedBytes
	s.updateGaugesLocked()
	s.mu.Unlock()
	if buildErr != nil {
		return SegmentRef{}, drained, buildErr
	}
	sum, err := s.writer.Close()
	if err != nil {
		return SegmentRef{}, drained, fmt.Errorf("upload: flush: encode segment: %w", err)
	}
	seq := s.nextSeq
	s.nextSeq++ // a failed flush's seq is not reused: its object may exist
	seg := SegmentRef{Key: segmentKey(s.opts.Node, seq, s.rng.Uint32()), Size: sum.Size, Seq: seq}
	if err := s.upload(ctx, seg.Key, s.buf.Bytes()); err != nil {
		return SegmentRef{}, drained, fmt.Errorf("upload: flush %d: %d changes of %d logs: %w", seq, sum.Changes, len(drained), err)
	}
	s.metrics.SegmentBytes.Add(float64(sum.Size))
	s.metrics.Changes.Add(float64(sum.Changes))
	attachBlocks(drained, sum.Blocks)
	return seg, drained, nil
}

// attachBlocks gives each drained log its blocks. A log's blocks are
// contiguous and in drain order, because the writer got each log's changes
// in one run.
func attachBlocks(drained []drainedLog, blocks []segments.BlockInfo) {
	i := 0
	for k := range drained {
		j := i
		for j < len(blocks) && blocks[j].LogID == drained[k].id {
			j++
		}
		drained[k].blocks = blocks[i:j:j]
		i = j
	}
}

// finish reports the flush to the drained logs and settles the accounting:
// released on success (after the callbacks, so a log frees its slices
// before appenders refill the room), back to pending on failure.
func (s *Scheduler) finish(seg SegmentRef, drained []drainedLog, err error) {
	var total int64
	for _, d := range drained {
		total += d.bytes
		if err != nil {
			d.log.Uploaded(FlushResult{Err: err})
			continue
		}
		d.log.Uploaded(FlushResult{Segment: seg, Blocks: d.blocks})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uploading = max(s.uploading-total, 0)
	if err == nil {
		s.releaseLocked(total)
	} else {
		s.updateGaugesLocked()
	}
	// Whatever stayed pending past the threshold, or still blocks an
	// appender, goes out at once (after a failure the next trigger retries,
	// so a dead store is not hammered in a loop).
	if s.reserved-s.uploading >= s.opts.FlushBytes || (err == nil && len(s.reservers) > 0) {
		s.flushDue = true
	}
}

// upload puts data under key, retrying transient failures with
// exponential backoff and full jitter.
func (s *Scheduler) upload(ctx context.Context, key string, data []byte) error {
	for attempt := 1; ; attempt++ {
		err := s.attempt(ctx, key, data)
		if err == nil {
			return nil
		}
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("put %s: %w", key, err)
		case !retryable(err):
			return fmt.Errorf("put %s: attempt %d: permanent error: %w", key, attempt, err)
		case attempt >= s.opts.MaxAttempts:
			return fmt.Errorf("put %s: gave up after %d attempts: %w", key, attempt, err)
		}
		s.metrics.Retries.Inc()
		if serr := clock.Sleep(ctx, s.clock, s.backoff(attempt)); serr != nil {
			return fmt.Errorf("put %s: backoff after attempt %d (%w): %w", key, attempt, err, serr)
		}
	}
}

// retryable reports whether a failed attempt is worth another: transient
// store errors and the attempt's own timeout. (upload checks the parent
// context first, so a DeadlineExceeded here is the attempt's.)
func retryable(err error) bool {
	return IsTransient(err) || errors.Is(err, context.DeadlineExceeded)
}

// backoff is the sleep after the given failed attempt (1-based): full
// jitter over min(MaxBackoff, BaseBackoff·2^(attempt-1)).
func (s *Scheduler) backoff(attempt int) time.Duration {
	limit := s.opts.MaxBackoff
	if shift := attempt - 1; shift < 62 && s.opts.BaseBackoff<<shift > 0 && s.opts.BaseBackoff<<shift < limit {
		limit = s.opts.BaseBackoff << shift
	}
	return time.Duration(s.rng.Int64N(int64(limit) + 1))
}

// attempt is one put of key, hedged: if it is still running after
// HedgeAfter, an identical put starts; the first success wins and cancels
// the other. Both puts have ended when attempt returns, so data may be
// reused.
func (s *Scheduler) attempt(ctx context.Context, key string, data []byte) error {
	if s.opts.HedgeAfter <= 0 {
		return s.putOnce(ctx, key, data)
	}
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan error, 2)
	put := func() { results <- s.putOnce(actx, key, data) }
	go put()
	running := 1
	hedge := s.clock.NewTimer(s.opts.HedgeAfter)
	defer hedge.Stop()
	hedgeC := hedge.C()
	var errs []error
	for running > 0 {
		select {
		case <-hedgeC:
			hedgeC = nil
			s.metrics.Hedges.Inc()
			running++
			go put()
		case err := <-results:
			running--
			if err == nil {
				cancel()
				for ; running > 0; running-- {
					<-results // the loser ends promptly: its context is cancelled
				}
				return nil
			}
			errs = append(errs, err)
		}
	}
	if len(errs) == 1 {
		return errs[0]
	}
	for _, err := range errs {
		if !retryable(err) {
			return err
		}
	}
	return errors.Join(errs...)
}

// putOnce is one PutIfAbsent with its own timeout. A key that already
// exists counts as success only if it holds exactly data: an earlier
// attempt (lost acknowledgement) or the hedge created it. Anything else
// there is a permanent error; keys carry a random suffix, so it cannot be
// another writer's object by design.
func (s *Scheduler) putOnce(ctx context.Context, key string, data []byte) error {
	s.metrics.Attempts.Inc()
	ctx, cancel := context.WithTimeout(ctx, s.opts.AttemptTimeout)
	defer cancel()
	err := s.store.PutIfAbsent(ctx, key, bytes.NewReader(data), int64(len(data)))
	if err == nil || !errors.Is(err, ErrAlreadyExists) {
		return err
	}
	same, verr := sameContent(ctx, s.store, key, data)
	switch {
	case verr != nil:
		return fmt.Errorf("verify existing segment: %w", verr)
	case !same:
		return fmt.Errorf("%w with different content", err)
	}
	return nil
}

// sameContent reports whether object key holds exactly want.
func sameContent(ctx context.Context, store BlobStore, key string, want []byte) (bool, error) {
	rc, err := store.Get(ctx, key)
	if err != nil {
		return false, err
	}
	same, err := equalReader(rc, want)
	if cerr := rc.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("get %s: close: %w", key, cerr)
	}
	return same, err
}

func equalReader(r io.Reader, want []byte) (bool, error) {
	var chunk [32 << 10]byte
	off := 0
	for {
		n, err := r.Read(chunk[:])
		if n > 0 {
			if off+n > len(want) || !bytes.Equal(chunk[:n], want[off:off+n]) {
				return false, nil
			}
			off += n
		}
		if errors.Is(err, io.EOF) {
			return off == len(want), nil
		}
		if err != nil {
			return false, err
		}
	}
}
