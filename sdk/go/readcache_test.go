package dstl_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// TestWriterReadsModel compares every read through a Writer with a map
// model over a random mix of puts, deletes, merges, clears and reads, with
// read caches from none to one that holds a few entries (so evictions of
// unsent changes happen all the time) to the default. At the end every key
// is read back from the node (Client.Get) after a flush.
func TestWriterReadsModel(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "model", 8)
		for _, cache := range []int{-1, 300, 0} {
			t.Run(fmt.Sprintf("cache=%d", cache), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(cache+7), 42))
				w := openWriter(t, c, "model", dstl.WriterOptions{CacheBytes: cache, Linger: time.Millisecond, BatchChanges: 7})
				defer w.Close(ctx)
				type mkey struct {
					state, key string
				}
				model := map[mkey]string{}
				states := []string{"a", "b"}
				keyOf := func() mkey { return mkey{states[rng.IntN(2)], fmt.Sprintf("k%d", rng.IntN(40))} }
				check := func(step int, k mkey) {
					t.Helper()
					v, ok, err := w.Get(ctx, k.state, []byte(k.key))
					want, wantOK := model[k]
					if err != nil || ok != wantOK || string(v) != want {
						t.Fatalf("step %d: Get %v = %q %v %v, want %q %v", step, k, v, ok, err, want, wantOK)
					}
				}
				for step := range 3000 {
					k := keyOf()
					switch r := rng.IntN(100); {
					case r < 30:
						v := fmt.Sprintf("v%d", step)
						if err := w.Put(ctx, k.state, []byte(k.key), []byte(v)); err != nil {
							t.Fatal(err)
						}
						model[k] = v
					case r < 40:
						if err := w.Delete(ctx, k.state, []byte(k.key)); err != nil {
							t.Fatal(err)
						}
						delete(model, k)
					case r < 55:
						v := fmt.Sprintf("+%d", step%10)
						if err := w.Merge(ctx, k.state, []byte(k.key), []byte(v)); err != nil {
							t.Fatal(err)
						}
						model[k] += v
					case r < 57:
						kg := w.KeyGroupOf([]byte(k.key))
						if err := w.Clear(ctx, k.state, kg); err != nil {
							t.Fatal(err)
						}
						for o := range model {
							if o.state == k.state && w.KeyGroupOf([]byte(o.key)) == kg {
								delete(model, o)
							}
						}
					default:
						check(step, k)
					}
					if step%500 == 0 && rng.IntN(2) == 0 {
						if _, err := w.Flush(ctx); err != nil {
							t.Fatal(err)
						}
					}
				}
				// Every key, through the writer and from the node.
				if _, err := w.Flush(ctx); err != nil {
					t.Fatal(err)
				}
				for _, s := range states {
					for i := range 40 {
						k := mkey{s, fmt.Sprintf("k%d", i)}
						check(-1, k)
						v, ok, err := c.Get(ctx, "model", s, []byte(k.key))
						if want, wantOK := model[k]; err != nil || ok != wantOK || string(v) != want {
							t.Fatalf("node Get %v = %q %v %v, want %q %v", k, v, ok, err, want, wantOK)
						}
					}
				}
			})
		}
	})
}

// TestWriterReadsConcurrent: goroutines sharing one Writer each count
// their own keys with read-modify-writes while the others write; every
// count ends exact (run under -race).
func TestWriterReadsConcurrent(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "conc", 16)
		w := openWriter(t, c, "conc", dstl.WriterOptions{CacheBytes: 2 << 10})
		defer w.Close(ctx)
		counts := dstl.NewValueState(w, "n", dstl.JSON[int]())
		const goroutines, keys, rounds = 4, 20, 50
		var wg sync.WaitGroup
		errs := make(chan error, goroutines)
		for g := range goroutines {
			wg.Go(func() {
				for r := range rounds {
					for k := range keys {
						key := fmt.Sprintf("g%d-k%d", g, k)
						n, _, err := counts.Get(ctx, key)
						if err == nil && n != r {
							err = fmt.Errorf("key %s in round %d read %d", key, r, n)
						}
						if err == nil {
							err = counts.Set(ctx, key, n+1)
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if _, err := w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		for g := range goroutines {
			for k := range keys {
				key := fmt.Sprintf("g%d-k%d", g, k)
				v, ok, err := c.Get(ctx, "conc", "n", []byte(key))
				if err != nil || !ok || string(v) != fmt.Sprint(rounds) {
					t.Fatalf("node: %s = %q %v %v, want %d", key, v, ok, err, rounds)
				}
			}
		}
	})
}

// getCounter counts the node's Get calls and the reads Appends carried,
// in-process or over HTTP.
type getCounter struct{ gets, appendReads atomic.Int64 }

type countingState struct {
	dstlv1connect.StateServiceHandler
	n *getCounter
}

func (s countingState) Get(ctx context.Context, req *connect.Request[dstlv1.GetRequest]) (*connect.Response[dstlv1.GetResponse], error) {
	s.n.gets.Add(1)
	return s.StateServiceHandler.Get(ctx, req)
}

type countingWriters struct {
	dstlv1connect.WriterServiceHandler
	n *getCounter
}

func (s countingWriters) Append(ctx context.Context, req *connect.Request[dstlv1.AppendRequest]) (*connect.Response[dstlv1.AppendResponse], error) {
	s.n.appendReads.Add(int64(len(req.Msg.GetReads())))
	return s.WriterServiceHandler.Append(ctx, req)
}

// countingClient returns a client of a fresh node in mode whose node Get
// calls are counted.
func countingClient(t *testing.T, mode string) (*dstl.Client, *getCounter) {
	t.Helper()
	n := &getCounter{}
	if mode == "remote" {
		url := serveTCP(t, func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == dstlv1connect.StateServiceGetProcedure {
					n.gets.Add(1)
				}
				h.ServeHTTP(w, r)
			})
		})
		// The reads an Append carries are counted by an interceptor: the
		// HTTP wrapper sees only bytes.
		counter := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
			return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
				if a, ok := req.Any().(*dstlv1.AppendRequest); ok {
					n.appendReads.Add(int64(len(a.GetReads())))
				}
				return next(ctx, req)
			}
		})
		c, err := dstl.Dial(t.Context(), url, dstl.WithConnectOptions(connect.WithInterceptors(counter)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c, n
	}
	api := inProcessServer(t)
	h := api.InProcess()
	c, err := dstl.NewInProcessClient(dstl.Handlers{Streams: h.Streams, Writers: countingWriters{h.Writers, n}, State: countingState{h.State, n}, Checkpoints: h.Checkpoints})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, n
}

// inProcessServer opens a node and its API server, closed with the test.
func inProcessServer(t *testing.T) *server.Server {
	t.Helper()
	ctx := t.Context()
	dir := t.TempDir()
	store, err := blobstore.Open(ctx, filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	node, err := changelog.Open(ctx, changelog.Options{Store: store, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	api, err := server.New(node, server.Options{StateDir: filepath.Join(dir, "state")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		_ = api.Shutdown(ctx)
		_ = node.Close(ctx)
		_ = api.Close()
		_ = store.Close()
	})
	return api
}

// TestWriterReadsFromCache: a read of a key the writer wrote or read
// before makes no call to the node; a read the cache cannot answer makes
// one (after flushing what it must), in both modes.
func TestWriterReadsFromCache(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			ctx := t.Context()
			c, n := countingClient(t, mode)
			mustCreate(t, c, "cache", 4)
			w := openWriter(t, c, "cache", dstl.WriterOptions{Linger: -1})
			defer w.Close(ctx)
			counts := dstl.NewValueState(w, "count", dstl.JSON[int]())
			gets := func(want int64, what string) {
				t.Helper()
				if got := n.gets.Load(); got != want {
					t.Fatalf("%s: %d Gets reached the node, want %d", what, got, want)
				}
			}
			for i := range 1000 {
				v, _, err := counts.Get(ctx, "hot")
				if err != nil || v != i {
					t.Fatalf("round %d: %d %v", i, v, err)
				}
				if err := counts.Set(ctx, "hot", v+1); err != nil {
					t.Fatal(err)
				}
			}
			gets(1, "1000 read-modify-writes of one key") // only the first read: absent
			if _, ok, err := counts.Get(ctx, "cold"); ok || err != nil {
				t.Fatalf("cold: %v %v", ok, err)
			}
			gets(2, "a key never seen")
			if _, _, err := counts.Get(ctx, "cold"); err != nil {
				t.Fatal(err)
			}
			gets(2, "the same key again")

			// A merge of a key the cache does not hold: the read flushes
			// it and asks the node, whose answer includes it, in one call
			// (the read travels with the Append).
			if err := w.Merge(ctx, "list", []byte("l"), []byte("x")); err != nil {
				t.Fatal(err)
			}
			if v, ok, err := w.Get(ctx, "list", []byte("l")); err != nil || !ok || string(v) != "x" {
				t.Fatalf("merged: %q %v %v", v, ok, err)
			}
			gets(2, "a merged key")
			if got := n.appendReads.Load(); got != 1 {
				t.Fatalf("a merged key: %d reads travelled with Appends, want 1", got)
			}
			if err := w.Merge(ctx, "list", []byte("l"), []byte("y")); err != nil {
				t.Fatal(err)
			}
			if v, _, err := w.Get(ctx, "list", []byte("l")); err != nil || string(v) != "xy" {
				t.Fatalf("merged twice: %q %v", v, err)
			}
			gets(2, "a merge of a cached key")

			// A clear drops the cached keys of its state and key group.
			kg := w.KeyGroupOf([]byte("hot"))
			if err := w.Clear(ctx, "count", kg); err != nil {
				t.Fatal(err)
			}
			if _, ok, err := counts.Get(ctx, "hot"); ok || err != nil {
				t.Fatalf("after clear: %v %v", ok, err)
			}
			gets(2, "a key after a clear")
			if got := n.appendReads.Load(); got != 2 {
				t.Fatalf("a key after a clear: %d reads travelled with Appends, want 2", got)
			}

			// Returned values are the caller's: changing one changes
			// nothing cached.
			if err := w.Put(ctx, "raw", []byte("k"), []byte("abc")); err != nil {
				t.Fatal(err)
			}
			v, _, _ := w.Get(ctx, "raw", []byte("k"))
			copy(v, "zzz")
			if v, _, err := w.Get(ctx, "raw", []byte("k")); err != nil || !bytes.Equal(v, []byte("abc")) {
				t.Fatalf("cached value changed through a returned slice: %q %v", v, err)
			}
		})
	}
}

// TestInProcessClientClose: Close waits for calls in flight, and later
// calls fail with ErrUnavailable, not a panic or a hang.
func TestInProcessClientClose(t *testing.T) {
	ctx := t.Context()
	api := inProcessServer(t)
	h := api.InProcess()
	release := make(chan struct{})
	entered := make(chan struct{})
	streams := blockingStreams{h.Streams, entered, release}
	c, err := dstl.NewInProcessClient(dstl.Handlers{Streams: streams, Writers: h.Writers, State: h.State, Checkpoints: h.Checkpoints})
	if err != nil {
		t.Fatal(err)
	}
	callErr := make(chan error, 1)
	go func() { _, err := c.CreateStream(ctx, "slow", 4); callErr <- err }()
	<-entered
	closed := make(chan struct{})
	go func() { _ = c.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a call was in flight")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	<-closed
	if err := <-callErr; err != nil {
		t.Fatalf("the call in flight: %v", err)
	}
	_, err = c.Stream(ctx, "slow")
	if !errors.Is(err, dstl.ErrUnavailable) || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("call after Close: %v, want ErrUnavailable", err)
	}
	if _, err := dstl.NewInProcessClient(dstl.Handlers{Streams: h.Streams}); err == nil {
		t.Fatal("NewInProcessClient without every handler succeeded")
	}
}

type blockingStreams struct {
	dstlv1connect.StreamServiceHandler
	entered, release chan struct{}
}

func (s blockingStreams) CreateStream(ctx context.Context, req *connect.Request[dstlv1.CreateStreamRequest]) (*connect.Response[dstlv1.CreateStreamResponse], error) {
	close(s.entered)
	<-s.release
	return s.StreamServiceHandler.CreateStream(ctx, req)
}

// TestEmbeddedHandlerNeedsHTTP: wrapping the HTTP handler of an in-process
// node is refused, not silently ignored.
func TestEmbeddedHandlerNeedsHTTP(t *testing.T) {
	_, err := embedded.Open(t.Context(), embedded.Options{Dir: t.TempDir(), Handler: func(h http.Handler) http.Handler { return h }})
	if err == nil || !strings.Contains(err.Error(), "Transport HTTP") {
		t.Fatalf("Open with a Handler in-process: %v", err)
	}
}
