package materializer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// Config configures a Materializer. The zero value is the production
// default.
type Config struct {
	// Interval is how often each stream is materialized (default 60s),
	// with Jitter so that the streams of a node do not all materialize at
	// once.
	Interval time.Duration
	// Bytes of un-materialized changelog (the replay a restore of the
	// newest checkpoint would need) that trigger a snapshot before the
	// interval is up (default 64 MiB).
	Bytes int64
	// Jitter spreads each interval uniformly over Interval × [1-J, 1+J]
	// (default 0.2; negative: none).
	Jitter float64
	// Poll is how often Run checks the triggers (default 1s).
	Poll time.Duration
	// MaxDeltaRatio: a snapshot is a delta run on top of the previous one
	// while the bytes the delta runs made obsolete (overwritten, deleted
	// or cleared keys of earlier runs) stay below this share of the base
	// run's bytes; past it the next snapshot is a full base export
	// (default 0.25). This bounds the dead bytes a chain carries to
	// ratio × its base.
	MaxDeltaRatio float64
	// MaxRuns caps the runs of a snapshot (default 16): each run is one
	// ingest at restore.
	MaxRuns int
	// MaxChangedBytes caps the memory that tracks the keys changed since
	// the previous snapshot; past it the snapshot is a full export
	// (default 256 MiB).
	MaxChangedBytes int64
	// GCInterval is how often snapshot files are collected (default 1m;
	// negative: never, see CollectFiles).
	GCInterval time.Duration
	// GCGrace: a file no listing ever found referenced (an upload in
	// flight, garbage of a failed round) is deleted only when it is older
	// than this and two listings at least this far apart found it
	// unreferenced (default 10m).
	GCGrace time.Duration
	// ReleasedGrace: a file a listing found referenced is deleted once two
	// listings at least this far apart found it unreferenced (default 1m).
	// A delta that inherits it is published within ReleasedGrace/2 (at
	// least 5 s) of checking that its base still has a record, or not at
	// all; keep it ≥ 10 s outside tests.
	ReleasedGrace time.Duration
	// RoundLease is the lifetime of a round's lease (default 1m, at least
	// 1s): a round that uploads files protects them from every
	// materializer's CollectFiles with a lease it renews every
	// RoundLease/3, and publishes only within RoundLease·3/4 of its newest
	// confirmed renewal (see roundLease). It bounds how long the files of
	// a round that died stay protected beyond GCGrace.
	RoundLease time.Duration
	// Streams restricts the materializer to these streams (nil: all).
	Streams []string
	// Store configures the local Pebble stores.
	Store  Options
	Clock  clock.Clock
	Seed   uint64 // seeds the jitter (0: random)
	Logger *slog.Logger
}

func (c *Config) defaults() {
	if c.Interval <= 0 {
		c.Interval = 60 * time.Second
	}
	if c.Bytes <= 0 {
		c.Bytes = 64 << 20
	}
	if c.Jitter == 0 {
		c.Jitter = 0.2
	}
	if c.Jitter < 0 {
		c.Jitter = 0
	}
	if c.Poll <= 0 {
		c.Poll = time.Second
	}
	if c.MaxDeltaRatio <= 0 {
		c.MaxDeltaRatio = 0.25
	}
	if c.MaxRuns <= 0 {
		c.MaxRuns = 16
	}
	if c.MaxChangedBytes <= 0 {
		c.MaxChangedBytes = 256 << 20
	}
	if c.GCInterval == 0 {
		c.GCInterval = time.Minute
	}
	if c.GCGrace <= 0 {
		c.GCGrace = 10 * time.Minute
	}
	if c.ReleasedGrace <= 0 {
		c.ReleasedGrace = time.Minute
	}
	if c.RoundLease <= 0 {
		c.RoundLease = time.Minute
	}
	c.RoundLease = max(c.RoundLease, time.Second)
	if c.Clock == nil {
		c.Clock = clock.Real{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Store.Logger == nil {
		c.Store.Logger = SlogLogger(c.Logger.With("component", "pebble"))
	}
}

// Markers kept in each stream's store next to the data (as applied SQNs
// of reserved log ids, which no changelog log id can equal: those are
// "<stream>/<epoch>"). foldingMarker is written before a fold starts and
// doneMarker after it ends, both = the checkpoint folded; Pebble recovers
// a prefix of the committed batches, so after a crash the store holds
// exactly the state of checkpoint doneMarker iff both are equal.
const (
	foldingMarker = "#folding"
	doneMarker    = "#checkpoint"
	// foldLog numbers the folded changes: the plan's steps may replay one
	// log several times for different key groups, so changes are
	// renumbered rather than deduplicated by their own SQNs (consistency
	// comes from the markers).
	foldLog = "#fold"
)

// Materializer folds the checkpoints of streams into local Pebble stores
// and publishes incremental snapshots of them to the blob store: the
// "remote compaction" of the design. It reads only the blob store (through
// a changelog node), so it runs in the daemon or in its own process
// (`dstl materialize`). Each stream has its own store in
// dir/<hex(stream)>.
type Materializer struct {
	node *changelog.Node
	blob upload.BlobStore
	dir  string
	cfg  Config

	// listed and listedAt cache Run's stream listing (Run's goroutine only).
	listed   []string
	listedAt time.Time

	mu      sync.Mutex
	rnd     *mrand.Rand
	streams map[string]*streamState
	closed  bool
}

// streamState is a stream's store and what it holds. mu serializes the
// stream's materializations and collections.
type streamState struct {
	mu          sync.Mutex
	name        string
	incarnation string
	dir         string // "" until bound to an incarnation
	store       *Store
	// held is the snapshot whose state the store holds (valid only if
	// known), with its decoded manifest; held == nil && known: empty.
	known    bool
	held     *changelog.Snapshot
	manifest SnapshotManifest
	nextDue  time.Time
	// plannedFor is the newest checkpoint the triggers were last
	// evaluated for.
	plannedFor uint64
	// published is a copy of status for Status (read without ss.mu).
	published atomic.Pointer[Status]
	// sightings: what CollectFiles saw of each file (two-phase GC).
	sightings map[string]sighting
	status    Status
}

// publishStatus makes the current status visible to Status; the caller
// holds ss.mu.
func (ss *streamState) publishStatus() {
	st := ss.status
	ss.published.Store(&st)
}

// Status is a stream's materializer state.
type Status struct {
	Stream string `json:"stream"`
	// NewestCheckpoint is the newest complete checkpoint seen;
	// SnapshotCheckpoint the newest one materialized by a published
	// snapshot.
	NewestCheckpoint   uint64    `json:"newest_checkpoint"`
	SnapshotCheckpoint uint64    `json:"snapshot_checkpoint"`
	LastSnapshotAt     time.Time `json:"last_snapshot_at"`
	// LagSQNs and LagBytes: the changelog a restore of the newest
	// checkpoint replays on top of the newest snapshot.
	LagSQNs  uint64 `json:"lag_sqns"`
	LagBytes int64  `json:"lag_bytes"`
	// Totals of this process.
	Snapshots     int64 `json:"snapshots"`
	BaseSnapshots int64 `json:"base_snapshots"`
	BytesUploaded int64 `json:"bytes_uploaded"`
	FilesUploaded int64 `json:"files_uploaded"`
	ChangesFolded int64 `json:"changes_folded"`
	FilesDeleted  int64 `json:"files_deleted"`
	// SnapshotBytes is the newest snapshot's total file size.
	SnapshotBytes int64  `json:"snapshot_bytes"`
	LastError     string `json:"last_error,omitempty"`
}

// New creates a materializer over node's blob store, keeping its stores
// under dir.
func New(node *changelog.Node, dir string, cfg Config) (*Materializer, error) {
	cfg.defaults()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("materializer: %w", err)
	}
	// Files spooled for an upload a crash interrupted are never needed,
	// nor stores a crash left half-discarded.
	if err := os.RemoveAll(filepath.Join(dir, "spool")); err != nil {
		return nil, fmt.Errorf("materializer: clear spool: %w", err)
	}
	trash, _ := filepath.Glob(filepath.Join(dir, "*"+trashInfix+"*"))
	for _, t := range trash {
		if err := os.RemoveAll(t); err != nil {
			return nil, fmt.Errorf("materializer: clear %s: %w", t, err)
		}
	}
	seed := cfg.Seed
	if seed == 0 {
		var b [8]byte
		_, _ = rand.Read(b[:])
		for _, x := range b {
			seed = seed<<8 | uint64(x)
		}
	}
	return &Materializer{
		node:    node,
		blob:    node.BlobStore(),
		dir:     dir,
		cfg:     cfg,
		rnd:     mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		streams: map[string]*streamState{},
	}, nil
}

// Close closes the stores. Run must have returned.
func (m *Materializer) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	var errs []error
	for _, ss := range m.streams {
		ss.mu.Lock()
		if ss.store != nil {
			errs = append(errs, ss.store.Close())
			ss.store = nil
		}
		ss.mu.Unlock()
	}
	return errors.Join(errs...)
}

// Run materializes the streams whenever a trigger fires and collects
// snapshot files every GCInterval, until ctx ends. Errors of one stream are
// logged and kept in its Status; they never stop the others.
func (m *Materializer) Run(ctx context.Context) error {
	nextGC := m.cfg.Clock.Now().Add(m.cfg.GCInterval)
	for {
		streams, err := m.streamNames(ctx)
		if err != nil && ctx.Err() == nil {
			m.cfg.Logger.Warn("materializer: list streams", "err", err)
		}
		for _, s := range streams {
			if ctx.Err() != nil {
				break
			}
			if _, err := m.MaterializeStream(ctx, s, false); err != nil && ctx.Err() == nil && !errors.Is(err, changelog.ErrStreamNotFound) {
				m.cfg.Logger.Warn("materializer: snapshot failed", "stream", s, "err", err)
			}
		}
		if m.cfg.GCInterval > 0 && !m.cfg.Clock.Now().Before(nextGC) {
			nextGC = m.cfg.Clock.Now().Add(m.cfg.GCInterval)
			for _, s := range streams {
				if _, err := m.CollectFiles(ctx, s); err != nil && ctx.Err() == nil && !errors.Is(err, changelog.ErrStreamNotFound) {
					m.cfg.Logger.Warn("materializer: file collection failed", "stream", s, "err", err)
				}
			}
		}
		if err := clock.Sleep(ctx, m.cfg.Clock, m.cfg.Poll); err != nil {
			return nil
		}
	}
}

// streamNames lists the streams to materialize: Config.Streams, or every
// stream, listed at most every streamListEvery.
func (m *Materializer) streamNames(ctx context.Context) ([]string, error) {
	if len(m.cfg.Streams) > 0 {
		return m.cfg.Streams, nil
	}
	now := m.cfg.Clock.Now()
	if m.listed != nil && now.Sub(m.listedAt) < streamListEvery {
		return m.listed, nil
	}
	names, err := m.node.ListStreams(ctx)
	if err != nil {
		return m.listed, err
	}
	m.listed, m.listedAt = names, now
	return names, nil
}

// streamListEvery bounds how often Run lists the streams.
const streamListEvery = 10 * time.Second

// state returns the stream's state, creating it (store not opened yet).
func (m *Materializer) state(stream string) (*streamState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	ss, ok := m.streams[stream]
	if !ok {
		ss = &streamState{name: stream, status: Status{Stream: stream}}
		// The first snapshot of a stream falls anywhere in its first
		// interval, so streams found together spread out.
		ss.nextDue = m.cfg.Clock.Now().Add(time.Duration(m.rnd.Float64() * float64(m.cfg.Interval)))
		m.streams[stream] = ss
	}
	return ss, nil
}

// bind reads the stream's definition and ties ss to its incarnation: a
// stream deleted and created again under the same name is another stream,
// so its local store (dir/<hex(name)>-<incarnation>) starts empty and the
// old incarnation's store is removed.
func (m *Materializer) bind(ctx context.Context, ss *streamState) (changelog.StreamConfig, error) {
	cfg, err := m.node.Stream(ctx, ss.name)
	if err != nil {
		return cfg, err
	}
	if ss.dir != "" && ss.incarnation == cfg.Incarnation {
		return cfg, nil
	}
	if ss.store != nil {
		if err := ss.store.Close(); err != nil {
			return cfg, err
		}
	}
	prefix := hex.EncodeToString([]byte(ss.name)) + "-"
	dir := filepath.Join(m.dir, prefix+cfg.Incarnation)
	old, _ := filepath.Glob(filepath.Join(m.dir, prefix+"*"))
	for _, p := range old {
		if p == dir || p == dir+".gc.json" {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			return cfg, fmt.Errorf("stream %s: remove the store of an old incarnation: %w", ss.name, err)
		}
	}
	// Everything but the mutex (held by the caller) starts over.
	ss.incarnation, ss.dir, ss.store = cfg.Incarnation, dir, nil
	ss.known, ss.held, ss.manifest, ss.plannedFor = false, nil, SnapshotManifest{}, 0
	ss.sightings, ss.status = nil, Status{Stream: ss.name}
	return cfg, nil
}

func (m *Materializer) nextInterval() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := 1 + m.cfg.Jitter*(2*m.rnd.Float64()-1)
	return time.Duration(f * float64(m.cfg.Interval))
}

// Status returns the materializer state of the streams it has seen.
func (m *Materializer) Status() []Status {
	m.mu.Lock()
	states := make([]*streamState, 0, len(m.streams))
	for _, ss := range m.streams {
		states = append(states, ss)
	}
	m.mu.Unlock()
	out := make([]Status, 0, len(states))
	for _, ss := range states {
		// The published copy: a round holds ss.mu for as long as it takes,
		// and a metrics scrape must not wait for it.
		if st := ss.published.Load(); st != nil {
			out = append(out, *st)
		}
	}
	slices.SortFunc(out, func(a, b Status) int {
		switch {
		case a.Stream < b.Stream:
			return -1
		case a.Stream > b.Stream:
			return 1
		}
		return 0
	})
	return out
}

// SnapshotResult reports one MaterializeStream call.
type SnapshotResult struct {
	// Snapshot is the published snapshot (nil: none was due, or nothing
	// new to materialize).
	Snapshot *changelog.Snapshot
	// Base: the snapshot is a full export; otherwise a delta run on top of
	// the previous snapshot.
	Base bool
	// Folded is the number of changes folded, Uploaded the bytes of the
	// files uploaded for the snapshot.
	Folded   int64
	Uploaded int64
	Files    int
	// Rebuilt: the local store was rebuilt from the blob store first.
	Rebuilt bool
}

// MaterializeStream publishes a snapshot of the stream's newest complete
// checkpoint if one is due (its interval is up or the un-materialized
// changelog exceeds Config.Bytes) or force is set and the newest checkpoint
// is not materialized yet.
func (m *Materializer) MaterializeStream(ctx context.Context, stream string, force bool) (SnapshotResult, error) {
	ss, err := m.state(stream)
	if err != nil {
		return SnapshotResult{}, err
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	res, err := m.materialize(ctx, ss, force)
	if err != nil {
		ss.status.LastError = err.Error()
	} else {
		ss.status.LastError = ""
	}
	ss.publishStatus()
	return res, err
}

func (m *Materializer) materialize(ctx context.Context, ss *streamState, force bool) (SnapshotResult, error) {
	var res SnapshotResult
	cfg, err := m.bind(ctx, ss)
	if err != nil {
		return res, err
	}
	cps, err := m.node.Checkpoints(ctx, ss.name)
	if err != nil {
		return res, err
	}
	if len(cps) == 0 {
		return res, nil
	}
	id := cps[len(cps)-1].ID
	now := m.cfg.Clock.Now()
	if !force && id == ss.plannedFor && now.Before(ss.nextDue) {
		// Nothing new since the last look and not due: the lag is what it
		// was. This keeps blob-store listings off every poll.
		return res, nil
	}
	all := keygroup.Range{Lo: 0, Hi: uint16(cfg.KeyGroups - 1)}
	pl, err := m.node.PlanRestore(ctx, ss.name, id, all)
	if err != nil {
		return res, fmt.Errorf("stream %s: plan checkpoint %d: %w", ss.name, id, err)
	}
	ss.status.NewestCheckpoint = id
	ss.status.LagSQNs, ss.status.LagBytes = pl.TailChanges(), pl.TailBytes()
	if snaps, err := m.node.Snapshots(ctx, ss.name); err == nil && len(snaps) > 0 {
		newest := snaps[len(snaps)-1]
		ss.status.SnapshotCheckpoint, ss.status.LastSnapshotAt, ss.status.SnapshotBytes = newest.Checkpoint, newest.CreatedAt, newest.Bytes
	}
	ss.plannedFor = id
	if base, ok := pl.SingleBase(); ok && base.Checkpoint == id {
		return res, nil // the newest checkpoint is materialized
	}
	ss.publishStatus() // the lag, before a long round
	if !force && now.Before(ss.nextDue) && ss.status.LagBytes < m.cfg.Bytes {
		return res, nil
	}
	ss.nextDue = now.Add(m.nextInterval())

	rebuilt, err := m.prepare(ctx, ss, pl)
	if err != nil {
		return res, err
	}
	res.Rebuilt = rebuilt
	if !ss.known {
		return res, fmt.Errorf("stream %s: store state unknown", ss.name)
	}
	changed, obsolete, folded, err := m.fold(ctx, ss, pl)
	if err != nil {
		ss.known = false // half folded: rebuild next time
		return res, err
	}
	res.Folded = folded
	ss.status.ChangesFolded += folded

	// The round's files are protected by its lease from before the first
	// upload until the record is published (or the round gave up).
	nonce := make([]byte, 4)
	_, _ = rand.Read(nonce)
	round := roundName(id, hex.EncodeToString(nonce))
	lease, err := m.startLease(ctx, ss.name, round)
	if err != nil {
		ss.known = false
		return res, err
	}
	defer lease.release(ctx)
	next, base, uploaded, files, err := m.export(ctx, ss, round, all, changed, obsolete)
	if err != nil {
		ss.known = false // the store is past the snapshot it was built on
		return res, err
	}
	res.Base, res.Uploaded, res.Files = base, uploaded, files
	ss.status.BytesUploaded += uploaded
	ss.status.FilesUploaded += int64(files)
	raw, err := json.Marshal(next)
	if err != nil {
		ss.known = false
		return res, err
	}
	if !base {
		// A delta inherits the held snapshot's files: publish it only if
		// that snapshot's record still exists. Files of a record deleted
		// after this check are still safe: CollectFiles deletes a file only
		// after two unreferenced sightings GCGrace apart, and this record
		// is published well within GCGrace of the check.
		if err := m.checkHeld(ctx, ss); err != nil {
			ss.known = false
			return res, err
		}
	}
	// Publish (and its checks) only while the round's files are
	// protected: by the lease for the new files, by ReleasedGrace for
	// those a delta inherits.
	within := lease.publishWithin()
	if within <= 0 {
		ss.known = false
		return res, fmt.Errorf("stream %s: snapshot of checkpoint %d: %w", ss.name, id, ErrLeaseLapsed)
	}
	pctx, cancel := context.WithTimeout(ctx, min(within, max(m.cfg.ReleasedGrace/2, minPublishTimeout)))
	snap, err := m.node.PublishSnapshot(pctx, ss.name, id, changelog.SnapshotContent{
		Incarnation: cfg.Incarnation,
		Files:       next.fileRefs(),
		Manifest:    raw,
		Bytes:       next.Bytes,
		NewBytes:    uploaded,
	})
	cancel()
	if errors.Is(err, changelog.ErrSnapshotConflict) {
		// Another materializer published this checkpoint first: same
		// state, other files. Build on theirs; ours are garbage.
		snap, err = m.published(ctx, ss.name, id)
		if err == nil {
			next, err = DecodeManifest(snap)
		}
	}
	if err != nil {
		ss.known = false
		return res, err
	}
	ss.held, ss.manifest, ss.known = &snap, next, true
	res.Snapshot = &snap
	ss.status.Snapshots++
	if base {
		ss.status.BaseSnapshots++
	}
	ss.status.SnapshotCheckpoint, ss.status.LastSnapshotAt, ss.status.SnapshotBytes = id, snap.CreatedAt, snap.Bytes
	ss.status.LagSQNs, ss.status.LagBytes = 0, 0
	return res, nil
}

// minPublishTimeout bounds how short the publication's timeout gets with a
// (test-sized) ReleasedGrace below twice it: the bound of ReleasedGrace is
// only kept from 10 s up.
const minPublishTimeout = 5 * time.Second

// errBaseGone: the snapshot a delta builds on was collected meanwhile.
var errBaseGone = errors.New("the snapshot the delta builds on was collected meanwhile")

func (m *Materializer) checkHeld(ctx context.Context, ss *streamState) error {
	snaps, err := m.node.Snapshots(ctx, ss.name)
	if err != nil {
		return err
	}
	for _, s := range snaps {
		if s.Checkpoint == ss.held.Checkpoint {
			return nil
		}
	}
	return fmt.Errorf("stream %s: delta on the snapshot of checkpoint %d: %w", ss.name, ss.held.Checkpoint, errBaseGone)
}

func (m *Materializer) published(ctx context.Context, stream string, id uint64) (changelog.Snapshot, error) {
	snaps, err := m.node.Snapshots(ctx, stream)
	if err != nil {
		return changelog.Snapshot{}, err
	}
	for _, s := range snaps {
		if s.Checkpoint == id {
			return s, nil
		}
	}
	return changelog.Snapshot{}, fmt.Errorf("stream %s: snapshot of checkpoint %d vanished: %w", stream, id, upload.ErrNotFound)
}

// DecodeManifest returns the snapshot manifest a snapshot record carries,
// validated.
func DecodeManifest(s changelog.Snapshot) (SnapshotManifest, error) {
	var man SnapshotManifest
	if err := json.Unmarshal(s.Manifest, &man); err != nil {
		return SnapshotManifest{}, fmt.Errorf("snapshot %s: manifest: %v: %w", s.Key(), err, ErrCorrupt)
	}
	if err := man.validate(); err != nil {
		return SnapshotManifest{}, fmt.Errorf("snapshot %s: %w", s.Key(), err)
	}
	if man.Stream != s.Stream {
		return SnapshotManifest{}, fmt.Errorf("snapshot %s: manifest of stream %q: %w", s.Key(), man.Stream, ErrCorrupt)
	}
	// The record's file list is what the changelog checks before relying
	// on the record: it must be exactly the manifest's files.
	refs := man.fileRefs()
	if len(refs) != len(s.Files) {
		return SnapshotManifest{}, fmt.Errorf("snapshot %s: the record lists %d files, the manifest %d: %w", s.Key(), len(s.Files), len(refs), ErrCorrupt)
	}
	listed := make(map[string]int64, len(s.Files))
	for _, f := range s.Files {
		listed[f.Key] = f.Size
	}
	for _, f := range refs {
		if size, ok := listed[f.Key]; !ok || size != f.Size {
			return SnapshotManifest{}, fmt.Errorf("snapshot %s: manifest file %s (%d bytes) is not in the record's file list: %w", s.Key(), f.Key, f.Size, ErrCorrupt)
		}
	}
	return man, nil
}

// fileRefs lists the manifest's files for the snapshot record, each once.
func (m SnapshotManifest) fileRefs() []changelog.SnapshotFileRef {
	var out []changelog.SnapshotFileRef
	seen := map[string]bool{}
	for _, r := range m.Runs {
		for _, f := range r.Files {
			if !seen[f.Name] {
				seen[f.Name] = true
				out = append(out, changelog.SnapshotFileRef{Key: f.Name, Size: f.Size})
			}
		}
	}
	return out
}

// prepare makes the stream's store hold the state the plan starts from:
// the state of its single base snapshot (or empty), reusing the store when
// it already holds it (checked against the markers after a restart), and
// rebuilding it from the blob store otherwise. A plan with several bases
// (or one covering part of the key groups) always rebuilds, and the next
// snapshot is a full export.
func (m *Materializer) prepare(ctx context.Context, ss *streamState, pl changelog.RestorePlan) (rebuilt bool, err error) {
	base, single := pl.SingleBase()
	var want uint64
	if single {
		want = base.Checkpoint
	}
	reusable := single || len(pl.Bases) == 0
	if ss.store == nil {
		st, err := m.openStore(ss)
		if err != nil {
			return false, err
		}
		ss.store = st
		folding, err1 := st.AppliedSQN(ss.name, foldingMarker)
		done, err2 := st.AppliedSQN(ss.name, doneMarker)
		ss.known = reusable && err1 == nil && err2 == nil && folding == done && done == want
		if ss.known && single {
			if ss.manifest, err = DecodeManifest(base); err != nil {
				return false, err
			}
			ss.held = &base
		}
		if ss.known && !single {
			// Empty only if nothing was ever folded.
			applied, err := st.Applied(ss.name)
			if err != nil {
				return false, err
			}
			ss.known = len(applied) == 0
		}
	}
	held := uint64(0)
	if ss.held != nil {
		held = ss.held.Checkpoint
	}
	if reusable && ss.known && held == want {
		return false, nil
	}
	// Rebuild: a fresh store with the bases imported.
	ss.known = false
	if err := ss.store.Close(); err != nil {
		return false, err
	}
	ss.store = nil
	if err := discardDir(ss.dir); err != nil {
		return false, fmt.Errorf("stream %s: clear store: %w", ss.name, err)
	}
	st, err := Open(ss.dir, m.cfg.Store)
	if err != nil {
		return false, err
	}
	ss.store = st
	ss.held, ss.manifest = nil, SnapshotManifest{}
	for _, b := range pl.Bases {
		// Applied SQNs (the markers) only from a single base: with several,
		// the store holds none of the snapshots exactly.
		opts := ImportOptions{SkipApplied: !single, Incarnation: ss.incarnation}
		if err := st.ImportSnapshot(ctx, m.blob, b.Snapshot, b.Ranges, opts); err != nil {
			return true, fmt.Errorf("stream %s: %w", ss.name, err)
		}
	}
	if single {
		man, err := DecodeManifest(base)
		if err != nil {
			return true, err
		}
		ss.held, ss.manifest = &base, man
	}
	ss.known = true
	return true, nil
}

// openStore opens the stream's store. The store is only a cache: one that
// does not open (a crash in the middle of an earlier discard, a damaged
// disk) is discarded and opened empty, to be rebuilt from the blob store.
func (m *Materializer) openStore(ss *streamState) (*Store, error) {
	st, err := Open(ss.dir, m.cfg.Store)
	if err == nil {
		return st, nil
	}
	m.cfg.Logger.Warn("materializer: discarding a local store that does not open; it is rebuilt from the blob store", "stream", ss.name, "dir", ss.dir, "err", err)
	if err := discardDir(ss.dir); err != nil {
		return nil, fmt.Errorf("stream %s: discard store: %w", ss.name, err)
	}
	return Open(ss.dir, m.cfg.Store)
}

// discardDir removes a store directory crash-safely: it is first renamed
// to a unique trash name (atomic), so a crash during the removal leaves
// trash that New sweeps, never a half-deleted store at the store's path.
func discardDir(dir string) error {
	var b [6]byte
	_, _ = rand.Read(b[:])
	trash := dir + trashInfix + hex.EncodeToString(b[:])
	if err := os.Rename(dir, trash); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return os.RemoveAll(trash)
}

const trashInfix = ".trash-"

// fold applies the plan's steps to the store between the two markers and
// returns the keys they changed (nil if too many to track).
func (m *Materializer) fold(ctx context.Context, ss *streamState, pl changelog.RestorePlan) (changed *ChangedSet, obsolete, folded int64, err error) {
	st := ss.store
	if err := st.ApplyThrough(ss.name, foldingMarker, nil, pl.Checkpoint); err != nil {
		return nil, 0, 0, err
	}
	sqn, err := st.AppliedSQN(ss.name, foldLog)
	if err != nil {
		return nil, 0, 0, err
	}
	// Changed keys only matter for a delta on the held snapshot; with none
	// held the snapshot is a full export (tracking cost 18 % of a first
	// snapshot's CPU).
	var before *View
	if ss.held != nil {
		changed = NewChangedSet(ss.name)
		// The held snapshot's state, to measure what the delta makes dead.
		if before, err = st.View(); err != nil {
			return nil, 0, 0, err
		}
		defer before.Close()
	}
	const batchLen = 4096
	batch := make([]segments.Change, 0, batchLen)
	var arena []byte
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		if err := st.Apply(ss.name, foldLog, batch); err != nil {
			return err
		}
		folded += int64(len(batch))
		batch, arena = batch[:0], arena[:0]
		return nil
	}
	for c, err := range m.node.ReplayPlan(ctx, pl) {
		if err != nil {
			return nil, 0, folded, err
		}
		if changed != nil {
			if err := changed.Add(c); err != nil {
				return nil, 0, folded, err
			}
			if changed.MemBytes() > m.cfg.MaxChangedBytes {
				changed = nil // too many to track: the snapshot is a full export
			}
		}
		// Copy: the replay reuses its buffers. When arena grows, earlier
		// changes keep pointing into the old array, which stays valid.
		start := len(arena)
		arena = append(arena, c.Key...)
		arena = append(arena, c.Value...)
		sqn++
		c.Key = arena[start : start+len(c.Key) : start+len(c.Key)]
		c.Value = arena[start+len(c.Key) : len(arena) : len(arena)]
		c.LogID, c.SQN = "", sqn
		batch = append(batch, c)
		if len(batch) == batchLen {
			if err := flush(); err != nil {
				return nil, 0, folded, err
			}
		}
	}
	if err := flush(); err != nil {
		return nil, 0, folded, err
	}
	if err := st.ApplyThrough(ss.name, doneMarker, nil, pl.Checkpoint); err != nil {
		return nil, 0, folded, err
	}
	if changed != nil {
		if obsolete, err = changed.ObsoleteBytes(ctx, before); err != nil {
			return nil, 0, folded, err
		}
	}
	return changed, obsolete, folded, nil
}

// export writes the snapshot files of a round: a delta run on top of the
// held snapshot when it is small enough, a full base export otherwise.
func (m *Materializer) export(ctx context.Context, ss *streamState, round string, all keygroup.Range, changed *ChangedSet, obsolete int64) (next SnapshotManifest, base bool, uploaded int64, files int, err error) {
	prefix := changelog.SnapshotFilePrefix(ss.name) + round + "-"
	spool := filepath.Join(m.dir, "spool")
	var mu sync.Mutex
	create := func(name string) (io.WriteCloser, error) {
		return newBlobFile(ctx, m.blob, spool, prefix+name, func(_ string, size int64) {
			mu.Lock()
			uploaded += size
			files++
			mu.Unlock()
		})
	}
	rename := func(name string) string { return prefix + name }
	if m.deltaFits(ss, changed, obsolete) {
		delta, err := ss.store.ExportChanged(ctx, ss.name, all, changed, create)
		if err != nil {
			return next, false, uploaded, files, err
		}
		for i := range delta.Runs {
			delta.Runs[i].Obsolete = obsolete
		}
		next, err = ss.manifest.Append(delta.RenameFiles(rename))
		return next, false, uploaded, files, err
	}
	next, err = ss.store.Export(ctx, ss.name, all, create)
	if err != nil {
		return next, true, uploaded, files, err
	}
	return next.RenameFiles(rename), true, uploaded, files, nil
}

// deltaFits: the next snapshot can be a delta on the held one, given the
// bytes of the held state it makes obsolete: while the chain's obsolete
// bytes (logical, compared with the base run's stored bytes, which errs
// towards an earlier base for compressible data) stay within MaxDeltaRatio
// of the base and the chain below MaxRuns. Deltas of new keys are live
// data, not waste: growth alone cuts a new base only every MaxRuns
// snapshots.
func (m *Materializer) deltaFits(ss *streamState, changed *ChangedSet, obsolete int64) bool {
	if ss.held == nil || changed == nil || len(ss.manifest.Runs) == 0 || len(ss.manifest.Runs) >= m.cfg.MaxRuns {
		return false
	}
	baseBytes := ss.manifest.Runs[0].Bytes
	for _, r := range ss.manifest.Runs[1:] {
		obsolete += r.Obsolete
	}
	return float64(obsolete) <= m.cfg.MaxDeltaRatio*float64(baseBytes)
}
