package materializer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2/objstorage"
	"github.com/cockroachdb/pebble/v2/objstorage/remote"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/upload"
)

// blobLocator is the remote.Locator under which a Store's Pebble finds the
// blob store. Pebble records it (with the object name) for every external
// table, so it must not change between opens of one store.
const blobLocator remote.Locator = "dstl-blob"

// Read retries of the remote adapter: a blob-store read that fails is tried
// remoteReadAttempts times in all, each attempt bounded by
// remoteAttemptTimeout (a stalled store is given up on, not waited for
// forever: Pebble's point reads carry no context), with a backoff between.
const (
	remoteReadAttempts   = 4
	remoteAttemptTimeout = 30 * time.Second
	remoteBackoff        = 25 * time.Millisecond
)

// blobStorage is the remote.Storage Pebble reads external (lazily ingested)
// snapshot files through: each ReadAt is one ranged read of the blob store
// (upload.BlobStore: file and S3 alike), or a read of the file's local copy
// while the hydrator holds one it fetched and verified (see hydrate.go).
//
// Pebble never owns these objects: our manifests and GC do (brief
// invariant 5). So CreateObject and Delete are refused; the store never
// configures CreateOnShared, and Pebble deletes only objects it created.
//
// Verification (invariant 6): Pebble checks the checksum in the trailer of
// every block it reads from an sstable (data, index, filter, properties,
// metaindex), so a block read remotely is verified before it is used; the
// hydrator verifies a file's whole-file CRC32C against the manifest before
// Pebble copies a byte of it into the local store.
type blobStorage struct {
	blob  upload.BlobStore
	fs    vfs.FS
	sleep func(context.Context, time.Duration) error

	mu sync.Mutex
	// local maps an object name to the path of its verified local copy
	// (made by the hydrator), with a count of the hydrations using it.
	local map[string]*localCopy
	// sizes are the object sizes the manifests declare (saves a Stat).
	sizes map[string]int64
	// remoteBytes counts bytes read from the blob store by Pebble's reads
	// (not by the hydrator's own fetches).
	remoteBytes int64
	// skip maps an object name to a byte range no reader of it needs while
	// the hydrator rewrites a clipped file (see setSkip).
	skip map[string]byteRange
}

// byteRange is [from, to) of an object.
type byteRange struct{ from, to int64 }

// localCopy is an open, verified copy. Readers hold mu shared while they
// read; dropLocal closes the file under mu.
type localCopy struct {
	mu     sync.RWMutex
	f      vfs.File
	closed bool
}

var _ remote.Storage = (*blobStorage)(nil)

func newBlobStorage(blob upload.BlobStore, fs vfs.FS) *blobStorage {
	return &blobStorage{
		blob:  blob,
		fs:    fs,
		sleep: sleepCtx,
		local: map[string]*localCopy{},
		sizes: map[string]int64{},
		skip:  map[string]byteRange{},
	}
}

// sleepCtx sleeps d on the real clock, or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error { return clock.Sleep(ctx, clock.Real{}, d) }

// setSize records an object's size from a manifest.
func (b *blobStorage) setSize(name string, size int64) {
	b.mu.Lock()
	b.sizes[name] = size
	b.mu.Unlock()
}

// addLocal makes every later read of name (also through readers opened
// before: Pebble's file cache keeps them) go to the verified copy at path.
func (b *blobStorage) addLocal(name, path string) error {
	f, err := b.fs.Open(path)
	if err != nil {
		return fmt.Errorf("open local copy of %s: %w", name, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if old, ok := b.local[name]; ok {
		old.close()
	}
	b.local[name] = &localCopy{f: f}
	return nil
}

// setSkip declares that no reader of name uses the bytes [from, to): they
// lie after the last data block any table of the object still read
// remotely can reach, and before the file's meta blocks. Pebble's rewrite
// of a clipped file reads ahead 8 MiB at a time (a constant of its remote
// read handle), so past the last block in range it would fetch up to 8 MiB
// of the file that nothing uses; those bytes are handed to it as zeros
// instead of being fetched. Safe because Pebble checks every block it uses
// against the checksum in the block's trailer: a zeroed block can only
// ever fail that check (a corruption error, retried by the hydrator), never
// be taken for data.
func (b *blobStorage) setSkip(name string, from, to int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if from < to {
		b.skip[name] = byteRange{from, to}
	}
}

// clearSkip ends setSkip: every byte of name is read again.
func (b *blobStorage) clearSkip(name string) {
	b.mu.Lock()
	delete(b.skip, name)
	b.mu.Unlock()
}

// dropLocal sends reads of name back to the blob store and closes the
// copy (the caller removes the file).
func (b *blobStorage) dropLocal(name string) {
	b.mu.Lock()
	c, ok := b.local[name]
	delete(b.local, name)
	b.mu.Unlock()
	if ok {
		c.close()
	}
}

func (c *localCopy) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		c.closed = true
		_ = c.f.Close()
	}
}

// readLocal reads p at off from name's local copy, if there is one.
func (b *blobStorage) readLocal(name string, p []byte, off int64) (ok bool, err error) {
	b.mu.Lock()
	c := b.local[name]
	b.mu.Unlock()
	if c == nil {
		return false, nil
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return false, nil
	}
	n, err := c.f.ReadAt(p, off)
	if n == len(p) {
		return true, nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return true, fmt.Errorf("read local copy of %s at %d: %w", name, off, err)
}

// RemoteBytes returns the bytes Pebble read from the blob store so far.
func (b *blobStorage) RemoteBytes() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.remoteBytes
}

// ReadObject implements remote.Storage.
func (b *blobStorage) ReadObject(ctx context.Context, name string) (remote.ObjectReader, int64, error) {
	b.mu.Lock()
	size, ok := b.sizes[name]
	b.mu.Unlock()
	if !ok {
		var err error
		if size, err = b.Size(name); err != nil {
			return nil, 0, err
		}
	}
	return &remoteReader{b: b, name: name, size: size}, size, nil
}

// CreateObject implements remote.Storage: refused, Pebble never creates
// objects on the blob store (CreateOnShared is never configured).
func (b *blobStorage) CreateObject(name string) (io.WriteCloser, error) {
	return nil, fmt.Errorf("materializer: pebble may not create blob object %s: %w", name, ErrInvalidArgument)
}

// List implements remote.Storage (Pebble lists only for shared objects it
// created, which it never does here; implemented for completeness).
func (b *blobStorage) List(prefix, delimiter string) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), remoteAttemptTimeout)
	defer cancel()
	var out []string
	seen := map[string]bool{}
	for o, err := range upload.Walk(ctx, b.blob, prefix, "") {
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", prefix, err)
		}
		rest := strings.TrimPrefix(o.Key, prefix)
		if delimiter != "" {
			if i := strings.Index(rest, delimiter); i >= 0 {
				rest = rest[:i]
			}
		}
		if !seen[rest] {
			seen[rest] = true
			out = append(out, rest)
		}
	}
	return out, nil
}

// Delete implements remote.Storage: refused, the objects belong to our
// manifests and are deleted only by CollectFiles.
func (b *blobStorage) Delete(name string) error {
	return fmt.Errorf("materializer: pebble may not delete blob object %s: %w", name, ErrInvalidArgument)
}

// Size implements remote.Storage.
func (b *blobStorage) Size(name string) (int64, error) {
	var info upload.ObjectInfo
	err := b.retry(context.Background(), name, func(ctx context.Context) error {
		var err error
		info, err = b.blob.Stat(ctx, name)
		return err
	})
	if err != nil {
		return 0, err
	}
	return info.Size, nil
}

// IsNotExistError implements remote.Storage.
func (b *blobStorage) IsNotExistError(err error) bool { return errors.Is(err, upload.ErrNotFound) }

// Close implements remote.Storage; the blob store belongs to the caller.
func (b *blobStorage) Close() error { return nil }

// retry runs op until it succeeds, fails permanently (the object is
// missing, the range invalid, ctx done) or remoteReadAttempts attempts
// failed, each bounded by remoteAttemptTimeout. An exhausted retry wraps
// ErrUnavailable (the server maps it to UNAVAILABLE); a missing object
// wraps ErrSnapshotFileGone and upload.ErrNotFound.
func (b *blobStorage) retry(ctx context.Context, name string, op func(context.Context) error) error {
	var err error
	for attempt := 0; attempt < remoteReadAttempts; attempt++ {
		if attempt > 0 {
			if serr := b.sleep(ctx, remoteBackoff<<(2*(attempt-1))); serr != nil {
				return fmt.Errorf("read %s: %w (after: %w)", name, serr, err)
			}
		}
		actx, cancel := context.WithTimeout(ctx, remoteAttemptTimeout)
		err = op(actx)
		cancel()
		switch {
		case err == nil:
			return nil
		case errors.Is(err, upload.ErrNotFound):
			return fmt.Errorf("snapshot file %s: %w: %w", name, ErrSnapshotFileGone, err)
		case errors.Is(err, upload.ErrInvalidRange), errors.Is(err, upload.ErrInvalidKey):
			return fmt.Errorf("snapshot file %s: %w", name, err)
		case ctx.Err() != nil:
			return fmt.Errorf("read %s: %w", name, ctx.Err())
		}
	}
	return fmt.Errorf("snapshot file %s: %d attempts: %w: %w", name, remoteReadAttempts, ErrUnavailable, err)
}

// remoteReader reads an object with ranged reads.
type remoteReader struct {
	b    *blobStorage
	name string
	size int64
}

// ReadAt implements remote.ObjectReader: exactly len(p) bytes or an error,
// never a short read passed off as data.
func (r *remoteReader) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > r.size {
		return fmt.Errorf("read %s [%d, %d) of %d bytes: %w", r.name, off, off+int64(len(p)), r.size, upload.ErrInvalidRange)
	}
	if len(p) == 0 {
		return nil
	}
	if ok, err := r.b.readLocal(r.name, p, off); ok {
		return err
	}
	r.b.mu.Lock()
	sk, skipping := r.b.skip[r.name]
	r.b.mu.Unlock()
	if end := off + int64(len(p)); skipping && off < sk.to && sk.from < end {
		// Fetch what lies outside the skipped range, zero what is inside.
		lo, hi := max(off, sk.from), min(end, sk.to)
		clear(p[lo-off : hi-off])
		if err := r.fetch(ctx, p[:lo-off], off); err != nil {
			return err
		}
		return r.fetch(ctx, p[hi-off:], hi)
	}
	return r.fetch(ctx, p, off)
}

// fetch reads p at off from the blob store (nothing if p is empty).
func (r *remoteReader) fetch(ctx context.Context, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	err := r.b.retry(ctx, r.name, func(ctx context.Context) error {
		rc, err := r.b.blob.GetRange(ctx, r.name, off, int64(len(p)))
		if err != nil {
			return err
		}
		_, err = io.ReadFull(rc, p)
		if cerr := rc.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			// A body cut short is a failed attempt (retried), not data.
			return fmt.Errorf("read %s at %d: %w", r.name, off, errors.Join(err, upload.ErrTransient))
		}
		return nil
	})
	if err != nil {
		return err
	}
	r.b.mu.Lock()
	r.b.remoteBytes += int64(len(p))
	r.b.mu.Unlock()
	return nil
}

func (r *remoteReader) Close() error { return nil }

// remoteTable is an objstorage.Readable over a remoteReader, for the
// sstable.Readers the hydrator opens itself. Not objstorageprovider's
// NewRemoteReadable: the Readable it returns calls a nil not-exist
// classifier on the first failed read (a nil-pointer panic, seen when a
// store closed under a hydration).
type remoteTable struct{ *remoteReader }

var _ objstorage.Readable = remoteTable{}

func (t remoteTable) Size() int64 { return t.size }

// NewReadHandle implements objstorage.Readable, without read-ahead: every
// read is one ranged read of the blob store.
func (t remoteTable) NewReadHandle(objstorage.ReadBeforeSize) objstorage.ReadHandle {
	h := objstorage.MakeNoopReadHandle(t)
	return &h
}
