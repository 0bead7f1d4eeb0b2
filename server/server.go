// Package server exposes a changelog node over Connect, gRPC and gRPC-Web:
// the stream, writer, state and checkpoint services of api/dstl/v1, plus gRPC
// reflection and health so stock gRPC tools work.
package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	kgzip "github.com/klauspost/compress/gzip"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/internal/zstdwire"
	"github.com/dstl-dev/dstl/materializer"
)

// Options configure a Server.
type Options struct {
	// DefaultDurability applies to appends that do not choose one.
	DefaultDurability changelog.Durability
	// BackpressureWait is how long an append waits for upload room before
	// failing with RESOURCE_EXHAUSTED (default 5s).
	BackpressureWait time.Duration
	// MaxMessageBytes bounds a request message (default 64 MiB).
	MaxMessageBytes int
	// MaxBatchChanges bounds the changes of one Append (or one message of
	// AppendStream); more is INVALID_ARGUMENT, refused before decoding
	// (default DefaultMaxBatchChanges, 1<<18).
	MaxBatchChanges int
	// MaxRequestMemory bounds the memory of requests being received,
	// decoded and applied, reserved before it is allocated (admission.go;
	// default DefaultMaxRequestMemory, 768 MiB). Requests beyond it wait
	// for room up to BackpressureWait, then fail with RESOURCE_EXHAUSTED.
	// It must leave room for one maximum request (New refuses otherwise).
	MaxRequestMemory int64
	// State serves reads. Default: a PebbleState in StateDir if set (the
	// server opens and closes it), else the in-memory LiveState. If State
	// also implements the write hooks of LiveState and PebbleState, the
	// server calls them.
	State StateReader
	// StateDir is the directory of the PebbleState serving reads. It is a
	// cache of the blob store: New reopens it keeping the key groups that
	// hold a complete checkpoint, and rebuilds the rest (OpenPebbleState).
	StateDir string
	// ReadWait bounds how long a read of key groups of a writer of this
	// node waits for the PebbleState's fold to reach that writer's last
	// acknowledged append (read-your-writes); then it fails with
	// ErrFoldBehind, UNAVAILABLE (default DefaultReadWait, 5s). StateDir
	// only.
	ReadWait time.Duration
	// FoldQueueBytes bounds the memory of acknowledged batches waiting for
	// the PebbleState's fold (default DefaultFoldQueueBytes, 64 MiB);
	// batches beyond it are read back from the changelog when folded.
	// StateDir only.
	FoldQueueBytes int64
	// HydrateBandwidth bounds the bytes per second the PebbleState reads
	// from the blob store to make lazily restored snapshot files local (0:
	// 64 MiB/s; negative: unbounded). StateDir only.
	HydrateBandwidth int64
	// CDCDir holds the stores of CDC feeds (one per subscription being
	// served, removed when it ends; the directory is emptied by New).
	// Default: a temporary directory removed by Close.
	CDCDir string
	// CDCPollInterval is how often a caught-up subscription reads the
	// stream's journal for a new complete checkpoint (default 200ms); a
	// checkpoint call on this node wakes it at once.
	CDCPollInterval time.Duration
	// Cluster is what ClusterService.ListMembers reports (cluster.go).
	Cluster ClusterOptions
	// Registry receives the server's metrics; nil registers nothing.
	Registry prometheus.Registerer
	Logger   *slog.Logger
}

// Server implements the dstl services over one changelog node.
type Server struct {
	node    *changelog.Node
	opts    Options
	hooks   stateHooks // nil if opts.State does not take writes
	state   StateReader
	owned   *PebbleState // opened by New, closed by Close
	metrics *metrics
	log     *slog.Logger

	admit *admission

	mu      sync.Mutex
	writers map[string]*changelog.Writer

	// CDC: the feeds' directory (cdcDir) and the checkpoint signal.
	cdcOnce  sync.Once
	cdcPath  string
	cdcErr   error
	cdcTemp  bool
	cpSignal checkpointSignal
	// feedsCtx is cancelled by StopSubscriptions.
	feedsCtx  context.Context
	feedsStop context.CancelFunc
}

// New returns a server for node.
func New(node *changelog.Node, opts Options) (*Server, error) {
	if opts.BackpressureWait <= 0 {
		opts.BackpressureWait = 5 * time.Second
	}
	if opts.MaxMessageBytes <= 0 {
		opts.MaxMessageBytes = 64 << 20
	}
	if opts.MaxBatchChanges <= 0 {
		opts.MaxBatchChanges = DefaultMaxBatchChanges
	}
	if opts.MaxRequestMemory <= 0 {
		opts.MaxRequestMemory = DefaultMaxRequestMemory
	}
	if need := maxRequestCost(opts.MaxMessageBytes, opts.MaxBatchChanges); workBudget(opts.MaxRequestMemory) < need {
		// Otherwise one maximum request would be admitted alone beyond the
		// bound, and the node's memory would not be bounded by it.
		return nil, fmt.Errorf("server: request memory %d B leaves %d B to decode requests, below what one Append of %d changes in %d bytes may cost (%d B): raise it to %d B or lower the batch or message limit",
			opts.MaxRequestMemory, workBudget(opts.MaxRequestMemory), opts.MaxBatchChanges, opts.MaxMessageBytes, need, need/3*4+4)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		node: node, opts: opts, log: opts.Logger, writers: map[string]*changelog.Writer{}, state: opts.State,
		admit: newAdmission(opts.MaxRequestMemory, opts.MaxMessageBytes, opts.MaxBatchChanges, opts.BackpressureWait),
	}
	if opts.CDCDir != "" {
		// Feeds' stores left by a crash: nothing in them is needed.
		if err := os.RemoveAll(opts.CDCDir); err != nil {
			return nil, fmt.Errorf("server: cdc dir: %w", err)
		}
	}
	s.feedsCtx, s.feedsStop = context.WithCancel(context.Background())
	s.metrics = newMetrics()
	if opts.Registry != nil {
		for _, c := range append(s.metrics.collectors(), newSubscriptionCollector(node, opts.Logger)) {
			if err := opts.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("server: register metrics: %w", err)
			}
		}
	}
	switch {
	case opts.State != nil && opts.StateDir != "":
		return nil, errors.New("server: set Options.State or Options.StateDir, not both")
	case opts.State != nil:
		s.hooks, _ = opts.State.(stateHooks)
	case opts.StateDir != "":
		ps, err := OpenPebbleState(node, opts.StateDir, PebbleStateOptions{Logger: opts.Logger, HydrateBandwidth: opts.HydrateBandwidth})
		if err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
		if opts.ReadWait > 0 {
			ps.readWait = opts.ReadWait
		}
		if opts.FoldQueueBytes > 0 {
			ps.queueBytes = opts.FoldQueueBytes
		}
		if opts.Registry != nil {
			// The fold's lag, and the hydration of the lazily imported
			// bases (dstl_store_*).
			for _, c := range append(foldCollectors(ps), materializer.NewStoreCollector(ps.store)) {
				if err := opts.Registry.Register(c); err != nil {
					return nil, errors.Join(fmt.Errorf("server: register metrics: %w", err), ps.Close())
				}
			}
		}
		s.state, s.hooks, s.owned = ps, ps, ps
	default:
		live := NewLiveState(node)
		s.state, s.hooks = live, live
	}
	return s, nil
}

// stateHooks are the write-through hooks of a read path that follows this
// node's writers (LiveState, PebbleState).
type stateHooks interface {
	// WriterOpened builds the view of a writer just opened or resumed.
	WriterOpened(ctx context.Context, w *changelog.Writer) error
	// Appended applies an acknowledged batch, SQNs first.., of a writer.
	// The caller hands batch over: the hook may keep the slice and rewrite
	// its changes (not the bytes of their keys and values, which the
	// caller may reuse once it returns).
	Appended(stream, writerID string, first uint64, batch []changelog.Change)
	// WriterClosed: the writer closed; its view serves until a newer
	// writer opens its key groups.
	WriterClosed(stream, writerID string)
	// WriterFenced: the writer was fenced; its view is dropped.
	WriterFenced(stream, writerID string)
	// Forget drops a deleted stream.
	Forget(stream string)
}

var (
	_ stateHooks = (*LiveState)(nil)
	_ stateHooks = (*PebbleState)(nil)
)

// Close releases what New opened (the PebbleState of Options.StateDir).
// Call it after Shutdown, once no request is served any more.
func (s *Server) Close() error {
	var err error
	if s.owned != nil {
		err = s.owned.Close()
	}
	s.feedsStop()
	s.cdcOnce.Do(func() {}) // orders the reads below after a feed's cdcDir
	if s.cdcTemp {
		err = errors.Join(err, os.RemoveAll(s.cdcPath))
	}
	return err
}

// Handler returns the HTTP handler serving every service, reflection and
// health, to be mounted at the root of an h2c (or TLS) server.
func (s *Server) Handler() http.Handler {
	opts := []connect.HandlerOption{
		connect.WithInterceptors(s.metrics.interceptor()),
		connect.WithReadMaxBytes(s.opts.MaxMessageBytes),
		connect.WithCompressMinBytes(compressMinBytes),
		connect.WithCompression("gzip", newGzipReader, newGzipWriter),
		// Registered last: preferred by clients that accept it (the SDK).
		connect.WithCompression(zstdwire.Name, zstdwire.NewDecompressor, zstdwire.NewCompressor),
	}
	mux := http.NewServeMux()
	mux.Handle(dstlv1connect.NewStreamServiceHandler(&streamService{s}, opts...))
	mux.Handle(dstlv1connect.NewWriterServiceHandler(&writerService{s}, opts...))
	mux.Handle(dstlv1connect.NewStateServiceHandler(&stateService{s}, opts...))
	mux.Handle(dstlv1connect.NewCheckpointServiceHandler(&checkpointService{s}, opts...))
	mux.Handle(dstlv1connect.NewCDCServiceHandler(&cdcService{s: s}, opts...))
	mux.Handle(dstlv1connect.NewClusterServiceHandler(&clusterService{s}, opts...))
	services := []string{
		dstlv1connect.StreamServiceName, dstlv1connect.WriterServiceName,
		dstlv1connect.StateServiceName, dstlv1connect.CheckpointServiceName,
		dstlv1connect.ClusterServiceName,
	}
	// Reflection lists health and reflection too, as grpc-go servers do.
	reflector := grpcreflect.NewStaticReflector(append(services,
		grpchealth.HealthV1ServiceName, grpcreflect.ReflectV1ServiceName, grpcreflect.ReflectV1AlphaServiceName)...)
	mux.Handle(grpcreflect.NewHandlerV1(reflector))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector))
	mux.Handle(grpchealth.NewHandler(grpchealth.NewStaticChecker(services...)))
	return s.admit.handler(mux)
}

// errWriterUnknown: a writer id this server does not hold.
var errWriterUnknown = errors.New("unknown writer")

func (s *Server) writer(id string) (*changelog.Writer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, ok := s.writers[id]
	if !ok {
		return nil, fmt.Errorf("writer %q is not open on this node (open it, or resume its epoch after a restart): %w", id, errWriterUnknown)
	}
	return w, nil
}

// writerFailed drops a writer that was fenced or closed from the server's
// table and its read view.
func (s *Server) writerFailed(w *changelog.Writer, err error) {
	if !errors.Is(err, changelog.ErrFenced) && !errors.Is(err, changelog.ErrClosed) {
		return
	}
	s.mu.Lock()
	if s.writers[w.LogID()] == w {
		delete(s.writers, w.LogID())
	}
	s.mu.Unlock()
	if errors.Is(err, changelog.ErrFenced) {
		s.metrics.fenced.Inc()
		if s.hooks != nil {
			s.hooks.WriterFenced(streamOf(w.LogID()), w.LogID())
		}
	}
}

// Shutdown persists every open writer so that everything acknowledged is
// on the blob store; the node's Close does the rest.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	writers := make([]*changelog.Writer, 0, len(s.writers))
	for _, w := range s.writers {
		writers = append(writers, w)
	}
	s.mu.Unlock()
	// In parallel: the writers share flushes.
	var (
		errs []error
		mu   sync.Mutex
		wg   sync.WaitGroup
	)
	for _, w := range writers {
		wg.Go(func() {
			if _, err := w.Persist(ctx, 0); err != nil && !errors.Is(err, changelog.ErrFenced) {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// compressMinBytes: responses smaller than this are sent uncompressed even
// to a client that accepts gzip. Resetting a flate compressor cost ~20 µs
// per response (a CPU profile of a loop of remote Gets: 0.18 s in
// compressor.reset over 8,648 calls), more than a small message saves on
// any network.
const compressMinBytes = 4 << 10

// newGzipWriter compresses responses for clients that accept gzip (connect
// clients do by default): klauspost's gzip at its fastest level instead of
// compress/gzip's default level. The bytes are gzip either way. On a CDC
// replay of 100-byte half-random values (BenchmarkSubscribeReplay, remote)
// the default level spent more CPU than everything else together: 3.1 µs
// per change end to end against 1.5 µs with this one, for 62 against 63
// bytes on the wire per change.
func newGzipWriter() connect.Compressor {
	w, err := kgzip.NewWriterLevel(io.Discard, kgzip.BestSpeed)
	if err != nil {
		panic(err) // a valid level
	}
	return w
}

// newGzipReader decompresses gzip requests.
func newGzipReader() connect.Decompressor { return new(kgzip.Reader) }
