// Package embedded runs a dstl node inside the process, behind the same
// client API as a remote node and without any network. By default the
// client calls the node's service handlers directly (Transport InProcess):
// no HTTP/2, no protobuf encoding, the same dstl.Client / dstl.Writer /
// typed-state API and the same errors. Transport HTTP serves the node's
// HTTP handler over in-memory pipes instead (the wire path, for tests that
// wrap the handler or use connect interceptors). It is the default for
// tests and small services:
//
//	node, err := embedded.Open(ctx, embedded.Options{Dir: "state"})
//	...
//	defer node.Close(ctx)
//	c := node.Client() // a *dstl.Client, as from dstl.Dial
//
// Everything a remote node keeps is kept here too: the local log under
// Dir, the blob store (the source of truth) under Dir/blobs unless BlobURL
// names another one, so reopening the same Dir (or a new Dir with the same
// BlobURL) recovers every checkpoint.
package embedded

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/materializer"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// Transport is how the client reaches the embedded node.
type Transport int

const (
	// InProcess calls the node's service handlers directly (the default).
	InProcess Transport = iota
	// HTTP serves the node's HTTP handler (Connect, gRPC, gRPC-Web) over
	// in-memory pipes: everything a remote client goes through, admission
	// and connect interceptors included, without a socket.
	HTTP
)

func (t Transport) String() string {
	switch t {
	case InProcess:
		return "in-process"
	case HTTP:
		return "http"
	}
	return fmt.Sprintf("transport(%d)", int(t))
}

// Options configure an embedded node.
type Options struct {
	// Dir is the node's data directory (required).
	Dir string
	// BlobURL is the blob store: a path, file:///path or
	// s3://bucket/prefix?...; default Dir/blobs.
	BlobURL string
	// Durability is the node's default durability of appends (default
	// buffered).
	Durability dstl.Durability
	// Transport is how the client reaches the node (default InProcess).
	Transport Transport
	// ClientOptions configure the client (timeouts, retries; with
	// Transport HTTP also connect options such as interceptors);
	// WithHTTPClient is overridden.
	ClientOptions []dstl.Option
	// Node tweaks the changelog node's options before it opens (upload
	// interval, limits, ...); Store and DataDir are already set. It may
	// wrap Store (fault injection in tests); DataDir stays Dir.
	Node func(*changelog.Options)
	// NoMaterializer: do not run the materializer in the node (as `dstl
	// serve --materialize=false`): snapshots are then left to another
	// process (`dstl materialize`) sharing the blob store, or to nobody,
	// in which case logs are never truncated and a restore replays them
	// whole.
	NoMaterializer bool
	// Materializer configures the node's materializer (zero: the
	// defaults of `dstl serve`).
	Materializer materializer.Config
	// Handler wraps the node's HTTP handler (e.g. for fault injection in
	// tests). It needs Transport HTTP: Open refuses it otherwise.
	Handler func(http.Handler) http.Handler
	Logger  *slog.Logger
}

// Node is a running embedded node.
type Node struct {
	client *dstl.Client
	node   *changelog.Node
	api    *server.Server
	store  upload.BlobStore
	// stopMat stops the materializer (nil: none runs).
	stopMat func() error
	// The HTTP transport only (nil in-process).
	hs     *http.Server
	ln     *pipeListener
	tr     *http.Transport
	served chan error

	closeOnce sync.Once
	closeErr  error
}

// Open starts a node on opts.Dir and returns it with a connected client.
func Open(ctx context.Context, opts Options) (*Node, error) {
	if opts.Dir == "" {
		return nil, errors.New("embedded: Options.Dir is required")
	}
	switch {
	case opts.Transport != InProcess && opts.Transport != HTTP:
		return nil, fmt.Errorf("embedded: unknown %v", opts.Transport)
	case opts.Handler != nil && opts.Transport != HTTP:
		return nil, errors.New("embedded: Options.Handler wraps the HTTP handler: it needs Transport HTTP")
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("embedded: dir %q: %w", opts.Dir, err)
	}
	blobURL := opts.BlobURL
	if blobURL == "" {
		blobURL = "file://" + filepath.Join(dir, "blobs")
	}
	var durability changelog.Durability
	switch opts.Durability {
	case dstl.DurabilityDefault, dstl.Buffered:
		durability = changelog.Buffered
	case dstl.Local:
		durability = changelog.Local
	default:
		return nil, fmt.Errorf("embedded: durability %v is not available on a single node", opts.Durability)
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	store, err := blobstore.Open(ctx, blobURL)
	if err != nil {
		return nil, fmt.Errorf("embedded: open blob store: %w", err)
	}
	nodeOpts := changelog.Options{Store: store, DataDir: dir, Logger: logger}
	if opts.Node != nil {
		opts.Node(&nodeOpts)
		nodeOpts.DataDir = dir
		if nodeOpts.Store == nil {
			store.Close()
			return nil, errors.New("embedded: Options.Node cleared the blob store")
		}
	}
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("embedded: open node: %w", err)
	}
	api, err := server.New(node, server.Options{DefaultDurability: durability, Logger: logger, StateDir: filepath.Join(dir, "state"), CDCDir: filepath.Join(dir, "cdc")})
	if err != nil {
		_ = node.Close(context.WithoutCancel(ctx))
		store.Close()
		return nil, fmt.Errorf("embedded: %w", err)
	}
	n := &Node{node: node, api: api, store: store}
	if !opts.NoMaterializer {
		if err := n.startMaterializer(ctx, filepath.Join(dir, "materializer"), opts); err != nil {
			_ = n.Close(ctx)
			return nil, err
		}
	}
	if opts.Transport == InProcess {
		h := api.InProcess()
		n.client, err = dstl.NewInProcessClient(dstl.Handlers{
			Streams: h.Streams, Writers: h.Writers, State: h.State, Checkpoints: h.Checkpoints,
			CDC: h.CDC, Subscribe: h.Subscribe,
		}, opts.ClientOptions...)
	} else {
		n.client, err = n.serveHTTP(ctx, opts)
	}
	if err != nil {
		_ = n.Close(ctx)
		return nil, err
	}
	return n, nil
}

// startMaterializer runs the materializer in the background, as `dstl
// serve` does: it snapshots the streams' checkpoints so that logs are
// truncated and restores replay only a short tail. Close stops it.
func (n *Node) startMaterializer(ctx context.Context, dir string, opts Options) error {
	cfg := opts.Materializer
	if cfg.Logger == nil {
		cfg.Logger = opts.Logger
	}
	mat, err := materializer.New(n.node, dir, cfg)
	if err != nil {
		return fmt.Errorf("embedded: materializer: %w", err)
	}
	mctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() { done <- mat.Run(mctx) }()
	n.stopMat = func() error {
		cancel()
		return errors.Join(<-done, mat.Close())
	}
	return nil
}

// serveHTTP serves the node's HTTP handler over in-memory pipes and dials
// it.
func (n *Node) serveHTTP(ctx context.Context, opts Options) (*dstl.Client, error) {
	var h http.Handler = n.api.Handler()
	if opts.Handler != nil {
		h = opts.Handler(h)
	}
	n.ln, n.served = newPipeListener(), make(chan error, 1)
	n.hs = &http.Server{Handler: h, Protocols: new(http.Protocols), ReadHeaderTimeout: 10 * time.Second}
	n.hs.Protocols.SetUnencryptedHTTP2(true)
	go func() { n.served <- n.hs.Serve(n.ln) }()

	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	n.tr = &http.Transport{Protocols: p, DialContext: n.ln.DialContext}
	copts := append(append([]dstl.Option(nil), opts.ClientOptions...), dstl.WithHTTPClient(&http.Client{Transport: n.tr}))
	return dstl.Dial(ctx, "http://embedded.dstl", copts...)
}

// Client returns the node's client.
func (n *Node) Client() *dstl.Client { return n.client }

// ChangelogNode returns the node's changelog, for tools and tests.
func (n *Node) ChangelogNode() *changelog.Node { return n.node }

// Close shuts the node down gracefully: it stops serving (letting calls in
// flight finish), persists every open writer so that everything
// acknowledged is on the blob store, and closes the node. Close open
// Writers first: changes still buffered in a Writer are not seen by the
// node.
func (n *Node) Close(ctx context.Context) error {
	n.closeOnce.Do(func() { n.closeErr = n.close(ctx) })
	return n.closeErr
}

func (n *Node) close(ctx context.Context) error {
	var errs []error
	n.api.StopSubscriptions() // follows never end by themselves
	if n.client != nil {
		// In-process: refuse new calls and wait for those in flight.
		_ = n.client.Close()
	}
	if n.hs != nil {
		n.tr.CloseIdleConnections()
		if err := n.hs.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("embedded: stop serving: %w", err))
			_ = n.hs.Close()
		}
		if err := <-n.served; err != nil && !errors.Is(err, http.ErrServerClosed) {
			errs = append(errs, fmt.Errorf("embedded: serve: %w", err))
		}
		n.tr.CloseIdleConnections()
	}
	if err := n.api.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("embedded: persist writers: %w", err))
	}
	if n.stopMat != nil {
		if err := n.stopMat(); err != nil {
			errs = append(errs, fmt.Errorf("embedded: stop materializer: %w", err))
		}
	}
	if err := n.node.Close(ctx); err != nil {
		errs = append(errs, fmt.Errorf("embedded: close node: %w", err))
	}
	if err := n.api.Close(); err != nil {
		errs = append(errs, fmt.Errorf("embedded: close state store: %w", err))
	}
	if err := n.store.Close(); err != nil {
		errs = append(errs, fmt.Errorf("embedded: close blob store: %w", err))
	}
	return errors.Join(errs...)
}
