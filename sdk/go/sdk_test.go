package dstl_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// open starts an embedded node in a temporary directory.
func open(t *testing.T, opts embedded.Options) *embedded.Node {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	n, err := embedded.Open(t.Context(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(context.Background()); err != nil {
			t.Errorf("close node: %v", err)
		}
	})
	return n
}

func openWriter(t *testing.T, c *dstl.Client, stream string, o dstl.WriterOptions) *dstl.Writer {
	t.Helper()
	w, err := c.OpenWriter(t.Context(), stream, o)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func mustCreate(t *testing.T, c *dstl.Client, name string, keyGroups int) {
	t.Helper()
	if _, err := c.CreateStream(t.Context(), name, keyGroups); err != nil {
		t.Fatal(err)
	}
}

// appendCounter counts the Append RPCs and their changes.
type appendCounter struct {
	calls, changes atomic.Int64
	// hold, when set, blocks Appends until it is closed.
	mu   sync.Mutex
	hold chan struct{}
}

func (a *appendCounter) interceptor() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if req.Spec().Procedure == dstlv1connect.WriterServiceAppendProcedure {
				a.calls.Add(1)
				a.changes.Add(int64(len(req.Any().(*dstlv1.AppendRequest).GetChanges())))
				a.mu.Lock()
				hold := a.hold
				a.mu.Unlock()
				if hold != nil {
					select {
					case <-hold:
					case <-ctx.Done():
						return nil, ctx.Err()
					}
				}
			}
			return next(ctx, req)
		}
	}
}

func TestStreams(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		st, err := c.CreateStream(ctx, "orders", 0)
		if err != nil {
			t.Fatal(err)
		}
		if st.Name != "orders" || st.KeyGroups != keygroup.Default || st.CreatedAt.IsZero() {
			t.Fatalf("created %+v", st)
		}
		if _, err := c.CreateStream(ctx, "orders", 4); !errors.Is(err, dstl.ErrAlreadyExists) {
			t.Fatalf("second create: %v, want ErrAlreadyExists", err)
		}
		if st, err := c.EnsureStream(ctx, "orders", 4); err != nil || st.KeyGroups != keygroup.Default {
			t.Fatalf("EnsureStream of an existing stream: %+v %v", st, err)
		}
		if st, err := c.EnsureStream(ctx, "users", 4); err != nil || st.KeyGroups != 4 {
			t.Fatalf("EnsureStream of a new stream: %+v %v", st, err)
		}
		if _, err := c.CreateStream(ctx, "-bad name", 0); !errors.Is(err, dstl.ErrInvalidArgument) {
			t.Fatalf("bad name: %v, want ErrInvalidArgument", err)
		}
		var names []string
		for s, err := range c.ListStreams(ctx) {
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, s.Name)
		}
		if !slices.Equal(names, []string{"orders", "users"}) {
			t.Fatalf("ListStreams = %v", names)
		}
		if err := c.DeleteStream(ctx, "users"); err != nil {
			t.Fatal(err)
		}
		_, err = c.Stream(ctx, "users")
		if !errors.Is(err, dstl.ErrNotFound) {
			t.Fatalf("deleted stream: %v, want ErrNotFound", err)
		}
	})
}

func TestErrNotFoundKeepsMessage(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		_, err := c.OpenWriter(ctx, "no-such-stream", dstl.WriterOptions{})
		if !errors.Is(err, dstl.ErrNotFound) {
			t.Fatalf("OpenWriter of an unknown stream: %v, want ErrNotFound", err)
		}
		if !strings.Contains(err.Error(), "no-such-stream") {
			t.Fatalf("message lost: %v", err)
		}
		var e *dstl.Error
		if !errors.As(err, &e) || e.Code != connect.CodeNotFound {
			t.Fatalf("not an *dstl.Error with NOT_FOUND: %#v", err)
		}
		if _, _, err := c.Get(ctx, "no-such-stream", "s", []byte("k")); !errors.Is(err, dstl.ErrNotFound) {
			t.Fatalf("Get of an unknown stream: %v", err)
		}
	})
}

func TestTypedState(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "typed", 8)
		w := openWriter(t, c, "typed", dstl.WriterOptions{})
		defer w.Close(ctx)

		type profile struct {
			Name string
			Age  int
		}
		profiles := dstl.NewValueState(w, "profile", dstl.JSON[profile]())
		if _, ok, err := profiles.Get(ctx, "u1"); ok || err != nil {
			t.Fatalf("unset value: %v %v", ok, err)
		}
		if err := profiles.Set(ctx, "u1", profile{"Ada", 36}); err != nil {
			t.Fatal(err)
		}
		if p, ok, err := profiles.Get(ctx, "u1"); err != nil || !ok || p != (profile{"Ada", 36}) {
			t.Fatalf("Get after Set (read-your-writes): %+v %v %v", p, ok, err)
		}
		if err := profiles.Delete(ctx, "u1"); err != nil {
			t.Fatal(err)
		}
		if _, ok, err := profiles.Get(ctx, "u1"); ok || err != nil {
			t.Fatalf("Get after Delete: %v %v", ok, err)
		}

		names := dstl.NewValueState(w, "name", dstl.String())
		if err := names.Set(ctx, "u2", "Grace"); err != nil {
			t.Fatal(err)
		}
		raw, ok, err := w.Get(ctx, "name", []byte("u2"))
		if err != nil || !ok || string(raw) != "Grace" {
			t.Fatalf("raw String codec value: %q %v %v", raw, ok, err)
		}
		protos := dstl.NewValueState(w, "proto", dstl.Proto[*dstlv1.Stream]())
		if err := protos.Set(ctx, "u2", &dstlv1.Stream{Name: "x", KeyGroups: 3}); err != nil {
			t.Fatal(err)
		}
		if m, ok, err := protos.Get(ctx, "u2"); err != nil || !ok || m.GetName() != "x" || m.GetKeyGroups() != 3 {
			t.Fatalf("proto value: %v %v %v", m, ok, err)
		}

		// MapState: entries are keys of their own, all in the user key's group.
		carts := dstl.NewMapState[string, int](w, "cart", nil, nil)
		for _, user := range []string{"alice", "al", "alice2"} {
			for i, item := range []string{"apple", "pear", "plum"} {
				if err := carts.Put(ctx, user, item, i+1); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := carts.Delete(ctx, "alice", "pear"); err != nil {
			t.Fatal(err)
		}
		if err := carts.Put(ctx, "alice", "apple", 10); err != nil {
			t.Fatal(err)
		}
		got, err := carts.Entries(ctx, "alice")
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != "map[apple:10 plum:3]" {
			t.Fatalf("Entries(alice) = %v", got)
		}
		if v, ok, err := carts.Get(ctx, "al", "pear"); err != nil || !ok || v != 2 {
			t.Fatalf("Get(al, pear) = %v %v %v", v, ok, err)
		}
		if _, ok, _ := carts.Get(ctx, "alice", "pear"); ok {
			t.Fatal("deleted entry still there")
		}
		wantKG := w.KeyGroupOf([]byte("alice"))
		n := 0
		for kv, err := range w.Scan(ctx, "cart", nil, nil) {
			if err != nil {
				t.Fatal(err)
			}
			user, _, err := dstl.SplitCompositeKey(kv.Key)
			if err != nil {
				t.Fatal(err)
			}
			if kv.KeyGroup != w.KeyGroupOf([]byte(user)) {
				t.Fatalf("entry %q of user %q in key group %d, want the user key's %d", kv.Key, user, kv.KeyGroup, w.KeyGroupOf([]byte(user)))
			}
			if user == "alice" && kv.KeyGroup != wantKG {
				t.Fatal("alice's entries split across key groups")
			}
			n++
		}
		if n != 8 {
			t.Fatalf("scanned %d entries, want 8", n)
		}
		if err := carts.Clear(ctx, "alice"); err != nil {
			t.Fatal(err)
		}
		if got, err := carts.Entries(ctx, "alice"); err != nil || len(got) != 0 {
			t.Fatalf("Entries after Clear: %v %v", got, err)
		}
		if got, err := carts.Entries(ctx, "al"); err != nil || len(got) != 3 {
			t.Fatalf("Clear(alice) touched al: %v %v", got, err)
		}

		// ListState: appends are merges of length-prefixed elements.
		events := dstl.NewListState(w, "events", dstl.JSON[[]int]())
		for i := range 5 {
			if err := events.Append(ctx, "k", []int{i, i * i}); err != nil {
				t.Fatal(err)
			}
		}
		list, err := events.Get(ctx, "k")
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(list) != "[[0 0] [1 1] [2 4] [3 9] [4 16]]" {
			t.Fatalf("list = %v", list)
		}
		if err := events.Clear(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		if list, err := events.Get(ctx, "k"); err != nil || list != nil {
			t.Fatalf("list after Clear: %v %v", list, err)
		}
		strs := dstl.NewListState(w, "strs", dstl.String())
		for _, s := range []string{"", "a", "bb"} {
			if err := strs.Append(ctx, "k", s); err != nil {
				t.Fatal(err)
			}
		}
		if l, err := strs.Get(ctx, "k"); err != nil || !slices.Equal(l, []string{"", "a", "bb"}) {
			t.Fatalf("string list = %q %v", l, err)
		}
	})
}

func TestStateSurvivesRestart(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			ctx := t.Context()
			dir := t.TempDir()
			blobs := filepath.Join(dir, "blobs")
			c, stop := nodeAt(t, mode, dir, blobs, nil)
			mustCreate(t, c, "s", 4)
			w := openWriter(t, c, "s", dstl.WriterOptions{})
			m := dstl.NewMapState[string, string](w, "m", nil, nil)
			if err := m.Put(ctx, "u", "k", "v"); err != nil {
				t.Fatal(err)
			}
			if complete, err := w.Checkpoint(ctx, 1, []byte("meta")); err != nil || !complete {
				t.Fatalf("checkpoint: %v %v", complete, err)
			}
			if err := w.Close(ctx); err != nil {
				t.Fatal(err)
			}
			stop()

			c, _ = nodeAt(t, mode, dir, blobs, nil)
			cps, err := collect(c.Checkpoints(ctx, "s", dstl.CheckpointListOptions{Parts: true}))
			if err != nil || len(cps) != 1 || cps[0].ID != 1 || string(cps[0].Parts[0].Metadata) != "meta" {
				t.Fatalf("checkpoints after restart: %+v %v", cps, err)
			}
			cp, err := c.RetainCheckpoint(ctx, "s", 1, true)
			if err != nil || !cp.Retained {
				t.Fatalf("retain: %+v %v", cp, err)
			}
			w = openWriter(t, c, "s", dstl.WriterOptions{})
			defer w.Close(ctx)
			if w.FromCheckpoint() != 1 || len(w.RestoredMetadata()) != 1 || string(w.RestoredMetadata()[0]) != "meta" {
				t.Fatalf("restored from %d with %q", w.FromCheckpoint(), w.RestoredMetadata())
			}
			m = dstl.NewMapState[string, string](w, "m", nil, nil)
			if v, ok, err := m.Get(ctx, "u", "k"); err != nil || !ok || v != "v" {
				t.Fatalf("after restart: %q %v %v", v, ok, err)
			}
		})
	}
}

// nodeAt starts a node with its data in dir and its blob store in blobs,
// in a mode (embedded: in-process; remote: served over TCP and dialled),
// and returns its client and a stop that shuts it down cleanly (also run
// at cleanup if not called).
func nodeAt(t *testing.T, mode, dir, blobs string, nodeOpts func(*changelog.Options)) (*dstl.Client, func()) {
	t.Helper()
	if mode == "embedded" {
		n, err := embedded.Open(t.Context(), embedded.Options{Dir: dir, BlobURL: blobs, Node: nodeOpts})
		if err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		stop := func() {
			once.Do(func() {
				if err := n.Close(context.Background()); err != nil {
					t.Errorf("close node: %v", err)
				}
			})
		}
		t.Cleanup(stop)
		return n.Client(), stop
	}
	ctx := t.Context()
	store, err := blobstore.Open(ctx, blobs)
	if err != nil {
		t.Fatal(err)
	}
	opts := changelog.Options{Store: store, DataDir: dir}
	if nodeOpts != nil {
		nodeOpts(&opts)
	}
	node, err := changelog.Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	api, err := server.New(node, server.Options{StateDir: filepath.Join(dir, "state"), CDCDir: filepath.Join(dir, "cdc")})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: api.Handler(), Protocols: new(http.Protocols)}
	hs.Protocols.SetUnencryptedHTTP2(true)
	go hs.Serve(ln)
	c, err := dstl.Dial(ctx, "http://"+ln.Addr().String(), dstl.WithRetries(0))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx := context.Background()
			_ = c.Close()
			api.StopSubscriptions()
			errs := []error{hs.Shutdown(ctx), api.Shutdown(ctx), node.Close(ctx), api.Close(), store.Close()}
			if err := errors.Join(errs...); err != nil {
				t.Errorf("stop node: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return c, stop
}

func TestBatching(t *testing.T) {
	interceptedModes(t, func(t *testing.T, c *dstl.Client, counter *appendCounter) {
		ctx := t.Context()
		mustCreate(t, c, "batch", 16)

		// Size-triggered batches only.
		w := openWriter(t, c, "batch", dstl.WriterOptions{BatchChanges: 100, Linger: -1})
		for i := range 1000 {
			if err := w.Put(ctx, "s", fmt.Appendf(nil, "key-%d", i), []byte("value")); err != nil {
				t.Fatal(err)
			}
		}
		last, err := w.Flush(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if last != 1000 || counter.calls.Load() != 10 || counter.changes.Load() != 1000 {
			t.Fatalf("1000 puts in batches of 100: last SQN %d, %d appends of %d changes", last, counter.calls.Load(), counter.changes.Load())
		}
		if last, err := w.Flush(ctx); err != nil || last != 1000 || counter.calls.Load() != 10 {
			t.Fatalf("empty flush sent something: %d %v", last, err)
		}
		if err := w.Close(ctx); err != nil {
			t.Fatal(err)
		}

		// Default options: linger and size limits together still batch.
		counter.calls.Store(0)
		counter.changes.Store(0)
		w = openWriter(t, c, "batch", dstl.WriterOptions{})
		for i := range 5000 {
			if err := w.Put(ctx, "s", fmt.Appendf(nil, "key-%d", i), []byte("value")); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := w.Persist(ctx); err != nil {
			t.Fatal(err)
		}
		if counter.changes.Load() != 5000 || counter.calls.Load() > 100 {
			t.Fatalf("5000 puts: %d appends of %d changes", counter.calls.Load(), counter.changes.Load())
		}
		t.Logf("5000 puts with default batching: %d appends", counter.calls.Load())

		// Byte-triggered batches.
		counter.calls.Store(0)
		w2 := openWriter(t, c, "batch", dstl.WriterOptions{BatchBytes: 10 << 10, Linger: -1})
		defer w2.Close(ctx)
		value := make([]byte, 1000)
		for i := range 100 {
			if err := w2.Put(ctx, "s", fmt.Appendf(nil, "key-%d", i), value); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := w2.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if n := counter.calls.Load(); n < 9 || n > 12 {
			t.Fatalf("100 KB in 10 KB batches took %d appends", n)
		}
		// The first writer was fenced by the later ones of the same range.
		if err := w.Close(ctx); err == nil {
			t.Log("closing a fenced writer succeeded")
		}
	})
}

func TestLinger(t *testing.T) {
	interceptedModes(t, func(t *testing.T, c *dstl.Client, counter *appendCounter) {
		ctx := t.Context()
		mustCreate(t, c, "linger", 4)
		w := openWriter(t, c, "linger", dstl.WriterOptions{Linger: 20 * time.Millisecond})
		defer w.Close(ctx)
		for i := range 3 {
			if err := w.Put(ctx, "s", []byte{byte(i)}, nil); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(5 * time.Second)
		for counter.changes.Load() < 3 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if counter.calls.Load() != 1 || counter.changes.Load() != 3 {
			t.Fatalf("after the linger: %d appends of %d changes, want 1 of 3", counter.calls.Load(), counter.changes.Load())
		}
	})
}

func TestBackpressure(t *testing.T) {
	interceptedModes(t, func(t *testing.T, c *dstl.Client, counter *appendCounter) {
		ctx := t.Context()
		mustCreate(t, c, "bp", 4)
		hold := make(chan struct{})
		counter.mu.Lock()
		counter.hold = hold
		counter.mu.Unlock()
		w := openWriter(t, c, "bp", dstl.WriterOptions{BufferChanges: 4, BatchChanges: 2, Linger: -1})
		defer w.Close(ctx)
		for i := range 4 {
			if err := w.Put(ctx, "s", []byte{byte(i)}, nil); err != nil {
				t.Fatal(err)
			}
		}
		// The buffer (2 in flight, held by the server, + 2 pending) is full.
		short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := w.Put(short, "s", []byte{4}, nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Put into a full buffer: %v, want context.DeadlineExceeded", err)
		}
		if time.Since(start) < 40*time.Millisecond {
			t.Fatal("Put into a full buffer did not block")
		}
		// A blocked Put proceeds once the server takes the batch.
		done := make(chan error, 1)
		go func() { done <- w.Put(ctx, "s", []byte{5}, nil) }()
		select {
		case err := <-done:
			t.Fatalf("Put returned while the buffer was full: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
		close(hold)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		last, err := w.Flush(ctx)
		if err != nil || last != 5 {
			t.Fatalf("flush: %d %v, want 5", last, err)
		}
	})
}

func TestFencedOnSameNode(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "fence", 8)
		w1 := openWriter(t, c, "fence", dstl.WriterOptions{})
		if err := w1.Put(ctx, "s", []byte("k"), []byte("1")); err != nil {
			t.Fatal(err)
		}
		if _, err := w1.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		w2 := openWriter(t, c, "fence", dstl.WriterOptions{KeyGroups: &dstl.KeyGroupRange{Lo: 0, Hi: 3}})
		defer w2.Close(ctx)
		if err := w1.Put(ctx, "s", []byte("k"), []byte("2")); err != nil {
			t.Fatal(err) // buffered: the failure shows on the next call
		}
		_, err := w1.Flush(ctx)
		if !errors.Is(err, dstl.ErrFenced) {
			t.Fatalf("flush of a fenced writer: %v, want ErrFenced", err)
		}
		// Sticky: every later call fails the same way, without blocking.
		if err := w1.Put(ctx, "s", []byte("k"), nil); !errors.Is(err, dstl.ErrFenced) {
			t.Fatalf("put after fencing: %v", err)
		}
		if err := w1.Close(ctx); !errors.Is(err, dstl.ErrFenced) {
			t.Fatalf("close after fencing: %v", err)
		}
	})
}

func TestFencedAcrossNodes(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			ctx := t.Context()
			blobs := filepath.Join(t.TempDir(), "blobs")
			fast := func(o *changelog.Options) { o.JournalRefresh = 20 * time.Millisecond }
			a, _ := nodeAt(t, mode, t.TempDir(), blobs, fast)
			b, _ := nodeAt(t, mode, t.TempDir(), blobs, fast)
			mustCreate(t, a, "shared", 8)
			w1 := openWriter(t, a, "shared", dstl.WriterOptions{})
			if err := w1.Put(ctx, "s", []byte("k"), []byte("1")); err != nil {
				t.Fatal(err)
			}
			if _, err := w1.Checkpoint(ctx, 1, nil); err != nil {
				t.Fatal(err)
			}
			w2 := openWriter(t, b, "shared", dstl.WriterOptions{})
			defer w2.Close(ctx)
			var err error
			for i := 0; i < 100 && err == nil; i++ {
				if err = w1.Put(ctx, "s", []byte("k"), []byte("2")); err == nil {
					_, err = w1.Persist(ctx)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if !errors.Is(err, dstl.ErrFenced) {
				t.Fatalf("writer fenced by another node: %v, want ErrFenced", err)
			}
			w1.Abort()
			v, ok, err := w2.Get(ctx, "s", []byte("k"))
			if err != nil || !ok || string(v) != "1" {
				t.Fatalf("new writer's view: %q %v %v, want the checkpoint's 1", v, ok, err)
			}
		})
	}
}

func TestWriterValidation(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "v", 8)
		if _, err := c.OpenWriter(ctx, "v", dstl.WriterOptions{KeyGroups: &dstl.KeyGroupRange{Lo: 2, Hi: 8}}); !errors.Is(err, dstl.ErrInvalidArgument) {
			t.Fatalf("range outside the stream: %v", err)
		}
		w := openWriter(t, c, "v", dstl.WriterOptions{KeyGroups: &dstl.KeyGroupRange{Lo: 0, Hi: 3}})
		if got := w.KeyGroups(); got != (dstl.KeyGroupRange{Lo: 0, Hi: 3}) {
			t.Fatalf("KeyGroups() = %v", got)
		}
		if err := w.Apply(ctx, dstl.Change{KeyGroup: 5, State: "s", Op: dstl.OpPut, Key: []byte("k")}); !errors.Is(err, dstl.ErrInvalidArgument) {
			t.Fatalf("change outside the range: %v", err)
		}
		// A key whose group is outside the range is refused before sending.
		for i := 0; ; i++ {
			k := fmt.Appendf(nil, "k%d", i)
			if !w.Owns(w.KeyGroupOf(k)) {
				if err := w.Put(ctx, "s", k, nil); !errors.Is(err, dstl.ErrInvalidArgument) {
					t.Fatalf("put outside the range: %v", err)
				}
				break
			}
		}
		if got, want := w.KeyGroupOf([]byte("hello")), int(keygroup.Of([]byte("hello"), 8)); got != want {
			t.Fatalf("KeyGroupOf = %d, want keygroup.Of's %d", got, want)
		}
		// Above the message limit: refused before sending.
		if err := w.Apply(ctx, dstl.Change{KeyGroup: 0, State: "s", Op: dstl.OpPut, Key: []byte("k"), Value: make([]byte, 64<<20)}); !errors.Is(err, dstl.ErrInvalidArgument) {
			t.Fatalf("change above the message limit: %v, want ErrInvalidArgument", err)
		}
		// The server rejects an oversized key (64 KiB by default): the error
		// of the background send surfaces on the next call, and sticks.
		if err := w.Apply(ctx, dstl.Change{KeyGroup: 0, State: "s", Op: dstl.OpPut, Key: make([]byte, 65<<10)}); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Flush(ctx); !errors.Is(err, dstl.ErrInvalidArgument) {
			t.Fatalf("oversized key: %v, want ErrInvalidArgument", err)
		}
		if err := w.Put(ctx, "s", []byte("k"), nil); !errors.Is(err, dstl.ErrInvalidArgument) {
			t.Fatalf("put after a failed send: %v, want the send's error", err)
		}
		w.Abort()
	})
}

func TestAbort(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "abort", 4)
		w := openWriter(t, c, "abort", dstl.WriterOptions{Linger: time.Hour})
		if err := w.Put(ctx, "s", []byte("k"), []byte("v")); err != nil {
			t.Fatal(err)
		}
		w.Abort() // the buffered put is dropped
		if err := w.Put(ctx, "s", []byte("k"), nil); !errors.Is(err, dstl.ErrClosed) {
			t.Fatalf("put after Abort: %v", err)
		}
		if _, ok, err := c.Get(ctx, "abort", "s", []byte("k")); err != nil || ok {
			t.Fatalf("aborted change visible: %v %v", ok, err)
		}
	})
}

func TestCloseStopsSender(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "close", 4)
		w := openWriter(t, c, "close", dstl.WriterOptions{Linger: time.Hour, BatchChanges: 1000})
		for i := range 10 {
			if err := w.Put(ctx, "s", []byte{byte(i)}, []byte("v")); err != nil {
				t.Fatal(err)
			}
		}
		// Close sends what is buffered, even with a long linger.
		if err := w.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if err := w.Put(ctx, "s", []byte("k"), nil); !errors.Is(err, dstl.ErrClosed) {
			t.Fatalf("put after Close: %v", err)
		}
		if err := w.Close(ctx); !errors.Is(err, dstl.ErrClosed) {
			t.Fatalf("second Close: %v", err)
		}
		v, ok, err := c.Get(ctx, "close", "s", []byte{9})
		if err != nil || !ok || string(v) != "v" {
			t.Fatalf("closed writer's last change: %q %v %v", v, ok, err)
		}
	})
}

// unavailableTwice answers the first two calls of each procedure with
// UNAVAILABLE (as a server refusing the request would), then passes
// through.
func unavailableTwice(calls *sync.Map) func(http.Handler) http.Handler {
	ew := connect.NewErrorWriter()
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, _ := calls.LoadOrStore(r.URL.Path, new(atomic.Int64))
			if n.(*atomic.Int64).Add(1) <= 2 {
				_ = ew.Write(w, r, connect.NewError(connect.CodeUnavailable, errors.New("injected: try again")))
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// serveTCP runs a node behind a real h2c listener on loopback, as
// `dstl serve` does, with handler wrapped by wrap.
func serveTCP(t testing.TB, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	return serveTCPWith(t, wrap, nil)
}

// serveTCPWith is serveTCP with the node's options tweaked by nodeOpts
// (nil: none), as embedded.Options.Node does.
func serveTCPWith(t testing.TB, wrap func(http.Handler) http.Handler, nodeOpts func(*changelog.Options)) string {
	t.Helper()
	ctx := t.Context()
	dir := t.TempDir()
	store, err := blobstore.Open(ctx, filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	opts := changelog.Options{Store: store, DataDir: dir}
	if nodeOpts != nil {
		nodeOpts(&opts)
	}
	node, err := changelog.Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	api, err := server.New(node, server.Options{StateDir: filepath.Join(dir, "state")})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: wrap(api.Handler()), Protocols: new(http.Protocols)}
	hs.Protocols.SetUnencryptedHTTP2(true)
	hs.Protocols.SetHTTP1(true)
	go hs.Serve(ln)
	t.Cleanup(func() {
		ctx := context.Background()
		_ = hs.Shutdown(ctx)
		_ = api.Shutdown(ctx)
		_ = node.Close(ctx)
		_ = api.Close()
		_ = store.Close()
	})
	return "http://" + ln.Addr().String()
}

func TestRetries(t *testing.T) {
	ctx := t.Context()
	var calls sync.Map
	url := serveTCP(t, unavailableTwice(&calls))
	c, err := dstl.Dial(ctx, url, dstl.WithRetryBackoff(time.Millisecond, 10*time.Millisecond), dstl.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Not idempotent, but the server refused it as a whole: retried.
	if _, err := c.CreateStream(ctx, "retried", 4); err != nil {
		t.Fatalf("create after two UNAVAILABLE answers: %v", err)
	}
	w, err := c.OpenWriter(ctx, "retried", dstl.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Put(ctx, "s", []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if last, err := w.Flush(ctx); err != nil || last != 1 {
		t.Fatalf("append after two UNAVAILABLE answers: %d %v", last, err)
	}
	if v, ok, err := w.Get(ctx, "s", []byte("k")); err != nil || !ok || string(v) != "v" {
		t.Fatalf("get: %q %v %v", v, ok, err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// Without retries the first answer is the result.
	var calls2 sync.Map
	url = serveTCP(t, unavailableTwice(&calls2))
	c2, err := dstl.Dial(ctx, url, dstl.WithRetries(0))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_, err = c2.Stream(ctx, "x")
	if !errors.Is(err, dstl.ErrUnavailable) || !strings.Contains(err.Error(), "injected: try again") {
		t.Fatalf("no retries: %v, want ErrUnavailable with the server's message", err)
	}

	// Retries are bounded and honour the context.
	var calls3 sync.Map
	url = serveTCP(t, unavailableTwice(&calls3))
	c3, err := dstl.Dial(ctx, url, dstl.WithRetries(1), dstl.WithRetryBackoff(time.Millisecond, time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	if _, err := c3.Stream(ctx, "y"); !errors.Is(err, dstl.ErrUnavailable) {
		t.Fatalf("one retry against two failures: %v", err)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c3.Stream(canceled, "z"); err == nil {
		t.Fatal("call with a canceled context succeeded")
	}
}

func TestDialUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c, err := dstl.Dial(t.Context(), "http://"+addr, dstl.WithRetries(2), dstl.WithRetryBackoff(time.Millisecond, 5*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Stream(t.Context(), "s"); !errors.Is(err, dstl.ErrUnavailable) {
		t.Fatalf("unreachable node: %v, want ErrUnavailable", err)
	}
}
