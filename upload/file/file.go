// Package file is the local file-system BlobStore: each object is one
// regular file under a root directory, at the path named by its key.
//
// Writes are create-only and atomic: PutIfAbsent writes a temporary file in
// the root's ".tmp" directory, fsyncs it, publishes it with link(2) (which
// fails if the name is taken, so exactly one of racing creators wins), and
// fsyncs the parent directory. Readers therefore see no object or the whole
// object. Deletes are not fsynced: a delete lost in a crash leaves garbage
// that the next GC pass deletes again.
//
// A key cannot be both an object and a directory of other objects here
// ("a" and "a/b"); S3 allows it, dstl's key layout never needs it. Such a
// put fails with a permanent error.
package file

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/dstl-dev/dstl/upload"
)

// tmpDir is the scratch directory under the root (upload.ReservedPrefix, so
// no key can name it). List skips it.
const tmpDir = upload.ReservedPrefix

// staleTemp is how old a leftover temporary file must be for Open to remove
// it (a put that takes longer than this is not expected).
const staleTemp = time.Hour

// copyChunk is how many bytes a put copies between context checks.
const copyChunk = 1 << 20

// Store is a BlobStore in a local directory. It is safe for concurrent use,
// also by several processes sharing the directory.
type Store struct {
	root string
}

var _ upload.BlobStore = (*Store)(nil)

// Open opens (creating if needed) the store rooted at the absolute directory
// root, and removes temporary files older than an hour left by crashed puts.
func Open(root string) (*Store, error) {
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("file blob store: root %q is not an absolute path", root)
	}
	root = filepath.Clean(root)
	if err := os.MkdirAll(filepath.Join(root, tmpDir), 0o755); err != nil {
		return nil, fmt.Errorf("file blob store: open %s: %w", root, err)
	}
	s := &Store{root: root}
	if err := s.tidyTemp(time.Now().Add(-staleTemp)); err != nil {
		return nil, fmt.Errorf("file blob store: open %s: tidy temporary files: %w", root, err)
	}
	return s, nil
}

// Root returns the store's root directory.
func (s *Store) Root() string { return s.root }

func (s *Store) tidyTemp(before time.Time) error {
	dir := filepath.Join(s.root, tmpDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		info, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if info.Mode().IsRegular() && info.ModTime().Before(before) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

func (s *Store) path(key string) string {
	return filepath.Join(s.root, filepath.FromSlash(key))
}

func wrap(op, key string, err error) error {
	return fmt.Errorf("file blob store: %s %s: %w", op, key, err)
}

// PutIfAbsent implements upload.BlobStore.
func (s *Store) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	if err := upload.ValidateKey(key); err != nil {
		return wrap("put", key, err)
	}
	if size < 0 {
		return wrap("put", key, fmt.Errorf("negative size %d", size))
	}
	if err := ctx.Err(); err != nil {
		return wrap("put", key, err)
	}
	if err := s.put(ctx, key, r, size); err != nil {
		return wrap("put", key, err)
	}
	return nil
}

func (s *Store) put(ctx context.Context, key string, r io.Reader, size int64) (err error) {
	dst := s.path(key)
	// Fail fast (before copying) if the key is taken; link(2) below is the
	// authoritative check.
	if err := s.checkFree(dst); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Join(s.root, tmpDir), "put-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	defer func() {
		if tmp != nil {
			_ = tmp.Close()
		}
		// Best-effort: once the object is published, failing to remove the
		// temporary name must not fail the put; Open tidies leftovers.
		_ = os.Remove(tmpName)
	}()
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	buf := make([]byte, max(1, min(size, copyChunk)))
	n, err := io.CopyBuffer(onlyWriter{tmp}, io.LimitReader(upload.CtxReader(ctx, r), size), buf)
	if err != nil {
		return err
	}
	if n < size {
		return upload.ShortRead(io.ErrUnexpectedEOF, n, size)
	}
	if err := upload.CheckEOF(r, size); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		tmp = nil
		return err
	}
	tmp = nil
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.publish(tmpName, dst)
}

// onlyWriter hides everything but Write, so io.CopyBuffer copies through
// its buffer (checking the context on every chunk) rather than ReadFrom.
type onlyWriter struct{ w io.Writer }

func (o onlyWriter) Write(p []byte) (int, error) { return o.w.Write(p) }

func (s *Store) checkFree(dst string) error {
	info, err := os.Lstat(dst)
	switch {
	case err == nil && info.IsDir():
		return errDirConflict
	case err == nil:
		return upload.ErrAlreadyExists
	case errors.Is(err, syscall.ENOTDIR):
		return errFileConflict
	}
	return nil
}

var (
	errDirConflict  = errors.New("key names a directory of other keys (the file backend cannot store both a/b and a)")
	errFileConflict = errors.New("a prefix of the key is an object (the file backend cannot store both a and a/b)")
)

// publish links tmp to dst, creating dst's parent directories, and makes the
// new name durable.
func (s *Store) publish(tmp, dst string) error {
	dir := filepath.Dir(dst)
	// A concurrent Delete may remove an empty parent between mkdir and link:
	// retry a few times.
	for attempt := 0; ; attempt++ {
		if err := s.mkdirs(dir); err != nil {
			if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.EEXIST) {
				return errFileConflict
			}
			// A concurrent Delete pruned an empty parent between our
			// check and our mkdir: create the path again.
			if errors.Is(err, fs.ErrNotExist) && attempt < 10 {
				continue
			}
			return err
		}
		err := os.Link(tmp, dst)
		if err == nil {
			break
		}
		switch {
		case errors.Is(err, fs.ErrExist):
			if info, serr := os.Lstat(dst); serr == nil && info.IsDir() {
				return errDirConflict
			}
			return upload.ErrAlreadyExists
		case errors.Is(err, syscall.ENOTDIR):
			return errFileConflict
		case errors.Is(err, fs.ErrNotExist) && attempt < 10:
			continue
		}
		return err
	}
	return syncDir(dir)
}

// mkdirs creates dir and its missing parents below the root, fsyncing the
// parent of every directory it creates.
func (s *Store) mkdirs(dir string) error {
	if dir == s.root {
		return nil
	}
	info, err := os.Stat(dir)
	if err == nil {
		if !info.IsDir() {
			return syscall.ENOTDIR
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	parent := filepath.Dir(dir)
	if err := s.mkdirs(parent); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			info, serr := os.Stat(dir)
			if serr == nil && info.IsDir() {
				return nil
			}
			if errors.Is(serr, fs.ErrNotExist) {
				// Created by another put and pruned by a Delete since:
				// the caller retries.
				return serr
			}
		}
		return err
	}
	return syncDir(parent)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// open opens key's file for reading, mapping a missing file (or a directory)
// to ErrNotFound.
func (s *Store) open(key string) (*os.File, os.FileInfo, error) {
	f, err := os.Open(s.path(key))
	if err != nil {
		return nil, nil, notFound(err)
	}
	info, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, nil, err
	}
	if !info.Mode().IsRegular() {
		_ = f.Close()
		return nil, nil, upload.ErrNotFound
	}
	return f, info, nil
}

func notFound(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return fmt.Errorf("%w (%v)", upload.ErrNotFound, err)
	}
	return err
}

// Get implements upload.BlobStore.
func (s *Store) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	if err := upload.ValidateKey(key); err != nil {
		return nil, wrap("get", key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, wrap("get", key, err)
	}
	f, _, err := s.open(key)
	if err != nil {
		return nil, wrap("get", key, err)
	}
	return &reader{ctx: ctx, r: f, c: f}, nil
}

// GetRange implements upload.BlobStore.
func (s *Store) GetRange(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	if err := upload.ValidateKey(key); err != nil {
		return nil, wrap("get range", key, err)
	}
	if offset < 0 || length < 0 {
		return nil, wrap("get range", key, fmt.Errorf("%w: offset %d length %d", upload.ErrInvalidRange, offset, length))
	}
	if err := ctx.Err(); err != nil {
		return nil, wrap("get range", key, err)
	}
	f, info, err := s.open(key)
	if err != nil {
		return nil, wrap("get range", key, err)
	}
	if size := info.Size(); offset > size || length > size-offset {
		_ = f.Close()
		return nil, wrap("get range", key, fmt.Errorf("%w: bytes %d+%d of a %d-byte object", upload.ErrInvalidRange, offset, length, size))
	}
	return &reader{ctx: ctx, r: io.NewSectionReader(f, offset, length), c: f}, nil
}

// reader fails once its context is done.
type reader struct {
	ctx context.Context
	r   io.Reader
	c   io.Closer
}

func (r *reader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

func (r *reader) Close() error { return r.c.Close() }

// Stat implements upload.BlobStore.
func (s *Store) Stat(ctx context.Context, key string) (upload.ObjectInfo, error) {
	if err := upload.ValidateKey(key); err != nil {
		return upload.ObjectInfo{}, wrap("stat", key, err)
	}
	if err := ctx.Err(); err != nil {
		return upload.ObjectInfo{}, wrap("stat", key, err)
	}
	info, err := os.Stat(s.path(key))
	if err != nil {
		return upload.ObjectInfo{}, wrap("stat", key, notFound(err))
	}
	if !info.Mode().IsRegular() {
		return upload.ObjectInfo{}, wrap("stat", key, upload.ErrNotFound)
	}
	return upload.ObjectInfo{Key: key, Size: info.Size(), ModTime: info.ModTime()}, nil
}

// Delete implements upload.BlobStore. It removes parent directories left
// empty, best-effort, up to (not including) the root.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := upload.ValidateKey(key); err != nil {
		return wrap("delete", key, err)
	}
	if err := ctx.Err(); err != nil {
		return wrap("delete", key, err)
	}
	p := s.path(key)
	info, err := os.Lstat(p)
	if err != nil {
		if errors.Is(notFound(err), upload.ErrNotFound) {
			return nil
		}
		return wrap("delete", key, err)
	}
	if info.IsDir() {
		return nil // not an object
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return wrap("delete", key, err)
	}
	for dir := filepath.Dir(p); dir != s.root && strings.HasPrefix(dir, s.root); dir = filepath.Dir(dir) {
		if os.Remove(dir) != nil {
			break // not empty (or gone): stop
		}
	}
	return nil
}

// List implements upload.BlobStore. It walks the directory tree in key
// order, skipping subtrees that sort entirely at or before startAfter or
// outside prefix.
func (s *Store) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	if err := ctx.Err(); err != nil {
		return upload.ListPage{}, fmt.Errorf("file blob store: list %q: %w", prefix, err)
	}
	if limit <= 0 {
		limit = 1000
	}
	w := walker{ctx: ctx, prefix: prefix, startAfter: startAfter, limit: limit + 1}
	if err := w.walk(s.root, ""); err != nil && !errors.Is(err, errDone) {
		return upload.ListPage{}, fmt.Errorf("file blob store: list %q: %w", prefix, err)
	}
	page := upload.ListPage{Objects: w.out}
	if len(page.Objects) > limit {
		page.Objects = page.Objects[:limit]
		page.Next = page.Objects[limit-1].Key
	}
	return page, nil
}

var errDone = errors.New("list page full")

type walker struct {
	ctx                context.Context
	prefix, startAfter string
	limit              int
	out                []upload.ObjectInfo
}

type entry struct {
	sortKey string // name, plus "/" for a directory: sorts like the keys below it
	name    string
	dir     bool
}

// walk lists directory dir, whose keys all start with keyPrefix ("" or
// "a/b/").
func (w *walker) walk(dir, keyPrefix string) error {
	if err := w.ctx.Err(); err != nil {
		return err
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && keyPrefix != "" {
			return nil // removed by a concurrent delete
		}
		return err
	}
	entries := make([]entry, 0, len(des))
	for _, de := range des {
		name := de.Name()
		switch {
		case keyPrefix == "" && name == tmpDir:
		case de.IsDir():
			entries = append(entries, entry{sortKey: name + "/", name: name, dir: true})
		case de.Type().IsRegular():
			entries = append(entries, entry{sortKey: name, name: name})
		}
	}
	slices.SortFunc(entries, func(a, b entry) int { return strings.Compare(a.sortKey, b.sortKey) })
	// Skip entries at or before startAfter without looking at them.
	if strings.HasPrefix(w.startAfter, keyPrefix) {
		after := w.startAfter[len(keyPrefix):]
		i, _ := slices.BinarySearchFunc(entries, after, func(e entry, t string) int {
			if e.dir && strings.HasPrefix(t, e.sortKey) {
				return 0 // startAfter is inside this subtree: keep it
			}
			return strings.Compare(e.sortKey, t)
		})
		entries = entries[i:]
	}
	for _, e := range entries {
		key := keyPrefix + e.sortKey
		if !strings.HasPrefix(key, w.prefix) && !(e.dir && strings.HasPrefix(w.prefix, key)) {
			if key > w.prefix {
				return errDone // everything after sorts past the prefix too
			}
			continue
		}
		if e.dir {
			if w.startAfter >= key && !strings.HasPrefix(w.startAfter, key) {
				continue
			}
			if err := w.walk(filepath.Join(dir, e.name), key); err != nil {
				return err
			}
			continue
		}
		if key <= w.startAfter {
			continue
		}
		info, err := os.Lstat(filepath.Join(dir, e.name))
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted concurrently
		}
		if err != nil {
			return err
		}
		w.out = append(w.out, upload.ObjectInfo{Key: key, Size: info.Size(), ModTime: info.ModTime()})
		if len(w.out) >= w.limit {
			return errDone
		}
	}
	return nil
}

// Close implements upload.BlobStore; the file store holds no resources.
func (s *Store) Close() error { return nil }
