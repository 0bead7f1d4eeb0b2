package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

type serveOptions struct {
	dataDir           string
	blobURL           string
	listen            string
	logFormat         string
	logLevel          string
	durability        string
	uploadInterval    time.Duration
	batchDelay        time.Duration
	flushBytes        int64
	maxInFlightBytes  int64
	maxRequestMemory  int64
	maxBatchChanges   int
	readWait          time.Duration
	foldQueueBytes    int64
	hydrateBandwidth  int64
	memoryLimit       int64
	maxKeySize        int
	maxValueSize      int
	retainCheckpoints int
	gcInterval        time.Duration
	gcGrace           time.Duration
	cdcMaxHold        time.Duration
	cdcMaxHoldFor     map[string]string
	tlsCert, tlsKey   string
	shutdownTimeout   time.Duration
	materialize       bool
	mat               materializeFlags
	gossip            gossipFlags
}

func newServeCommand() *cobra.Command {
	var o serveOptions
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run a dstl node (single node, local blob store by default)",
		Long: `Run a dstl node: the stream, writer, state and checkpoint services over
Connect, gRPC and gRPC-Web (HTTP/2 cleartext, or TLS with --tls-cert and
--tls-key), plus /metrics, /healthz and /readyz on the same address.

With no flags the node keeps its data in ./dstl-data, uses ./dstl-data/blobs
as its blob store and listens on 127.0.0.1:7600.

--gossip-listen or --join makes the node a cluster member (memberlist
gossip; docs/cluster.md): it gossips its node id, RPC URL and zone, and
lists the members in /metrics and ClusterService (dstl cluster members).
Without them it is a single node and starts no gossip.

Settings come from flags, then DSTL_* environment variables (--blob is
DSTL_BLOB), then the config file (--config, lines of "name: value" with the
flag names), then the defaults.

SIGTERM or SIGINT shuts down gracefully: the node stops accepting requests,
uploads everything acknowledged and exits 0. A second signal exits at once.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serve(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.dataDir, "data-dir", "dstl-data", "directory for the node's local data")
	f.StringVar(&o.blobURL, "blob", "", "blob store URL: file:///path, a path, or s3://bucket/prefix?endpoint=...&region=...&path_style=true (default <data-dir>/blobs)")
	f.StringVar(&o.listen, "listen", "127.0.0.1:7600", "address to serve the API, /metrics and health endpoints on")
	f.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&o.durability, "durability", "buffered", "default durability of appends that do not choose: buffered or local")
	f.DurationVar(&o.uploadInterval, "upload-interval", upload.DefaultFlushInterval, "upload whatever is pending at least this often")
	f.DurationVar(&o.batchDelay, "batch-delay", upload.DefaultBatchDelay, "how long a persist waits so that concurrent persists share one segment")
	f.Int64Var(&o.flushBytes, "flush-bytes", upload.DefaultFlushBytes, "upload as soon as this many bytes are pending")
	f.Int64Var(&o.maxInFlightBytes, "max-inflight-bytes", upload.DefaultMaxInFlightBytes, "bound on bytes appended but not uploaded; appends wait (then fail with RESOURCE_EXHAUSTED) beyond it")
	f.Int64Var(&o.maxRequestMemory, "max-request-memory", server.DefaultMaxRequestMemory, "bound on the memory of requests being received, decoded and applied, reserved before it is allocated; requests wait for room beyond it")
	f.IntVar(&o.maxBatchChanges, "max-batch-changes", server.DefaultMaxBatchChanges, "most changes one Append (or one AppendStream message) may carry; more is INVALID_ARGUMENT")
	f.DurationVar(&o.readWait, "read-wait", server.DefaultReadWait, "how long a read of key groups of a writer of this node waits for the read store's fold to reach the writer's acknowledged appends (read-your-writes) before failing with UNAVAILABLE")
	f.Int64Var(&o.foldQueueBytes, "fold-queue-bytes", server.DefaultFoldQueueBytes, "bound on the memory of acknowledged batches waiting for the read store's fold; batches beyond it are read back from the changelog")
	f.Int64Var(&o.hydrateBandwidth, "hydrate-bandwidth", 64<<20, "bytes per second the read store reads from the blob store to make lazily restored snapshot files local (0: unbounded)")
	f.Int64Var(&o.memoryLimit, "memory-limit", 0, "Go soft memory limit in bytes (0: --max-inflight-bytes + --max-request-memory + --fold-queue-bytes + 256 MiB, unless GOMEMLIMIT is set; negative: none)")
	f.IntVar(&o.maxKeySize, "max-key-size", changelog.DefaultLimits.MaxKeySize, "largest key in bytes")
	f.IntVar(&o.maxValueSize, "max-value-size", changelog.DefaultLimits.MaxValueSize, "largest value in bytes")
	f.IntVar(&o.retainCheckpoints, "retain-checkpoints", 3, "how many of the newest checkpoints of each stream garbage collection keeps")
	f.DurationVar(&o.gcInterval, "gc-interval", time.Minute, "period of garbage collection: truncation below published snapshots, segments, unused snapshot records (negative disables it)")
	f.DurationVar(&o.gcGrace, "gc-grace", 10*time.Minute, "segments younger than this are never collected (an upload may still be in flight)")
	f.DurationVar(&o.cdcMaxHold, "cdc-max-hold", changelog.DefaultSubscriptionMaxHold, "how far back a registered CDC subscription may hold truncation and garbage collection: once the oldest checkpoint it has not consumed completed longer ago, it is expired and holds nothing (negative: no cap)")
	f.StringToStringVar(&o.cdcMaxHoldFor, "cdc-max-hold-for", nil, "--cdc-max-hold for some streams: STREAM=DURATION[,STREAM=DURATION...] (repeatable)")
	f.StringVar(&o.tlsCert, "tls-cert", "", "TLS certificate file (PEM); with --tls-key serves TLS instead of h2c")
	f.StringVar(&o.tlsKey, "tls-key", "", "TLS private key file (PEM)")
	f.DurationVar(&o.shutdownTimeout, "shutdown-timeout", time.Minute, "how long a graceful shutdown may take to upload what is pending")
	f.BoolVar(&o.materialize, "materialize", true, "run the materializer in this process (false: leave it to a `dstl materialize` process)")
	o.mat.add(f)
	o.gossip.add(f)
	addConfigFlag(cmd)
	return cmd
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", format)
	}
}

func serve(ctx context.Context, o serveOptions) error {
	log, err := newLogger(o.logFormat, o.logLevel)
	if err != nil {
		return err
	}
	durability, err := changelog.ParseDurability(o.durability)
	if err != nil {
		return fmt.Errorf("--durability: %w", err)
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	maxHoldFor, err := parseMaxHoldFor(o.cdcMaxHoldFor)
	if err != nil {
		return err
	}
	dataDir, err := filepath.Abs(o.dataDir)
	if err != nil {
		return fmt.Errorf("data dir %q: %w", o.dataDir, err)
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	blobURL := o.blobURL
	if blobURL == "" {
		blobURL = "file://" + filepath.Join(dataDir, "blobs")
	}
	store, err := blobstore.Open(ctx, blobURL)
	if err != nil {
		return fmt.Errorf("open blob store: %w", err)
	}
	defer store.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	schedMetrics := upload.NewSchedulerMetrics()
	reg.MustRegister(schedMetrics.Collectors()...)

	nodeOpts := changelog.Options{
		Store: store, DataDir: dataDir, Logger: log,
		Limits:            changelog.Limits{MaxKeySize: o.maxKeySize, MaxValueSize: o.maxValueSize},
		RetainCheckpoints: o.retainCheckpoints,
		GCInterval:        o.gcInterval,
		GCGrace:           o.gcGrace,
		// 0 would mean the default to the node: keep "no cap" explicit.
		SubscriptionMaxHold: o.cdcMaxHold, SubscriptionMaxHoldFor: maxHoldFor,
	}
	nodeOpts.Scheduler.Interval = o.uploadInterval
	nodeOpts.Scheduler.BatchDelay = o.batchDelay
	nodeOpts.Scheduler.FlushBytes = o.flushBytes
	nodeOpts.Scheduler.MaxInFlightBytes = o.maxInFlightBytes
	nodeOpts.Scheduler.Metrics = schedMetrics
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		return fmt.Errorf("open node: %w", err)
	}
	registerLocalLogMetrics(reg, node)
	setMemoryLimit(o, log)
	cluster, clusterOpts, err := startGossip(ctx, o, node.ID(), reg, log)
	if err != nil {
		_ = node.Close(context.WithoutCancel(ctx))
		return err
	}
	defer closeGossip(cluster, log) // after everything else; Close follows Leave
	api, err := server.New(node, server.Options{
		Cluster:           clusterOpts,
		DefaultDurability: durability, Registry: reg, Logger: log, StateDir: filepath.Join(dataDir, "state"),
		// Feeds' stores: under the data directory, where the next start
		// removes those a crash left (docs/cdc.md).
		CDCDir:           filepath.Join(dataDir, "cdc"),
		MaxRequestMemory: o.maxRequestMemory, MaxBatchChanges: o.maxBatchChanges,
		ReadWait: o.readWait, FoldQueueBytes: o.foldQueueBytes, HydrateBandwidth: hydrateBandwidth(o.hydrateBandwidth),
	})
	if err != nil {
		_ = node.Close(context.WithoutCancel(ctx))
		return err
	}

	// The in-process materializer: snapshots the streams' checkpoints so
	// that logs are truncated and restores replay only a short tail.
	stopMaterializer := func() error { return nil }
	if o.materialize {
		mat, err := materializer.New(node, filepath.Join(dataDir, "materializer"), o.mat.config(log))
		if err != nil {
			_ = api.Close()
			_ = node.Close(context.WithoutCancel(ctx))
			return err
		}
		reg.MustRegister(materializer.NewCollector(mat))
		matCtx, matCancel := context.WithCancel(context.WithoutCancel(ctx))
		matDone := make(chan error, 1)
		go func() { matDone <- mat.Run(matCtx) }()
		stopMaterializer = func() error {
			matCancel()
			return errors.Join(<-matDone, mat.Close())
		}
	}

	mux := http.NewServeMux()
	mux.Handle("/", api.Handler())
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := checkBlobStore(r.Context(), store); err != nil {
			http.Error(w, "blob store: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})

	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		_ = stopMaterializer()
		_ = node.Close(context.WithoutCancel(ctx))
		_ = api.Close()
		return fmt.Errorf("listen on %s: %w", o.listen, err)
	}
	srv := &http.Server{
		Handler: mux, ReadHeaderTimeout: 10 * time.Second, Protocols: new(http.Protocols),
		// A client that vanished without closing its connection (a
		// half-open TCP connection) would keep its subscriptions' feeds,
		// and their stores, until the kernel gives up on it: ping a silent
		// connection and close it when the ping is not answered.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second},
	}
	srv.Protocols.SetHTTP1(true)
	if o.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			_ = stopMaterializer()
			_ = node.Close(context.WithoutCancel(ctx))
			_ = api.Close()
			return fmt.Errorf("load TLS key pair: %w", err)
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		srv.Protocols.SetHTTP2(true)
		ln = tls.NewListener(ln, srv.TLSConfig)
	} else {
		srv.Protocols.SetUnencryptedHTTP2(true)
	}
	if cluster != nil {
		updateGossipPort(ctx, cluster, ln.Addr(), log)
	}
	log.Info("dstl serving", "listen", ln.Addr().String(), "tls", o.tlsCert != "", "data_dir", dataDir,
		"blob", redactURL(blobURL), "node", node.ID(), "gossip", gossipAddr(cluster), "version", buildVersion())

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	var serveErr error
	select {
	case err := <-errc:
		serveErr = fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
		log.Info("shutting down: uploading everything acknowledged")
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.shutdownTimeout)
	defer cancel()
	// Tell the cluster first, so that the others see this node "left"
	// rather than "dead" (bounded: it must not eat the persist budget).
	leaveGossip(shutdownCtx, cluster, log)
	// Stop accepting and let in-flight requests finish, then make every
	// acknowledged change durable on the blob store.
	api.StopSubscriptions() // follows never end by themselves
	if err := srv.Shutdown(shutdownCtx); err != nil {
		serveErr = errors.Join(serveErr, fmt.Errorf("stop serving: %w", err))
	}
	if err := api.Shutdown(shutdownCtx); err != nil {
		serveErr = errors.Join(serveErr, fmt.Errorf("persist writers: %w", err))
	}
	if err := stopMaterializer(); err != nil {
		serveErr = errors.Join(serveErr, fmt.Errorf("stop materializer: %w", err))
	}
	if err := node.Close(shutdownCtx); err != nil {
		serveErr = errors.Join(serveErr, fmt.Errorf("close node: %w", err))
	}
	if err := api.Close(); err != nil {
		serveErr = errors.Join(serveErr, fmt.Errorf("close state store: %w", err))
	}
	if serveErr == nil {
		log.Info("stopped: everything acknowledged is uploaded")
	}
	return serveErr
}

// memoryLimitBase is the node's memory besides in-flight changes and
// requests (Pebble caches and memtables, upload buffers, the runtime):
// the constant of the bound in docs/operations.md.
const memoryLimitBase = 256 << 20

// setMemoryLimit makes the garbage collector keep the heap near what the
// node's bounds allow instead of letting it grow to twice the live heap
// (GOGC), which is what keeps resident memory under the documented bound.
func setMemoryLimit(o serveOptions, log *slog.Logger) {
	limit := o.memoryLimit
	switch {
	case limit < 0:
		return
	case limit == 0 && os.Getenv("GOMEMLIMIT") != "":
		return // the operator's choice
	case limit == 0:
		limit = o.maxInFlightBytes + o.maxRequestMemory + o.foldQueueBytes + memoryLimitBase
	}
	debug.SetMemoryLimit(limit)
	log.Info("memory limit", "bytes", limit)
}

// registerLocalLogMetrics exports the local log's counters.
func registerLocalLogMetrics(reg prometheus.Registerer, node *changelog.Node) {
	counter := func(name, help string, v func() int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v()) })
	}
	reg.MustRegister(
		counter("dstl_locallog_appends_total", "Local-durability appends written to the local log.", func() int64 { return node.LocalLogStats().Appends }),
		counter("dstl_locallog_changes_total", "Changes written to the local log.", func() int64 { return node.LocalLogStats().Changes }),
		counter("dstl_locallog_fsyncs_total", "Fsyncs of the local log (appends per fsync shows group commit).", func() int64 { return node.LocalLogStats().Fsyncs }),
		counter("dstl_locallog_bytes_total", "Bytes written to the local log.", func() int64 { return node.LocalLogStats().Bytes }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "dstl_locallog_files", Help: "Local log files on disk."}, func() float64 { return float64(node.LocalLogStats().Files) }),
	)
}

// checkBlobStore makes one cheap call to prove the blob store answers.
func checkBlobStore(ctx context.Context, store upload.BlobStore) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := store.List(ctx, "", "", 1)
	return err
}

// hydrateBandwidth maps --hydrate-bandwidth (0: unbounded) to
// server.Options.HydrateBandwidth (negative: unbounded).
func hydrateBandwidth(flag int64) int64 {
	if flag <= 0 {
		return -1
	}
	return flag
}

// parseMaxHoldFor parses --cdc-max-hold-for: stream names and durations.
func parseMaxHoldFor(m map[string]string) (map[string]time.Duration, error) {
	out := make(map[string]time.Duration, len(m))
	for stream, v := range m {
		if err := changelog.ValidateStreamName(stream); err != nil {
			return nil, fmt.Errorf("--cdc-max-hold-for %s=%s: %w", stream, v, err)
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			return nil, fmt.Errorf("--cdc-max-hold-for %s=%s: %w", stream, v, err)
		}
		out[stream] = d
	}
	return out, nil
}
