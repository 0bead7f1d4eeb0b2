package embedded_test

import (
	"context"
	"errors"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
)

func TestOpenRequiresDir(t *testing.T) {
	if _, err := embedded.Open(t.Context(), embedded.Options{}); err == nil {
		t.Fatal("Open without a Dir succeeded")
	}
	if _, err := embedded.Open(t.Context(), embedded.Options{Dir: t.TempDir(), Durability: dstl.Replicated}); err == nil {
		t.Fatal("Open with replicated durability succeeded on a single node")
	}
}

func TestEmbedded(t *testing.T) {
	ctx := t.Context()
	var requests atomic.Int64
	n, err := embedded.Open(ctx, embedded.Options{
		Dir:        t.TempDir(),
		Durability: dstl.Local,
		Transport:  embedded.HTTP,
		Handler: func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				requests.Add(1)
				if r.ProtoMajor != 2 {
					http.Error(w, "want HTTP/2", http.StatusHTTPVersionNotSupported)
					return
				}
				h.ServeHTTP(w, r)
			})
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	c := n.Client()
	if _, err := c.CreateStream(ctx, "e", 4); err != nil {
		t.Fatal(err)
	}
	var writers []*dstl.Writer
	for i := range 4 {
		w, err := c.OpenWriter(ctx, "e", dstl.WriterOptions{KeyGroups: &dstl.KeyGroupRange{Lo: i, Hi: i}})
		if err != nil {
			t.Fatal(err)
		}
		writers = append(writers, w)
	}
	for _, w := range writers {
		if err := w.Clear(ctx, "s", w.KeyGroups().Lo); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Persist(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := senders(); got != 4 {
		t.Fatalf("%d writer senders running, want 4", got)
	}
	for _, w := range writers {
		if err := w.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := senders(); got != 0 {
		t.Fatalf("%d writer senders left after Close", got)
	}
	if err := n.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if requests.Load() == 0 {
		t.Fatal("the handler saw no request")
	}
	// The client of a closed node fails cleanly.
	_, err = c.Stream(context.Background(), "e")
	if !errors.Is(err, dstl.ErrUnavailable) {
		t.Fatalf("call to a closed node: %v, want ErrUnavailable", err)
	}
}

// senders counts the running Writer background goroutines.
func senders() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "sdk/go.(*Writer).run(")
}
