package embedded_test

import (
	"context"
	"errors"
	"fmt"
	"github.com/dstl-dev/dstl/materializer"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// TestEmbeddedMaterializes: an embedded node runs the materializer, as
// `dstl serve` does (its checkpoints get snapshots, so logs can be
// truncated), unless NoMaterializer; a node reopened on the same Dir serves
// the state, in-process.
func TestEmbeddedMaterializes(t *testing.T) {
	for _, noMat := range []bool{false, true} {
		t.Run(fmt.Sprintf("NoMaterializer=%v", noMat), func(t *testing.T) {
			ctx := t.Context()
			dir := t.TempDir()
			opts := embedded.Options{Dir: dir, NoMaterializer: noMat, Materializer: materializer.Config{Interval: 50 * time.Millisecond, Poll: 10 * time.Millisecond, Jitter: -1}}
			n, err := embedded.Open(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			c := n.Client()
			if _, err := c.CreateStream(ctx, "m", 4); err != nil {
				t.Fatal(err)
			}
			w, err := c.OpenWriter(ctx, "m", dstl.WriterOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for i := range 100 {
				if err := w.Put(ctx, "s", fmt.Appendf(nil, "k%d", i), fmt.Appendf(nil, "v%d", i)); err != nil {
					t.Fatal(err)
				}
			}
			if complete, err := w.Checkpoint(ctx, 1, nil); err != nil || !complete {
				t.Fatalf("checkpoint: %v %v", complete, err)
			}
			snapshotted := func() bool {
				snaps, err := n.ChangelogNode().Snapshots(ctx, "m")
				if err != nil {
					t.Fatal(err)
				}
				return len(snaps) > 0
			}
			if noMat {
				time.Sleep(200 * time.Millisecond) // four intervals
				if snapshotted() {
					t.Fatal("a snapshot appeared with NoMaterializer")
				}
			} else {
				deadline := time.Now().Add(20 * time.Second)
				for !snapshotted() && time.Now().Before(deadline) {
					time.Sleep(20 * time.Millisecond)
				}
				if !snapshotted() {
					t.Fatal("no snapshot of checkpoint 1 after 20 s")
				}
			}
			if err := w.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if err := n.Close(ctx); err != nil {
				t.Fatal(err)
			}

			n, err = embedded.Open(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close(context.Background())
			w, err = n.Client().OpenWriter(ctx, "m", dstl.WriterOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close(ctx)
			for _, i := range []int{0, 57, 99} {
				v, ok, err := w.Get(ctx, "s", fmt.Appendf(nil, "k%d", i))
				if err != nil || !ok || string(v) != fmt.Sprintf("v%d", i) {
					t.Fatalf("k%d after reopen: %q %v %v", i, v, ok, err)
				}
			}
		})
	}
}
