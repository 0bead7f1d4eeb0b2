package dstl_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/dstl-dev/dstl/changelog"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/upload"
)

// lostCloseStore, once armed, loses the acknowledgement of the next
// journal entry (the entry lands, the caller gets a transient error) and
// fails every journal listing until disarmed, so nothing can find the
// entry: the outcome of the close is unknown.
type lostCloseStore struct {
	upload.BlobStore
	mu        sync.Mutex
	armed     bool
	failLists bool
}

func (s *lostCloseStore) arm(on bool) {
	s.mu.Lock()
	s.armed, s.failLists = on, false
	s.mu.Unlock()
}

func (s *lostCloseStore) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	err := s.BlobStore.PutIfAbsent(ctx, key, r, size)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil && s.armed && strings.Contains(key, "/journal/") {
		s.armed, s.failLists = false, true
		return fmt.Errorf("put %s: connection reset after the request was sent: %w", key, upload.ErrTransient)
	}
	return err
}

func (s *lostCloseStore) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	s.mu.Lock()
	if s.failLists && strings.Contains(prefix, "/journal") {
		s.mu.Unlock()
		return upload.ListPage{}, fmt.Errorf("list %s: 503 slow down: %w", prefix, upload.ErrTransient)
	}
	s.mu.Unlock()
	return s.BlobStore.List(ctx, prefix, startAfter, limit)
}

// A Close whose epoch-close entry landed but reported an error (issue 9
// R1) fails; the writer then accepts no change, and calling Close again
// resolves the outcome and succeeds. Every change acknowledged before the
// close is in the stream's next checkpoint.
func TestCloseRetriedAfterUnknownOutcome(t *testing.T) {
	var store *lostCloseStore
	wrap := func(o *changelog.Options) {
		store = &lostCloseStore{BlobStore: o.Store}
		o.Store = store
	}
	bothModesWith(t, wrap, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "cr", 4)
		w := openWriter(t, c, "cr", dstl.WriterOptions{})
		if err := w.Put(ctx, "s", []byte("k"), []byte("v1")); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Persist(ctx); err != nil {
			t.Fatal(err)
		}
		store.arm(true)
		err := w.Close(ctx)
		store.arm(false)
		if err == nil {
			t.Fatal("Close with a lost journal ack and failing listings succeeded: fault not injected")
		}
		if err := w.Put(ctx, "s", []byte("k"), []byte("v2")); err == nil {
			if _, err = w.Flush(ctx); err == nil {
				t.Fatal("a change was acknowledged after a Close whose outcome is unknown")
			}
		}
		if err := w.Close(ctx); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if err := w.Close(ctx); !errors.Is(err, dstl.ErrClosed) {
			t.Fatalf("Close after a successful Close: %v, want ErrClosed", err)
		}
		if v, ok, err := c.Get(ctx, "cr", "s", []byte("k")); err != nil || !ok || string(v) != "v1" {
			t.Fatalf("after the close: %q %v %v, want v1", v, ok, err)
		}
	})
}
