package changelog

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dstl-dev/dstl/changelog/locallog"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/upload"
)

// Options configure a Node.
type Options struct {
	// Store is the blob store (the source of truth).
	Store upload.BlobStore
	// DataDir holds the node's local state: its id and its local log.
	DataDir string
	// NodeID names the node in segment keys; default: a random id created
	// on first start and kept in DataDir/node-id.
	NodeID string
	Clock  clock.Clock
	Limits Limits
	// Scheduler configures the upload scheduler; Store, Node and Clock are
	// filled in by Open.
	Scheduler upload.SchedulerOptions
	// LocalLog configures the local log; Dir defaults to DataDir/locallog.
	LocalLog locallog.Options
	// RetainCheckpoints is how many of the newest complete checkpoints of
	// each stream keep their segments from garbage collection (default 3).
	RetainCheckpoints int
	// GCGrace protects segment objects younger than this from garbage
	// collection, so an object being uploaded is never deleted (default 10m).
	GCGrace time.Duration
	// GCMaxRound bounds one garbage collection round: it deletes nothing
	// once it is older than this (the next round continues). A retain or
	// an open from an old checkpoint waits at most this long (plus a clock
	// skew margin) for a round of a crashed node (default 2m).
	GCMaxRound time.Duration
	// ForeignGCGrace: segments of another node are collected only when
	// nothing references them, they are older than this, the node has
	// uploaded no segment for this long and owns no live epoch (a node
	// whose data dir was lost forever; default 24h, negative: never).
	ForeignGCGrace time.Duration
	// PartCacheBytes bounds the cache of checkpoint parts read (default
	// 32 MiB, estimated in-memory size).
	PartCacheBytes int64
	// GCInterval is the period of the background garbage collection of
	// this node's segments (default 1m; negative disables it).
	GCInterval time.Duration
	// JournalCompactEvery: the appender of every JournalCompactEvery-th
	// journal entry stores the folded journal state there, so a node
	// opening a stream reads that and the entries after it (default 256).
	JournalCompactEvery int
	// JournalKeepCheckpoints is how many of the newest complete checkpoints
	// keep their journal records at least (more if RetainCheckpoints is
	// higher); older ones nothing needs are forgotten (default 64).
	JournalKeepCheckpoints int
	// JournalRefresh is how often writers re-read their streams' journals
	// to learn that another node fenced them (default 1s).
	JournalRefresh time.Duration
	// SubscriptionMaxHold caps how far back a registered CDC subscription
	// holds truncation and garbage collection: once the oldest complete
	// checkpoint it has not consumed completed longer ago than this, the
	// subscription is expired and holds nothing (subscription.go; default
	// DefaultSubscriptionMaxHold, 24h; negative: no cap).
	SubscriptionMaxHold time.Duration
	// SubscriptionMaxHoldFor overrides SubscriptionMaxHold for the streams
	// it names (negative: no cap for that stream).
	SubscriptionMaxHoldFor map[string]time.Duration
	Logger                 *slog.Logger
}

// ErrClosed: the node or writer was closed.
var ErrClosed = errors.New("closed")

// ErrWriterNotFound: a resume named a log this node does not hold.
var ErrWriterNotFound = errors.New("writer not found")

// Node is one dstl node's changelog: its streams' journals, its writers,
// its local log and its upload scheduler.
type Node struct {
	opts  Options
	store upload.BlobStore
	clock clock.Clock
	id    string
	log   *slog.Logger
	sched *upload.Scheduler
	wal   *locallog.Log

	firstSeq uint64 // sequence of this incarnation's first segment

	runCancel context.CancelFunc
	runDone   chan error
	gcDone    chan struct{}

	mu        sync.Mutex
	closed    bool
	streams   map[string]*streamHandle
	writers   map[string]*Writer // live writers by log id
	recovered map[string]*recoveredLog
	// opening counts the opens in flight per stream, from before their
	// epoch-open entry is appended until the writer is attached or its
	// open failed: an epoch of this node without a writer is an orphan
	// only while none is (see abandon.go).
	opening   map[string]int
	parts     *partCache          // checkpoint parts read recently (immutable)
	snapshots map[string]Snapshot // snapshot records read so far (immutable; dropped when deleted)
}

// streamHandle is a stream as this node knows it: its definition and its
// journal, shared by every writer of the stream on the node.
type streamHandle struct {
	cfg     StreamConfig
	journal *journal

	// partsMu guards parts: per checkpoint id, the epochs of this node's
	// writers that stored their part. Only the writer that completes the
	// node's set reads the journal to complete the checkpoint: with many
	// writers per node, that saves each of them a journal and a parts
	// listing (on a loopback S3 the number of calls is what costs).
	partsMu sync.Mutex
	parts   map[uint64]map[uint64]bool
	// completeRetry: completeWaiting failed; the background refresh
	// tries again.
	completeRetry atomic.Bool
	// loaded: a first refresh of the journal succeeded. Until then a
	// caller that finds the handle cached refreshes it itself rather than
	// read a journal another caller is still reading for the first time.
	loaded atomic.Bool
}

// Open starts a node: it recovers the local log (changes acknowledged
// `local` but not uploaded are queued for upload again), rebuilds each
// recovered log's segment references from the blob store, and starts the
// upload scheduler.
func Open(ctx context.Context, opts Options) (*Node, error) {
	if opts.Store == nil {
		return nil, errors.New("changelog: Options.Store is required")
	}
	if opts.DataDir == "" {
		return nil, errors.New("changelog: Options.DataDir is required")
	}
	if opts.Clock == nil {
		opts.Clock = clock.Real{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.RetainCheckpoints <= 0 {
		opts.RetainCheckpoints = 3
	}
	if opts.GCGrace <= 0 {
		opts.GCGrace = 10 * time.Minute
	}
	if opts.GCMaxRound <= 0 {
		opts.GCMaxRound = 2 * time.Minute
	}
	if opts.ForeignGCGrace == 0 {
		opts.ForeignGCGrace = 24 * time.Hour
	}
	if opts.PartCacheBytes <= 0 {
		opts.PartCacheBytes = 32 << 20
	}
	if opts.GCInterval == 0 {
		opts.GCInterval = time.Minute
	}
	if opts.JournalCompactEvery <= 0 {
		opts.JournalCompactEvery = defaultJournalCompactEvery
	}
	if opts.JournalKeepCheckpoints <= 0 {
		opts.JournalKeepCheckpoints = defaultJournalKeepCheckpoints
	}
	if opts.JournalRefresh <= 0 {
		opts.JournalRefresh = time.Second
	}
	if opts.SubscriptionMaxHold == 0 {
		opts.SubscriptionMaxHold = DefaultSubscriptionMaxHold
	}
	opts.Limits = opts.Limits.withDefaults()
	if err := os.MkdirAll(opts.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("changelog: data dir: %w", err)
	}
	if opts.NodeID == "" {
		id, err := loadNodeID(opts.DataDir)
		if err != nil {
			return nil, err
		}
		opts.NodeID = id
	}
	n := &Node{
		opts:      opts,
		store:     opts.Store,
		clock:     opts.Clock,
		id:        opts.NodeID,
		log:       opts.Logger,
		streams:   map[string]*streamHandle{},
		writers:   map[string]*Writer{},
		recovered: map[string]*recoveredLog{},
		opening:   map[string]int{},
		parts:     newPartCache(opts.PartCacheBytes),
		snapshots: map[string]Snapshot{},
	}
	// Segment keys carry the node's flush sequence: continue after the
	// newest one so that keys keep sorting in upload order.
	objs, err := listSegments(ctx, opts.Store, opts.NodeID)
	if err != nil {
		return nil, fmt.Errorf("changelog: %w", err)
	}
	so := opts.Scheduler
	so.Store, so.Node, so.Clock = opts.Store, opts.NodeID, opts.Clock
	var newest uint64
	for _, o := range objs {
		if seq, ok := segmentSeq(segmentPrefix(opts.NodeID), o.Key); ok && seq > newest {
			newest = seq
		}
	}
	// Each start leaves a gap of incarnationSeqs after the newest segment
	// it sees: a segment an earlier incarnation was still uploading (a PUT
	// that lands after this listing) has a lower sequence than every
	// segment of this incarnation, which is what recovery marks rely on.
	// The previous start's first sequence is kept in the data dir: GC may
	// have deleted the newest segments, so the listing alone could go back.
	prev, err := loadSeq(opts.DataDir)
	if err != nil {
		return nil, err
	}
	so.FirstSeq = max(so.FirstSeq, newest+incarnationSeqs, prev+incarnationSeqs)
	if err := storeSeq(opts.DataDir, so.FirstSeq); err != nil {
		return nil, err
	}
	n.firstSeq = so.FirstSeq
	sched, err := upload.NewScheduler(so)
	if err != nil {
		return nil, fmt.Errorf("changelog: %w", err)
	}
	n.sched = sched
	lo := opts.LocalLog
	if lo.Dir == "" {
		lo.Dir = filepath.Join(opts.DataDir, "locallog")
	}
	wal, rec, err := locallog.Open(lo)
	if err != nil {
		return nil, fmt.Errorf("changelog: recover local log: %w", err)
	}
	n.wal = wal
	if err := n.recover(ctx, rec, objs); err != nil {
		_ = wal.Close()
		return nil, err
	}
	n.clearOwnRoundMarkers(ctx)
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	n.runCancel, n.runDone, n.gcDone = cancel, make(chan error, 1), make(chan struct{})
	go func() { n.runDone <- sched.Run(runCtx) }()
	go n.runBackground(runCtx)
	return n, nil
}

// runBackground runs the periodic garbage collection and journal refresh
// (which tells writers that another node fenced them) until ctx ends.
func (n *Node) runBackground(ctx context.Context) {
	defer close(n.gcDone)
	nextGC := n.clock.Now().Add(n.opts.GCInterval)
	n.abandonAllOrphans(ctx)
	for {
		if err := clock.Sleep(ctx, n.clock, n.opts.JournalRefresh); err != nil {
			return
		}
		n.refreshWriters(ctx)
		n.releaseRecovered(ctx)
		n.abandonCachedOrphans(ctx)
		if n.opts.GCInterval > 0 && !n.clock.Now().Before(nextGC) {
			nextGC = n.clock.Now().Add(n.opts.GCInterval)
			if _, err := n.AdoptSnapshots(ctx); err != nil && ctx.Err() == nil {
				n.log.Warn("truncating logs below published snapshots failed", "err", err)
			}
			if st, err := n.CollectGarbage(ctx); err != nil {
				if ctx.Err() == nil {
					n.log.Warn("segment garbage collection failed", "err", err)
				}
			} else if st.Deleted > 0 || st.SnapshotsDeleted > 0 {
				n.log.Info("segment garbage collection", "deleted", st.Deleted, "bytes", st.DeletedBytes, "kept", st.Referenced, "young", st.Young, "snapshots_deleted", st.SnapshotsDeleted)
			}
		}
	}
}

// releaseRecovered drops recovered logs nobody can resume any more (their
// epoch was fenced or closed, or their stream deleted) once their tail is
// uploaded: the local log forgets them and their segments stop being GC
// roots of this node.
func (n *Node) releaseRecovered(ctx context.Context) {
	n.mu.Lock()
	var logs []*recoveredLog
	for _, r := range n.recovered {
		logs = append(logs, r)
	}
	n.mu.Unlock()
	for _, r := range logs {
		w := r.writer
		w.mu.Lock()
		pending := len(w.tail)
		w.mu.Unlock()
		if pending > 0 {
			continue // upload it first: it was acknowledged
		}
		h, err := n.streamHandle(ctx, r.meta.Stream)
		live := false
		switch {
		case errors.Is(err, ErrStreamNotFound):
		case err != nil:
			continue
		default:
			if err := h.journal.refresh(ctx); err != nil {
				continue
			}
			st := h.journal.snapshot()
			i := st.liveIndex(w.epoch)
			live = i >= 0 && !st.live[i].Closed
		}
		if live {
			continue
		}
		n.mu.Lock()
		if n.recovered[w.logID] == r {
			delete(n.recovered, w.logID)
		}
		n.mu.Unlock()
		n.sched.Unregister(w)
		n.wal.Forget(w.logID)
		n.log.Info("released recovered log", "log", w.logID)
	}
}

// refreshWriters re-reads the journal of every stream with a live writer
// here and fences the writers a newer epoch (on any node) overlaps.
func (n *Node) refreshWriters(ctx context.Context) {
	n.mu.Lock()
	byStream := map[*streamHandle][]*Writer{}
	for _, w := range n.writers {
		byStream[w.stream] = append(byStream[w.stream], w)
	}
	n.mu.Unlock()
	for h, ws := range byStream {
		if err := h.journal.refresh(ctx); err != nil {
			if ctx.Err() == nil {
				n.log.Warn("journal refresh failed", "stream", h.cfg.Name, "err", err)
			}
			continue
		}
		st := h.journal.snapshot()
		changed := h.completeRetry.Load()
		for _, w := range ws {
			if by, ok := st.fenced(w.epoch); ok {
				w.fence(by)
				changed = true
				continue
			}
			if w.closeFailed() {
				// Finish a Close that failed: its entry may have landed
				// (then this only re-reads), or it is appended now.
				cctx, cancel := context.WithTimeout(ctx, closeRetryTimeout)
				if err := w.Close(cctx); err != nil && ctx.Err() == nil {
					n.log.Warn("retrying a failed writer close failed", "log", w.logID, "err", err)
				}
				cancel()
			}
		}
		if changed {
			n.completeWaiting(ctx, h)
		}
	}
}

// closeRetryTimeout bounds one background retry of a failed Close, so one
// writer cannot hold up the refresh of the others for long.
const closeRetryTimeout = 30 * time.Second

// ID returns the node's id.
func (n *Node) ID() string { return n.id }

// BlobStore returns the blob store the node reads and writes.
func (n *Node) BlobStore() upload.BlobStore { return n.store }

// Scheduler returns the node's upload scheduler (for metrics).
func (n *Node) Scheduler() *upload.Scheduler { return n.sched }

// Close stops the node gracefully: every change acknowledged so far, in
// any durability, is uploaded before it returns (unless ctx ends first),
// then the scheduler and the local log stop. Writers are detached, not
// closed: their epochs stay live and can be resumed after a restart.
func (n *Node) Close(ctx context.Context) error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	writers := make([]*Writer, 0, len(n.writers))
	for _, w := range n.writers {
		writers = append(writers, w)
	}
	n.mu.Unlock()

	// Persist every writer at once: they share flushes, so this costs one
	// or two uploads rather than one per writer.
	var (
		errs []error
		mu   sync.Mutex
		wg   sync.WaitGroup
	)
	for _, w := range writers {
		wg.Go(func() {
			if _, err := w.Persist(ctx, 0); err != nil && !errors.Is(err, ErrFenced) {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if err := n.sched.FlushNow(ctx); err != nil {
		errs = append(errs, fmt.Errorf("final upload: %w", err))
	}
	for _, w := range writers {
		w.detach(ErrClosed)
	}
	n.runCancel()
	if err := <-n.runDone; err != nil && !errors.Is(err, context.Canceled) {
		errs = append(errs, fmt.Errorf("upload scheduler: %w", err))
	}
	<-n.gcDone
	if err := n.wal.Close(); err != nil {
		errs = append(errs, fmt.Errorf("local log: %w", err))
	}
	return errors.Join(errs...)
}

// CreateStream defines a new stream. keyGroups 0 means keygroup.Default.
func (n *Node) CreateStream(ctx context.Context, name string, keyGroups int) (StreamConfig, error) {
	if keyGroups == 0 {
		keyGroups = 128
	}
	cfg := StreamConfig{Name: name, KeyGroups: keyGroups, CreatedAtMs: n.clock.Now().UnixMilli(), Incarnation: newNonce()}
	if err := createStream(ctx, n.store, cfg); err != nil {
		return StreamConfig{}, err
	}
	return cfg, nil
}

// Stream returns a stream's definition.
func (n *Node) Stream(ctx context.Context, name string) (StreamConfig, error) {
	h, err := n.streamHandle(ctx, name)
	if err != nil {
		return StreamConfig{}, err
	}
	return h.cfg, nil
}

// ListStreams returns every stream's name.
func (n *Node) ListStreams(ctx context.Context) ([]string, error) {
	return listStreams(ctx, n.store)
}

func (n *Node) streamHandle(ctx context.Context, name string) (*streamHandle, error) {
	n.mu.Lock()
	h, ok := n.streams[name]
	if ok && h.journal.isGone() {
		delete(n.streams, name) // deleted (and maybe created again) since
		ok = false
	}
	n.mu.Unlock()
	if ok && h.loaded.Load() {
		return h, nil
	}
	if ok {
		return h, h.load(ctx)
	}
	cfg, err := getStream(ctx, n.store, name)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	h, ok = n.streams[name]
	if !ok || h.journal.isGone() {
		h = &streamHandle{cfg: cfg, journal: newJournal(n.store, cfg, n.clock.Now, newNonce).withCompaction(n.opts.JournalCompactEvery, n.opts.GCGrace)}
		n.streams[name] = h
	}
	n.mu.Unlock()
	// The handle is kept even if this read fails: the entries read so far
	// stay folded, and the next refresh continues after them.
	if err := h.load(ctx); err != nil {
		return nil, err
	}
	return h, nil
}

// load reads the handle's journal up to its end and marks it loaded.
func (h *streamHandle) load(ctx context.Context) error {
	if err := h.journal.refresh(ctx); err != nil {
		return err
	}
	h.loaded.Store(true)
	return nil
}

// freshHandle returns the stream's handle with its journal read to the end.
// A cached handle whose stream was deleted and created again elsewhere
// learns it on this read; the reader then gets the new stream's handle
// instead of ErrStreamNotFound for a stream that exists.
func (n *Node) freshHandle(ctx context.Context, name string) (*streamHandle, error) {
	for attempt := 0; ; attempt++ {
		h, err := n.streamHandle(ctx, name)
		if err != nil {
			return nil, err
		}
		err = h.journal.refresh(ctx)
		if err == nil || attempt > 0 || !h.journal.isGone() || !errors.Is(err, ErrStreamNotFound) {
			return h, err
		}
	}
}

// Checkpoints returns the complete checkpoints of a stream, oldest first.
func (n *Node) Checkpoints(ctx context.Context, stream string) ([]CheckpointComplete, error) {
	_, cps, err := n.StreamCheckpoints(ctx, stream)
	return cps, err
}

// StreamCheckpoints returns the stream's definition and its complete
// checkpoints, oldest first, read from one view of its journal: a caller
// that follows one incarnation of a name (a CDC feed) learns from the
// definition that the stream was deleted and created again.
func (n *Node) StreamCheckpoints(ctx context.Context, stream string) (StreamConfig, []CheckpointComplete, error) {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return StreamConfig{}, nil, err
	}
	st := h.journal.snapshot()
	return h.cfg, st.checkpoints, nil
}

func newNonce() string {
	var b [12]byte
	_, _ = crand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b[:])
}

// loadNodeID reads DataDir/node-id, creating it on first start.
func loadNodeID(dir string) (string, error) {
	p := filepath.Join(dir, "node-id")
	data, err := os.ReadFile(p)
	if err == nil {
		id := strings.TrimSpace(string(data))
		if id == "" || strings.ContainsAny(id, "/ \t") {
			return "", fmt.Errorf("changelog: %s holds an invalid node id %q", p, id)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("changelog: read node id: %w", err)
	}
	id := "n" + newNonce()[:16]
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("changelog: write node id: %w", err)
	}
	f, err := os.Open(tmp)
	if err == nil {
		err = f.Sync()
		f.Close()
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		return "", fmt.Errorf("changelog: write node id: %w", err)
	}
	return id, nil
}

// seqFile holds the first segment sequence of the node's latest start.
const seqFile = "segment-seq"

func loadSeq(dir string) (uint64, error) {
	data, err := os.ReadFile(filepath.Join(dir, seqFile))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("changelog: read %s: %w", seqFile, err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("changelog: %s holds %q: %w", seqFile, data, locallog.ErrCorrupt)
	}
	return v, nil
}

// storeSeq records seq durably (write, fsync, rename, fsync the dir)
// before the node uploads any segment.
func storeSeq(dir string, seq uint64) error {
	p := filepath.Join(dir, seqFile)
	tmp := p + ".tmp"
	err := os.WriteFile(tmp, []byte(strconv.FormatUint(seq, 10)+"\n"), 0o644)
	if err == nil {
		err = syncPath(tmp)
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err == nil {
		err = syncPath(dir)
	}
	if err != nil {
		return fmt.Errorf("changelog: record segment sequence: %w", err)
	}
	return nil
}

func syncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// crash stops the node as a kill -9 would, as far as that is possible in
// process: nothing more is uploaded, buffered changes are lost, and no
// writer or epoch is closed. The local log and the blob store keep what
// they had. Tests use it to restart a node on the same data directory.
func (n *Node) crash() {
	n.mu.Lock()
	n.closed = true
	writers := make([]*Writer, 0, len(n.writers)+len(n.recovered))
	for _, w := range n.writers {
		writers = append(writers, w)
	}
	for _, r := range n.recovered {
		writers = append(writers, r.writer)
	}
	n.mu.Unlock()
	n.runCancel()
	<-n.runDone
	<-n.gcDone
	for _, w := range writers {
		w.detach(ErrClosed)
	}
	_ = n.wal.Close()
}

// LocalLogStats returns the local log's counters (for metrics).
func (n *Node) LocalLogStats() locallog.Stats { return n.wal.Stats() }
