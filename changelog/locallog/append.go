package locallog

import (
	"context"
	"fmt"
	"slices"

	"github.com/dstl-dev/dstl/segments"
)

type itemKind uint8

const (
	itemAppend itemKind = iota
	itemMeta
	itemUploaded
	itemForget
)

// item is one request in the queue. Appends and SetMeta have a waiter
// (done); marks and forgets are lazy and ride on the next record.
type item struct {
	kind    itemKind
	logID   string
	changes []segments.Change // the caller's: read by the committer until batch.encoded
	meta    []byte            // a private copy
	sqn     uint64            // itemUploaded; updated while queued (coalescing)
	size    int               // estimated encoded bytes, for the batch cut
	done    chan error        // nil for lazy items; capacity 1
	batch   *batch            // set under mu when the committer takes the item
}

// batch is what the committer took for one record.
type batch struct {
	items []*item
	// encoded is closed once the record is encoded: the committer no longer
	// reads the appenders' changes, so an appender that gives up waiting
	// may return and let its caller reuse the buffers.
	encoded chan struct{}
	// completed: the waiters were told (committer only).
	completed bool
}

// Append makes changes of logID durable (written and fsynced) before it
// returns nil. Concurrent Appends, of any logs, are group-committed: one
// record and one fsync serve every Append queued while the previous fsync
// ran. Append does not retain changes after it returns.
//
// Each change's LogID must be logID or empty; SQNs must be ≥ 1 and strictly
// increasing within the call and across the Appends of a log. An Append may
// repeat changes already appended (a retry after an Append that gave up):
// changes at or below the highest SQN already appended for the log are
// skipped, the first copy wins. An Append of no changes returns once
// everything appended before it is durable.
//
// If ctx ends while the Append waits, it returns an error wrapping ctx's.
// If the committer had not taken the request yet, the error also wraps
// ErrWithdrawn: the changes are certainly not written. Otherwise they may
// still become durable (and then be recovered): the outcome is unknown and
// the caller may retry with the same SQNs. An error from the disk ends the Log: every later call fails with it.
func (l *Log) Append(ctx context.Context, logID string, changes []segments.Change) error {
	size, err := validate(logID, changes)
	if err != nil {
		return err
	}
	it := &item{kind: itemAppend, logID: logID, changes: changes, size: size, done: make(chan error, 1)}
	if err := l.enqueue(ctx, it); err != nil {
		return fmt.Errorf("locallog: append to %s: %w", logID, err)
	}
	if err := l.wait(ctx, it); err != nil {
		return fmt.Errorf("locallog: append to %s: %w", logID, err)
	}
	return nil
}

// SetMeta durably records opaque metadata for logID (stream, epoch, key
// groups: the changelog's business), replacing the previous one. It is
// recovered with the log's changes, and kept until Forget. ctx is honoured
// as in Append.
func (l *Log) SetMeta(ctx context.Context, logID string, meta []byte) error {
	if err := validLogID(logID); err != nil {
		return err
	}
	if len(meta) > MaxMetaLen {
		return fmt.Errorf("locallog: meta of %s: %d bytes above %d: %w", logID, len(meta), MaxMetaLen, ErrTooLarge)
	}
	it := &item{kind: itemMeta, logID: logID, meta: slices.Clone(meta), size: len(logID) + len(meta), done: make(chan error, 1)}
	if err := l.enqueue(ctx, it); err != nil {
		return fmt.Errorf("locallog: set meta of %s: %w", logID, err)
	}
	if err := l.wait(ctx, it); err != nil {
		return fmt.Errorf("locallog: set meta of %s: %w", logID, err)
	}
	return nil
}

// MarkUploaded records that logID's changes ≤ sqn are on the blob store. It
// is lazy: it has no fsync of its own but rides on the next record (or on
// Close), so a crash may forget it and recover those changes again; the
// changelog must tolerate uploading them twice. Marks of a log that is not
// known here (never appended, or forgotten), or after Close, are ignored.
func (l *Log) MarkUploaded(logID string, sqn uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing || l.err != nil {
		return
	}
	if _, ok := l.known[logID]; !ok {
		return
	}
	if it := l.marks[logID]; it != nil {
		it.sqn = max(it.sqn, sqn)
		return
	}
	it := &item{kind: itemUploaded, logID: logID, sqn: sqn, size: len(logID) + 10}
	l.queue = append(l.queue, it)
	l.marks[logID] = it
}

// Forget drops logID: its changes are no longer needed (the log was closed
// and uploaded, or discarded). Lazy like MarkUploaded: until a record
// carries it, a crash recovers the log. An Append of the log queued before
// the Forget is dropped with it (one racing with it may or may not be); a
// later Append or SetMeta of the same logID starts a new log.
func (l *Log) Forget(logID string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing || l.err != nil {
		return
	}
	if _, ok := l.known[logID]; !ok {
		return
	}
	delete(l.known, logID)
	delete(l.marks, logID) // a later mark must follow the forget, not precede it
	l.queue = append(l.queue, &item{kind: itemForget, logID: logID, size: len(logID) + 2})
}

func (l *Log) enqueue(ctx context.Context, it *item) error {
	// An Append whose ctx already ended is not queued at all: certainly not written.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrWithdrawn, err)
	}
	l.mu.Lock()
	switch {
	case l.err != nil:
		l.mu.Unlock()
		return l.err
	case l.closing:
		l.mu.Unlock()
		return ErrClosed
	}
	l.queue = append(l.queue, it)
	l.waiting++
	l.known[it.logID] = struct{}{}
	l.mu.Unlock()
	l.signal()
	return nil
}

func (l *Log) wait(ctx context.Context, it *item) error {
	select {
	case err := <-it.done:
		return err
	case <-ctx.Done():
	}
	l.mu.Lock()
	if it.batch == nil {
		// Not taken: withdraw it, so it is certainly not written.
		if i := slices.Index(l.queue, it); i >= 0 {
			l.queue = slices.Delete(l.queue, i, i+1)
			l.waiting--
		}
		l.mu.Unlock()
		return fmt.Errorf("%w: %w", ErrWithdrawn, ctx.Err())
	}
	b := it.batch
	l.mu.Unlock()
	// Taken: the caller's buffers are free once the record is encoded
	// (a short wait: no I/O), but the outcome is unknown.
	<-b.encoded
	return fmt.Errorf("outcome unknown, may be durable: %w", ctx.Err())
}

func validLogID(id string) error {
	if len(id) == 0 || len(id) > segments.MaxLogIDLen {
		return fmt.Errorf("locallog: log id length %d not in 1..%d: %w", len(id), segments.MaxLogIDLen, segments.ErrInvalidChange)
	}
	return nil
}

// changeOverhead bounds a change's encoded bytes beyond key, value and state.
const changeOverhead = 64

// validate checks changes as the segment writer would, so that one bad
// change is refused to its caller instead of failing a whole batch, and
// returns the estimated encoded size.
func validate(logID string, changes []segments.Change) (int, error) {
	if err := validLogID(logID); err != nil {
		return 0, err
	}
	size := 0
	var prev uint64
	for i := range changes {
		c := &changes[i]
		var err error
		need := changeOverhead + len(c.Key) + len(c.Value)
		switch {
		case c.LogID != "" && c.LogID != logID:
			err = fmt.Errorf("change %d has log id %q", i, c.LogID)
		case c.SQN <= prev:
			err = fmt.Errorf("change %d: SQN %d not above %d", i, c.SQN, prev)
		case c.KeyGroup > segments.MaxKeyGroup:
			err = fmt.Errorf("SQN %d: key group %d above %d", c.SQN, c.KeyGroup, segments.MaxKeyGroup)
		case c.Op < segments.OpPut || c.Op > segments.OpClear:
			err = fmt.Errorf("SQN %d: unknown op %d", c.SQN, c.Op)
		case len(c.State) > segments.MaxStateLen:
			err = fmt.Errorf("SQN %d: state name of %d bytes above %d", c.SQN, len(c.State), segments.MaxStateLen)
		case need > segments.MaxBlockRawSize:
			err = fmt.Errorf("SQN %d: change of %d bytes above %d", c.SQN, need, segments.MaxBlockRawSize)
		}
		if err != nil {
			return 0, fmt.Errorf("locallog: append to %s: %w: %w", logID, err, segments.ErrInvalidChange)
		}
		prev = c.SQN
		size += need + len(c.State)
	}
	if size > maxAppendBytes {
		return 0, fmt.Errorf("locallog: append to %s: %d bytes above %d: %w", logID, size, maxAppendBytes, ErrTooLarge)
	}
	return size + len(logID), nil
}
