package dstl_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/cdc"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
)

// cdcWriter makes checkpoints of one writer of a fresh stream.
type cdcWriter struct {
	t  *testing.T
	w  *dstl.Writer
	cp uint64
}

func newCDCWriter(t *testing.T, c *dstl.Client, stream string) *cdcWriter {
	t.Helper()
	mustCreate(t, c, stream, 4)
	w := openWriter(t, c, stream, dstl.WriterOptions{})
	t.Cleanup(func() { _ = w.Close(context.Background()) })
	return &cdcWriter{t: t, w: w}
}

// commit applies changes ("k=v" puts, "k" deletes) of state "st" and
// checkpoints them.
func (cw *cdcWriter) commit(changes ...string) {
	cw.t.Helper()
	ctx := cw.t.Context()
	for _, ch := range changes {
		var err error
		if k, v, ok := strings.Cut(ch, "="); ok {
			err = cw.w.Put(ctx, "st", []byte(k), []byte(v))
		} else {
			err = cw.w.Delete(ctx, "st", []byte(ch))
		}
		if err != nil {
			cw.t.Fatal(err)
		}
	}
	cw.cp++
	complete, err := cw.w.Checkpoint(ctx, cw.cp, nil)
	if err != nil || !complete {
		cw.t.Fatalf("checkpoint %d: complete %v, %v", cw.cp, complete, err)
	}
}

// show renders an event: "PUT 1 a=1", "-D 2 b", "CHECKPOINT 2".
func show(e dstl.Event) string {
	switch {
	case e.Kind.IsMarker():
		return fmt.Sprintf("%v %d", e.Kind, e.Checkpoint)
	case len(e.Value) == 0:
		return fmt.Sprintf("%v %d %s", e.Kind, e.Checkpoint, e.Key)
	}
	return fmt.Sprintf("%v %d %s=%s", e.Kind, e.Checkpoint, e.Key, e.Value)
}

// drain iterates s to its end (NoFollow) and returns the events shown,
// with their tokens.
func drain(t *testing.T, s *dstl.Subscription) ([]string, []dstl.Token) {
	t.Helper()
	var got []string
	var toks []dstl.Token
	for e, err := range s.Changes() {
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		got = append(got, show(e))
		toks = append(toks, e.Token())
	}
	return got, toks
}

// canonical sorts the events between markers (the order of different keys
// within a checkpoint is the feed's business), keeping a -U/+U pair
// together.
func canonical(evs []string) []string {
	out := slices.Clone(evs)
	start := 0
	for i := 0; i <= len(out); i++ {
		if i < len(out) && !strings.HasPrefix(out[i], "CHECKPOINT") && !strings.HasPrefix(out[i], "RESET") {
			continue
		}
		slices.SortStableFunc(out[start:i], func(a, b string) int {
			return strings.Compare(keyOf(a), keyOf(b))
		})
		start = i + 1
	}
	return out
}

func keyOf(ev string) string {
	f := strings.Fields(ev)
	k, _, _ := strings.Cut(f[len(f)-1], "=")
	return k
}

func TestSubscribeUpsert(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		cw.commit("a=1", "b=2")
		cw.commit("a=3", "b")
		got, toks := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true}))
		want := []string{"PUT 1 a=1", "PUT 1 b=2", "CHECKPOINT 1", "PUT 2 a=3", "-D 2 b", "CHECKPOINT 2"}
		if !slices.Equal(canonical(got), want) {
			t.Fatalf("events %q, want %q", got, want)
		}
		for i, tok := range toks {
			if tok.IsZero() || (i > 0 && tok == toks[i-1]) {
				t.Fatalf("token %d: %v", i, tok)
			}
		}
		// The events of a delta carry their timestamps.
		for e, err := range c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true}).Changes() {
			if err != nil {
				t.Fatal(err)
			}
			if !e.Kind.IsMarker() && (e.Time.IsZero() || time.Since(e.Time) > time.Hour || e.State != "st" || e.KeyGroup < 0 || e.KeyGroup >= 4 || e.Snapshot) {
				t.Fatalf("event %+v", e)
			}
		}
	})
}

func TestSubscribeRetract(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		cw.commit("a=1")
		cw.commit("a=2", "c=5")
		cw.commit("a")
		got, _ := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true, Form: dstl.FormRetract}))
		want := []string{"+I 1 a=1", "CHECKPOINT 1", "-U 2 a=1", "+U 2 a=2", "+I 2 c=5", "CHECKPOINT 2", "-D 3 a=2", "CHECKPOINT 3"}
		if !slices.Equal(canonical(got), want) {
			t.Fatalf("events %q, want %q", got, want)
		}
		i := slices.Index(got, "-U 2 a=1")
		if i < 0 || got[i+1] != "+U 2 a=2" {
			t.Fatalf("-U is not right before its +U: %q", got)
		}
	})
}

func TestSubscribeSnapshotAndLatest(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		cw.commit("a=1", "b=2")
		cw.commit("a=3", "c=4")
		var got []string
		for e, err := range c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true, Start: dstl.StartSnapshot}).Changes() {
			if err != nil {
				t.Fatal(err)
			}
			if !e.Snapshot || !e.Time.IsZero() {
				t.Fatalf("snapshot event %+v", e)
			}
			got = append(got, show(e))
		}
		want := []string{"RESET 2", "PUT 2 a=3", "PUT 2 b=2", "PUT 2 c=4", "CHECKPOINT 2"}
		if !slices.Equal(canonical(got), want) {
			t.Fatalf("snapshot: %q, want %q", got, want)
		}
		if got, _ := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true, Start: dstl.StartLatest})); len(got) != 0 {
			t.Fatalf("latest: %q", got)
		}
	})
}

func TestSubscribeResumeFromEveryToken(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		var puts []string
		for i := range 10 {
			puts = append(puts, fmt.Sprintf("k%02d=%d", i, i))
		}
		cw.commit(puts...)
		cw.commit("k01=x", "k02", "k03=y", "k20=z")
		cw.commit("k04=w")
		for _, form := range []dstl.Form{dstl.FormUpsert, dstl.FormRetract} {
			opts := dstl.SubscribeOptions{NoFollow: true, MaxEvents: 3, Form: form}
			all, toks := drain(t, c.Subscribe(t.Context(), "s", opts))
			if len(all) != 10+1+6+1+2+1 && form == dstl.FormRetract || len(all) != 10+1+4+1+1+1 && form == dstl.FormUpsert {
				t.Fatalf("%v: %d events: %q", form, len(all), all)
			}
			for i, tok := range toks {
				o := opts
				o.From = tok
				rest, _ := drain(t, c.Subscribe(t.Context(), "s", o))
				if !slices.Equal(rest, all[i+1:]) {
					t.Fatalf("%v: from the token of %d (%s): %q, want %q", form, i, all[i], rest, all[i+1:])
				}
			}
			// Breaking the loop and calling Changes again continues.
			s := c.Subscribe(t.Context(), "s", opts)
			var got []string
			for range 2 {
				for e, err := range s.Changes() {
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, show(e))
					if len(got) == 5 {
						break
					}
				}
			}
			if !slices.Equal(got, all) {
				t.Fatalf("%v: break and continue: %q, want %q", form, got, all)
			}
		}
	})
}

func TestSubscribeFollow(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		cw.commit("a=1")
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		s := c.Subscribe(ctx, "s", dstl.SubscribeOptions{})
		var got []string
		for e, err := range s.Changes() {
			if err != nil {
				t.Fatalf("after %q: %v", got, err)
			}
			got = append(got, show(e))
			if e.Kind == dstl.EventCheckpointComplete {
				if e.Checkpoint == 2 {
					break
				}
				cw.commit("b=2") // made after the subscription waits
			}
		}
		want := []string{"PUT 1 a=1", "CHECKPOINT 1", "PUT 2 b=2", "CHECKPOINT 2"}
		if !slices.Equal(got, want) || s.NewestCheckpoint() != 2 {
			t.Fatalf("events %q, want %q (newest %d)", got, want, s.NewestCheckpoint())
		}

		// Cancelling the context ends a follow that waits.
		ctx, cancel = context.WithCancel(t.Context())
		defer cancel()
		s = c.Subscribe(ctx, "s", dstl.SubscribeOptions{})
		var last error
		n := 0
		for _, err := range s.Changes() {
			if err != nil {
				last = err
				break
			}
			if n++; n == 4 {
				time.AfterFunc(50*time.Millisecond, cancel)
			}
		}
		if !errors.Is(last, context.Canceled) || n != 4 {
			t.Fatalf("after cancel: %d events, %v", n, last)
		}
	})
}

func TestSubscribeBadToken(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		cw.commit("a=1")
		mustCreate(t, c, "t", 4)
		_, toks := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true}))
		if _, err := dstl.ParseToken("not-a-token"); !errors.Is(err, dstl.ErrBadToken) {
			t.Fatalf("parse: %v", err)
		}
		real, err := cdc.ParseToken(toks[0].String())
		if err != nil {
			t.Fatal(err)
		}
		edit := func(f func(*cdc.Token)) dstl.Token {
			tok := real
			f(&tok)
			p, err := dstl.ParseToken(tok.String())
			if err != nil {
				t.Fatal(err)
			}
			return p
		}
		for _, tc := range []struct {
			name   string
			stream string
			o      dstl.SubscribeOptions
			code   connect.Code
		}{
			{"other stream", "t", dstl.SubscribeOptions{From: toks[0]}, connect.CodeInvalidArgument},
			{"other form", "s", dstl.SubscribeOptions{From: toks[0], Form: dstl.FormRetract}, connect.CodeInvalidArgument},
			{"other incarnation", "s", dstl.SubscribeOptions{From: edit(func(t *cdc.Token) { t.Incarnation = "another" })}, connect.CodeInvalidArgument},
			{"other key groups", "s", dstl.SubscribeOptions{From: edit(func(t *cdc.Token) { t.KeyGroups.Hi = 1 })}, connect.CodeInvalidArgument},
			{"from the future", "s", dstl.SubscribeOptions{From: edit(func(t *cdc.Token) { t.After, t.Checkpoint, t.Ordinal = 9, 0, 0 })}, connect.CodeOutOfRange},
		} {
			var last error
			for _, err := range c.Subscribe(t.Context(), tc.stream, tc.o).Changes() {
				last = err
			}
			var e *dstl.Error
			if !errors.Is(last, dstl.ErrBadToken) || !errors.As(last, &e) || e.Code != tc.code {
				t.Errorf("%s: %v", tc.name, last)
			}
		}
	})
}

// breaker breaks the subscriptions of a client mid-stream.
type breaker struct {
	breakNow func()
	streams  func() int
}

// breakableClient returns a client that resumes (5 retries) and a way to
// break its streams: remote through a TCP proxy whose connections are
// closed, embedded through a Subscribe handler that fails a send with
// UNAVAILABLE. The second client (of the same node) never breaks, for the
// writers.
func breakableClient(t *testing.T, mode string) (*dstl.Client, *dstl.Client, breaker) {
	t.Helper()
	opts := []dstl.Option{dstl.WithRetries(5), dstl.WithRetryBackoff(10*time.Millisecond, 100*time.Millisecond)}
	if mode == "embedded" {
		h := inProcessServer(t).InProcess()
		var armed atomic.Bool
		var streams atomic.Int64
		sub := func(ctx context.Context, req *dstlv1.SubscribeRequest, send func(*dstlv1.SubscribeResponse) error) error {
			streams.Add(1)
			return h.Subscribe(ctx, req, func(m *dstlv1.SubscribeResponse) error {
				if armed.CompareAndSwap(true, false) {
					return connect.NewError(connect.CodeUnavailable, errors.New("injected break"))
				}
				return send(m)
			})
		}
		c, err := dstl.NewInProcessClient(dstl.Handlers{Streams: h.Streams, Writers: h.Writers, State: h.State, Checkpoints: h.Checkpoints, CDC: h.CDC, Subscribe: sub}, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c, c, breaker{breakNow: func() { armed.Store(true) }, streams: func() int { return int(streams.Load()) }}
	}
	target := strings.TrimPrefix(serveTCP(t, func(h http.Handler) http.Handler { return h }), "http://")
	p := newProxy(t, target)
	c, err := dstl.Dial(t.Context(), "http://"+p.addr(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	direct, err := dstl.Dial(t.Context(), "http://"+target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = direct.Close() })
	return c, direct, breaker{breakNow: p.kill, streams: p.accepted}
}

// proxy relays TCP connections to target; kill closes every open one.
type proxy struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	n     int
	wg    sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln}
	p.wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, in, out)
			p.n++
			p.mu.Unlock()
			p.wg.Go(func() { _, _ = io.Copy(out, in); out.Close() })
			p.wg.Go(func() { _, _ = io.Copy(in, out); in.Close() })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		p.kill()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *proxy) accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

func TestSubscribeResumesAfterBreak(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			c, wc, br := breakableClient(t, mode)
			cw := newCDCWriter(t, wc, "s")
			for cp := range 3 {
				var puts []string
				for i := range 5 {
					puts = append(puts, fmt.Sprintf("k%d.%d=v", cp, i))
				}
				cw.commit(puts...)
			}
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			s := c.Subscribe(ctx, "s", dstl.SubscribeOptions{MaxEvents: 1})
			bg := make(chan struct{})
			var got []string
			for e, err := range s.Changes() {
				if err != nil {
					t.Fatalf("after %q: %v", got, err)
				}
				got = append(got, show(e))
				switch {
				case len(got) == 4:
					br.breakNow()
				case e.Kind == dstl.EventCheckpointComplete && e.Checkpoint == 3:
					// Break the follow while it waits, then make checkpoint 4.
					go func() {
						defer close(bg)
						for br.streams() < 2 {
							time.Sleep(5 * time.Millisecond)
						}
						time.Sleep(100 * time.Millisecond)
						br.breakNow()
						if err := cw.w.Put(ctx, "st", []byte("late"), []byte("1")); err != nil {
							t.Error(err)
						}
						if _, err := cw.w.Checkpoint(ctx, 4, nil); err != nil {
							t.Error(err)
						}
					}()
				}
				if e.Kind == dstl.EventCheckpointComplete && e.Checkpoint == 4 {
					break
				}
			}
			<-bg
			want, _ := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true}))
			if !slices.Equal(got, want) {
				t.Fatalf("with breaks: %q\nwant %q", got, want)
			}
			if n := br.streams(); n < 3 {
				t.Fatalf("%d streams (connections): the breaks did not happen", n)
			}
		})
	}
}

func TestSubscribeEndsOnNodeClose(t *testing.T) {
	n, err := embedded.Open(t.Context(), embedded.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	c := n.Client()
	cw := newCDCWriter(t, c, "s")
	cw.commit("a=1")
	if err := cw.w.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	first := make(chan struct{})
	go func() {
		var last error
		for e, err := range c.Subscribe(context.Background(), "s", dstl.SubscribeOptions{}).Changes() {
			if err != nil {
				last = err
			}
			if e.Kind == dstl.EventCheckpointComplete {
				close(first)
			}
		}
		done <- last
	}()
	<-first
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, dstl.ErrUnavailable) {
		t.Fatalf("a follow after Close: %v", err)
	}
}

func TestRegisteredSubscriptions(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		cw := newCDCWriter(t, c, "s")
		cw.commit("a=1")
		cw.commit("b=2")
		info, err := c.CreateSubscription(t.Context(), "s", "billing", dstl.CreateSubscriptionOptions{})
		if err != nil || info.Name != "billing" || info.Stream != "s" || info.Checkpoint != 0 {
			t.Fatalf("create: %+v, %v", info, err)
		}
		if _, err := c.CreateSubscription(t.Context(), "s", "billing", dstl.CreateSubscriptionOptions{}); !errors.Is(err, dstl.ErrAlreadyExists) {
			t.Fatalf("create again: %v", err)
		}
		// Consume checkpoint 1, commit it.
		var tok dstl.Token
		for e, err := range c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{Name: "billing", NoFollow: true}).Changes() {
			if err != nil {
				t.Fatal(err)
			}
			if e.Kind == dstl.EventCheckpointComplete {
				tok = e.Token()
				break
			}
		}
		info, err = c.CommitSubscription(t.Context(), "s", "billing", tok)
		if err != nil || info.Checkpoint != 1 || info.Token != tok || info.LagCheckpoints != 1 || info.Expired {
			t.Fatalf("commit: %+v, %v", info, err)
		}
		got, _ := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{Name: "billing", NoFollow: true}))
		if want := []string{"PUT 2 b=2", "CHECKPOINT 2"}; !slices.Equal(got, want) {
			t.Fatalf("resumed from the committed token: %q, want %q", got, want)
		}
		if list, err := c.ListSubscriptions(t.Context(), "s"); err != nil || len(list) != 1 || list[0].Name != "billing" {
			t.Fatalf("list: %+v, %v", list, err)
		}
		if got, err := c.GetSubscription(t.Context(), "s", "billing"); err != nil || got.Checkpoint != 1 {
			t.Fatalf("get: %+v, %v", got, err)
		}
		if err := c.DeleteSubscription(t.Context(), "s", "billing"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.GetSubscription(t.Context(), "s", "billing"); !errors.Is(err, dstl.ErrNotFound) {
			t.Fatalf("get after delete: %v", err)
		}
	})
}

// A remote client and the node agree on zstd for large responses (both
// register it after gzip, so it is preferred), and the events arrive
// intact.
func TestSubscribeResponsesUseZstd(t *testing.T) {
	var mu sync.Mutex
	encodings := map[string]bool{}
	url := serveTCP(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h.ServeHTTP(w, r)
			mu.Lock()
			defer mu.Unlock()
			for _, k := range []string{"Connect-Content-Encoding", "Content-Encoding", "Grpc-Encoding"} {
				if v := w.Header().Get(k); v != "" {
					encodings[v] = true
				}
			}
		})
	})
	c, err := dstl.Dial(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cw := newCDCWriter(t, c, "s")
	var kvs []string
	for i := range 500 {
		kvs = append(kvs, fmt.Sprintf("key-%03d=%s", i, strings.Repeat("v", 40)))
	}
	cw.commit(kvs...)
	got, _ := drain(t, c.Subscribe(t.Context(), "s", dstl.SubscribeOptions{NoFollow: true}))
	if len(got) != 501 {
		t.Fatalf("%d events, want 500 and a marker", len(got))
	}
	mu.Lock()
	defer mu.Unlock()
	if !encodings["zstd"] {
		t.Fatalf("response encodings %v, want zstd", encodings)
	}
}
