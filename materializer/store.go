// Package materializer folds changelog changes into a Pebble LSM and
// exports key-group ranges of it as SST snapshots (brief: "background
// materializers fold the changelog into an LSM and publish incremental
// snapshots"). docs/materializer.md describes the key layout, why one
// Pebble batch per Apply makes folding idempotent and crash-safe, and the
// snapshot format.
package materializer

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/remote"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// KeyGroupRange is an inclusive range of key groups, the changelog's type.
type KeyGroupRange = keygroup.Range

// Options configure a Store. The zero value is the production default.
type Options struct {
	// FS is the file system Pebble and the import staging area use; nil is
	// the operating system's. Tests inject vfs.NewCrashableMem here.
	FS vfs.FS
	// SyncWrites makes every Apply fsync Pebble's WAL before returning.
	// Off by default: the changelog is the source of truth and Pebble
	// recovers a prefix of the committed batches after a crash, so an
	// unsynced Apply is only redone (see docs/materializer.md).
	SyncWrites bool
	// CacheSize is Pebble's block cache in bytes (default 64 MiB).
	CacheSize int64
	// MemTableSize is Pebble's memtable size in bytes (default 32 MiB).
	MemTableSize uint64
	// TargetFileSize is the size at which Export cuts an SST (default
	// 64 MiB).
	TargetFileSize int64
	// NoWAL turns Pebble's write-ahead log off: writes are cheaper (the
	// read store's fold of unique keys ran ~1.8x faster in
	// BenchmarkServerAppend), and a crash or a Close without Flush loses
	// what is still in memtables: a reopened store holds its last flushed
	// state (a prefix of the committed batches) plus every ingest and
	// excise, which are durable when they return. The applied-SQN
	// bookkeeping that lets a reopened store resume folding assumes the
	// WAL; an owner that keeps a NoWAL store across restarts needs its
	// own protocol (the server's read store: range marks, SetRangeMarks
	// with durable flushing).
	NoWAL bool
	// ExportCompression compresses the blocks of exported SSTs (default
	// zstd: snapshots are written once and kept on the blob store).
	ExportCompression *sstable.CompressionProfile
	// Logger receives Pebble's log lines; nil sends them to slog.Default()
	// (routine ones at debug level, see SlogLogger).
	Logger pebble.Logger

	// Remote is the blob store lazily imported snapshot files are read
	// from (ImportOptions.Lazy); nil: lazy imports are refused. A store
	// that holds lazily imported files must be reopened with the same blob
	// store: Pebble refers to them by name under one locator.
	Remote upload.BlobStore
	// SecondaryCacheSize, if positive, gives Pebble an on-disk cache of
	// blocks read from lazily imported files before they are hydrated.
	// Off by default: Pebble fills it before it checks a block's checksum
	// and its Download copies blocks from it without checking them, so a
	// block corrupted in transit would stay corrupt in the cache and be
	// copied into the hydrated local table (a read error for good, where
	// without the cache the next read or hydration fetches the block
	// again). The in-memory block cache (CacheSize) holds only verified
	// blocks.
	SecondaryCacheSize int64
	// HydrateBandwidth bounds the bytes per second the hydrator reads from
	// the blob store (default 64 MiB/s; negative: unbounded).
	HydrateBandwidth int64
	// RefLease is the lifetime of the store's references to the snapshot
	// files it still reads from the blob store (default 1m, at least 1s);
	// they are renewed every RefLease/3 and expire that long after a
	// crash.
	RefLease time.Duration
	// RefOwner names the store in its reference keys (for example the node
	// id; default "store").
	RefOwner string
	// Clock stamps the references (default the wall clock).
	Clock clock.Clock
}

const (
	defaultCacheSize        = 64 << 20
	defaultMemTableSize     = 32 << 20
	defaultTargetFileSize   = 64 << 20
	defaultHydrateBandwidth = 64 << 20
	defaultRefLease         = time.Minute
)

// Store is a materialized view of changelog logs: one Pebble DB holding the
// folded state of any number of streams and, for every log folded into it,
// the newest SQN applied. It is safe for concurrent use; Apply calls of one
// log are serialized, different logs fold in parallel.
type Store struct {
	dir, dbDir, stagingDir string
	fs                     vfs.FS
	opts                   Options
	wo                     *pebble.WriteOptions

	// closeMu is held shared by every operation and exclusively by Close,
	// so Close waits for running calls and Pebble is never used closed.
	closeMu sync.RWMutex
	closed  bool
	db      *pebble.DB

	mu   sync.Mutex
	logs map[string]*logState // by string(appliedKey)

	// remote and lazy: lazily imported files (nil / unused without
	// Options.Remote), see lazy.go and hydrate.go.
	remote    *blobStorage
	lazy      lazyTracker
	closeOnce sync.Once
}

// logState caches a log's applied SQN; mu serializes the log's Apply calls.
type logState struct {
	mu      sync.Mutex
	loaded  bool
	applied uint64
}

// Open opens (or creates) a store in dir: the Pebble DB lives in dir/db,
// files being imported are staged in dir/staging.
func Open(dir string, opts Options) (*Store, error) {
	fs := opts.FS
	if fs == nil {
		fs = vfs.Default
	}
	if opts.CacheSize <= 0 {
		opts.CacheSize = defaultCacheSize
	}
	if opts.MemTableSize == 0 {
		opts.MemTableSize = defaultMemTableSize
	}
	if opts.TargetFileSize <= 0 {
		opts.TargetFileSize = defaultTargetFileSize
	}
	if opts.Logger == nil {
		opts.Logger = SlogLogger(slog.Default().With("component", "pebble"))
	}
	if opts.HydrateBandwidth == 0 {
		opts.HydrateBandwidth = defaultHydrateBandwidth
	}
	if opts.RefLease <= 0 {
		opts.RefLease = defaultRefLease
	}
	opts.RefLease = max(opts.RefLease, time.Second)
	// The owner is part of a lease key, <owner>-<nonce>.<seq>.<ttl>: keep
	// it to characters that cannot be mistaken for the key's separators.
	opts.RefOwner = strings.Map(func(r rune) rune {
		if r == '-' || r == '_' || (r >= '0' && r <= '9') || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') {
			return r
		}
		return '_'
	}, opts.RefOwner)
	if opts.RefOwner == "" || len(opts.RefOwner) > 64 {
		opts.RefOwner = "store"
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	s := &Store{
		dir:        dir,
		dbDir:      fs.PathJoin(dir, "db"),
		stagingDir: fs.PathJoin(dir, "staging"),
		fs:         fs,
		opts:       opts,
		wo:         pebble.NoSync,
		logs:       make(map[string]*logState),
	}
	if opts.SyncWrites {
		s.wo = pebble.Sync
	}
	// A crash may leave half-copied import files behind; they are never
	// referenced by the DB, so start from an empty staging area.
	if err := fs.RemoveAll(s.stagingDir); err != nil {
		return nil, fmt.Errorf("materializer %s: clear staging: %w", dir, err)
	}
	for _, d := range []string{s.stagingDir, s.dbDir} {
		if err := fs.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("materializer %s: %w", dir, err)
		}
	}
	// Make the directories themselves durable (Pebble syncs only inside
	// its own directory), so a crash cannot lose the whole store.
	for _, d := range []string{dir, fs.PathDir(dir)} {
		if err := syncDir(fs, d); err != nil {
			return nil, fmt.Errorf("materializer %s: %w", dir, err)
		}
	}
	cache := pebble.NewCache(opts.CacheSize)
	defer cache.Unref()
	po := &pebble.Options{
		FS:    fs,
		Cache: cache,
		// Excise and IngestAndExcise need FormatVirtualSSTables or newer.
		FormatMajorVersion: pebble.FormatNewest,
		MemTableSize:       opts.MemTableSize,
		// Merge is a plain append: Pebble's default merger
		// ("pebble.concatenate") concatenates operands oldest first.
		Merger: pebble.DefaultMerger,
		Logger: opts.Logger,
		// The write-ahead log is what makes unflushed batches survive a
		// crash; without it (Options.NoWAL) the owner's protocol decides
		// what a reopened store is worth.
		DisableWAL: opts.NoWAL,
	}
	// Pebble's default for a block whose checksum does not match is to
	// call Logger.Fatalf (a crash). A corrupt block is already refused to
	// the reader that asked for it (an error naming the file: invariant 6);
	// crashing the node as well helps nothing, and with lazily imported
	// files the bytes come over the network from a store we do not
	// control. So it is reported and the read fails.
	po.EventListener = &pebble.EventListener{
		DataCorruption: func(info pebble.DataCorruptionInfo) {
			opts.Logger.Errorf("materializer %s: %s", dir, info)
		},
	}
	if opts.Remote != nil {
		s.remote = newBlobStorage(opts.Remote, fs)
		po.Experimental.RemoteStorage = remote.MakeSimpleFactory(map[remote.Locator]remote.Storage{blobLocator: s.remote})
		po.Experimental.SecondaryCacheSizeBytes = max(opts.SecondaryCacheSize, 0)
		// No read-triggered compactions: reads of a lazily imported range
		// (its runs overlap) would make Pebble rewrite the external tables
		// at once, reading them from the blob store outside the hydrator's
		// bandwidth bound. Size-triggered compactions still may (see
		// docs/materializer.md, "Lazy import").
		po.Experimental.ReadSamplingMultiplier = -1
	}
	db, err := pebble.Open(s.dbDir, po)
	if err != nil {
		return nil, fmt.Errorf("materializer %s: open pebble: %w", dir, err)
	}
	s.db = db
	if opts.Remote != nil {
		if err := s.openLazy(); err != nil {
			s.stopLazy()
			s.releaseRefs()
			return nil, errors.Join(fmt.Errorf("materializer %s: %w", dir, err), db.Close())
		}
	}
	return s, nil
}

func syncDir(fs vfs.FS, dir string) error {
	d, err := fs.OpenDir(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// Close closes the store, waiting for running calls. Unsynced applies are
// flushed to the WAL file (not fsynced) by Pebble's Close.
//
// The hydrator is stopped first (Pebble's Download must never run on a
// closed DB); the store's references to the files it still reads from the
// blob store are deleted last, once Pebble reads nothing any more. A
// reopened store references what is still remote again before it serves
// anything; between the two, the files are protected only by their
// snapshot records and CollectFiles' grace periods.
func (s *Store) Close() error {
	s.stopLazy()
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.db.Close()
	s.releaseRefs()
	if err != nil {
		return fmt.Errorf("materializer %s: close: %w", s.dir, err)
	}
	return nil
}

// stopLazy stops the hydrator and waits for it.
func (s *Store) stopLazy() {
	s.closeOnce.Do(func() {
		if s.lazy.stop != nil {
			s.lazy.stop()
			<-s.lazy.done
		}
	})
}

// releaseRefs deletes the store's references (Close, after Pebble closed).
func (s *Store) releaseRefs() {
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	for k, ref := range s.lazy.refs {
		ref.lease.release(context.Background())
		delete(s.lazy.refs, k)
	}
}

// Flush makes every applied change durable (WAL fsync and memtable flush).
func (s *Store) Flush() error {
	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()
	if err := s.db.Flush(); err != nil {
		return fmt.Errorf("materializer %s: flush: %w", s.dir, err)
	}
	return nil
}

// acquire takes closeMu shared; the caller releases it with RUnlock.
func (s *Store) acquire() error {
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		return fmt.Errorf("materializer %s: %w", s.dir, ErrClosed)
	}
	return nil
}

func (s *Store) logState(key []byte) *logState {
	s.mu.Lock()
	defer s.mu.Unlock()
	ls, ok := s.logs[string(key)]
	if !ok {
		ls = &logState{}
		s.logs[string(key)] = ls
	}
	return ls
}

// load reads the log's applied SQN from Pebble once; ls.mu is held.
func (s *Store) load(ls *logState, key []byte) error {
	if ls.loaded {
		return nil
	}
	v, closer, err := s.db.Get(key)
	switch {
	case errors.Is(err, pebble.ErrNotFound):
		ls.applied = 0
	case err != nil:
		return fmt.Errorf("read applied SQN: %w", err)
	default:
		sqn, derr := decodeSQN(key, v)
		closer.Close()
		if derr != nil {
			return derr
		}
		ls.applied = sqn
	}
	ls.loaded = true
	return nil
}

// AppliedSQN returns the newest SQN of a log folded into the store (0:
// none).
func (s *Store) AppliedSQN(stream, logID string) (uint64, error) {
	key, err := AppliedKey(stream, logID)
	if err != nil {
		return 0, err
	}
	if err := s.acquire(); err != nil {
		return 0, err
	}
	defer s.closeMu.RUnlock()
	ls := s.logState(key)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if err := s.load(ls, key); err != nil {
		return 0, fmt.Errorf("materializer: stream %s log %s: %w", stream, logID, err)
	}
	return ls.applied, nil
}

// Applied returns the applied SQN of every log of a stream folded into the
// store.
func (s *Store) Applied(stream string) (map[string]uint64, error) {
	if err := s.acquire(); err != nil {
		return nil, err
	}
	defer s.closeMu.RUnlock()
	return readApplied(s.db, stream)
}

// reader is what a DB and a Snapshot have in common.
type reader interface {
	NewIter(*pebble.IterOptions) (*pebble.Iterator, error)
}

func readApplied(r reader, stream string) (map[string]uint64, error) {
	lo, hi, err := AppliedBounds(stream)
	if err != nil {
		return nil, err
	}
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return nil, fmt.Errorf("materializer: stream %s: applied SQNs: %w", stream, err)
	}
	out := make(map[string]uint64)
	for ok := it.First(); ok; ok = it.Next() {
		_, logID, err := DecodeAppliedKey(it.Key())
		if err == nil {
			out[logID], err = decodeSQN(it.Key(), it.Value())
		}
		if err != nil {
			it.Close()
			return nil, fmt.Errorf("materializer: stream %s: %w", stream, err)
		}
	}
	if err := it.Close(); err != nil {
		return nil, fmt.Errorf("materializer: stream %s: applied SQNs: %w", stream, err)
	}
	return out, nil
}

// Apply folds changes of one log of a stream into the store, in SQN order.
// It is idempotent: changes with an SQN at or below the log's applied SQN
// are skipped, so a batch may be replayed any number of times, and a batch
// overlapping the applied point applies only its new suffix. The changes
// and the log's new applied SQN are written in ONE Pebble batch, so after a
// crash the store holds exactly the changes up to its recorded applied SQN.
//
// Every change must have SQN ≥ 1, strictly increasing, and a LogID equal to
// logID or empty; gaps are fine (a replay filtered by key group has them).
// Key and Value are copied: callers may reuse them when Apply returns.
func (s *Store) Apply(stream, logID string, changes []segments.Change) error {
	return s.ApplyThrough(stream, logID, changes, 0)
}

// ApplyThrough is Apply that also advances the log's applied SQN to
// through when it is above the last change: a replay restricted to some key
// groups knows the log is folded up to through even if its last changes
// were for other key groups. through 0 means the last change's SQN.
func (s *Store) ApplyThrough(stream, logID string, changes []segments.Change, through uint64) error {
	key, err := AppliedKey(stream, logID)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		return fmt.Errorf("materializer: stream %s log %s: %w", stream, logID, err)
	}
	var last uint64
	for i := range changes {
		c := &changes[i]
		switch {
		case c.LogID != "" && c.LogID != logID:
			return fail(fmt.Errorf("change %d (SQN %d) belongs to log %q: %w", i, c.SQN, c.LogID, ErrOutOfOrder))
		case c.SQN <= last:
			return fail(fmt.Errorf("change %d: SQN %d after %d: %w", i, c.SQN, last, ErrOutOfOrder))
		case c.Op < segments.OpPut || c.Op > segments.OpClear:
			return fail(fmt.Errorf("change %d (SQN %d): %v: %w", i, c.SQN, c.Op, ErrInvalidArgument))
		case len(c.State) > MaxStateLen:
			return fail(fmt.Errorf("change %d (SQN %d): state name of %d bytes: %w", i, c.SQN, len(c.State), ErrInvalidArgument))
		}
		last = c.SQN
	}
	if through == 0 {
		through = last
	} else if through < last {
		return fail(fmt.Errorf("through %d below the last change's SQN %d: %w", through, last, ErrOutOfOrder))
	}
	if through == 0 {
		return nil // nothing to apply
	}

	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()
	ls := s.logState(key)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if err := s.load(ls, key); err != nil {
		return fail(err)
	}
	if through <= ls.applied {
		return nil // a replay of what is already folded
	}

	b := s.db.NewBatch()
	defer b.Close()
	var kbuf []byte
	for i := range changes {
		c := &changes[i]
		if c.SQN <= ls.applied {
			continue
		}
		kbuf = appendStatePrefix(kbuf[:0], stream, c.KeyGroup, c.State)
		switch c.Op {
		case segments.OpPut:
			err = b.Set(append(kbuf, c.Key...), c.Value, nil)
		case segments.OpDelete:
			err = b.Delete(append(kbuf, c.Key...), nil)
		case segments.OpMerge:
			err = b.Merge(append(kbuf, c.Key...), c.Value, nil)
		case segments.OpClear:
			err = b.DeleteRange(kbuf, prefixEnd(kbuf), nil)
		}
		if err != nil {
			return fail(fmt.Errorf("SQN %d: %w", c.SQN, err))
		}
	}
	if err := b.Set(key, encodeSQN(through), nil); err != nil {
		return fail(err)
	}
	if err := b.Commit(s.wo); err != nil {
		return fail(fmt.Errorf("commit through SQN %d: %w", through, err))
	}
	ls.applied = through
	return nil
}

// Get returns the value of a key, or ok=false if it has none.
func (s *Store) Get(stream string, kg uint16, state string, key []byte) (value []byte, ok bool, err error) {
	k, err := AppendDataKey(nil, stream, kg, state, key)
	if err != nil {
		return nil, false, err
	}
	if err := s.acquire(); err != nil {
		return nil, false, err
	}
	defer s.closeMu.RUnlock()
	v, closer, err := s.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("materializer: get %s/%d/%s: %w", stream, kg, state, err)
	}
	value = append([]byte(nil), v...)
	return value, true, closer.Close()
}

// Entry is one key of a scan. Key and Value are copies owned by the caller.
type Entry struct {
	KeyGroup uint16
	Key      []byte
	Value    []byte
}

// Position is a point in a scan's order (key group, then user key).
type Position struct {
	KeyGroup uint16
	Key      []byte
}

// ScanOptions narrow a scan.
type ScanOptions struct {
	// Prefix keeps only user keys starting with it.
	Prefix []byte
	// After resumes strictly after this position (the last entry of the
	// previous page); nil starts at the beginning.
	After *Position
	// Limit stops after this many entries; ≤ 0 means no limit.
	Limit int
}

// Scan yields the keys of one state in key groups r of a stream, ordered by
// key group then user key. The whole scan reads one consistent point-in-time
// view (one Pebble iterator), so it never sees half of an Apply. The store
// cannot close while a scan is being consumed.
func (s *Store) Scan(ctx context.Context, stream string, r KeyGroupRange, state string, o ScanOptions) iter.Seq2[Entry, error] {
	return func(yield func(Entry, error) bool) {
		if err := checkStream(stream); err != nil {
			yield(Entry{}, err)
			return
		}
		if err := checkState(state); err != nil {
			yield(Entry{}, err)
			return
		}
		if r.Lo > r.Hi {
			yield(Entry{}, fmt.Errorf("scan key groups %s: %w", r, ErrInvalidArgument))
			return
		}
		if err := s.acquire(); err != nil {
			yield(Entry{}, err)
			return
		}
		defer s.closeMu.RUnlock()
		lo := r.Lo
		if o.After != nil {
			if o.After.KeyGroup > r.Hi {
				return
			}
			lo = max(lo, o.After.KeyGroup)
		}
		it, err := s.db.NewIterWithContext(ctx, &pebble.IterOptions{})
		if err != nil {
			yield(Entry{}, fmt.Errorf("materializer: scan %s: %w", stream, err))
			return
		}
		defer it.Close()
		n := 0
		for kg := uint32(lo); kg <= uint32(r.Hi); kg++ {
			if err := ctx.Err(); err != nil {
				yield(Entry{}, err)
				return
			}
			start, end, _ := StateBounds(stream, uint16(kg), state, o.Prefix)
			it.SetBounds(start, end)
			prefixLen := len(start) - len(o.Prefix)
			var ok bool
			if o.After != nil && uint32(o.After.KeyGroup) == kg {
				seek := append(start[:prefixLen:prefixLen], o.After.Key...)
				seek = append(seek, 0) // the smallest key after After.Key
				ok = it.SeekGE(seek)
			} else {
				ok = it.First()
			}
			for ; ok; ok = it.Next() {
				v, err := it.ValueAndErr()
				if err != nil {
					yield(Entry{}, fmt.Errorf("materializer: scan %s: %w", stream, err))
					return
				}
				e := Entry{
					KeyGroup: uint16(kg),
					Key:      append([]byte(nil), it.Key()[prefixLen:]...),
					Value:    append([]byte(nil), v...),
				}
				if !yield(e, nil) {
					return
				}
				if n++; o.Limit > 0 && n >= o.Limit {
					return
				}
			}
			if err := it.Error(); err != nil {
				yield(Entry{}, fmt.Errorf("materializer: scan %s: %w", stream, err))
				return
			}
		}
	}
}

// Row is one key of Rows. Key and Value are only valid until the next
// iteration.
type Row struct {
	KeyGroup uint16
	State    string
	Key      []byte
	Value    []byte
}

// Rows yields every key of every state in key groups r of a stream, in key
// order (key group, then state name by length and bytes, then user key),
// from one consistent point-in-time view. CDC's snapshots and diffs are
// defined by this order.
func (s *Store) Rows(ctx context.Context, stream string, r KeyGroupRange) iter.Seq2[Row, error] {
	return func(yield func(Row, error) bool) {
		start, end, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
		if err != nil {
			yield(Row{}, err)
			return
		}
		if err := s.acquire(); err != nil {
			yield(Row{}, err)
			return
		}
		defer s.closeMu.RUnlock()
		it, err := s.db.NewIterWithContext(ctx, &pebble.IterOptions{LowerBound: start, UpperBound: end})
		if err != nil {
			yield(Row{}, fmt.Errorf("materializer: rows of %s: %w", stream, err))
			return
		}
		defer it.Close()
		for ok := it.First(); ok; ok = it.Next() {
			if err := ctx.Err(); err != nil {
				yield(Row{}, err)
				return
			}
			dk, err := DecodeDataKey(it.Key())
			if err != nil {
				yield(Row{}, fmt.Errorf("materializer: rows of %s: %w", stream, err))
				return
			}
			v, err := it.ValueAndErr()
			if err != nil {
				yield(Row{}, fmt.Errorf("materializer: rows of %s: %w", stream, err))
				return
			}
			if !yield(Row{KeyGroup: dk.KeyGroup, State: dk.State, Key: dk.Key, Value: v}, nil) {
				return
			}
		}
		if err := it.Error(); err != nil {
			yield(Row{}, fmt.Errorf("materializer: rows of %s: %w", stream, err))
		}
	}
}
