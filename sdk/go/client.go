package dstl

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"iter"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/internal/zstdwire"
)

// Durability is how durable an append is when the server acknowledges it.
type Durability int

const (
	// DurabilityDefault lets the server apply its configured default.
	DurabilityDefault Durability = iota
	// Buffered: in the node's memory; made durable by the next Persist or
	// Checkpoint (lost if the node crashes first).
	Buffered
	// Local: fsynced in the node's local log (group commit).
	Local
	// Replicated: copied to other nodes (cluster mode; refused on a single
	// node).
	Replicated
)

func (d Durability) proto() dstlv1.Durability {
	switch d {
	case Buffered:
		return dstlv1.Durability_DURABILITY_BUFFERED
	case Local:
		return dstlv1.Durability_DURABILITY_LOCAL
	case Replicated:
		return dstlv1.Durability_DURABILITY_REPLICATED
	}
	return dstlv1.Durability_DURABILITY_UNSPECIFIED
}

func (d Durability) String() string {
	switch d {
	case DurabilityDefault:
		return "default"
	case Buffered:
		return "buffered"
	case Local:
		return "local"
	case Replicated:
		return "replicated"
	}
	return fmt.Sprintf("durability(%d)", int(d))
}

// Defaults of a Client.
const (
	DefaultTimeout      = 30 * time.Second
	DefaultRetries      = 4
	DefaultRetryBackoff = 50 * time.Millisecond
	DefaultMaxBackoff   = 2 * time.Second
)

type options struct {
	timeout     time.Duration
	retries     int
	backoff     time.Duration
	maxBackoff  time.Duration
	httpClient  connect.HTTPClient
	durability  Durability
	connectOpts []connect.ClientOption
}

// Option configures a Client.
type Option func(*options)

// WithTimeout bounds each attempt of each call (default 30s; 0 or less:
// only the caller's context bounds it). The caller's context bounds the
// whole call, retries included.
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithRetries sets how many times a call is retried after a retryable
// failure (default 4; 0 disables retries).
func WithRetries(n int) Option {
	return func(o *options) {
		if n < 0 {
			n = 0
		}
		o.retries = n
	}
}

// WithRetryBackoff sets the first and the largest backoff between retries
// (defaults 50ms and 2s). The backoff doubles on every retry, with full
// jitter.
func WithRetryBackoff(initial, max time.Duration) Option {
	return func(o *options) { o.backoff, o.maxBackoff = initial, max }
}

// WithHTTPClient replaces the HTTP client (and so the transport). It must
// speak HTTP/2 to the server (h2c for http:// URLs).
func WithHTTPClient(c connect.HTTPClient) Option { return func(o *options) { o.httpClient = c } }

// WithDurability sets the default durability of the client's writers
// (default DurabilityDefault: the server's default).
func WithDurability(d Durability) Option { return func(o *options) { o.durability = d } }

// WithConnectOptions passes options (interceptors, compression, protocol)
// to the underlying connect clients.
func WithConnectOptions(opts ...connect.ClientOption) Option {
	return func(o *options) { o.connectOpts = append(o.connectOpts, opts...) }
}

// Client is a connection to a dstl node. It is safe for concurrent use.
type Client struct {
	opts        options
	baseURL     string
	transport   *http.Transport // nil if the caller brought its own client
	gate        *callGate       // an in-process client's calls; nil over the network
	streams     streamCalls
	writers     writerCalls
	state       stateCalls
	checkpoints checkpointCalls
	cdc         cdcCalls
	// subscribe opens one Subscribe stream (cdc.go).
	subscribe func(context.Context, *dstlv1.SubscribeRequest) (eventStream, error)

	// scheme is baseURL's ("" in-process).
	scheme string
	// nodes are clients of other members of the cluster, by URL, that
	// writers followed their owner to (owner.go); closed by Close.
	nodesMu sync.Mutex
	nodes   map[string]*Client
}

// Dial returns a client of the node at rawURL: http://host:port speaks
// HTTP/2 cleartext (h2c), https://host:port HTTP/2 over TLS. Dial does not
// contact the node; the first call does. ctx is reserved for future use.
func Dial(ctx context.Context, rawURL string, opts ...Option) (*Client, error) {
	_ = ctx
	o := options{timeout: DefaultTimeout, retries: DefaultRetries, backoff: DefaultRetryBackoff, maxBackoff: DefaultMaxBackoff}
	for _, opt := range opts {
		opt(&o)
	}
	return dial(rawURL, o)
}

// dial builds a client of rawURL with options o (a transport of its own
// unless o brings an HTTP client).
func dial(rawURL string, o options) (*Client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("dstl: dial %q: %w", rawURL, err)
	}
	if u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("dstl: dial %q: want http://host:port or https://host:port", rawURL)
	}
	c := &Client{opts: o, baseURL: strings.TrimRight(rawURL, "/"), scheme: u.Scheme}
	if o.httpClient == nil {
		p := new(http.Protocols)
		t := &http.Transport{
			Protocols: p, ForceAttemptHTTP2: true, IdleConnTimeout: 90 * time.Second,
			// A connection that went silent (the node or the network died
			// without a reset) is pinged and closed when the ping is not
			// answered, so a call or a subscription's follow on it fails
			// (and a subscription resumes) instead of hanging.
			HTTP2: &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second},
		}
		if u.Scheme == "http" {
			p.SetUnencryptedHTTP2(true)
		} else {
			p.SetHTTP2(true)
			t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		c.transport = t
		c.opts.httpClient = &http.Client{Transport: t}
	}
	hc := c.opts.httpClient
	// zstd for responses when the node offers it (it is preferred, being
	// registered after connect's default gzip): cheaper than gzip for the
	// same bytes. Requests are not compressed. The caller's options come
	// after, so WithConnectOptions can change this.
	o.connectOpts = append([]connect.ClientOption{
		connect.WithAcceptCompression(zstdwire.Name, zstdwire.NewDecompressor, zstdwire.NewCompressor),
	}, o.connectOpts...)
	c.streams = dstlv1connect.NewStreamServiceClient(hc, c.baseURL, o.connectOpts...)
	c.writers = dstlv1connect.NewWriterServiceClient(hc, c.baseURL, o.connectOpts...)
	c.state = dstlv1connect.NewStateServiceClient(hc, c.baseURL, o.connectOpts...)
	c.checkpoints = dstlv1connect.NewCheckpointServiceClient(hc, c.baseURL, o.connectOpts...)
	cdcClient := dstlv1connect.NewCDCServiceClient(hc, c.baseURL, o.connectOpts...)
	c.cdc = cdcClient
	c.subscribe = func(ctx context.Context, req *dstlv1.SubscribeRequest) (eventStream, error) {
		s, err := cdcClient.Subscribe(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return remoteStream{s}, nil
	}
	return c, nil
}

// Close releases the client's idle connections, those to other nodes its
// writers followed their owners to included. Close writers first. An
// in-process client refuses calls from then on and waits for the calls in
// flight.
func (c *Client) Close() error {
	if c.gate != nil {
		c.gate.close()
	}
	c.nodesMu.Lock()
	nodes := c.nodes
	c.nodes = nil
	c.nodesMu.Unlock()
	for _, n := range nodes {
		_ = n.Close()
	}
	if c.transport != nil {
		c.transport.CloseIdleConnections()
	}
	return nil
}

// retryable reports whether a failed attempt may be retried. idempotent
// calls retry UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED; the
// others retry UNAVAILABLE and RESOURCE_EXHAUSTED only when the server
// itself answered with them (the request was then refused as a whole, so it
// is safe to send again), not when the connection broke mid-call. An
// in-process client's errors are always the node's answer (answered).
func retryable(err error, idempotent, answered bool) bool {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return false
	}
	switch ce.Code() {
	case connect.CodeUnavailable, connect.CodeResourceExhausted:
		return idempotent || answered || connect.IsWireError(ce)
	case connect.CodeDeadlineExceeded:
		return idempotent
	}
	return false
}

// call runs fn with the client's per-attempt timeout and retry policy.
func call[Req, Res any](ctx context.Context, c *Client, op string, idempotent bool, fn func(context.Context, *connect.Request[Req]) (*connect.Response[Res], error), req *Req) (*Res, error) {
	if err := validRequest(op, req); err != nil {
		return nil, err
	}
	if c.gate != nil {
		if err := c.gate.enter(); err != nil {
			return nil, wrapErr(op, err)
		}
		defer c.gate.exit()
	}
	for attempt := 0; ; attempt++ {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if c.opts.timeout > 0 {
			actx, cancel = context.WithTimeout(ctx, c.opts.timeout)
		}
		res, err := fn(actx, connect.NewRequest(req))
		cancel()
		if err == nil {
			return res.Msg, nil
		}
		if attempt >= c.opts.retries || ctx.Err() != nil || !retryable(err, idempotent, c.inProcess()) {
			return nil, wrapErr(op, err)
		}
		if err := sleep(ctx, backoff(c.opts.backoff, c.opts.maxBackoff, attempt)); err != nil {
			return nil, wrapErr(op, err)
		}
	}
}

// backoff returns the wait before retry attempt+1: full jitter over an
// exponentially growing ceiling.
func backoff(initial, max time.Duration, attempt int) time.Duration {
	if initial <= 0 {
		return 0
	}
	ceil := initial
	for i := 0; i < attempt && ceil < max; i++ {
		ceil *= 2
	}
	if max > 0 && ceil > max {
		ceil = max
	}
	return ceil/2 + rand.N(ceil/2+1)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ---------------------------------------------------------------- streams

// Stream describes a stream.
type Stream struct {
	Name      string
	KeyGroups int
	CreatedAt time.Time
	// Hydration is the progress of a lazy restore of the stream on the node
	// that answered (Client.Stream only; nil when nothing of it was
	// restored lazily there).
	Hydration *Hydration
}

// Hydration is how much of a lazily restored state is local on a node:
// snapshot files imported by reference are read from the blob store on
// demand and downloaded in the background.
type Hydration struct {
	TotalBytes, LocalBytes int64
	TotalFiles, LocalFiles int
	// LastError is the newest download failure (retried); empty if none.
	LastError string
}

// Done reports whether every byte is local.
func (h Hydration) Done() bool { return h.LocalFiles == h.TotalFiles }

func streamOf(p *dstlv1.Stream) Stream {
	s := Stream{Name: p.GetName(), KeyGroups: int(p.GetKeyGroups()), CreatedAt: time.UnixMilli(p.GetCreatedAtMs())}
	if h := p.GetHydration(); h != nil {
		s.Hydration = &Hydration{
			TotalBytes: int64(h.GetTotalBytes()), LocalBytes: int64(h.GetLocalBytes()),
			TotalFiles: int(h.GetTotalFiles()), LocalFiles: int(h.GetLocalFiles()), LastError: h.GetLastError(),
		}
	}
	return s
}

// CreateStream creates a stream with keyGroups key groups (0: the default,
// 128). ErrAlreadyExists if the name is taken.
func (c *Client) CreateStream(ctx context.Context, name string, keyGroups int) (Stream, error) {
	if keyGroups < 0 {
		return Stream{}, invalid("CreateStream", "negative key-group count %d", keyGroups)
	}
	if err := validStream("CreateStream", name); err != nil {
		return Stream{}, err
	}
	res, err := call(ctx, c, "CreateStream", false, c.streams.CreateStream, &dstlv1.CreateStreamRequest{Name: name, KeyGroups: uint32(keyGroups)})
	if err != nil {
		return Stream{}, err
	}
	return streamOf(res.GetStream()), nil
}

// EnsureStream returns stream name, creating it with keyGroups key groups
// (0: the default) if it does not exist. An existing stream is returned as
// it is, whatever its key-group count.
func (c *Client) EnsureStream(ctx context.Context, name string, keyGroups int) (Stream, error) {
	st, err := c.Stream(ctx, name)
	if !errors.Is(err, ErrNotFound) {
		return st, err
	}
	st, err = c.CreateStream(ctx, name, keyGroups)
	if errors.Is(err, ErrAlreadyExists) {
		return c.Stream(ctx, name)
	}
	return st, err
}

// Stream describes the stream name. ErrNotFound if it does not exist.
func (c *Client) Stream(ctx context.Context, name string) (Stream, error) {
	if err := validStream("GetStream", name); err != nil {
		return Stream{}, err
	}
	res, err := call(ctx, c, "GetStream", true, c.streams.GetStream, &dstlv1.GetStreamRequest{Name: name})
	if err != nil {
		return Stream{}, err
	}
	return streamOf(res.GetStream()), nil
}

// ListStreams iterates over every stream in name order, fetching a page at
// a time. It stops at the first error, which it yields.
func (c *Client) ListStreams(ctx context.Context) iter.Seq2[Stream, error] {
	return func(yield func(Stream, error) bool) {
		token := ""
		for {
			res, err := call(ctx, c, "ListStreams", true, c.streams.ListStreams, &dstlv1.ListStreamsRequest{PageToken: token})
			if err != nil {
				yield(Stream{}, err)
				return
			}
			for _, s := range res.GetStreams() {
				if !yield(streamOf(s), nil) {
					return
				}
			}
			if token = res.GetNextPageToken(); token == "" {
				return
			}
		}
	}
}

// DeleteStream deletes a stream's definition. ErrFenced while the node has
// open writers of it.
func (c *Client) DeleteStream(ctx context.Context, name string) error {
	if err := validStream("DeleteStream", name); err != nil {
		return err
	}
	_, err := call(ctx, c, "DeleteStream", false, c.streams.DeleteStream, &dstlv1.DeleteStreamRequest{Name: name})
	return err
}

// ---------------------------------------------------------------- checkpoints

// KeyGroupRange is an inclusive range of key groups [Lo, Hi].
type KeyGroupRange struct{ Lo, Hi int }

func rangeOf(p *dstlv1.KeyGroupRange) KeyGroupRange {
	return KeyGroupRange{Lo: int(p.GetLo()), Hi: int(p.GetHi())}
}

// Checkpoint is a complete, restorable point of a stream.
type Checkpoint struct {
	Stream      string
	ID          uint64
	CompletedAt time.Time
	// Retained checkpoints are kept by garbage collection.
	Retained bool
	// PartCount is the number of parts, also when Parts is not filled in.
	PartCount int
	// Parts are filled in by Checkpoint, RetainCheckpoint, and by
	// Checkpoints with CheckpointListOptions.Parts.
	Parts []CheckpointPart
}

// CheckpointPart is one writer's part of a checkpoint.
type CheckpointPart struct {
	Epoch     uint64
	KeyGroups KeyGroupRange
	LogID     string
	UpToSQN   uint64
	// Metadata is what the writer passed to Writer.Checkpoint.
	Metadata []byte
}

func checkpointOf(p *dstlv1.Checkpoint) Checkpoint {
	cp := Checkpoint{
		Stream: p.GetStream(), ID: p.GetId(), CompletedAt: time.UnixMilli(p.GetCompletedAtMs()), Retained: p.GetRetained(),
		PartCount: int(p.GetPartCount()),
	}
	for _, part := range p.GetParts() {
		cp.Parts = append(cp.Parts, CheckpointPart{
			Epoch: part.GetEpoch(), KeyGroups: rangeOf(part.GetKeyGroups()), LogID: part.GetLogId(),
			UpToSQN: part.GetUpToSqn(), Metadata: part.GetMetadata(),
		})
	}
	return cp
}

// CheckpointListOptions select how Checkpoints lists.
type CheckpointListOptions struct {
	// NewestFirst lists the highest id first (default: oldest first).
	NewestFirst bool
	// Parts fills in each Checkpoint's Parts (one blob read per part on the
	// node); without it only PartCount is set.
	Parts bool
	// PageSize is the number of checkpoints fetched per call (0: the
	// server's default, 100; at most 1000).
	PageSize int
}

// Checkpoints iterates over the complete checkpoints of a stream, oldest
// first (see CheckpointListOptions), fetching a page at a time. It stops at
// the first error, which it yields.
func (c *Client) Checkpoints(ctx context.Context, stream string, o CheckpointListOptions) iter.Seq2[Checkpoint, error] {
	return func(yield func(Checkpoint, error) bool) {
		if err := validStream("ListCheckpoints", stream); err != nil {
			yield(Checkpoint{}, err)
			return
		}
		if o.PageSize < 0 {
			yield(Checkpoint{}, invalid("ListCheckpoints", "negative page size %d", o.PageSize))
			return
		}
		req := &dstlv1.ListCheckpointsRequest{Stream: stream, NewestFirst: o.NewestFirst, IncludeParts: o.Parts, PageSize: int32(min(o.PageSize, 1<<20))}
		for {
			res, err := call(ctx, c, "ListCheckpoints", true, c.checkpoints.ListCheckpoints, req)
			if err != nil {
				yield(Checkpoint{}, err)
				return
			}
			for _, cp := range res.GetCheckpoints() {
				if !yield(checkpointOf(cp), nil) {
					return
				}
			}
			if req.PageToken = res.GetNextPageToken(); req.PageToken == "" {
				return
			}
		}
	}
}

// Checkpoint returns complete checkpoint id of stream with its parts.
// ErrNotFound if there is no such complete checkpoint.
func (c *Client) Checkpoint(ctx context.Context, stream string, id uint64) (Checkpoint, error) {
	if err := validStream("GetCheckpoint", stream); err != nil {
		return Checkpoint{}, err
	}
	res, err := call(ctx, c, "GetCheckpoint", true, c.checkpoints.GetCheckpoint, &dstlv1.GetCheckpointRequest{Stream: stream, Id: id})
	if err != nil {
		return Checkpoint{}, err
	}
	return checkpointOf(res.GetCheckpoint()), nil
}

// LatestCheckpoint returns the newest complete checkpoint of stream with
// its parts; ok is false if the stream has none.
func (c *Client) LatestCheckpoint(ctx context.Context, stream string) (cp Checkpoint, ok bool, err error) {
	for cp, err := range c.Checkpoints(ctx, stream, CheckpointListOptions{NewestFirst: true, Parts: true, PageSize: 1}) {
		return cp, err == nil, err
	}
	return Checkpoint{}, false, nil
}

// RetainCheckpoint marks checkpoint id of stream retained (retained=false
// releases it): garbage collection keeps everything a retained checkpoint
// needs.
func (c *Client) RetainCheckpoint(ctx context.Context, stream string, id uint64, retained bool) (Checkpoint, error) {
	if err := validStream("RetainCheckpoint", stream); err != nil {
		return Checkpoint{}, err
	}
	res, err := call(ctx, c, "RetainCheckpoint", true, c.checkpoints.RetainCheckpoint, &dstlv1.RetainCheckpointRequest{Stream: stream, Id: id, Retained: retained})
	if err != nil {
		return Checkpoint{}, err
	}
	return checkpointOf(res.GetCheckpoint()), nil
}

// ---------------------------------------------------------------- reads

// KeyValue is one key's value, as returned by Scan.
type KeyValue struct {
	KeyGroup int
	State    string
	Key      []byte
	Value    []byte
}

// Get reads one key's current value from the node (the key group is
// computed from key by the server). It does not see changes still
// buffered in a Writer: use Writer.Get for read-your-writes.
func (c *Client) Get(ctx context.Context, stream, state string, key []byte) ([]byte, bool, error) {
	return c.get(ctx, stream, state, key, nil)
}

func (c *Client) get(ctx context.Context, stream, state string, key []byte, kg *uint32) ([]byte, bool, error) {
	if err := validStream("Get", stream); err != nil {
		return nil, false, err
	}
	if err := validName("Get", "state", state); err != nil {
		return nil, false, err
	}
	res, err := call(ctx, c, "Get", true, c.state.Get, &dstlv1.GetRequest{Stream: stream, State: state, Key: key, KeyGroup: kg})
	if err != nil {
		return nil, false, err
	}
	return res.GetValue(), res.GetFound(), nil
}

// ScanOptions select the keys of a Scan.
type ScanOptions struct {
	// State selects one state; empty means every state.
	State string
	// Prefix selects keys starting with it.
	Prefix []byte
	// KeyGroups restricts the scan; nil means every key group.
	KeyGroups *KeyGroupRange
	// PageSize is the number of entries fetched per call (0: the server's
	// default, 100).
	PageSize int
}

// Scan iterates over a stream's keys in (key group, state, key) order. It
// stops at the first error, which it yields.
func (c *Client) Scan(ctx context.Context, stream string, o ScanOptions) iter.Seq2[KeyValue, error] {
	return func(yield func(KeyValue, error) bool) {
		if err := validStream("Scan", stream); err != nil {
			yield(KeyValue{}, err)
			return
		}
		if err := validName("Scan", "state", o.State); err != nil {
			yield(KeyValue{}, err)
			return
		}
		req := &dstlv1.ScanRequest{Stream: stream, State: o.State, Prefix: o.Prefix, PageSize: int32(o.PageSize)}
		if o.KeyGroups != nil {
			req.KeyGroups = &dstlv1.KeyGroupRange{Lo: uint32(o.KeyGroups.Lo), Hi: uint32(o.KeyGroups.Hi)}
		}
		for {
			res, err := call(ctx, c, "Scan", true, c.state.Scan, req)
			if err != nil {
				yield(KeyValue{}, err)
				return
			}
			for _, e := range res.GetEntries() {
				if !yield(KeyValue{KeyGroup: int(e.GetKeyGroup()), State: e.GetState(), Key: e.GetKey(), Value: e.GetValue()}, nil) {
					return
				}
			}
			if res.GetNextPageToken() == "" {
				return
			}
			req.PageToken = res.GetNextPageToken()
		}
	}
}
