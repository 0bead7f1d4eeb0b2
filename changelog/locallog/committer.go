package locallog

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"

	"github.com/dstl-dev/dstl/segments"
)

// committer is the state of the single goroutine that writes records. Only
// that goroutine (and Open, before starting it) touches it.
type committer struct {
	l    *Log
	st   *state // the fold of every durable record
	f    *os.File
	num  uint64 // active file number
	size int64  // active file size

	out  sink // the record being encoded
	seg  *segments.Writer
	ents []entry

	taken   map[string]struct{} // take: logs appended in the batch so far
	forgot  map[string]struct{} // commit: logs forgotten in the batch
	written map[string]written  // commit: highest SQN per log, baseline then written

	closeErr, deleteErr error
}

type written struct {
	last  uint64
	wrote bool // some change of the log is in this record
}

// sink appends a segment to the record buffer.
type sink struct{ b []byte }

func (s *sink) Write(p []byte) (int, error) {
	s.b = append(s.b, p...)
	return len(p), nil
}

func (c *committer) init(l *Log, st *state) {
	c.l, c.st = l, st
	c.seg = segments.NewWriter(nil, segments.WriterOptions{Codec: l.opts.Codec})
	c.taken = make(map[string]struct{})
	c.forgot = make(map[string]struct{})
	c.written = make(map[string]written)
}

// run is the committer loop: wait for a request with a waiter (lazy marks
// alone do not wake it), take a prefix of the queue, commit it as one
// record. While it writes and fsyncs, new requests queue up and form the
// next batch: that is the group commit.
func (l *Log) run() {
	defer close(l.stopped)
	c := &l.c
	for {
		l.mu.Lock()
		for l.waiting == 0 && !l.closing {
			l.mu.Unlock()
			<-l.wake
			l.mu.Lock()
		}
		b := c.take()
		last := l.closing && len(l.queue) == 0
		l.mu.Unlock()
		if len(b.items) > 0 {
			if err := c.commit(b); err != nil {
				l.fail(err, b)
				c.close()
				return
			}
		}
		if last {
			c.close()
			return
		}
	}
}

// take removes a prefix of the queue for one record. Called with l.mu held.
// The batch is cut before maxBatchBytes, and before a Forget of a log that
// the batch appends to: a record's entries apply before its changes, so the
// Forget must go in a later record to come after those changes.
func (c *committer) take() *batch {
	l := c.l
	b := &batch{encoded: make(chan struct{})}
	clear(c.taken)
	size, n := 0, 0
	for _, it := range l.queue {
		if n > 0 && size+it.size > maxBatchBytes {
			break
		}
		if _, ok := c.taken[it.logID]; ok && it.kind == itemForget {
			break
		}
		switch it.kind {
		case itemAppend:
			c.taken[it.logID] = struct{}{}
		case itemUploaded:
			delete(l.marks, it.logID) // no more coalescing into a taken item
		}
		if it.done != nil {
			l.waiting--
		}
		it.batch = b
		size += it.size
		n++
	}
	b.items = slices.Clone(l.queue[:n])
	rest := copy(l.queue, l.queue[n:])
	clear(l.queue[rest:])
	l.queue = l.queue[:rest]
	return b
}

// commit encodes the batch as one record, writes and fsyncs it, folds it
// into the durable state and wakes its waiters. Any error ends the Log: after
// a failed write or fsync nobody knows what reached the disk.
func (c *committer) commit(b *batch) error {
	changes, err := c.encode(b)
	close(b.encoded) // the appenders' buffers are no longer read
	if err != nil {
		return fmt.Errorf("locallog: encode record: %w", err)
	}
	if len(c.ents) == 0 && changes == 0 {
		// Only repeats or empty Appends: every earlier record is already
		// durable, as the committer syncs each one before the next.
		c.complete(b)
		return nil
	}
	if err := c.write(c.out.b); err != nil {
		return err
	}
	c.l.stats.changes.Add(int64(changes))

	// Durable: fold it in the order recovery would.
	obsoletes := false
	for i := range c.ents {
		obsoletes = c.st.applyEntry(&c.ents[i]) || obsoletes
	}
	for id, w := range c.written {
		if w.wrote {
			c.st.noteWritten(id, w.last)
		}
	}
	c.complete(b)

	if c.size >= c.l.opts.FileSize {
		if err := c.newFile(c.num + 1); err != nil {
			return err
		}
		obsoletes = true
	}
	if obsoletes {
		c.deleteObsolete()
	}
	return nil
}

// encode builds the record of batch b in c.out and returns how many changes
// it holds. Changes at or below the highest SQN already written for their
// log are repeats (a retried Append) and are skipped, first copy wins.
func (c *committer) encode(b *batch) (changes int, err error) {
	c.ents = c.ents[:0]
	clear(c.forgot)
	clear(c.written)
	for _, it := range b.items {
		switch it.kind {
		case itemMeta:
			c.ents = append(c.ents, entry{kind: entryMeta, logID: it.logID, meta: it.meta})
		case itemUploaded:
			c.ents = append(c.ents, entry{kind: entryUploaded, logID: it.logID, sqn: it.sqn})
		case itemForget:
			c.ents = append(c.ents, entry{kind: entryForget, logID: it.logID})
			c.forgot[it.logID] = struct{}{}
		}
	}
	out, start := beginRecord(c.out.b[:0], c.num, len(c.ents))
	for i := range c.ents {
		out = appendEntry(out, &c.ents[i])
	}
	c.out.b = out
	c.seg.Reset(&c.out)
	for _, it := range b.items {
		if it.kind != itemAppend {
			continue
		}
		w, ok := c.written[it.logID]
		if _, forgotten := c.forgot[it.logID]; !ok && !forgotten {
			if ls := c.st.logs[it.logID]; ls != nil {
				w.last = ls.last
			}
		}
		for _, ch := range it.changes {
			if ch.SQN <= w.last {
				continue
			}
			ch.LogID = it.logID
			if err := c.seg.Add(ch); err != nil {
				return 0, err
			}
			w.last, w.wrote = ch.SQN, true
			changes++
		}
		c.written[it.logID] = w
	}
	if changes > 0 {
		if _, err := c.seg.Close(); err != nil {
			return 0, err
		}
	}
	if len(c.out.b)-start-frameHeaderLen+4 > maxPayload {
		return 0, fmt.Errorf("record of %d bytes above %d", len(c.out.b)-start, maxPayload)
	}
	c.out.b = finishRecord(c.out.b, start)
	return changes, nil
}

func (c *committer) complete(b *batch) {
	b.completed = true
	n := 0
	for _, it := range b.items {
		if it.done != nil {
			n++
		}
	}
	c.l.stats.appends.Add(int64(n)) // before the wake-ups: an appender may read Stats at once
	for _, it := range b.items {
		if it.done != nil {
			it.done <- nil
		}
	}
	// A huge batch should not pin its buffer for the life of the Log.
	if cap(c.out.b) > 2*maxBatchBytes {
		c.out.b = nil
	}
}

// write appends one record to the active file and fsyncs it.
func (c *committer) write(rec []byte) error {
	if _, err := c.f.Write(rec); err != nil {
		return fmt.Errorf("locallog: write %s at offset %d: %w", c.f.Name(), c.size, err)
	}
	c.size += int64(len(rec))
	c.l.stats.bytes.Add(int64(len(rec)))
	c.l.stats.records.Add(1)
	if err := c.sync(c.f); err != nil {
		return fmt.Errorf("locallog: fsync %s: %w", c.f.Name(), err)
	}
	return nil
}

func (c *committer) sync(f *os.File) error {
	if c.l.opts.NoSync {
		return nil
	}
	c.l.stats.fsyncs.Add(1)
	return f.Sync()
}

// newFile makes file num the active file. Its first record is a snapshot of
// the durable state (every live log's metadata and mark), synced together
// with the directory entry before anything else is written to it: from then
// on no older file is needed for metadata or marks, only for the changes it
// holds (see deleteObsolete).
func (c *committer) newFile(num uint64) error {
	path := walName{num}.path(c.l.opts.Dir)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("locallog: create %s: %w", path, err)
	}
	snap := c.st.snapshot()
	out, start := beginRecord(c.out.b[:0], num, 1)
	out = appendEntry(out, &snap)
	c.out.b = finishRecord(out, start)

	old, oldNum, oldSize := c.f, c.num, c.size
	c.f, c.num, c.size = f, num, 0
	err = c.write(c.out.b)
	if err == nil && !c.l.opts.NoSync {
		c.l.stats.fsyncs.Add(1)
		err = syncDir(c.l.opts.Dir)
	}
	if err != nil {
		c.f, c.num, c.size = old, oldNum, oldSize
		return errors.Join(err, f.Close())
	}
	c.st.files = append(c.st.files, &fileState{num: num, path: path, size: c.size, maxSQN: make(map[string]uint64)})
	c.l.stats.files.Store(int64(len(c.st.files)))
	if old != nil {
		if err := old.Close(); err != nil {
			return fmt.Errorf("locallog: close %s: %w", old.Name(), err)
		}
	}
	return nil
}

// deleteObsolete deletes every file, but the active one, all of whose
// changes are uploaded or forgotten.
//
// Invariant: a file is deleted only after a durable record says everything
// in it is uploaded (or forgotten). c.st folds only records that were
// fsynced, so the marks that make a file obsolete are durable before its
// unlink. The metadata and marks a deleted file held survive in the
// snapshot that starts the active file, also durable (newFile). Unlinks are
// not synced: a file that reappears after a crash is read again by recovery
// and found obsolete again by the same fold, since the records that made it
// so are durable.
func (c *committer) deleteObsolete() {
	files := c.st.files
	keep := files[:0]
	for i, f := range files {
		if i < len(files)-1 && c.st.obsolete(f) {
			err := os.Remove(f.path)
			if err == nil || errors.Is(err, fs.ErrNotExist) {
				c.l.stats.deleted.Add(1)
				continue
			}
			// Kept and retried at the next check; Close reports it.
			c.deleteErr = fmt.Errorf("locallog: delete obsolete %s: %w", f.path, err)
		}
		keep = append(keep, f)
	}
	clear(files[len(keep):])
	c.st.files = keep
	c.l.stats.files.Store(int64(len(keep)))
}

func (c *committer) close() {
	if c.f == nil {
		return
	}
	if err := c.f.Close(); err != nil {
		c.closeErr = fmt.Errorf("locallog: close %s: %w", c.f.Name(), err)
	}
	c.f = nil
}

// fail ends the Log with err: the batch's waiters and everything queued get
// it, and so does every later call.
func (l *Log) fail(err error, b *batch) {
	l.mu.Lock()
	l.err = err
	queued := l.queue
	l.queue, l.waiting = nil, 0
	clear(l.marks)
	l.mu.Unlock()
	if !b.completed { // a rotation after the record may fail too
		for _, it := range b.items {
			if it.done != nil {
				it.done <- err
			}
		}
	}
	for _, it := range queued {
		if it.done != nil {
			it.done <- err
		}
	}
}
