// Package faulty wraps a BlobStore with injected faults for crash and fault
// tests: transient errors, lost acknowledgements, latency, torn writes and
// lost writes, each with a per-operation probability drawn from a seeded
// source, so a run is reproducible from its seed. A late write models a
// PUT that outlives its deadline: the caller gets a deadline error, and the
// object appears some operations later.
//
// Every injected error wraps ErrInjected and upload.ErrTransient (the
// faults model failures a client would retry).
package faulty

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/upload"
)

// ErrInjected marks every error this package makes up.
var ErrInjected = errors.New("injected fault")

// Op is a BlobStore operation.
type Op int

// The operations faults apply to.
const (
	OpPut Op = iota
	OpGet
	OpGetRange
	OpStat
	OpList
	OpDelete
	numOps
)

var opNames = [numOps]string{"put", "get", "get range", "stat", "list", "delete"}

func (o Op) String() string {
	if o < 0 || o >= numOps {
		return fmt.Sprintf("Op(%d)", int(o))
	}
	return opNames[o]
}

// Fault is a kind of injected fault.
type Fault int

// The kinds of faults.
const (
	// Transient: the operation fails before reaching the store.
	Transient Fault = iota
	// LostAck: the operation takes effect, then an error is reported.
	LostAck
	// Latency: the operation is delayed (the delay honours the context).
	Latency
	// TornWrite: a put reads part of its data and fails; nothing is stored
	// (the store's creates are atomic, so a torn write is never visible).
	TornWrite
	// LostWrite: a put reports success but stores nothing. Only for testing
	// that the system detects it.
	LostWrite
	// LateWrite: a put fails with a deadline error (wrapping
	// context.DeadlineExceeded) before anything is stored, and its data is
	// stored later: at the start of the Nth following operation on the
	// Store (N drawn from 1..MaxLateOps), or at Settle or Close. It models
	// a request a client timed out on that the server still carries out.
	// Like any create-only put, the late one does nothing if the key exists
	// by then.
	LateWrite
	numFaults
)

// NumFaults is the number of fault kinds (for iterating over them).
const NumFaults = int(numFaults)

var faultNames = [numFaults]string{"transient", "lost ack", "latency", "torn write", "lost write", "late write"}

func (f Fault) String() string {
	if f < 0 || f >= numFaults {
		return fmt.Sprintf("Fault(%d)", int(f))
	}
	return faultNames[f]
}

// Faults are one operation's fault probabilities, each in [0, 1]. The
// zero value injects nothing.
type Faults struct {
	Transient float64
	LostAck   float64
	Latency   float64
	// MaxDelay bounds an injected latency, drawn uniformly from
	// (0, MaxDelay]; 0 means 10ms.
	MaxDelay time.Duration
	// TornWrite, LostWrite and LateWrite apply to puts only.
	TornWrite float64
	LostWrite float64
	LateWrite float64
	// MaxLateOps bounds how many later operations a late write waits for
	// before it lands; 0 means 4.
	MaxLateOps int
}

// Options configure a Store.
type Options struct {
	// Seed seeds the fault decisions.
	Seed uint64
	// All applies to every operation without an entry in PerOp.
	All   Faults
	PerOp map[Op]Faults
	// Sleep injects a latency; it must return early with ctx's error when
	// ctx is done. Nil means a real timer.
	Sleep func(ctx context.Context, d time.Duration) error
}

// Store is a BlobStore that injects faults into calls to another.
type Store struct {
	inner upload.BlobStore
	sleep func(ctx context.Context, d time.Duration) error

	mu     sync.Mutex
	rng    *rand.Rand
	all    Faults
	perOp  map[Op]Faults
	counts [numOps][numFaults]int64
	// late holds the late writes not landed yet, in the order they failed.
	late []*lateWrite
	// landing counts late writes being stored by some call right now, so
	// that Settle also waits for them (lateCond signals a change).
	landing  int
	lateCond *sync.Cond
	// lateLanded and lateLost count late writes stored, and those that found
	// their key taken (or failed) when they landed.
	lateLanded, lateLost int64
}

// lateWrite is a put whose caller saw a deadline error; it lands when
// opsLeft reaches 0.
type lateWrite struct {
	key     string
	data    []byte
	opsLeft int
}

var _ upload.BlobStore = (*Store)(nil)

// Wrap returns inner with faults injected as opts say.
func Wrap(inner upload.BlobStore, opts Options) *Store {
	s := &Store{
		inner: inner,
		sleep: opts.Sleep,
		rng:   rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x9e3779b97f4a7c15)),
		all:   opts.All,
		perOp: make(map[Op]Faults),
	}
	s.lateCond = sync.NewCond(&s.mu)
	for op, f := range opts.PerOp {
		s.perOp[op] = f
	}
	if s.sleep == nil {
		s.sleep = realSleep
	}
	return s
}

func realSleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// SetFaults replaces the faults of op (for example to turn them on after a
// test's setup).
func (s *Store) SetFaults(op Op, f Faults) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.perOp[op] = f
}

// SetAll replaces the faults of operations without their own entry.
func (s *Store) SetAll(f Faults) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.all = f
}

// Count returns how many faults of kind f were injected into op.
func (s *Store) Count(op Op, f Fault) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[op][f]
}

// Total returns how many faults of kind f were injected into all operations.
func (s *Store) Total(f Fault) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for op := range numOps {
		n += s.counts[op][f]
	}
	return n
}

// LateWrites returns how many late writes landed (stored their object) and
// how many were lost when they landed (the key was taken, or the store
// failed), and how many are still pending.
func (s *Store) LateWrites() (landed, lost int64, pending int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lateLanded, s.lateLost, len(s.late) + s.landing
}

// Settle lands every pending late write now and waits for those other
// calls are landing, so that afterwards the blob store holds everything an
// injected late write will ever store (tests call it before checking for
// leaked objects).
func (s *Store) Settle(ctx context.Context) {
	s.mu.Lock()
	due := s.late
	s.late = nil
	s.landing += len(due)
	s.mu.Unlock()
	s.land(ctx, due)
	s.mu.Lock()
	for s.landing > 0 {
		s.lateCond.Wait()
	}
	s.mu.Unlock()
}

// tick counts one operation against the pending late writes and returns
// the ones due now; the caller holds s.mu and must land them.
func (s *Store) tickLocked() []*lateWrite {
	var due []*lateWrite
	kept := s.late[:0]
	for _, w := range s.late {
		if w.opsLeft--; w.opsLeft <= 0 {
			due = append(due, w)
			continue
		}
		kept = append(kept, w)
	}
	clear(s.late[len(kept):])
	s.late = kept
	s.landing += len(due)
	return due
}

// land stores late writes in order. They belong to the Store, not to the
// call that lands them, so the caller's cancellation does not stop them.
func (s *Store) land(ctx context.Context, due []*lateWrite) {
	if len(due) == 0 {
		return
	}
	ctx = context.WithoutCancel(ctx)
	for _, w := range due {
		err := s.inner.PutIfAbsent(ctx, w.key, bytes.NewReader(w.data), int64(len(w.data)))
		s.mu.Lock()
		if err == nil {
			s.lateLanded++
		} else {
			s.lateLost++
		}
		s.landing--
		s.lateCond.Broadcast()
		s.mu.Unlock()
	}
}

// Inner returns the wrapped store.
func (s *Store) Inner() upload.BlobStore { return s.inner }

// plan is the faults decided for one call.
type plan struct {
	delay                                               time.Duration
	transient, lostAck, tornWrite, lostWrite, lateWrite bool
	tornFraction                                        float64
	lateOps                                             int
	// due are earlier late writes that land before this call runs.
	due []*lateWrite
}

// decide draws the same number of values for every call, whatever the
// configuration, so one seed gives one sequence of decisions.
func (s *Store) decide(op Op) plan {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.perOp[op]
	if !ok {
		f = s.all
	}
	var r [9]float64
	for i := range r {
		r[i] = s.rng.Float64()
	}
	var p plan
	if r[0] < f.Latency {
		maxDelay := f.MaxDelay
		if maxDelay <= 0 {
			maxDelay = 10 * time.Millisecond
		}
		p.delay = time.Duration((1 - r[1]) * float64(maxDelay))
		s.counts[op][Latency]++
	}
	put := op == OpPut
	switch {
	case r[2] < f.Transient:
		p.transient = true
		s.counts[op][Transient]++
	case put && r[3] < f.TornWrite:
		p.tornWrite, p.tornFraction = true, r[6]
		s.counts[op][TornWrite]++
	case put && r[4] < f.LostWrite:
		p.lostWrite = true
		s.counts[op][LostWrite]++
	case put && r[7] < f.LateWrite:
		maxOps := f.MaxLateOps
		if maxOps <= 0 {
			maxOps = 4
		}
		p.lateWrite, p.lateOps = true, 1+int(r[8]*float64(maxOps)) // r[8] < 1: 1..maxOps
		s.counts[op][LateWrite]++
	case r[5] < f.LostAck:
		p.lostAck = true
		s.counts[op][LostAck]++
	}
	// This call is one more operation for the late writes pending before it.
	p.due = s.tickLocked()
	return p
}

func injected(f Fault, op Op, key string) error {
	return fmt.Errorf("faulty: %s %s: %w (%s): %w", op, key, ErrInjected, f, upload.ErrTransient)
}

// before lands the late writes due, then applies latency and transient
// faults; a non-nil error ends the call.
func (s *Store) before(ctx context.Context, op Op, key string) (plan, error) {
	p := s.decide(op)
	s.land(ctx, p.due)
	if p.delay > 0 {
		if err := s.sleep(ctx, p.delay); err != nil {
			return p, fmt.Errorf("faulty: %s %s: injected latency: %w", op, key, err)
		}
	}
	if p.transient {
		return p, injected(Transient, op, key)
	}
	return p, nil
}

// PutIfAbsent implements upload.BlobStore.
func (s *Store) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	p, err := s.before(ctx, OpPut, key)
	if err != nil {
		return err
	}
	switch {
	case p.tornWrite:
		// Part of the data went out, then the connection broke.
		n := int64(p.tornFraction * float64(size))
		if _, err := io.CopyN(io.Discard, r, n); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("faulty: put %s: read: %w", key, err)
		}
		return injected(TornWrite, OpPut, key)
	case p.lostWrite:
		if _, err := io.CopyN(io.Discard, r, size); err != nil {
			return fmt.Errorf("faulty: put %s: read: %w", key, err)
		}
		return nil
	case p.lateWrite:
		// The request went out whole; the caller stopped waiting for it.
		data, err := io.ReadAll(io.LimitReader(r, size))
		if err != nil {
			return fmt.Errorf("faulty: put %s: read: %w", key, err)
		}
		s.mu.Lock()
		s.late = append(s.late, &lateWrite{key: key, data: data, opsLeft: p.lateOps})
		s.mu.Unlock()
		return fmt.Errorf("faulty: put %s: %w (%s): %w: %w", key, ErrInjected, LateWrite, context.DeadlineExceeded, upload.ErrTransient)
	}
	if err := s.inner.PutIfAbsent(ctx, key, r, size); err != nil {
		return err
	}
	if p.lostAck {
		return injected(LostAck, OpPut, key)
	}
	return nil
}

// Get implements upload.BlobStore.
func (s *Store) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	p, err := s.before(ctx, OpGet, key)
	if err != nil {
		return nil, err
	}
	rc, err := s.inner.Get(ctx, key)
	return s.ackReader(p, OpGet, key, rc, err)
}

// GetRange implements upload.BlobStore.
func (s *Store) GetRange(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	p, err := s.before(ctx, OpGetRange, key)
	if err != nil {
		return nil, err
	}
	rc, err := s.inner.GetRange(ctx, key, offset, length)
	return s.ackReader(p, OpGetRange, key, rc, err)
}

func (s *Store) ackReader(p plan, op Op, key string, rc io.ReadCloser, err error) (io.ReadCloser, error) {
	if err != nil {
		return nil, err
	}
	if p.lostAck {
		if cerr := rc.Close(); cerr != nil {
			return nil, errors.Join(injected(LostAck, op, key), cerr)
		}
		return nil, injected(LostAck, op, key)
	}
	return rc, nil
}

// Stat implements upload.BlobStore.
func (s *Store) Stat(ctx context.Context, key string) (upload.ObjectInfo, error) {
	p, err := s.before(ctx, OpStat, key)
	if err != nil {
		return upload.ObjectInfo{}, err
	}
	info, err := s.inner.Stat(ctx, key)
	if err == nil && p.lostAck {
		return upload.ObjectInfo{}, injected(LostAck, OpStat, key)
	}
	return info, err
}

// List implements upload.BlobStore.
func (s *Store) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	p, err := s.before(ctx, OpList, prefix)
	if err != nil {
		return upload.ListPage{}, err
	}
	page, err := s.inner.List(ctx, prefix, startAfter, limit)
	if err == nil && p.lostAck {
		return upload.ListPage{}, injected(LostAck, OpList, prefix)
	}
	return page, err
}

// Delete implements upload.BlobStore.
func (s *Store) Delete(ctx context.Context, key string) error {
	p, err := s.before(ctx, OpDelete, key)
	if err != nil {
		return err
	}
	if err := s.inner.Delete(ctx, key); err != nil {
		return err
	}
	if p.lostAck {
		return injected(LostAck, OpDelete, key)
	}
	return nil
}

// Close lands the pending late writes, then closes the wrapped store.
func (s *Store) Close() error {
	s.Settle(context.Background())
	return s.inner.Close()
}
