package server

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/upload/file"
)

type testClients struct {
	url        string
	http       *http.Client
	streams    dstlv1connect.StreamServiceClient
	writers    dstlv1connect.WriterServiceClient
	state      dstlv1connect.StateServiceClient
	checkpoint dstlv1connect.CheckpointServiceClient
}

// startServer runs a real node behind the API on an h2c loopback server.
func startServer(t *testing.T, opts ...connect.ClientOption) *testClients {
	t.Helper()
	c, _ := startServerWith(t, Options{}, opts...)
	return c
}

// startServerWith is startServer with server options.
func startServerWith(t *testing.T, srvOpts Options, opts ...connect.ClientOption) (*testClients, *Server) {
	t.Helper()
	ctx := context.Background()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	nodeOpts := changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(node, srvOpts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), Protocols: new(http.Protocols)}
	hs.Protocols.SetHTTP1(true)
	hs.Protocols.SetUnencryptedHTTP2(true)
	go hs.Serve(ln)
	t.Cleanup(func() {
		hs.Close()
		node.Close(context.Background())
		store.Close()
	})
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: p}}
	url := "http://" + ln.Addr().String()
	return &testClients{
		url:        url,
		http:       hc,
		streams:    dstlv1connect.NewStreamServiceClient(hc, url, opts...),
		writers:    dstlv1connect.NewWriterServiceClient(hc, url, opts...),
		state:      dstlv1connect.NewStateServiceClient(hc, url, opts...),
		checkpoint: dstlv1connect.NewCheckpointServiceClient(hc, url, opts...),
	}, srv
}

func wantCode(t *testing.T, what string, err error, code connect.Code, msgPart string) {
	t.Helper()
	if connect.CodeOf(err) != code {
		t.Fatalf("%s: got %v (code %v), want %v", what, err, connect.CodeOf(err), code)
	}
	if msgPart != "" && !strings.Contains(err.Error(), msgPart) {
		t.Fatalf("%s: message %q does not name %q", what, err, msgPart)
	}
}

func put(kg uint32, key, value string) *dstlv1.Change {
	return &dstlv1.Change{KeyGroup: kg, State: "s", Op: dstlv1.Op_OP_PUT, Key: []byte(key), Value: []byte(value)}
}

// Bad input of every kind gets its code and a message naming what was
// wrong, over gRPC as well as Connect, and the node keeps serving others.
func TestBadInputOverTheWire(t *testing.T) {
	for _, proto := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}, {"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}}} {
		t.Run(proto.name, func(t *testing.T) {
			ctx := context.Background()
			c := startServer(t, proto.opts...)
			_, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "good", KeyGroups: 8}))
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "good"}))
			wantCode(t, "create twice", err, connect.CodeAlreadyExists, "good")
			_, err = c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "../x"}))
			wantCode(t, "bad name", err, connect.CodeInvalidArgument, "../x")
			_, err = c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "big", KeyGroups: 40000}))
			wantCode(t, "too many key groups", err, connect.CodeInvalidArgument, "40000")
			_, err = c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "missing"}))
			wantCode(t, "unknown stream", err, connect.CodeNotFound, "missing")
			_, err = c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "good", KeyGroups: &dstlv1.KeyGroupRange{Lo: 4, Hi: 9}}))
			wantCode(t, "range outside the stream", err, connect.CodeInvalidArgument, "4..9")

			old, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "good", KeyGroups: &dstlv1.KeyGroupRange{Lo: 0, Hi: 3}}))
			if err != nil {
				t.Fatal(err)
			}
			id := old.Msg.WriterId
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(5, "k", "v")}}))
			wantCode(t, "key group outside the writer", err, connect.CodeInvalidArgument, "key group 5")
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(1, "k", strings.Repeat("x", 16<<20+1))}}))
			wantCode(t, "oversized value", err, connect.CodeInvalidArgument, "value")
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{{KeyGroup: 1, Op: 42}}}))
			wantCode(t, "unknown op", err, connect.CodeInvalidArgument, "op")
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(1, "k", "v")}, Durability: dstlv1.Durability_DURABILITY_REPLICATED}))
			wantCode(t, "replicated on one node", err, connect.CodeUnimplemented, "replicated")
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: "good/999", Changes: []*dstlv1.Change{put(1, "k", "v")}}))
			wantCode(t, "unknown writer", err, connect.CodeNotFound, "good/999")

			// A newer epoch over overlapping key groups fences the old writer.
			if _, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "good", KeyGroups: &dstlv1.KeyGroupRange{Lo: 2, Hi: 7}})); err != nil {
				t.Fatal(err)
			}
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(1, "k", "v")}}))
			if connect.CodeOf(err) != connect.CodeFailedPrecondition && connect.CodeOf(err) != connect.CodeNotFound {
				t.Fatalf("stale epoch append: %v, want FailedPrecondition (fenced) or NotFound (dropped)", err)
			}
			_, err = c.checkpoint.GetCheckpoint(ctx, connect.NewRequest(&dstlv1.GetCheckpointRequest{Stream: "good", Id: 7}))
			wantCode(t, "unknown checkpoint", err, connect.CodeNotFound, "7")

			// The node still serves good requests.
			w, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "good"}))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: w.Msg.WriterId, Changes: []*dstlv1.Change{put(1, "k", "v")}})); err != nil {
				t.Fatal(err)
			}
			got, err := c.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: "good", State: "s", Key: []byte("k"), KeyGroup: ptr(uint32(1))}))
			if err != nil || !got.Msg.Found || string(got.Msg.Value) != "v" {
				t.Fatalf("get after bad input: %+v, %v", got, err)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// Garbage instead of a protobuf message is INVALID_ARGUMENT, not a crash.
func TestMalformedProtobuf(t *testing.T) {
	c := startServer(t)
	for _, body := range [][]byte{{0xff, 0xff, 0xff}, []byte("not a protobuf"), bytes.Repeat([]byte{0x0a}, 100)} {
		req, err := http.NewRequest(http.MethodPost, c.url+dstlv1connect.StreamServiceCreateStreamProcedure, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/proto")
		res, err := c.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusBadRequest {
			t.Fatalf("garbage body %q: HTTP %d, want 400 (invalid_argument)", body, res.StatusCode)
		}
	}
	if _, err := c.streams.ListStreams(context.Background(), connect.NewRequest(&dstlv1.ListStreamsRequest{})); err != nil {
		t.Fatalf("node stopped serving after malformed requests: %v", err)
	}
}

// A client that disconnects in the middle of a stream of batches: the
// batches received before are appended in order, nothing half-appended, and
// the writer and node keep working.
func TestClientDisconnectsMidStream(t *testing.T) {
	ctx := context.Background()
	c := startServer(t)
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 4})); err != nil {
		t.Fatal(err)
	}
	w, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	id := w.Msg.WriterId
	sctx, cancel := context.WithCancel(ctx)
	stream := c.writers.AppendStream(sctx)
	for i := range 10 {
		if err := stream.Send(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(uint32(i%4), "k", "v")}}); err != nil {
			t.Fatal(err)
		}
	}
	cancel() // disconnect without closing the stream properly
	_, err = stream.CloseAndReceive()
	if err == nil {
		t.Fatal("a cancelled stream reported success")
	}
	// The handler may still be finishing batches it received before the
	// disconnect: wait until the writer's position stops moving.
	var settled uint64
	for stable := 0; stable < 3; {
		p, err := c.writers.Persist(ctx, connect.NewRequest(&dstlv1.PersistRequest{WriterId: id}))
		if err != nil {
			t.Fatal(err)
		}
		if p.Msg.UpToSqn == settled {
			stable++
		} else {
			settled, stable = p.Msg.UpToSqn, 0
		}
		time.Sleep(20 * time.Millisecond)
	}
	if settled > 10 {
		t.Fatalf("%d changes appended from a stream of 10 batches", settled)
	}
	// The writer works on; its next SQN follows whatever was appended.
	res, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(0, "after", "x")}}))
	if err != nil {
		t.Fatal(err)
	}
	if res.Msg.FirstSqn != settled+1 {
		t.Fatalf("append after disconnect got SQN %d, want %d", res.Msg.FirstSqn, settled+1)
	}
	p, err := c.writers.Persist(ctx, connect.NewRequest(&dstlv1.PersistRequest{WriterId: id}))
	if err != nil || p.Msg.UpToSqn != res.Msg.LastSqn {
		t.Fatalf("persist after disconnect: %+v, %v", p, err)
	}
	// A complete stream of batches reports what it appended.
	stream = c.writers.AppendStream(ctx)
	for range 5 {
		if err := stream.Send(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(1, "k", "v"), put(2, "k", "v")}}); err != nil {
			t.Fatal(err)
		}
	}
	sum, err := stream.CloseAndReceive()
	if err != nil || sum.Msg.Batches != 5 || sum.Msg.Changes != 10 || sum.Msg.LastSqn != res.Msg.LastSqn+10 {
		t.Fatalf("append stream: %+v, %v", sum, err)
	}
}

// Scans page through every key in order, whatever the page size.
func TestScanPagination(t *testing.T) {
	ctx := context.Background()
	c := startServer(t)
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 4})); err != nil {
		t.Fatal(err)
	}
	w, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	var batch []*dstlv1.Change
	for i := range 250 {
		batch = append(batch, put(uint32(i%4), string(rune('a'+i%26))+strings.Repeat("k", i/26), "v"))
	}
	if _, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: w.Msg.WriterId, Changes: batch})); err != nil {
		t.Fatal(err)
	}
	var got []*dstlv1.KeyValue
	token := ""
	for pages := 0; ; pages++ {
		res, err := c.state.Scan(ctx, connect.NewRequest(&dstlv1.ScanRequest{Stream: "s", PageSize: 7, PageToken: token}))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, res.Msg.Entries...)
		if token = res.Msg.NextPageToken; token == "" {
			break
		}
		if pages > 100 {
			t.Fatal("scan does not end")
		}
	}
	if len(got) != 250 {
		t.Fatalf("scanned %d entries, want 250", len(got))
	}
	for i := 1; i < len(got); i++ {
		a, b := got[i-1], got[i]
		if a.KeyGroup > b.KeyGroup || (a.KeyGroup == b.KeyGroup && string(a.Key) >= string(b.Key)) {
			t.Fatalf("scan out of order at %d: %v then %v", i, a, b)
		}
	}
	_, err = c.state.Scan(ctx, connect.NewRequest(&dstlv1.ScanRequest{Stream: "s", PageToken: "!!"}))
	wantCode(t, "bad page token", err, connect.CodeInvalidArgument, "page token")
}
