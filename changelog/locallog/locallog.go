// Package locallog is the node's local write-ahead log: the `local`
// durability level of the changelog. One Log per node, shared by all of its
// logs (writers), holds changes that are acknowledged but perhaps not yet on
// the blob store; after a crash Open returns them so that they can be
// uploaded.
//
// Appends are group-committed: a single committer goroutine takes every
// queued request, writes them as ONE record and fsyncs once, so concurrent
// appenders of many logs share an fsync. A record is a small segment (see
// package segments) plus metadata entries (uploaded marks, forgotten logs,
// per-log metadata). The format is specified in docs/locallog.md.
//
// Files rotate at Options.FileSize; a file all of whose changes are uploaded
// or forgotten is deleted once a durable record says so.
package locallog

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/dstl-dev/dstl/segments"
)

// Options configure Open.
type Options struct {
	// Dir holds the WAL files, e.g. <data-dir>/locallog; created if missing.
	Dir string
	// FileSize: rotate to a new file once the active one holds this many
	// bytes (default 64 MiB).
	FileSize int64
	// Codec of the records' blocks (default segments.CodecS2: fast).
	Codec segments.Codec
	// NoSync skips every fsync: tests and benchmarks only, nothing is durable.
	NoSync bool
}

// DefaultFileSize is the rotation size when Options.FileSize is 0.
const DefaultFileSize = 64 << 20

// Batching limits. A batch is cut at maxBatchBytes (estimated raw bytes) so
// that one record, and the time its appenders wait for it, stays bounded;
// an Append above maxAppendBytes is refused (it would be a record alone).
const (
	maxBatchBytes  = 16 << 20
	maxAppendBytes = 256 << 20
)

// Stats are cumulative counters, for metrics.
type Stats struct {
	Bytes   int64 // bytes written to WAL files
	Files   int64 // WAL files on disk now, the active one included
	Records int64 // records written
	Fsyncs  int64 // fsyncs of files and of the directory
	Appends int64 // Append and SetMeta calls made durable
	Changes int64 // changes written (repeated SQNs skipped)
	Deleted int64 // obsolete files deleted
}

// Log is the node's local log. Its methods are safe for concurrent use.
type Log struct {
	opts Options
	lock *os.File

	mu      sync.Mutex
	queue   []*item          // FIFO; the committer takes a prefix
	waiting int              // queued items with a waiter: these wake the committer
	marks   map[string]*item // queued, not yet taken uploaded item per log (coalescing)
	known   map[string]struct{}
	closing bool
	err     error // sticky: a failed write or fsync ends the log

	wake    chan struct{} // capacity 1: "the queue changed"
	stopped chan struct{} // closed when the committer has exited

	c committer // owned by the committer goroutine

	closeOnce sync.Once
	closeErr  error

	stats struct {
		bytes, files, records, fsyncs, appends, changes, deleted atomic.Int64
	}
}

// Open recovers the log in opts.Dir and starts its committer. New records go
// to a new file (never after a recovered tail), which starts with a snapshot
// of the recovered state; files made obsolete by that state are deleted.
// Open fails with an error wrapping ErrCorrupt if a file holds damage other
// than a torn tail of the last file.
func Open(opts Options) (*Log, *Recovered, error) {
	if opts.Dir == "" {
		return nil, nil, errors.New("locallog: Options.Dir is empty")
	}
	if opts.FileSize <= 0 {
		opts.FileSize = DefaultFileSize
	}
	switch opts.Codec {
	case segments.CodecDefault:
		opts.Codec = segments.CodecS2
	case segments.CodecNone, segments.CodecS2, segments.CodecZstd:
	default:
		return nil, nil, fmt.Errorf("locallog: unknown codec %d", opts.Codec)
	}
	if err := ensureDir(opts.Dir, opts.NoSync); err != nil {
		return nil, nil, err
	}
	lock, err := lockDir(opts.Dir)
	if err != nil {
		return nil, nil, err
	}
	l, rec, err := open(opts, lock)
	if err != nil {
		return nil, nil, errors.Join(err, lock.Close())
	}
	go l.run()
	return l, rec, nil
}

func open(opts Options, lock *os.File) (*Log, *Recovered, error) {
	files, err := listWAL(opts.Dir)
	if err != nil {
		return nil, nil, err
	}
	st, rec, err := recoverDir(opts.Dir, files, opts.NoSync)
	if err != nil {
		return nil, nil, err
	}
	l := &Log{
		opts:    opts,
		lock:    lock,
		marks:   make(map[string]*item),
		known:   make(map[string]struct{}, len(st.logs)),
		wake:    make(chan struct{}, 1),
		stopped: make(chan struct{}),
	}
	for id := range st.logs {
		l.known[id] = struct{}{}
	}
	l.c.init(l, st)
	next := uint64(1)
	if len(files) > 0 {
		next = files[len(files)-1].num + 1
	}
	if err := l.c.newFile(next); err != nil {
		return nil, nil, err
	}
	l.c.deleteObsolete()
	return l, rec, nil
}

// Close commits everything queued (pending marks included), stops the
// committer and closes the files. It returns the error that ended the log,
// if any, or a failure to delete an obsolete file. Later calls return the
// same result; later Appends fail with ErrClosed.
func (l *Log) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closing = true
		l.mu.Unlock()
		l.signal()
		<-l.stopped
		l.mu.Lock()
		err := l.err
		l.mu.Unlock()
		l.closeErr = errors.Join(err, l.c.closeErr, l.c.deleteErr, l.lock.Close())
	})
	return l.closeErr
}

// Stats returns the counters.
func (l *Log) Stats() Stats {
	return Stats{
		Bytes:   l.stats.bytes.Load(),
		Files:   l.stats.files.Load(),
		Records: l.stats.records.Load(),
		Fsyncs:  l.stats.fsyncs.Load(),
		Appends: l.stats.appends.Load(),
		Changes: l.stats.changes.Load(),
		Deleted: l.stats.deleted.Load(),
	}
}

// Dir returns the directory of the log.
func (l *Log) Dir() string { return l.opts.Dir }

func (l *Log) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}
