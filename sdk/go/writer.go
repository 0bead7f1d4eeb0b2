package dstl

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"iter"
	"sync"
	"time"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// Defaults of WriterOptions.
const (
	DefaultBatchChanges  = 1000
	DefaultBatchBytes    = 1 << 20
	DefaultLinger        = 5 * time.Millisecond
	DefaultBufferChanges = 10000
	// DefaultCacheBytes bounds a writer's read cache.
	DefaultCacheBytes = 32 << 20
	// MaxChangeBytes bounds one change's key, value and state name: a
	// request above the server's message limit (64 MiB by default) would
	// be refused as a whole.
	MaxChangeBytes = 64<<20 - 4<<10
)

// WriterOptions configure OpenWriter. The zero value opens a writer of
// every key group, from the newest complete checkpoint, with the client's
// durability and the default batching.
type WriterOptions struct {
	// KeyGroups is the range to own; nil means every key group.
	KeyGroups *KeyGroupRange
	// FromCheckpoint is the complete checkpoint to start from; 0 means the
	// newest.
	FromCheckpoint uint64
	// ResumeEpoch reattaches to this live epoch (recovered by the node
	// after a restart) instead of opening a new one. A resume is never
	// redirected: only the node that recovered the epoch's log has it.
	ResumeEpoch uint64
	// AnyNode opens the writer on the client's node even if another
	// member of the cluster owns its (stream, key-group range); without it
	// the open follows the owner (docs/cluster.md, "Ownership"). Fencing
	// is the same either way: the newer epoch wins.
	AnyNode bool
	// Durability of the writer's appends; DurabilityDefault means the
	// client's (WithDurability), and then the server's.
	Durability Durability
	// BatchChanges sends a batch once it holds this many changes (default
	// 1000).
	BatchChanges int
	// BatchBytes sends a batch once its keys and values reach this many
	// bytes (default 1 MiB).
	BatchBytes int
	// Linger is how long a batch waits for more changes before it is sent
	// (default 5ms; negative: only when full, or on Flush).
	Linger time.Duration
	// BufferChanges bounds the changes buffered and in flight; Put blocks
	// while it is reached (default max(10000, BatchChanges); a smaller
	// value also caps BatchChanges).
	BufferChanges int
	// CacheBytes bounds the writer's read cache: the values of keys of its
	// key groups it wrote or read, which reads answer without asking the
	// node (default DefaultCacheBytes, 32 MiB; negative: no cache, every
	// read asks the node).
	CacheBytes int
}

// Op is what a change does to its key.
type Op int

const (
	// OpPut sets the key's value.
	OpPut Op = Op(dstlv1.Op_OP_PUT)
	// OpDelete removes the key.
	OpDelete Op = Op(dstlv1.Op_OP_DELETE)
	// OpMerge appends the value to the key's value.
	OpMerge Op = Op(dstlv1.Op_OP_MERGE)
	// OpClear removes every key of the state in the key group.
	OpClear Op = Op(dstlv1.Op_OP_CLEAR)
)

// Change is one state mutation, for Writer.Apply.
type Change struct {
	// KeyGroup must be inside the writer's range; Writer.KeyGroupOf
	// computes it from a key.
	KeyGroup int
	State    string
	Op       Op
	Key      []byte
	Value    []byte
	// Timestamp of the change; zero lets the server stamp it.
	Timestamp time.Time
}

// Writer owns a key-group range of a stream and appends changes to it.
//
// Changes are batched on the client: Put, Delete, Merge, Clear and Apply
// add a change to a bounded buffer and return; a background goroutine sends
// the buffer as one AppendRequest once it holds BatchChanges changes or
// BatchBytes bytes, after Linger, or on Flush. When the buffer is full they
// block (back-pressure), honouring their context. A failed send (after the
// client's retries) breaks the writer: the changes it held and every later
// one are dropped, and the error is returned by the next call. Reopen the
// writer from the last checkpoint then.
//
// Reads through a Writer (Get and the typed states) see every change added
// before them (read-your-writes). A key of the writer's own key groups that
// the writer wrote or read before is answered from its read cache, in the
// client, with no call to the node: only the writer changes its key groups
// while it is live. Other reads ask the node, after flushing the buffered
// changes the cache cannot vouch for (see readcache.go).
//
// A Writer is safe for concurrent use; changes keep the order of the calls
// that added them.
type Writer struct {
	c          *Client
	stream     string
	id         string
	epoch      uint64
	kgCount    int
	kgs        KeyGroupRange
	from       uint64
	restored   [][]byte
	durability dstlv1.Durability

	batchChanges int
	batchBytes   int
	linger       time.Duration
	bufferMax    int

	ctx    context.Context // the sender's; canceled by Close on timeout and by Abort
	cancel context.CancelFunc
	kick   chan struct{} // wakes the sender
	done   chan struct{} // closed when the sender exits

	mu           sync.Mutex
	pending      []*dstlv1.Change
	pendingBytes int
	firstAt      time.Time // when the oldest pending change was added
	inflight     int       // changes being sent
	added        uint64    // changes added so far
	sent         uint64    // changes acknowledged so far
	flushTo      uint64    // a Flush waits for sent >= flushTo
	lastSQN      uint64
	err          error // sticky: the writer is broken
	closing      bool
	cache        *readCache // nil: disabled
	// unsureUpTo: a read that misses the cache flushes changes up to this
	// index (added) first; see readCache.
	unsureUpTo uint64
	// reads wait to travel with the batch that flushes their target.
	reads    []*readAfter
	progress chan struct{} // closed and replaced when sent, err or closing change

	// closeMu serialises Close calls; closed: the server confirmed the
	// close (a failed CloseWriter leaves it false, so Close can be retried:
	// the server's writer accepts no changes until a close succeeds).
	closeMu sync.Mutex
	closed  bool
}

// OpenWriter opens a writer of stream: a new epoch that fences every older
// writer of overlapping key groups. RestoredMetadata returns the metadata
// of the checkpoint it started from.
//
// In a cluster the writer is opened on the owner of its (stream, key-group
// range): a member that is not the owner answers NotOwner with the owner's
// URL, and OpenWriter follows it (at most MaxOwnerRedirects times, then
// ErrNotOwner) unless o.AnyNode. Every call of the returned Writer, its
// reads included, goes to that node (Writer.Node); the Client's other calls
// stay on its own node. docs/sdk.md, "Writers follow their owner".
func (c *Client) OpenWriter(ctx context.Context, stream string, o WriterOptions) (*Writer, error) {
	st, err := c.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	req := &dstlv1.OpenWriterRequest{Stream: stream, FromCheckpoint: o.FromCheckpoint, ResumeEpoch: o.ResumeEpoch, AnyNode: o.AnyNode}
	if o.KeyGroups != nil {
		r := *o.KeyGroups
		if r.Lo < 0 || r.Lo > r.Hi || r.Hi >= st.KeyGroups {
			return nil, invalid("OpenWriter", "key groups %d..%d in a stream of %d", r.Lo, r.Hi, st.KeyGroups)
		}
		req.KeyGroups = &dstlv1.KeyGroupRange{Lo: uint32(r.Lo), Hi: uint32(r.Hi)}
	}
	// In a cluster the writer lives on its owner: the open follows
	// NotOwner answers there, and node serves every call of the writer.
	res, node, err := c.openWriter(ctx, req)
	if err != nil {
		return nil, err
	}
	d := o.Durability
	if d == DurabilityDefault {
		d = c.opts.durability
	}
	w := &Writer{
		c: node, stream: stream, id: res.GetWriterId(), epoch: res.GetEpoch(), kgCount: st.KeyGroups,
		kgs: rangeOf(res.GetKeyGroups()), from: res.GetFromCheckpoint(), restored: res.GetRestoredMetadata(),
		durability: d.proto(), lastSQN: res.GetLastSqn(),
		batchChanges: o.BatchChanges, batchBytes: o.BatchBytes, linger: o.Linger, bufferMax: o.BufferChanges,
		kick: make(chan struct{}, 1), done: make(chan struct{}), progress: make(chan struct{}),
	}
	if w.batchChanges <= 0 {
		w.batchChanges = DefaultBatchChanges
	}
	if w.batchBytes <= 0 {
		w.batchBytes = DefaultBatchBytes
	}
	if w.linger == 0 {
		w.linger = DefaultLinger
	}
	if w.bufferMax <= 0 {
		w.bufferMax = max(DefaultBufferChanges, w.batchChanges)
	}
	w.batchChanges = min(w.batchChanges, w.bufferMax)
	switch {
	case o.CacheBytes == 0:
		w.cache = newReadCache(DefaultCacheBytes)
	case o.CacheBytes > 0:
		w.cache = newReadCache(o.CacheBytes)
	}
	// The sender is owned by the writer: Close and Abort stop it.
	w.ctx, w.cancel = context.WithCancel(context.WithoutCancel(ctx))
	go w.run()
	return w, nil
}

// Node returns the URL of the node the writer lives on: in a cluster, the
// owner the open was sent to (every call of the writer goes there),
// otherwise the client's node ("in-process" for an in-process client).
func (w *Writer) Node() string { return w.c.baseURL }

// ID names the writer ("<stream>/<epoch>").
func (w *Writer) ID() string { return w.id }

// Stream returns the writer's stream.
func (w *Writer) Stream() string { return w.stream }

// Epoch returns the writer's epoch.
func (w *Writer) Epoch() uint64 { return w.epoch }

// KeyGroups returns the writer's key-group range.
func (w *Writer) KeyGroups() KeyGroupRange { return w.kgs }

// KeyGroupCount returns the stream's number of key groups.
func (w *Writer) KeyGroupCount() int { return w.kgCount }

// FromCheckpoint returns the checkpoint the writer's state started from (0:
// none).
func (w *Writer) FromCheckpoint() uint64 { return w.from }

// RestoredMetadata returns the metadata that the parts of FromCheckpoint
// overlapping the writer's key groups were checkpointed with (one entry per
// part that had metadata), e.g. the source offsets to resume from.
func (w *Writer) RestoredMetadata() [][]byte { return w.restored }

// KeyGroupOf returns key's key group in the writer's stream (the server's
// own function, changelog/keygroup).
func (w *Writer) KeyGroupOf(key []byte) int { return int(keygroup.Of(key, w.kgCount)) }

// Owns reports whether key group kg is in the writer's range.
func (w *Writer) Owns(kg int) bool { return w.kgs.Lo <= kg && kg <= w.kgs.Hi }

// LastSQN returns the SQN of the newest acknowledged change.
func (w *Writer) LastSQN() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastSQN
}

// Put sets key's value in state (key group from key).
func (w *Writer) Put(ctx context.Context, state string, key, value []byte) error {
	return w.Apply(ctx, Change{KeyGroup: w.KeyGroupOf(key), State: state, Op: OpPut, Key: key, Value: value})
}

// Delete removes key from state.
func (w *Writer) Delete(ctx context.Context, state string, key []byte) error {
	return w.Apply(ctx, Change{KeyGroup: w.KeyGroupOf(key), State: state, Op: OpDelete, Key: key})
}

// Merge appends value to key's value in state.
func (w *Writer) Merge(ctx context.Context, state string, key, value []byte) error {
	return w.Apply(ctx, Change{KeyGroup: w.KeyGroupOf(key), State: state, Op: OpMerge, Key: key, Value: value})
}

// Clear removes every key of state in key group kg.
func (w *Writer) Clear(ctx context.Context, state string, kg int) error {
	return w.Apply(ctx, Change{KeyGroup: kg, State: state, Op: OpClear})
}

// Apply adds one change to the writer's buffer, blocking while the buffer
// is full. The key and value are copied.
func (w *Writer) Apply(ctx context.Context, c Change) error {
	if !w.Owns(c.KeyGroup) {
		return invalid("Append", "writer %s: key group %d outside its range %d..%d", w.id, c.KeyGroup, w.kgs.Lo, w.kgs.Hi)
	}
	if c.Op < OpPut || c.Op > OpClear {
		return invalid("Append", "writer %s: unknown op %d", w.id, c.Op)
	}
	if err := validName("Append", "state", c.State); err != nil {
		return err
	}
	if n := len(c.Key) + len(c.Value) + len(c.State); n > MaxChangeBytes {
		return invalid("Append", "writer %s: change of %d bytes is above the %d-byte limit", w.id, n, MaxChangeBytes)
	}
	pc := &dstlv1.Change{
		KeyGroup: uint32(c.KeyGroup), State: c.State, Op: dstlv1.Op(c.Op),
		Key: append([]byte(nil), c.Key...), Value: append([]byte(nil), c.Value...),
	}
	if !c.Timestamp.IsZero() {
		pc.TimestampMs = c.Timestamp.UnixMilli()
	}
	size := len(c.Key) + len(c.Value) + len(c.State) + 16
	w.mu.Lock()
	for {
		if w.err != nil {
			err := w.err
			w.mu.Unlock()
			return err
		}
		if w.closing {
			w.mu.Unlock()
			return fmt.Errorf("writer %s: %w", w.id, ErrClosed)
		}
		if len(w.pending)+w.inflight < w.bufferMax {
			break
		}
		// Full: wait for the sender (which sends a full buffer at once).
		ch := w.progress
		w.mu.Unlock()
		w.wake()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		w.mu.Lock()
	}
	if len(w.pending) == 0 {
		w.firstAt = time.Now()
	}
	w.pending = append(w.pending, pc)
	w.pendingBytes += size
	w.added++
	w.cacheChangeLocked(pc)
	wake := len(w.pending) == 1 || len(w.pending) >= w.batchChanges || w.pendingBytes >= w.batchBytes
	w.mu.Unlock()
	if wake {
		w.wake()
	}
	return nil
}

func (w *Writer) wake() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// broadcastLocked wakes every waiter on progress; the caller holds w.mu.
func (w *Writer) broadcastLocked() {
	close(w.progress)
	w.progress = make(chan struct{})
}

// run is the sender: it sends batches in order until the writer closes or
// breaks.
func (w *Writer) run() {
	defer close(w.done)
	defer func() {
		// Reads still waiting find the writer closed or broken.
		w.mu.Lock()
		answerReads(w.reads, nil, cmp.Or(w.err, fmt.Errorf("writer %s: %w", w.id, ErrClosed)))
		w.reads = nil
		w.mu.Unlock()
	}()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		w.mu.Lock()
		for {
			if w.err != nil || (w.closing && len(w.pending) == 0) {
				w.mu.Unlock()
				return
			}
			n := len(w.pending)
			var wait time.Duration = -1
			if n > 0 {
				due := n >= w.batchChanges || w.pendingBytes >= w.batchBytes || n >= w.bufferMax ||
					w.flushTo > w.sent || w.closing
				if !due && w.linger > 0 {
					if wait = time.Until(w.firstAt.Add(w.linger)); wait <= 0 {
						due = true
					}
				}
				if due {
					break
				}
			}
			w.mu.Unlock()
			var tc <-chan time.Time
			if wait > 0 {
				timer.Reset(wait)
				tc = timer.C
			}
			select {
			case <-w.kick:
			case <-tc:
			case <-w.ctx.Done():
				w.mu.Lock()
				if w.err == nil {
					w.failLocked(fmt.Errorf("writer %s: %w", w.id, ErrClosed))
				}
				w.mu.Unlock()
				return
			}
			timer.Stop()
			w.mu.Lock()
		}
		// Take one batch off the front of the buffer.
		n, bytes := 0, 0
		for n < len(w.pending) && n < w.batchChanges && (n == 0 || bytes < w.batchBytes) {
			c := w.pending[n]
			bytes += len(c.Key) + len(c.Value) + len(c.State) + 16
			n++
		}
		batch := w.pending[:n:n]
		w.pending = w.pending[n:]
		w.pendingBytes -= bytes
		if len(w.pending) > 0 {
			w.firstAt = time.Now()
		}
		w.inflight = n
		reads := w.takeReadsLocked(w.sent + uint64(n))
		w.mu.Unlock()

		req := &dstlv1.AppendRequest{WriterId: w.id, Changes: batch, Durability: w.durability}
		for _, r := range reads {
			req.Reads = append(req.Reads, r.req)
		}
		res, err := call(w.ctx, w.c, "Append", false, w.c.writers.Append, req)

		w.mu.Lock()
		w.inflight = 0
		if err != nil {
			w.failLocked(fmt.Errorf("writer %s: batch of %d changes: %w", w.id, n, err))
			answerReads(reads, nil, w.err)
		} else {
			w.sent += uint64(n)
			w.lastSQN = res.GetLastSqn()
			answerReads(reads, res.GetReads(), nil)
			w.settleReadsLocked()
		}
		w.broadcastLocked()
		w.mu.Unlock()
	}
}

// cacheChangeLocked applies change number w.added to the read cache; the
// caller holds w.mu.
func (w *Writer) cacheChangeLocked(pc *dstlv1.Change) {
	if w.cache == nil {
		w.unsureUpTo = w.added
		return
	}
	kg := int(pc.KeyGroup)
	switch Op(pc.Op) {
	case OpPut:
		w.unsureLocked(w.cache.set(kg, pc.State, pc.Key, pc.Value, true, w.added))
	case OpDelete:
		w.unsureLocked(w.cache.set(kg, pc.State, pc.Key, nil, false, w.added))
	case OpMerge:
		e := w.cache.get(kg, pc.State, pc.Key)
		if e == nil {
			w.unsureUpTo = w.added
			return
		}
		v := make([]byte, 0, len(e.value)+len(pc.Value))
		v = append(append(v, e.value...), pc.Value...)
		w.unsureLocked(w.cache.set(kg, pc.State, pc.Key, v, true, w.added))
	case OpClear:
		w.cache.clear(kg, pc.State)
		w.unsureUpTo = w.added
	}
}

// unsureLocked records that the changes up to index i may not be reflected
// by the cache any more (an evicted entry); the caller holds w.mu.
func (w *Writer) unsureLocked(i uint64) {
	w.unsureUpTo = max(w.unsureUpTo, i)
}

// failLocked breaks the writer; the caller holds w.mu.
func (w *Writer) failLocked(err error) {
	w.err = err
	w.pending, w.pendingBytes = nil, 0
	answerReads(w.reads, nil, err)
	w.reads = nil
	if w.cache != nil {
		w.cache.reset()
	}
	w.broadcastLocked()
}

// Flush sends every change added before the call and returns the SQN of
// the newest acknowledged change (as durable as the writer's durability).
func (w *Writer) Flush(ctx context.Context) (uint64, error) {
	w.mu.Lock()
	target := w.added
	if w.flushTo < target {
		w.flushTo = target
	}
	for w.sent < target && w.err == nil {
		ch := w.progress
		w.mu.Unlock()
		w.wake()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		w.mu.Lock()
	}
	defer w.mu.Unlock()
	if w.err != nil {
		return 0, w.err
	}
	return w.lastSQN, nil
}

// flushed flushes only if changes are pending (reads call it).
func (w *Writer) flushed(ctx context.Context) error {
	w.mu.Lock()
	idle := w.sent == w.added && w.err == nil
	w.mu.Unlock()
	if idle {
		return nil
	}
	_, err := w.Flush(ctx)
	return err
}

// Persist flushes the writer and returns once every change up to the
// returned SQN is in segments uploaded to the blob store.
func (w *Writer) Persist(ctx context.Context) (uint64, error) {
	last, err := w.Flush(ctx)
	if err != nil {
		return 0, err
	}
	res, err := call(ctx, w.c, "Persist", true, w.c.writers.Persist, &dstlv1.PersistRequest{WriterId: w.id, UpToSqn: last})
	if err != nil {
		return 0, w.broken(err)
	}
	return res.GetUpToSqn(), nil
}

// Checkpoint flushes the writer, persists it and records its part of
// checkpoint id (which must be above the stream's newest complete one) with
// metadata, returned by RestoredMetadata to writers restored from it. It
// reports whether the checkpoint is complete (every live writer of the
// stream recorded its part).
func (w *Writer) Checkpoint(ctx context.Context, id uint64, metadata []byte) (complete bool, err error) {
	if _, err := w.Flush(ctx); err != nil {
		return false, err
	}
	res, err := call(ctx, w.c, "Checkpoint", false, w.c.writers.Checkpoint, &dstlv1.CheckpointRequest{WriterId: w.id, CheckpointId: id, Metadata: metadata})
	if err != nil {
		return false, w.broken(err)
	}
	return res.GetComplete(), nil
}

// broken makes a fencing error sticky, so that later calls fail fast.
func (w *Writer) broken(err error) error {
	if isFenced(err) {
		w.mu.Lock()
		if w.err == nil {
			w.failLocked(err)
		}
		w.mu.Unlock()
	}
	return err
}

func isFenced(err error) bool {
	e, ok := err.(*Error)
	return ok && e.Is(ErrFenced)
}

// Close sends every buffered change, then persists the writer, records its
// final state and closes its epoch on the server. The background sender has
// stopped when Close returns, whatever the outcome; if ctx ends first the
// changes not yet sent are dropped. A broken writer returns its error.
//
// A Close that failed on the server (an error other than the writer's own)
// may be called again: it retries the server's close, whose outcome may be
// unknown (the final state may already be recorded), until one succeeds.
// Once a Close succeeded, Close returns ErrClosed.
func (w *Writer) Close(ctx context.Context) error {
	w.closeMu.Lock()
	defer w.closeMu.Unlock()
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return fmt.Errorf("writer %s: %w", w.id, ErrClosed)
	}
	first := !w.closing
	w.closing = true
	if first {
		w.broadcastLocked()
	}
	w.mu.Unlock()
	if first {
		w.wake()
		select {
		case <-w.done:
		case <-ctx.Done():
			w.cancel()
			<-w.done
		}
	}
	<-w.done
	w.cancel()
	w.mu.Lock()
	err := w.err
	w.mu.Unlock()
	if err != nil {
		return err
	}
	if _, err := call(ctx, w.c, "CloseWriter", false, w.c.writers.CloseWriter, &dstlv1.CloseWriterRequest{WriterId: w.id}); err != nil {
		return err
	}
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	return nil
}

// Abort stops the writer at once, as a crash would: buffered changes are
// dropped and the server is not told (its epoch stays open until a newer
// writer fences it). For tests and failure handling.
func (w *Writer) Abort() {
	w.mu.Lock()
	if w.err == nil {
		w.failLocked(fmt.Errorf("writer %s: aborted: %w", w.id, ErrClosed))
	}
	w.closing = true
	w.mu.Unlock()
	w.cancel()
	<-w.done
}

// Get reads key of state with read-your-writes: from the writer's read
// cache if it holds the key, else from the node (which serves this
// writer's view) after flushing the buffered changes the cache cannot
// vouch for. The returned slice is the caller's.
func (w *Writer) Get(ctx context.Context, state string, key []byte) ([]byte, bool, error) {
	return w.getKG(ctx, state, key, w.KeyGroupOf(key))
}

func (w *Writer) getKG(ctx context.Context, state string, key []byte, kg int) ([]byte, bool, error) {
	// Only the writer's own key groups are cached: another view (another
	// writer's, a checkpoint's) changes without this writer. After Close,
	// a newer writer may change them too.
	cached := w.cache != nil && w.Owns(kg)
	w.mu.Lock()
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return nil, false, err
	}
	cached = cached && !w.closing
	if cached {
		if e := w.cache.get(kg, state, key); e != nil {
			v, found := bytes.Clone(e.value), e.found
			w.mu.Unlock()
			return v, found, nil
		}
	}
	needFlush, unsure := w.sent < w.unsureUpTo, w.unsureUpTo
	w.mu.Unlock()
	var (
		v      []byte
		found  bool
		served bool
	)
	if needFlush {
		// The read travels with the flush: one round trip.
		a, err := w.readWithFlush(ctx, state, key, kg)
		if err != nil {
			return nil, false, err
		}
		v, found, served = a.value, a.found, a.served
	}
	if !served {
		k := uint32(kg)
		var err error
		if v, found, err = w.c.get(ctx, w.stream, state, key, &k); err != nil {
			return nil, false, err
		}
	}
	if !cached {
		return v, found, nil
	}
	w.mu.Lock()
	// Cache the node's answer unless a change may have touched the key
	// since the read began (it would then be cached, or unsureUpTo moved).
	if w.err == nil && !w.closing && w.unsureUpTo == unsure && w.cache.get(kg, state, key) == nil {
		w.unsureLocked(w.cache.set(kg, state, key, bytes.Clone(v), found, 0))
	}
	w.mu.Unlock()
	return v, found, nil
}

// Scan iterates over the keys of state starting with prefix in the
// writer's key groups (nil kg) or in one key group, after flushing the
// writer's buffered changes.
func (w *Writer) Scan(ctx context.Context, state string, prefix []byte, kg *int) iter.Seq2[KeyValue, error] {
	return func(yield func(KeyValue, error) bool) {
		if err := w.flushed(ctx); err != nil {
			yield(KeyValue{}, err)
			return
		}
		r := w.kgs
		if kg != nil {
			r = KeyGroupRange{Lo: *kg, Hi: *kg}
		}
		for kv, err := range w.c.Scan(ctx, w.stream, ScanOptions{State: state, Prefix: prefix, KeyGroups: &r, PageSize: 1000}) {
			if !yield(kv, err) || err != nil {
				return
			}
		}
	}
}
