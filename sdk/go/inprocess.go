package dstl

import (
	"context"
	"errors"
	"sync"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// Handlers are a node's service implementations, called directly by an
// in-process client (sdk/go/embedded): the same methods the RPC server
// exposes, without HTTP/2 and without encoding a message. The server's
// InProcess method returns them.
type Handlers struct {
	Streams     dstlv1connect.StreamServiceHandler
	Writers     dstlv1connect.WriterServiceHandler
	State       dstlv1connect.StateServiceHandler
	Checkpoints dstlv1connect.CheckpointServiceHandler
	// CDC serves the registered subscriptions' unary methods (its
	// Subscribe is not called: see the Subscribe field). Optional: without
	// it those calls fail with UNIMPLEMENTED.
	CDC dstlv1connect.CDCServiceHandler
	// Subscribe runs CDCService.Subscribe for an in-process caller: it
	// calls send with each message, in order, and returns when the
	// subscription ends (nil once a no_follow subscription delivered
	// everything), when send fails (it then returns send's error or one of
	// its own), or when ctx ends. send blocks until the client takes the
	// message, and hands it over: the server must not touch a message
	// (nor the byte slices in it) after send returns. Optional: without it
	// Subscribe fails with UNIMPLEMENTED.
	Subscribe func(ctx context.Context, req *dstlv1.SubscribeRequest, send func(*dstlv1.SubscribeResponse) error) error
}

// The unary methods a Client calls: both a connect client over the network
// and the node's handlers in-process have them.
type (
	streamCalls interface {
		CreateStream(context.Context, *connect.Request[dstlv1.CreateStreamRequest]) (*connect.Response[dstlv1.CreateStreamResponse], error)
		GetStream(context.Context, *connect.Request[dstlv1.GetStreamRequest]) (*connect.Response[dstlv1.GetStreamResponse], error)
		ListStreams(context.Context, *connect.Request[dstlv1.ListStreamsRequest]) (*connect.Response[dstlv1.ListStreamsResponse], error)
		DeleteStream(context.Context, *connect.Request[dstlv1.DeleteStreamRequest]) (*connect.Response[dstlv1.DeleteStreamResponse], error)
	}
	writerCalls interface {
		OpenWriter(context.Context, *connect.Request[dstlv1.OpenWriterRequest]) (*connect.Response[dstlv1.OpenWriterResponse], error)
		Append(context.Context, *connect.Request[dstlv1.AppendRequest]) (*connect.Response[dstlv1.AppendResponse], error)
		Persist(context.Context, *connect.Request[dstlv1.PersistRequest]) (*connect.Response[dstlv1.PersistResponse], error)
		Checkpoint(context.Context, *connect.Request[dstlv1.CheckpointRequest]) (*connect.Response[dstlv1.CheckpointResponse], error)
		CloseWriter(context.Context, *connect.Request[dstlv1.CloseWriterRequest]) (*connect.Response[dstlv1.CloseWriterResponse], error)
	}
	stateCalls interface {
		Get(context.Context, *connect.Request[dstlv1.GetRequest]) (*connect.Response[dstlv1.GetResponse], error)
		Scan(context.Context, *connect.Request[dstlv1.ScanRequest]) (*connect.Response[dstlv1.ScanResponse], error)
	}
	checkpointCalls interface {
		ListCheckpoints(context.Context, *connect.Request[dstlv1.ListCheckpointsRequest]) (*connect.Response[dstlv1.ListCheckpointsResponse], error)
		GetCheckpoint(context.Context, *connect.Request[dstlv1.GetCheckpointRequest]) (*connect.Response[dstlv1.GetCheckpointResponse], error)
		RetainCheckpoint(context.Context, *connect.Request[dstlv1.RetainCheckpointRequest]) (*connect.Response[dstlv1.RetainCheckpointResponse], error)
	}
	cdcCalls interface {
		CreateSubscription(context.Context, *connect.Request[dstlv1.CreateSubscriptionRequest]) (*connect.Response[dstlv1.CreateSubscriptionResponse], error)
		CommitSubscription(context.Context, *connect.Request[dstlv1.CommitSubscriptionRequest]) (*connect.Response[dstlv1.CommitSubscriptionResponse], error)
		GetSubscription(context.Context, *connect.Request[dstlv1.GetSubscriptionRequest]) (*connect.Response[dstlv1.GetSubscriptionResponse], error)
		ListSubscriptions(context.Context, *connect.Request[dstlv1.ListSubscriptionsRequest]) (*connect.Response[dstlv1.ListSubscriptionsResponse], error)
		DeleteSubscription(context.Context, *connect.Request[dstlv1.DeleteSubscriptionRequest]) (*connect.Response[dstlv1.DeleteSubscriptionResponse], error)
	}
)

// NewInProcessClient returns a client that calls h directly, in this
// process. It behaves as a client of the same node over the network (the
// same methods, errors, retries and timeouts), except that an error is
// always the node's own answer (no connection can break mid-call) and
// connect options (interceptors, compression) do not apply. Close stops
// it: later calls fail with ErrUnavailable, and Close waits for the calls
// in flight, so the node can be shut down after it. WithHTTPClient and
// WithConnectOptions are ignored.
func NewInProcessClient(h Handlers, opts ...Option) (*Client, error) {
	if h.Streams == nil || h.Writers == nil || h.State == nil || h.Checkpoints == nil {
		return nil, errors.New("dstl: NewInProcessClient: every handler is required")
	}
	o := options{timeout: DefaultTimeout, retries: DefaultRetries, backoff: DefaultRetryBackoff, maxBackoff: DefaultMaxBackoff}
	for _, opt := range opts {
		opt(&o)
	}
	c := &Client{
		opts: o, baseURL: "in-process", gate: &callGate{done: make(chan struct{})},
		streams: h.Streams, writers: h.Writers, state: h.State, checkpoints: h.Checkpoints,
		cdc: noCDC{},
	}
	if h.CDC != nil {
		c.cdc = h.CDC
	}
	c.subscribe = c.subscribeUnimplemented
	if h.Subscribe != nil {
		c.subscribe = func(ctx context.Context, req *dstlv1.SubscribeRequest) (eventStream, error) {
			return openInProcessStream(ctx, c.gate, h.Subscribe, req)
		}
	}
	return c, nil
}

// callGate counts the calls of an in-process client in flight, so that
// Close can refuse new ones and wait for the rest: the node behind it must
// not close under a running call.
type callGate struct {
	mu     sync.Mutex
	closed bool
	calls  sync.WaitGroup
	// done is closed by close: subscriptions in flight end on it, since
	// close waits for them.
	done chan struct{}
}

// errClientClosed: a call on an in-process client after Close.
var errClientClosed = connect.NewError(connect.CodeUnavailable, errors.New("the in-process client is closed (its node is shutting down)"))

func (g *callGate) enter() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClientClosed
	}
	g.calls.Add(1)
	return nil
}

func (g *callGate) exit() { g.calls.Done() }

func (g *callGate) close() {
	g.mu.Lock()
	if !g.closed {
		g.closed = true
		close(g.done)
	}
	g.mu.Unlock()
	g.calls.Wait()
}

func (g *callGate) isClosed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}

// inProcess is an error of the node's own making: there is no connection
// to break, so the request was refused as a whole (see retryable).
func (c *Client) inProcess() bool { return c.gate != nil }
