package changelog

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
)

const snapshotKind = "snapshot"

// Typed errors of snapshot records.
var (
	// ErrSnapshotConflict: a snapshot of that checkpoint was already
	// published (by another materializer); the caller's files are garbage GC
	// removes.
	ErrSnapshotConflict = errors.New("snapshot already published")
	// ErrSnapshotFilesMissing: a file a snapshot names is definitely not on
	// the blob store (not found, or stored with another size). Such a
	// record is refused: not published, never adopted or restored from.
	ErrSnapshotFilesMissing = errors.New("snapshot files missing")
	// ErrForeignSnapshot: a snapshot record of another incarnation of the
	// stream (deleted and created again under the same name), or one that
	// names no incarnation.
	ErrForeignSnapshot = errors.New("snapshot of another incarnation of the stream")
)

// Snapshot records that the state of a complete checkpoint of a stream is
// materialized: the changelog only needs the changes after it. It is stored
// create-only at streams/<stream>/snapshots/<checkpoint>, one per
// checkpoint.
//
// Logs is what makes it a restore base (see PlanRestore): for every part of
// the checkpoint, its log and the last SQN the part covers, so the
// snapshot's state of that part's key groups is exactly that log up to that
// SQN on top of the state the log's epoch started from. The changelog fills
// it in from the checkpoint's parts; the materializer only names the
// checkpoint it folded.
//
// Incarnation is the StreamConfig.Incarnation of the stream the state was
// folded from. Log ids restart at "<stream>/1" when a stream is deleted and
// created again, so without it a late record of the deleted stream would
// read as a base of the new one. A record of another incarnation, or of
// none (written before records carried one), is never used: not listed by
// Snapshots, planned, adopted or imported, and garbage collection deletes
// it.
//
// Files lists every blob the snapshot needs (key and size), so that the
// changelog can check they exist before it relies on the record
// (publication, and before anything truncates a log below it) without
// reading the Manifest, the materializer's description of the files
// (opaque here). The files live under streams/<stream>/sst/, so deleting a
// stream deletes them.
type Snapshot struct {
	Stream      string            `json:"stream"`
	Incarnation string            `json:"incarnation"`
	Checkpoint  uint64            `json:"checkpoint"`
	Logs        map[string]uint64 `json:"logs"`
	CreatedAt   time.Time         `json:"created_at"`
	// Bytes is the size of all files the snapshot references; NewBytes of
	// those uploaded for it (the rest are shared with older snapshots).
	Bytes    int64             `json:"bytes"`
	NewBytes int64             `json:"new_bytes"`
	Files    []SnapshotFileRef `json:"files"`
	Manifest json.RawMessage   `json:"manifest"`

	ns  streamNS // the key space the record was read from or written to
	key string
	// The object the record was read from (size and ModTime as listed;
	// zero if not read back yet): a listing showing another object under
	// the key (the stream deleted and created again) reads it again.
	size  int64
	mtime time.Time
	// What this node found checking Files (cached with the record: records
	// are immutable, and a file, once found missing, never comes back).
	verified, missing bool
}

// SnapshotFileRef names one blob a snapshot needs and its size.
type SnapshotFileRef struct {
	Key  string `json:"key"`
	Size int64  `json:"size"`
}

// SnapshotContent is what a materializer publishes (see PublishSnapshot).
type SnapshotContent struct {
	// Incarnation of the stream the state was folded from (required).
	Incarnation string
	// Files: every blob the manifest references, all already stored.
	Files []SnapshotFileRef
	// Manifest is opaque to the changelog.
	Manifest json.RawMessage
	// Bytes and NewBytes as in Snapshot.
	Bytes, NewBytes int64
}

// Key is the snapshot record's blob key.
func (s Snapshot) Key() string { return s.key }

func snapshotPrefix(ns streamNS) string { return streamPrefix(ns) + "snapshots/" }

func snapshotKey(ns streamNS, checkpoint uint64) string {
	return fmt.Sprintf("%s%020d", snapshotPrefix(ns), checkpoint)
}

// SnapshotFilePrefix is where the snapshot files of one incarnation of a
// stream (StreamConfig.Incarnation) live: under its prefix, so DeleteStream
// removes them with it and a round of a deleted incarnation never uploads
// into the new one's.
func SnapshotFilePrefix(stream, incarnation string) string {
	return streamPrefix(streamNS{name: stream, incarnation: incarnation}) + "sst/"
}

// SnapshotLeasePrefix is where materializer rounds of one incarnation of a
// stream keep the leases that protect their files while they upload (see
// the materializer's CollectFiles); under its prefix, so DeleteStream
// removes them too.
func SnapshotLeasePrefix(stream, incarnation string) string {
	return streamPrefix(streamNS{name: stream, incarnation: incarnation}) + "sst-leases/"
}

// SnapshotRefPrefix is where lazily opened stores of one incarnation of a
// stream keep the references to the snapshot files they still read from
// the blob store (leases listing files, see the materializer's Store and
// CollectFiles); under its prefix, so DeleteStream removes them too.
func SnapshotRefPrefix(stream, incarnation string) string {
	return streamPrefix(streamNS{name: stream, incarnation: incarnation}) + "sst-refs/"
}

// validateSnapshotFiles checks a record's file list: keys under the
// stream's snapshot-file prefix, sizes not negative, no key twice.
func validateSnapshotFiles(ns streamNS, files []SnapshotFileRef) error {
	prefix := SnapshotFilePrefix(ns.name, ns.incarnation)
	seen := make(map[string]bool, len(files))
	for _, f := range files {
		if len(f.Key) <= len(prefix) || !strings.HasPrefix(f.Key, prefix) {
			return fmt.Errorf("snapshot file %q is not under %s", f.Key, prefix)
		}
		if f.Size < 0 {
			return fmt.Errorf("snapshot file %s has size %d", f.Key, f.Size)
		}
		if seen[f.Key] {
			return fmt.Errorf("snapshot file %s is listed twice", f.Key)
		}
		seen[f.Key] = true
	}
	return nil
}

// verifyConcurrency bounds the Stat calls one verification has in flight.
const verifyConcurrency = 8

// verifySnapshotFiles checks that every file exists with its size. A file
// definitely absent (ErrNotFound) or of another size fails with
// ErrSnapshotFilesMissing. A Stat that failed otherwise is an unknown
// outcome, not a missing file: it fails with that error, and the caller
// decides nothing.
func verifySnapshotFiles(ctx context.Context, store upload.BlobStore, files []SnapshotFileRef) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		missing  error
		unknown  error
		wg       sync.WaitGroup
		work     = make(chan SnapshotFileRef)
		nWorkers = min(verifyConcurrency, len(files))
	)
	for range nWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for f := range work {
				info, err := store.Stat(ctx, f.Key)
				mu.Lock()
				switch {
				case errors.Is(err, upload.ErrNotFound):
					missing = cmp.Or(missing, fmt.Errorf("file %s: %w", f.Key, ErrSnapshotFilesMissing))
					cancel() // definite: the others cannot change the verdict
				case err != nil:
					unknown = cmp.Or(unknown, fmt.Errorf("check snapshot file %s: %w", f.Key, err))
				case info.Size != f.Size:
					missing = cmp.Or(missing, fmt.Errorf("file %s has %d bytes, the record says %d: %w", f.Key, info.Size, f.Size, ErrSnapshotFilesMissing))
					cancel()
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for _, f := range files {
		select {
		case work <- f:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if missing != nil {
		return missing
	}
	if unknown != nil {
		return unknown
	}
	return ctx.Err()
}

// PublishSnapshot records that the state of complete checkpoint `checkpoint`
// of the stream, incarnation c.Incarnation, is materialized in the files
// c.Files (which c.Manifest describes). It fills in Logs from the
// checkpoint's parts.
//
// It is refused, and nothing is written:
//   - with ErrStreamNotFound if the stream is not that incarnation any more
//     (deleted, maybe created again, since the state was folded): checked
//     against a fresh read of the stream's definition;
//   - with ErrSnapshotFilesMissing if a file is definitely not stored with
//     its size (every file is Stat-ed first);
//   - with ErrSnapshotConflict if a snapshot of that checkpoint exists.
//
// A deletion of the stream after the checks can still let the record land
// in a new stream of the same name; it carries the old incarnation, so the
// new stream never uses it. A write with an unknown outcome is resolved by
// reading the record back.
func (n *Node) PublishSnapshot(ctx context.Context, stream string, checkpoint uint64, c SnapshotContent) (Snapshot, error) {
	if c.Incarnation == "" {
		return Snapshot{}, fmt.Errorf("stream %s: publish snapshot of checkpoint %d without an incarnation: %w", stream, checkpoint, ErrInvalidChange)
	}
	if err := validateSnapshotFiles(streamNS{name: stream, incarnation: c.Incarnation}, c.Files); err != nil {
		return Snapshot{}, fmt.Errorf("stream %s: publish snapshot of checkpoint %d: %v: %w", stream, checkpoint, err, ErrInvalidChange)
	}
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return Snapshot{}, fmt.Errorf("publish snapshot: %w", err)
	}
	if h.cfg.Incarnation != c.Incarnation {
		return Snapshot{}, fmt.Errorf("stream %s: publish snapshot of checkpoint %d: the state was folded from incarnation %s, the stream is %s (deleted and created again): %w", stream, checkpoint, c.Incarnation, h.cfg.Incarnation, ErrStreamNotFound)
	}
	// The cached handle may be stale: the definition decides.
	if err := h.journal.checkCatalog(ctx); err != nil {
		return Snapshot{}, fmt.Errorf("publish snapshot of checkpoint %d: %w", checkpoint, err)
	}
	parts, err := n.CheckpointParts(ctx, stream, checkpoint)
	if err != nil {
		return Snapshot{}, fmt.Errorf("publish snapshot: %w", err)
	}
	if err := verifySnapshotFiles(ctx, n.store, c.Files); err != nil {
		return Snapshot{}, fmt.Errorf("stream %s: publish snapshot of checkpoint %d: %w", stream, checkpoint, err)
	}
	s := Snapshot{
		Stream:      stream,
		Incarnation: c.Incarnation,
		Checkpoint:  checkpoint,
		Logs:        make(map[string]uint64, len(parts)),
		CreatedAt:   n.clock.Now().UTC(),
		Bytes:       c.Bytes,
		NewBytes:    c.NewBytes,
		Files:       c.Files,
		Manifest:    c.Manifest,
		key:         snapshotKey(h.cfg.ns(), checkpoint),
		ns:          h.cfg.ns(),
		verified:    true,
	}
	for _, p := range parts {
		s.Logs[p.LogID] = p.UpToSQN
	}
	data, err := envelope.Seal(snapshotKind, s)
	if err != nil {
		return Snapshot{}, err
	}
	if err := n.store.PutIfAbsent(ctx, s.key, bytes.NewReader(data), int64(len(data))); err != nil {
		// Unknown outcome (an ack lost, or a backend's retry that found its
		// own first attempt): the stored record decides.
		got, rerr := readAll(ctx, n.store, s.key)
		switch {
		case rerr == nil && bytes.Equal(got, data):
			// Ours landed.
		case rerr == nil || errors.Is(err, upload.ErrAlreadyExists):
			return Snapshot{}, fmt.Errorf("stream %s: checkpoint %d: %w", stream, checkpoint, ErrSnapshotConflict)
		default:
			return Snapshot{}, fmt.Errorf("stream %s: publish snapshot %s: %w", stream, s.key, errors.Join(err, rerr))
		}
	}
	n.cacheSnapshot(s)
	return s, nil
}

// Snapshots returns the stream's usable snapshots, oldest first: those of
// the stream's current incarnation whose files this node found stored
// (checked once per record, then cached). A failed check is an error, not
// a verdict: nothing is decided on an unknown outcome.
func (n *Node) Snapshots(ctx context.Context, stream string) ([]Snapshot, error) {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return nil, err
	}
	usable, _, err := n.listSnapshots(ctx, h)
	return usable, err
}

// listSnapshots lists the stream's snapshot records, oldest first, split
// into usable ones and those never to be used: of another incarnation (or
// none), or with files definitely missing. Before it calls any record
// foreign it confirms, from the stream's definition, that h is the current
// incarnation (ErrStreamNotFound otherwise): a node with a stale view must
// never set aside (and so collect) the new stream's records.
func (n *Node) listSnapshots(ctx context.Context, h *streamHandle) (usable, unusable []Snapshot, err error) {
	stream, inc := h.cfg.Name, h.cfg.Incarnation
	prefix := snapshotPrefix(h.cfg.ns())
	var objs []upload.ObjectInfo
	for o, err := range upload.Walk(ctx, n.store, prefix, "") {
		if err != nil {
			return nil, nil, fmt.Errorf("stream %s: list snapshots: %w", stream, err)
		}
		objs = append(objs, o)
	}
	foreign := false
	usable = make([]Snapshot, 0, len(objs))
	for _, o := range objs {
		id, err := strconv.ParseUint(strings.TrimPrefix(o.Key, prefix), 10, 64)
		if err != nil {
			continue // not a record
		}
		s, err := n.snapshot(ctx, h.cfg.ns(), id, o)
		if errors.Is(err, upload.ErrNotFound) {
			continue // collected meanwhile
		}
		if err != nil {
			return nil, nil, err
		}
		if !s.ownedBy(inc) {
			foreign = true
			unusable = append(unusable, s)
			continue
		}
		if !s.verified && !s.missing {
			switch err := verifySnapshotFiles(ctx, n.store, s.Files); {
			case errors.Is(err, ErrSnapshotFilesMissing):
				s.missing = true
			case err != nil:
				return nil, nil, fmt.Errorf("stream %s: snapshot %s: %w", stream, s.key, err)
			default:
				s.verified = true
			}
			n.cacheSnapshot(s)
		}
		if s.missing {
			unusable = append(unusable, s)
			continue
		}
		usable = append(usable, s)
	}
	if foreign {
		if err := h.journal.checkCatalog(ctx); err != nil {
			return nil, nil, err
		}
	}
	return usable, unusable, nil
}

// ownedBy: the record belongs to incarnation inc of its stream.
func (s Snapshot) ownedBy(inc string) bool { return s.Incarnation != "" && s.Incarnation == inc }

// snapshot reads the snapshot record listed as o, cached: records are
// immutable, but a key can hold another record after the stream was
// deleted and created again, so the cached one is used only while the
// listing shows the object it was read from (size and ModTime; a store
// with coarse ModTimes could only be fooled by a same-sized record
// recreated within its resolution).
func (n *Node) snapshot(ctx context.Context, ns streamNS, checkpoint uint64, o upload.ObjectInfo) (Snapshot, error) {
	stream, key := ns.name, snapshotKey(ns, checkpoint)
	n.mu.Lock()
	s, ok := n.snapshots[key]
	n.mu.Unlock()
	if ok && s.size == o.Size && !s.mtime.IsZero() && s.mtime.Equal(o.ModTime) {
		return s, nil
	}
	data, err := readAll(ctx, n.store, key)
	if err != nil {
		return Snapshot{}, fmt.Errorf("stream %s: read snapshot: %w", stream, err)
	}
	prev := s
	if s, err = decodeSnapshot(ns, checkpoint, data); err != nil {
		return Snapshot{}, err
	}
	if ok && prev.Incarnation == s.Incarnation && prev.CreatedAt.Equal(s.CreatedAt) {
		s.verified, s.missing = prev.verified, prev.missing // the same record
	}
	if int64(len(data)) == o.Size {
		// Else it changed since the listing: cache it without a stamp.
		s.size, s.mtime = o.Size, o.ModTime
	}
	n.cacheSnapshot(s)
	return s, nil
}

// decodeSnapshot decodes the record of the snapshot of checkpoint
// `checkpoint` of a stream, checking that it names them and that its files
// are the stream's. A record without an incarnation decodes (so that it
// can be collected) but is never used.
func decodeSnapshot(ns streamNS, checkpoint uint64, data []byte) (Snapshot, error) {
	stream, key := ns.name, snapshotKey(ns, checkpoint)
	var s Snapshot
	if err := envelope.Open(key, data, snapshotKind, &s); err != nil {
		return Snapshot{}, err
	}
	if s.Stream != stream || s.Checkpoint != checkpoint {
		return Snapshot{}, fmt.Errorf("snapshot %s names stream %q checkpoint %d: %w", key, s.Stream, s.Checkpoint, envelope.ErrCorrupt)
	}
	if err := validateSnapshotFiles(ns, s.Files); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %v: %w", key, err, envelope.ErrCorrupt)
	}
	s.key, s.ns = key, ns
	return s, nil
}

func (n *Node) cacheSnapshot(s Snapshot) {
	n.mu.Lock()
	n.snapshots[s.key] = s
	n.mu.Unlock()
}

// deleteSnapshot removes a snapshot record nothing uses any more. Its files
// become garbage for the materializer's collection. It deletes only s: if
// the key holds another record now (the stream was deleted and created
// again, and s came from this node's cache), it is left alone.
func (n *Node) deleteSnapshot(ctx context.Context, s Snapshot) error {
	data, err := readAll(ctx, n.store, s.key)
	if err == nil {
		var cur Snapshot
		cur, err = decodeSnapshot(s.ns, s.Checkpoint, data)
		if err == nil && (cur.Incarnation != s.Incarnation || !cur.CreatedAt.Equal(s.CreatedAt)) {
			n.forgetSnapshot(s.key)
			return nil
		}
	}
	if errors.Is(err, upload.ErrNotFound) {
		n.forgetSnapshot(s.key)
		return nil
	}
	if err != nil {
		return fmt.Errorf("stream %s: delete snapshot %s: %w", s.Stream, s.key, err)
	}
	if err := n.store.Delete(ctx, s.key); err != nil {
		return fmt.Errorf("stream %s: delete snapshot %s: %w", s.Stream, s.key, err)
	}
	n.forgetSnapshot(s.key)
	return nil
}

func (n *Node) forgetSnapshot(key string) {
	n.mu.Lock()
	delete(n.snapshots, key)
	n.mu.Unlock()
}

// deleteUnusableSnapshots deletes records listSnapshots set aside: of
// another incarnation (a late publication into a stream created again), of
// none, or naming files that are gone. Nothing can restore from them.
func (n *Node) deleteUnusableSnapshots(ctx context.Context, unusable []Snapshot, st *GCStats) error {
	var errs []error
	for _, s := range unusable {
		if err := n.deleteSnapshot(ctx, s); err != nil {
			errs = append(errs, fmt.Errorf("gc: %w", err))
			continue
		}
		st.SnapshotsDeleted++
	}
	return errors.Join(errs...)
}

// newestSnapshotWithLog returns the newest snapshot whose checkpoint has a
// part of logID, and the SQN it covers.
func newestSnapshotWithLog(snaps []Snapshot, logID string) (Snapshot, uint64, bool) {
	for _, s := range slices.Backward(snaps) {
		if sqn, ok := s.Logs[logID]; ok {
			return s, sqn, true
		}
	}
	return Snapshot{}, 0, false
}

// AdoptSnapshots truncates each live writer of this node below the newest
// published snapshot that covers its log: the snapshot's checkpoint has a
// part of the log, so every later checkpoint of the writer can restore
// from that snapshot plus the log after it, and the prefix's segments
// become garbage once no retained checkpoint lists them. It returns how
// many writers it truncated. The node runs it before each background
// garbage collection; snapshots published by another process (a remote
// materializer) are adopted the same way.
//
// A registered CDC subscription that is not expired holds truncation back
// (subscription.go): a log with a part in the subscription's hold
// checkpoint is truncated at most up to that part's SQN + 1, a log without
// one (opened after it) and every log of a subscription at 0 not at all.
//
// Invariant (brief invariants 1 and 4): a writer is truncated only below a
// record of its own stream incarnation whose files were all found stored
// (Stat, with their sizes) before the truncation. A record with a file
// definitely missing is refused (an error wrapping
// ErrSnapshotFilesMissing; garbage collection deletes the record), and a
// check that failed otherwise truncates nothing.
func (n *Node) AdoptSnapshots(ctx context.Context) (int, error) {
	n.mu.Lock()
	byStream := map[*streamHandle][]*Writer{}
	for _, w := range n.writers {
		byStream[w.stream] = append(byStream[w.stream], w)
	}
	n.mu.Unlock()
	truncated := 0
	var errs []error
	for h, ws := range byStream {
		// The writers' own incarnation: a record of any other is not theirs.
		snaps, unusable, err := n.listSnapshots(ctx, h)
		if errors.Is(err, ErrStreamNotFound) {
			continue // deleted: its writers are dead
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		// Registered CDC subscriptions hold the logs back to what their
		// hold point needs (subscription.go); if they cannot be read,
		// truncate nothing.
		js := h.journal.snapshot()
		held, err := n.subscriptionHolds(ctx, h, &js, false)
		if err != nil {
			errs = append(errs, fmt.Errorf("adopt snapshot: %w", err))
			continue
		}
		for _, w := range ws {
			_, sqn, ok := newestSnapshotWithLog(snaps, w.logID)
			w.mu.Lock()
			current := w.truncatedBefore
			w.mu.Unlock()
			for _, s := range unusable {
				if bad, has := s.Logs[w.logID]; has && s.missing && bad+1 > current && (!ok || bad > sqn) {
					errs = append(errs, fmt.Errorf("adopt snapshot %s for writer %s: refused: %w", s.key, w.logID, ErrSnapshotFilesMissing))
				}
			}
			if !ok || sqn == 0 {
				continue
			}
			before := sqn + 1
			limit, err := n.truncationLimit(ctx, h.cfg.Name, &js, held, w.epoch)
			if err != nil {
				errs = append(errs, fmt.Errorf("adopt snapshot: %w", err))
				continue
			}
			before = min(before, limit)
			if before <= current {
				continue
			}
			err = w.Truncate(ctx, before)
			if errors.Is(err, ErrFenced) || errors.Is(err, ErrClosed) {
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("adopt snapshot: %w", err))
				continue
			}
			truncated++
		}
	}
	return truncated, errors.Join(errs...)
}
