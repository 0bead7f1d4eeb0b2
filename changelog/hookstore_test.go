package changelog

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/dstl-dev/dstl/upload"
)

// hookStore (the review tests' fault injector) injects precise faults: a put that lands and then reports a
// transient error (lost acknowledgement), followed by one failing listing.
type hookStore struct {
	upload.BlobStore
	mu          sync.Mutex
	lostAckPut  func(key string) bool // put lands, then a transient error
	failLists   int                   // the next n listings of failListOf fail
	failListOf  string
	deletedKeys []string
	// holdPut, if set and true for a key, captures that put and blocks it
	// until its context ends (a PUT in flight when the process dies).
	holdPut func(key string) bool
	held    chan heldPut
	// listHook, if set, wraps every listing (inner performs it).
	listHook func(prefix string, inner func() (upload.ListPage, error)) (upload.ListPage, error)
}

type heldPut struct {
	key  string
	data []byte
}

func (h *hookStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	h.mu.Lock()
	f := h.lostAckPut
	hold := h.holdPut
	if hold != nil && hold(key) {
		h.holdPut = nil
		h.mu.Unlock()
		data, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		h.held <- heldPut{key: key, data: data}
		<-ctx.Done()
		return ctx.Err()
	}
	h.mu.Unlock()
	err := h.BlobStore.PutIfAbsent(ctx, key, r, size)
	if err == nil && f != nil && f(key) {
		h.mu.Lock()
		h.failLists, h.failListOf = 1, "/journal/" // the re-read that would find the nonce fails
		h.lostAckPut = nil
		h.mu.Unlock()
		return fmt.Errorf("put %s: connection reset after the request was sent: %w", key, upload.ErrTransient)
	}
	return err
}

func (h *hookStore) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	h.mu.Lock()
	if hook := h.listHook; hook != nil {
		h.mu.Unlock()
		return hook(prefix, func() (upload.ListPage, error) { return h.BlobStore.List(ctx, prefix, startAfter, limit) })
	}
	if h.failLists > 0 && strings.Contains(prefix, h.failListOf) {
		h.failLists--
		h.mu.Unlock()
		return upload.ListPage{}, fmt.Errorf("list %s: 503 slow down: %w", prefix, upload.ErrTransient)
	}
	h.mu.Unlock()
	return h.BlobStore.List(ctx, prefix, startAfter, limit)
}

func (h *hookStore) Delete(ctx context.Context, key string) error {
	h.mu.Lock()
	h.deletedKeys = append(h.deletedKeys, key)
	h.mu.Unlock()
	return h.BlobStore.Delete(ctx, key)
}
