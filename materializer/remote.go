package materializer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2/objstorage/remote"
	"github.com/cockroachdb/pebble/v2/vfs"

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
// once the hydrator has fetched and verified it (see hydrate.go).
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
}

type localCopy struct {
	path string
	refs int
}

var _ remote.Storage = (*blobStorage)(nil)

func newBlobStorage(blob upload.BlobStore, fs vfs.FS) *blobStorage {
	return &blobStorage{
		blob:  blob,
		fs:    fs,
		sleep: sleepCtx,
		local: map[string]*localCopy{},
		sizes: map[string]int64{},
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// setSize records an object's size from a manifest.
func (b *blobStorage) setSize(name string, size int64) {
	b.mu.Lock()
	b.sizes[name] = size
	b.mu.Unlock()
}

// addLocal makes reads of name go to the verified copy at path.
func (b *blobStorage) addLocal(name, path string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if c, ok := b.local[name]; ok {
		c.refs++
		return
	}
	b.local[name] = &localCopy{path: path, refs: 1}
}

// dropLocal releases a use of name's local copy; it returns true when the
// copy is no longer used (the caller removes the file).
func (b *blobStorage) dropLocal(name string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	c, ok := b.local[name]
	if !ok {
		return false
	}
	if c.refs--; c.refs > 0 {
		return false
	}
	delete(b.local, name)
	return true
}

func (b *blobStorage) localPath(name string) (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c, ok := b.local[name]
	if !ok {
		return "", false
	}
	return c.path, true
}

// RemoteBytes returns the bytes Pebble read from the blob store so far.
func (b *blobStorage) RemoteBytes() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.remoteBytes
}

// ReadObject implements remote.Storage.
func (b *blobStorage) ReadObject(ctx context.Context, name string) (remote.ObjectReader, int64, error) {
	if path, ok := b.localPath(name); ok {
		f, err := b.fs.Open(path)
		if err == nil {
			st, err := f.Stat()
			if err != nil {
				_ = f.Close()
				return nil, 0, fmt.Errorf("local copy of %s: %w", name, err)
			}
			return &localReader{f: f, name: name}, st.Size(), nil
		}
		// The copy went (hydration finished meanwhile): read remotely.
	}
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

// localReader reads a hydrated, verified local copy.
type localReader struct {
	f    vfs.File
	name string
}

func (l *localReader) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := l.f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read local copy of %s at %d: %w", l.name, off, err)
}

func (l *localReader) Close() error { return l.f.Close() }
