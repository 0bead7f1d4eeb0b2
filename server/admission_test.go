package server

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// The counter finds every change of a marshalled AppendRequest, whatever
// the chunks the bytes arrive in, and prices garbage pessimistically.
func TestChangeCounter(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 127, 128, 5000} {
		req := &dstlv1.AppendRequest{WriterId: "s/1", Durability: dstlv1.Durability_DURABILITY_LOCAL}
		for i := range n {
			req.Changes = append(req.Changes, &dstlv1.Change{KeyGroup: uint32(i % 300), State: "st", Op: dstlv1.Op_OP_PUT,
				Key: bytes.Repeat([]byte("k"), rng.IntN(300)), Value: bytes.Repeat([]byte("v"), rng.IntN(3000)), TimestampMs: int64(i)})
		}
		wire, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		var c changeCounter
		for rest := wire; len(rest) > 0; {
			k := min(1+rng.IntN(64), len(rest))
			c.feed(rest[:k])
			rest = rest[k:]
		}
		if c.changes() != int64(n) {
			t.Errorf("%d changes in %d bytes: counted %d", n, len(wire), c.changes())
		}
	}
	var c changeCounter
	c.feed([]byte{0x0b, 1, 2, 3, 4, 5, 6, 7}) // wire type 3 (group): unparseable
	if c.changes() < 3 {
		t.Errorf("garbage counted as %d changes, want the most it could hold", c.changes())
	}
}

// The budget admits in FIFO order, never above its size, lets a
// reservation larger than itself through alone, and a waiter that gives up
// leaves nothing reserved.
func TestBudget(t *testing.T) {
	ctx := context.Background()
	b := newBudget(100)
	if got, err := b.acquire(ctx, 60); err != nil || got != 60 {
		t.Fatal(got, err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := b.acquire(short, 50); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("over the budget: %v, want to wait until the deadline", err)
	}
	done := make(chan int64)
	go func() {
		got, _ := b.acquire(ctx, 1000) // larger than the budget: alone
		done <- got
	}()
	time.Sleep(10 * time.Millisecond)
	if b.inUse() != 60 {
		t.Fatalf("in use %d, want 60", b.inUse())
	}
	b.release(60)
	if got := <-done; got != 100 || b.inUse() != 100 {
		t.Fatalf("oversized reservation got %d, in use %d; want the whole budget", got, b.inUse())
	}
	b.release(100)
	if b.inUse() != 0 {
		t.Fatalf("in use %d after releasing everything", b.inUse())
	}
}

// More changes than MaxBatchChanges is INVALID_ARGUMENT, counted from the
// wire before anything is decoded, over every protocol; a batch at the
// limit is appended; concurrent appends above the request memory wait for
// room instead of failing, and every reservation is given back.
func TestAppendAdmission(t *testing.T) {
	ctx := context.Background()
	for _, proto := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}, {"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}}, {"connect-gzip", []connect.ClientOption{connect.WithSendGzip()}}} {
		t.Run(proto.name, func(t *testing.T) {
			c, srv := startServerWith(t, Options{MaxBatchChanges: 1000, MaxRequestMemory: 8 << 20, MaxMessageBytes: 1 << 20}, proto.opts...)
			if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 1})); err != nil {
				t.Fatal(err)
			}
			ow, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
			if err != nil {
				t.Fatal(err)
			}
			batch := func(n int) *dstlv1.AppendRequest {
				req := &dstlv1.AppendRequest{WriterId: ow.Msg.GetWriterId()}
				for range n {
					req.Changes = append(req.Changes, put(0, "k", "v"))
				}
				return req
			}
			_, err = c.writers.Append(ctx, connect.NewRequest(batch(1001)))
			wantCode(t, "append above the batch limit", err, connect.CodeInvalidArgument, "at most 1000 changes")
			// Each costs ~1000 x 1280 B of the 6 MiB work budget: a few at a
			// time, the others wait.
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for range 16 {
				wg.Go(func() {
					_, err := c.writers.Append(ctx, connect.NewRequest(batch(1000)))
					errs <- err
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatalf("concurrent appends over the request memory: %v, want them to wait", err)
				}
			}
			if w, k := srv.admit.wire.inUse(), srv.admit.work.inUse(); w != 0 || k != 0 {
				t.Fatalf("after the appends: %d wire and %d work bytes still reserved", w, k)
			}
		})
	}
}

// A stream of batches holds one batch's reservation at a time.
func TestAppendStreamAdmission(t *testing.T) {
	ctx := context.Background()
	c, srv := startServerWith(t, Options{MaxBatchChanges: 1000, MaxRequestMemory: 8 << 20, MaxMessageBytes: 1 << 20}, connect.WithGRPC())
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 1})); err != nil {
		t.Fatal(err)
	}
	ow, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	st := c.writers.AppendStream(ctx)
	for i := range 20 { // 20 x 1.3 MB of work: more than the 6 MiB budget in all
		req := &dstlv1.AppendRequest{WriterId: ow.Msg.GetWriterId()}
		for range 1000 {
			req.Changes = append(req.Changes, put(0, "k", "v"))
		}
		if err := st.Send(req); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	res, err := st.CloseAndReceive()
	if err != nil || res.Msg.GetChanges() != 20000 {
		t.Fatalf("AppendStream: %v %v", res, err)
	}
	if w, k := srv.admit.wire.inUse(), srv.admit.work.inUse(); w != 0 || k != 0 {
		t.Fatalf("after the stream: %d wire and %d work bytes still reserved", w, k)
	}
	// A raw request without Content-Length is priced at the maximum and
	// still served.
	body, _ := proto.Marshal(&dstlv1.ListStreamsRequest{})
	req, _ := http.NewRequest(http.MethodPost, c.url+dstlv1connect.StreamServiceListStreamsProcedure, struct{ *bytes.Reader }{bytes.NewReader(body)})
	req.Header.Set("Content-Type", "application/proto")
	resp, err := c.http.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("unknown-length request: %v %v", resp, err)
	}
	resp.Body.Close()
}

// Request memory too small for one maximum request is refused at New: the
// bound would not hold otherwise.
func TestRequestMemoryTooSmall(t *testing.T) {
	if _, err := New(nil, Options{MaxRequestMemory: 64 << 20}); err == nil || !strings.Contains(err.Error(), "raise it") {
		t.Fatalf("New with 64 MiB of request memory for the default limits: %v, want a refusal", err)
	}
}
