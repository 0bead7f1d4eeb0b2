package server

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// Request admission: what a request costs in memory is reserved BEFORE it
// is buffered and decoded, so that any mix of valid requests keeps the
// node's memory under a bound (docs/operations.md, "Memory bounds").
//
// Two budgets, both reserved from the raw message as it arrives (the body
// is wrapped before connect reads it):
//
//   - wire: the message bytes connect buffers. Reserved from the envelope
//     prefix (gRPC, gRPC-Web, Connect streaming) or Content-Length (Connect
//     unary; the maximum message size if the length is unknown) before the
//     first payload byte is read.
//   - work: what decoding and processing allocate. Reserved when the last
//     payload byte has arrived and before connect can unmarshal it. For
//     Append and AppendStream it is priced per change: the body reader
//     counts the changes of an uncompressed protobuf AppendRequest from the
//     wire as it streams by (no allocation), refuses more than
//     MaxBatchChanges with INVALID_ARGUMENT, and reserves
//     appendBytesFactor x wire + N x changeCostBytes. A compressed or JSON
//     request cannot be counted and is priced at the most changes it could
//     hold.
//
// A request waits for room at most Options.BackpressureWait, then fails
// with RESOURCE_EXHAUSTED (retry later), as an append waiting for upload room
// does. The wait must be bounded: a request waiting for wire room has not
// read its body, and over HTTP/2 the unread bodies of waiting requests fill
// the connection's flow-control window, which can stop the body of the
// request holding the room from arriving (one client multiplexing many
// large appends on one connection would otherwise wedge itself).
//
// A message holds both reservations until the handler is done with it: the
// end of the request, or the next message's prefix on a stream (connect
// reads it only when the handler asks for the next message). A request
// never waits for a budget while holding a reservation of that budget, and
// a work holder waits for nothing of ours, so admission cannot deadlock.
// A reservation larger than a budget is admitted once the budget is
// entirely free (alone), so one maximum-size request still moves.

const (
	// changeCostBytes is what one change of an Append costs the node while
	// the request is decoded and applied: the decoded *dstlv1.Change
	// (~190 B), the server's batch entry, the writer's tail entry and its
	// growth, and the read view's copy (~780 B), measured for tiny changes
	// by TestAppendCostPerChange, which fails if a change costs more.
	changeCostBytes = 1280
	// appendBytesFactor prices the bytes of an Append beyond its per-change
	// cost: decoded keys and values, the writer's arena, the read view's
	// batch (the wire buffer is the wire budget's).
	appendBytesFactor = 3
	// otherBytesFactor prices the decoded copy of any other request.
	otherBytesFactor = 2
	// minJSONChangeBytes is the least JSON a change takes ("{}," ).
	minJSONChangeBytes = 3
	// DefaultMaxBatchChanges bounds the changes of one Append (the SDK
	// sends batches of 1000 by default).
	DefaultMaxBatchChanges = 1 << 18
	// DefaultMaxRequestMemory bounds the memory of requests being received
	// and decoded (wire + work budgets). It must let one request of the
	// most changes and bytes through (maxRequestCost); the default does for
	// the default limits (576 MiB of work for 512 MiB).
	DefaultMaxRequestMemory = 768 << 20
)

// maxRequestCost is the most work one admissible request may be priced at:
// an Append of maxBatch changes in a message of maxMessage bytes.
func maxRequestCost(maxMessage, maxBatch int) int64 {
	return appendBytesFactor*int64(maxMessage) + int64(maxBatch)*changeCostBytes
}

// workBudget is the part of the request memory that prices decoding and
// applying (the rest buffers wire bytes).
func workBudget(memory int64) int64 { return memory - memory/4 }

// budget is a FIFO weighted semaphore of bytes.
type budget struct {
	mu      sync.Mutex
	size    int64
	used    int64
	waiters []*budgetWaiter
}

type budgetWaiter struct {
	n     int64
	ready chan struct{} // closed once admitted
}

func newBudget(size int64) *budget { return &budget{size: size} }

// acquire reserves n bytes (at most the budget's size: a larger
// reservation waits until the budget is free) and returns what it
// reserved, which release must get back.
func (b *budget) acquire(ctx context.Context, n int64) (int64, error) {
	n = min(max(n, 0), b.size)
	if n == 0 {
		return 0, nil
	}
	b.mu.Lock()
	if len(b.waiters) == 0 && b.used+n <= b.size {
		b.used += n
		b.mu.Unlock()
		return n, nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	b.waiters = append(b.waiters, w)
	b.mu.Unlock()
	select {
	case <-w.ready:
		return n, nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-w.ready: // admitted meanwhile: give it back
		b.used -= n
		b.grantLocked()
	default:
		for i, o := range b.waiters {
			if o == w {
				b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
				break
			}
		}
		b.grantLocked() // w may have blocked smaller ones behind it
	}
	return 0, ctx.Err()
}

func (b *budget) release(n int64) {
	if n <= 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used = max(b.used-n, 0)
	b.grantLocked()
}

func (b *budget) grantLocked() {
	for len(b.waiters) > 0 && b.used+b.waiters[0].n <= b.size {
		w := b.waiters[0]
		b.waiters = b.waiters[1:]
		b.used += w.n
		close(w.ready)
	}
}

func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// admission holds the budgets of one server.
type admission struct {
	wire, work      *budget
	maxBatchChanges int
	maxMessageBytes int64
	wait            time.Duration
}

func newAdmission(memory int64, maxMessageBytes, maxBatchChanges int, wait time.Duration) *admission {
	// A quarter for buffering, the rest for decoding and applying (an
	// Append costs ~60x its wire size in tiny changes, ~4x in big ones).
	return &admission{
		wire: newBudget(memory - workBudget(memory)), work: newBudget(workBudget(memory)),
		maxBatchChanges: maxBatchChanges, maxMessageBytes: int64(maxMessageBytes), wait: wait,
	}
}

// handler wraps next so that every request body is admitted as it is read.
func (a *admission) handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.Body == nil || r.Body == http.NoBody {
			next.ServeHTTP(w, r)
			return
		}
		ct := r.Header.Get("Content-Type")
		b := &admittedBody{
			a: a, body: r.Body, ctx: r.Context(),
			appends:   r.URL.Path == dstlv1connect.WriterServiceAppendProcedure || r.URL.Path == dstlv1connect.WriterServiceAppendStreamProcedure,
			enveloped: strings.HasPrefix(ct, "application/grpc") || strings.HasPrefix(ct, "application/connect+"),
		}
		if !b.enveloped {
			enc := r.Header.Get("Content-Encoding")
			b.compressed = enc != "" && enc != "identity"
			b.json = strings.HasPrefix(ct, "application/json")
			b.length = r.ContentLength
		}
		r.Body = b
		defer b.releaseAll()
		next.ServeHTTP(w, r)
	})
}

// admittedBody reserves each message's cost before handing its bytes on.
type admittedBody struct {
	a         *admission
	body      io.ReadCloser
	ctx       context.Context
	appends   bool // the body is AppendRequest messages
	enveloped bool

	// The current message.
	started    bool  // its wire budget is reserved
	length     int64 // its size (unenveloped: Content-Length, -1 unknown)
	left       int64 // payload bytes not read yet (enveloped)
	read       int64 // payload bytes read
	compressed bool
	json       bool
	scan       changeCounter
	wireHeld   int64
	workHeld   int64
	worked     bool    // the work budget is reserved
	pending    [5]byte // the envelope prefix read ahead, handed on first
	pendingN   int
	err        error
}

func (b *admittedBody) Close() error { return b.body.Close() }

func (b *admittedBody) releaseAll() {
	b.a.wire.release(b.wireHeld)
	b.a.work.release(b.workHeld)
	b.wireHeld, b.workHeld = 0, 0
}

func (b *admittedBody) fail(err error) error {
	b.err = err
	return err
}

func (b *admittedBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.enveloped {
		return b.readEnveloped(p)
	}
	return b.readUnary(p)
}

// readUnary: the whole body is one message (Connect unary).
func (b *admittedBody) readUnary(p []byte) (int, error) {
	if !b.started {
		b.started = true
		wire := b.length
		if wire < 0 {
			wire = b.a.maxMessageBytes // unknown: the most it may be
		}
		if err := b.reserveWire(min(wire, b.a.maxMessageBytes)); err != nil {
			return 0, err
		}
	}
	n, err := b.body.Read(p)
	b.read += int64(n)
	if b.countable() {
		b.scan.feed(p[:n])
	}
	if !b.worked && (errors.Is(err, io.EOF) || (b.length >= 0 && b.read >= b.length)) {
		if b.length < 0 { // now known: give back the rest of the worst case
			b.a.wire.release(b.wireHeld - min(b.wireHeld, b.read))
			b.wireHeld = min(b.wireHeld, b.read)
		}
		if werr := b.reserveWork(b.read); werr != nil {
			return 0, werr
		}
	}
	return n, err
}

// readEnveloped: 5-byte prefix (flags, big-endian size) + payload, repeated.
func (b *admittedBody) readEnveloped(p []byte) (int, error) {
	if b.left == 0 && (!b.started || b.worked) {
		// A message boundary: the handler is done with the previous
		// message (connect reads on only when asked for the next one).
		var prefix [5]byte
		n, err := io.ReadFull(b.body, prefix[:])
		if err != nil {
			if n == 0 {
				return 0, err // io.EOF: the end of the stream
			}
			return 0, fmt.Errorf("read envelope prefix: %w", err)
		}
		b.releaseAll()
		b.started, b.worked, b.read, b.scan = true, false, 0, changeCounter{}
		b.compressed = prefix[0]&1 != 0
		size := int64(binary.BigEndian.Uint32(prefix[1:]))
		b.length, b.left = size, size
		if size <= b.a.maxMessageBytes { // larger ones connect refuses unread
			if err := b.reserveWire(size); err != nil {
				return 0, err
			}
		}
		if size == 0 || size > b.a.maxMessageBytes {
			b.worked = true
		}
		b.pending = prefix
		b.pendingN = 5
	}
	if b.pendingN > 0 {
		n := copy(p, b.pending[5-b.pendingN:])
		b.pendingN -= n
		return n, nil
	}
	if b.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.body.Read(p)
	b.left -= int64(n)
	b.read += int64(n)
	if b.countable() {
		b.scan.feed(p[:n])
	}
	if b.left == 0 && !b.worked && b.length <= b.a.maxMessageBytes {
		if werr := b.reserveWork(b.read); werr != nil {
			return 0, werr
		}
	}
	if errors.Is(err, io.EOF) && b.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *admittedBody) countable() bool { return b.appends && !b.compressed && !b.json }

func (b *admittedBody) reserveWire(n int64) error {
	got, err := b.acquire(b.a.wire, n)
	if err != nil {
		return b.fail(fmt.Errorf("no memory to receive a %d-byte request: %w", n, err))
	}
	b.wireHeld += got
	return nil
}

// acquire waits for room in bud at most the back-pressure wait.
func (b *admittedBody) acquire(bud *budget, n int64) (int64, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.a.wait)
	defer cancel()
	got, err := bud.acquire(ctx, n)
	switch {
	case err == nil:
		return got, nil
	case b.ctx.Err() != nil:
		return 0, connect.NewError(connect.CodeOf(b.ctx.Err()), b.ctx.Err())
	}
	return 0, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("the node's request memory stayed full for %s; retry later: %w", b.a.wait, err))
}

// reserveWork prices a fully received message of wire bytes (not yet
// decoded) and reserves it.
func (b *admittedBody) reserveWork(wire int64) error {
	b.worked = true
	cost := otherBytesFactor * wire
	if b.appends {
		var changes int64
		switch {
		case b.countable():
			changes = b.scan.changes()
			if changes > int64(b.a.maxBatchChanges) {
				return b.fail(connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("append of %d changes: at most %d changes per batch: %w", changes, b.a.maxBatchChanges, errInvalid)))
			}
		case b.json:
			changes = min(wire/minJSONChangeBytes, int64(b.a.maxBatchChanges))
			if b.compressed {
				changes = int64(b.a.maxBatchChanges)
			}
		default: // compressed protobuf: as many as it may decode to
			changes = int64(b.a.maxBatchChanges)
		}
		if b.compressed {
			wire = b.a.maxMessageBytes
		}
		cost = appendBytesFactor*wire + changes*changeCostBytes
	} else if b.compressed {
		cost = otherBytesFactor * b.a.maxMessageBytes
	}
	got, err := b.acquire(b.a.work, cost)
	if err != nil {
		return b.fail(fmt.Errorf("no memory to decode a %d-byte request: %w", wire, err))
	}
	b.workHeld += got
	return nil
}

// changeCounter counts field 2 (changes) of a protobuf AppendRequest from
// its bytes as they stream by, without allocating. Bytes it cannot parse
// are counted at the most changes they could hold (2 bytes each).
type changeCounter struct {
	count  int64
	bad    int64 // bytes after a parse failure
	failed bool
	state  uint8 // counterTag, counterLen, counterSkip, counterVarint
	varint uint64
	shift  uint
	skip   uint64
	field  uint64
}

const (
	counterTag = iota
	counterLen
	counterSkip
	counterVarint
)

func (c *changeCounter) changes() int64 { return c.count + c.bad/2 }

func (c *changeCounter) feed(p []byte) {
	for i := 0; i < len(p); i++ {
		if c.failed {
			c.bad += int64(len(p) - i)
			return
		}
		if c.state == counterSkip {
			n := min(uint64(len(p)-i), c.skip)
			c.skip -= n
			i += int(n) - 1
			if c.skip == 0 {
				c.state = counterTag
			}
			continue
		}
		x := p[i]
		if c.shift >= 64 {
			c.failed = true
			c.bad += int64(len(p) - i)
			return
		}
		c.varint |= uint64(x&0x7f) << c.shift
		c.shift += 7
		if x&0x80 != 0 {
			continue
		}
		v := c.varint
		c.varint, c.shift = 0, 0
		switch c.state {
		case counterTag:
			c.field = v >> 3
			switch v & 7 {
			case 0:
				c.state = counterVarint
			case 1:
				c.state, c.skip = counterSkip, 8
			case 2:
				c.state = counterLen
			case 5:
				c.state, c.skip = counterSkip, 4
			default: // groups and invalid wire types
				c.failed = true
			}
		case counterLen:
			if c.field == 2 {
				c.count++
			}
			c.state, c.skip = counterSkip, v
			if v == 0 {
				c.state = counterTag
			}
		case counterVarint:
			c.state = counterTag
		}
	}
}
