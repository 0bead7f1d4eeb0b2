package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// materializeFlags are the materializer settings shared by serve (the
// in-process materializer) and materialize (a separate process).
type materializeFlags struct {
	interval time.Duration
	bytes    int64
	jitter   float64
	gcGrace  time.Duration
	// releasedGrace: see materializer.Config.ReleasedGrace.
	releasedGrace time.Duration
	// roundLease: see materializer.Config.RoundLease.
	roundLease time.Duration
}

func (m *materializeFlags) add(f *pflag.FlagSet) {
	f.DurationVar(&m.interval, "materialize-interval", 60*time.Second, "materialize each stream's newest checkpoint at least this often (with ±20% jitter)")
	f.Int64Var(&m.bytes, "materialize-bytes", 64<<20, "materialize sooner once a restore of the newest checkpoint would replay this many changelog bytes")
	f.Float64Var(&m.jitter, "materialize-jitter", 0.2, "spread of the interval, as a fraction of it (0 for none)")
	f.DurationVar(&m.gcGrace, "snapshot-gc-grace", 10*time.Minute, "snapshot files no snapshot ever referenced (uploads in flight, failed rounds) are deleted after this long, seen unreferenced twice this far apart")
	f.DurationVar(&m.releasedGrace, "snapshot-released-grace", time.Minute, "snapshot files released by a deleted snapshot are deleted once seen unreferenced twice this far apart")
	f.DurationVar(&m.roundLease, "snapshot-round-lease", time.Minute, "lifetime of the lease (renewed every third of it) that protects a materializer round's files from every node's collection while it uploads; a round publishes only within three quarters of it after its last renewal (at least 1s)")
}

func (m *materializeFlags) config(log *slog.Logger) materializer.Config {
	jitter := m.jitter
	if jitter == 0 {
		jitter = -1 // Config: 0 means the default
	}
	return materializer.Config{Interval: m.interval, Bytes: m.bytes, Jitter: jitter, GCGrace: m.gcGrace, ReleasedGrace: m.releasedGrace, RoundLease: m.roundLease, Logger: log}
}

type materializeOptions struct {
	blobURL       string
	dataDir       string
	streams       []string
	once          bool
	listen        string
	logFormat     string
	logLevel      string
	gcInterval    time.Duration
	cdcMaxHold    time.Duration
	cdcMaxHoldFor map[string]string
	mat           materializeFlags
}

func newMaterializeCommand() *cobra.Command {
	var o materializeOptions
	cmd := &cobra.Command{
		Use:   "materialize",
		Short: "Run a materializer in its own process, reading only the blob store",
		Long: `Run a materializer that reads only the blob store: it folds each stream's
checkpoints into local Pebble stores and publishes incremental snapshots
that serving nodes adopt (they truncate their logs below them) — the
"remote compaction" of the design. 'dstl serve' runs one in-process by
default (--materialize=false turns it off there).

With --once it materializes the newest checkpoint of every stream (or of
--stream) now, collects unreferenced snapshot files, prints what it did
and exits. Without it, it runs until SIGTERM or SIGINT, materializing each
stream every --materialize-interval or sooner once --materialize-bytes of
changelog are waiting, and serves /metrics on --listen if given.

Its local stores (under --data-dir) are caches: deleting them only costs a
download of the newest snapshot.`,
		Example: `  dstl materialize --blob s3://bucket/dstl?endpoint=http://127.0.0.1:9000&region=us-east-1&path_style=true
  dstl materialize --blob ./dstl-data/blobs --once`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return materialize(cmd, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.blobURL, "blob", "", "blob store URL (required): file:///path, a path, or s3://bucket/prefix?endpoint=...")
	f.StringVar(&o.dataDir, "data-dir", "dstl-materializer", "directory for the materializer's local stores")
	f.StringSliceVar(&o.streams, "stream", nil, "materialize only these streams (repeatable; default all)")
	f.BoolVar(&o.once, "once", false, "materialize every stream's newest checkpoint now, collect garbage, and exit")
	f.StringVar(&o.listen, "listen", "", "address to serve /metrics and /healthz on (default: none)")
	f.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.DurationVar(&o.gcInterval, "gc-interval", time.Minute, "period of snapshot garbage collection (negative disables it)")
	f.DurationVar(&o.cdcMaxHold, "cdc-max-hold", changelog.DefaultSubscriptionMaxHold, "retention cap of registered CDC subscriptions, as for 'dstl serve' (use the same value on every node)")
	f.StringToStringVar(&o.cdcMaxHoldFor, "cdc-max-hold-for", nil, "--cdc-max-hold for some streams, as for 'dstl serve'")
	o.mat.add(f)
	addConfigFlag(cmd)
	return cmd
}

func materialize(cmd *cobra.Command, o materializeOptions) error {
	ctx := cmd.Context()
	if o.blobURL == "" {
		return errors.New("--blob is required: the materializer reads the blob store the nodes write (e.g. --blob ./dstl-data/blobs)")
	}
	log, err := newLogger(o.logFormat, o.logLevel)
	if err != nil {
		return err
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
	store, err := blobstore.Open(ctx, o.blobURL)
	if err != nil {
		return fmt.Errorf("open blob store: %w", err)
	}
	defer store.Close()
	// A node without writers: it reads journals, parts and segments, and
	// its garbage collection deletes the snapshot records nothing uses.
	node, err := changelog.Open(ctx, changelog.Options{Store: store, DataDir: filepath.Join(dataDir, "node"), Logger: log, GCInterval: o.gcInterval, SubscriptionMaxHold: o.cdcMaxHold, SubscriptionMaxHoldFor: maxHoldFor})
	if err != nil {
		return fmt.Errorf("open node: %w", err)
	}
	defer func() { _ = node.Close(context.WithoutCancel(ctx)) }()
	cfg := o.mat.config(log)
	cfg.Streams = o.streams
	cfg.GCInterval = o.gcInterval
	mat, err := materializer.New(node, filepath.Join(dataDir, "stores"), cfg)
	if err != nil {
		return err
	}
	defer mat.Close()
	if o.once {
		return materializeOnce(cmd, node, mat, o.streams)
	}

	if o.listen != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), materializer.NewCollector(mat))
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		ln, err := net.Listen("tcp", o.listen)
		if err != nil {
			return fmt.Errorf("listen on %s: %w", o.listen, err)
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		log.Info("materializer metrics", "listen", ln.Addr().String())
	}
	log.Info("dstl materializing", "blob", redactURL(o.blobURL), "data_dir", dataDir, "interval", cfg.Interval, "bytes", cfg.Bytes)
	if err := mat.Run(ctx); err != nil {
		return err
	}
	log.Info("materializer stopped")
	return nil
}

// materializeOnce materializes every stream now and collects garbage,
// printing a line per stream.
func materializeOnce(cmd *cobra.Command, node *changelog.Node, mat *materializer.Materializer, streams []string) error {
	ctx := cmd.Context()
	if len(streams) == 0 {
		var err error
		if streams, err = node.ListStreams(ctx); err != nil {
			return err
		}
	}
	out := cmd.OutOrStdout()
	var errs []error
	for _, s := range streams {
		start := time.Now()
		res, err := mat.MaterializeStream(ctx, s, true)
		if err != nil {
			errs = append(errs, fmt.Errorf("stream %s: %w", s, err))
			fmt.Fprintf(out, "%s: failed: %v\n", s, err)
			continue
		}
		if res.Snapshot == nil {
			fmt.Fprintf(out, "%s: up to date\n", s)
		} else {
			kind := "delta"
			if res.Base {
				kind = "full"
			}
			fmt.Fprintf(out, "%s: snapshot of checkpoint %d (%s): folded %d changes, uploaded %d files, %s, in %s\n",
				s, res.Snapshot.Checkpoint, kind, res.Folded, res.Files, humanBytes(res.Uploaded), time.Since(start).Round(time.Millisecond))
		}
	}
	// Records first (the node's collection deletes those nothing restores
	// from), then the files no remaining record references.
	if _, err := node.CollectGarbage(ctx); err != nil {
		errs = append(errs, err)
	}
	for _, s := range streams {
		gc, err := mat.CollectFiles(ctx, s)
		if err != nil {
			errs = append(errs, fmt.Errorf("stream %s: %w", s, err))
			continue
		}
		if gc.Deleted > 0 {
			fmt.Fprintf(out, "%s: deleted %d unreferenced snapshot files (%s)\n", s, gc.Deleted, humanBytes(gc.DeletedBytes))
		}
	}
	return errors.Join(errs...)
}
