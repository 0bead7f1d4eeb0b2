// Package upload is the boundary between dstl and its blob store (the "DFS":
// a local directory or any S3-compatible object store). It defines the small
// BlobStore interface every backend implements, the typed errors they return,
// and the batching upload scheduler (scheduler.go) that turns many logs'
// appends into one segment object per flush.
//
// Backends live in their own packages, named after what they wrap:
// upload/file (a local file system) and upload/s3 (aws-sdk-go-v2). The
// package upload/blobstore opens one from a blob URL.
package upload

import (
	"context"
	"errors"
	"io"
	"time"
)

// BlobStore is an object store with create-only writes. Keys are
// slash-separated relative paths ("streams/orders/epochs/00000007"); they
// never start with a slash and never contain "." or ".." elements.
//
// Invariants every backend keeps (checked by upload/blobtest):
//   - PutIfAbsent is atomic: a reader sees either no object or the whole
//     object, never a prefix, and of two racing creators of one key exactly
//     one succeeds; the other gets ErrAlreadyExists.
//   - Objects are immutable once created; they are only ever deleted.
//   - List returns keys in lexicographic (byte) order.
type BlobStore interface {
	// PutIfAbsent creates key with exactly size bytes read from r. It fails
	// with ErrAlreadyExists if key exists, and leaves no object behind if it
	// fails for any other reason.
	PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error
	// Get opens the whole object. The caller closes the reader.
	Get(ctx context.Context, key string) (io.ReadCloser, error)
	// GetRange opens length bytes of the object starting at offset. A range
	// that extends past the end of the object is an error wrapping
	// ErrInvalidRange; length 0 returns an empty reader.
	GetRange(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error)
	// Stat returns the object's metadata, or ErrNotFound.
	Stat(ctx context.Context, key string) (ObjectInfo, error)
	// List returns up to limit objects whose key starts with prefix and sorts
	// after startAfter, in key order. An empty ListPage.Next means there are
	// no more; otherwise pass Next as startAfter to fetch the next page.
	// limit <= 0 means a backend default (1000).
	List(ctx context.Context, prefix, startAfter string, limit int) (ListPage, error)
	// Delete removes key. Deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// Close releases the backend's resources.
	Close() error
}

// ObjectInfo describes one stored object.
type ObjectInfo struct {
	Key     string
	Size    int64
	ModTime time.Time
}

// ListPage is one page of a List call.
type ListPage struct {
	Objects []ObjectInfo
	// Next is the key to pass as startAfter for the following page, or ""
	// when the listing is complete.
	Next string
}

// Typed errors. Backends wrap them with the key and operation, so callers
// test with errors.Is.
var (
	// ErrNotFound: the object does not exist.
	ErrNotFound = errors.New("blob not found")
	// ErrAlreadyExists: a create-only put found the key taken.
	ErrAlreadyExists = errors.New("blob already exists")
	// ErrInvalidRange: a range read outside the object.
	ErrInvalidRange = errors.New("invalid blob range")
	// ErrInvalidKey: a key that is empty, absolute, or contains "." / "..".
	ErrInvalidKey = errors.New("invalid blob key")
	// ErrTransient marks a failure that may succeed if retried (timeouts,
	// throttling, 5xx, connection resets). Anything not marked transient is
	// permanent.
	ErrTransient = errors.New("transient blob store error")
)

// IsTransient reports whether err is worth retrying.
func IsTransient(err error) bool { return errors.Is(err, ErrTransient) }
