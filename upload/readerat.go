package upload

import (
	"context"
	"fmt"
	"io"
)

// ReaderAt returns an io.ReaderAt over the object key of the given size,
// reading through GetRange: each ReadAt is one ranged read. All reads use
// ctx, so the adapter is only valid while ctx is. Reads at or past size
// return io.EOF; a read crossing size returns the bytes up to it and io.EOF.
func ReaderAt(ctx context.Context, store BlobStore, key string, size int64) io.ReaderAt {
	return &readerAt{ctx: ctx, store: store, key: key, size: size}
}

type readerAt struct {
	ctx   context.Context
	store BlobStore
	key   string
	size  int64
}

func (r *readerAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s at %d: %w", r.key, off, ErrInvalidRange)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	n := int64(len(p))
	if rest := r.size - off; n > rest {
		n = rest
	}
	if n == 0 {
		return 0, nil
	}
	rc, err := r.store.GetRange(r.ctx, r.key, off, n)
	if err != nil {
		return 0, err
	}
	got, err := io.ReadFull(rc, p[:n])
	cerr := rc.Close()
	if err != nil {
		return got, fmt.Errorf("read %s at %d: %w", r.key, off, err)
	}
	if cerr != nil {
		return got, fmt.Errorf("read %s at %d: close: %w", r.key, off, cerr)
	}
	if got < len(p) {
		return got, io.EOF
	}
	return got, nil
}
