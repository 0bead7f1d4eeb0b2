package upload

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// ErrSizeMismatch: a PutIfAbsent reader held fewer or more bytes than the
// size the caller declared. Nothing is stored.
var ErrSizeMismatch = errors.New("blob size mismatch")

// CheckEOF reports, after exactly size bytes were read from r, whether r is
// at its end; a reader with more bytes is an error wrapping ErrSizeMismatch.
// Backends call it before publishing an object.
func CheckEOF(r io.Reader, size int64) error {
	var one [1]byte
	for range 100 {
		n, err := r.Read(one[:])
		if n > 0 {
			return fmt.Errorf("%w: reader has more than %d bytes", ErrSizeMismatch, size)
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return io.ErrNoProgress
}

// ShortRead turns the error of reading a put's body into the error to
// report: an early EOF becomes ErrSizeMismatch.
func ShortRead(err error, got, size int64) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: reader ended after %d of %d bytes", ErrSizeMismatch, got, size)
	}
	return err
}

// CtxReader returns r whose Read fails with ctx's error once ctx is done,
// so long copies stop promptly.
func CtxReader(ctx context.Context, r io.Reader) io.Reader {
	if ctx.Done() == nil {
		return r
	}
	return &ctxReader{ctx: ctx, r: r}
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
