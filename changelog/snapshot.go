package changelog

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
)

const snapshotKind = "snapshot"

// ErrSnapshotConflict: a snapshot of that checkpoint was already published
// (by another materializer); the caller's files are garbage GC removes.
var ErrSnapshotConflict = errors.New("snapshot already published")

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
// Manifest is the materializer's description of the files (opaque here: the
// changelog never reads it); the files live under
// streams/<stream>/sst/, so deleting a stream deletes them.
type Snapshot struct {
	Stream     string            `json:"stream"`
	Checkpoint uint64            `json:"checkpoint"`
	Logs       map[string]uint64 `json:"logs"`
	CreatedAt  time.Time         `json:"created_at"`
	// Bytes is the size of all files the snapshot references; NewBytes of
	// those uploaded for it (the rest are shared with older snapshots).
	Bytes    int64           `json:"bytes"`
	NewBytes int64           `json:"new_bytes"`
	Manifest json.RawMessage `json:"manifest"`

	key string
}

// Key is the snapshot record's blob key.
func (s Snapshot) Key() string { return s.key }

func snapshotPrefix(stream string) string { return streamPrefix(stream) + "snapshots/" }

func snapshotKey(stream string, checkpoint uint64) string {
	return fmt.Sprintf("%s%020d", snapshotPrefix(stream), checkpoint)
}

// SnapshotFilePrefix is where a stream's snapshot files live: under the
// stream, so DeleteStream removes them with it.
func SnapshotFilePrefix(stream string) string { return streamPrefix(stream) + "sst/" }

// PublishSnapshot records that the state of complete checkpoint `checkpoint`
// of the stream is materialized in the files manifest describes (all of
// them must already be on the blob store). It fills in Logs from the
// checkpoint's parts. A second snapshot of the same checkpoint is refused
// with ErrSnapshotConflict.
func (n *Node) PublishSnapshot(ctx context.Context, stream string, checkpoint uint64, manifest json.RawMessage, bytes_, newBytes int64) (Snapshot, error) {
	parts, err := n.CheckpointParts(ctx, stream, checkpoint)
	if err != nil {
		return Snapshot{}, fmt.Errorf("publish snapshot: %w", err)
	}
	s := Snapshot{
		Stream:     stream,
		Checkpoint: checkpoint,
		Logs:       make(map[string]uint64, len(parts)),
		CreatedAt:  n.clock.Now().UTC(),
		Bytes:      bytes_,
		NewBytes:   newBytes,
		Manifest:   manifest,
		key:        snapshotKey(stream, checkpoint),
	}
	for _, p := range parts {
		s.Logs[p.LogID] = p.UpToSQN
	}
	data, err := envelope.Seal(snapshotKind, s)
	if err != nil {
		return Snapshot{}, err
	}
	err = n.store.PutIfAbsent(ctx, s.key, bytes.NewReader(data), int64(len(data)))
	if errors.Is(err, upload.ErrAlreadyExists) {
		return Snapshot{}, fmt.Errorf("stream %s: checkpoint %d: %w", stream, checkpoint, ErrSnapshotConflict)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("stream %s: publish snapshot %s: %w", stream, s.key, err)
	}
	n.cacheSnapshot(s)
	return s, nil
}

// Snapshots returns the stream's published snapshots, oldest first.
func (n *Node) Snapshots(ctx context.Context, stream string) ([]Snapshot, error) {
	ids, err := listNumbered(ctx, n.store, snapshotPrefix(stream))
	if err != nil {
		return nil, fmt.Errorf("stream %s: list snapshots: %w", stream, err)
	}
	out := make([]Snapshot, 0, len(ids))
	for _, id := range ids {
		s, err := n.snapshot(ctx, stream, id)
		if errors.Is(err, upload.ErrNotFound) {
			continue // collected meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// snapshot reads one snapshot record, cached: records are immutable.
func (n *Node) snapshot(ctx context.Context, stream string, checkpoint uint64) (Snapshot, error) {
	key := snapshotKey(stream, checkpoint)
	n.mu.Lock()
	s, ok := n.snapshots[key]
	n.mu.Unlock()
	if ok {
		return s, nil
	}
	data, err := readAll(ctx, n.store, key)
	if err != nil {
		return Snapshot{}, fmt.Errorf("stream %s: read snapshot: %w", stream, err)
	}
	if s, err = decodeSnapshot(stream, checkpoint, data); err != nil {
		return Snapshot{}, err
	}
	n.cacheSnapshot(s)
	return s, nil
}

// decodeSnapshot decodes the record of the snapshot of checkpoint
// `checkpoint` of a stream, checking that it names them.
func decodeSnapshot(stream string, checkpoint uint64, data []byte) (Snapshot, error) {
	key := snapshotKey(stream, checkpoint)
	var s Snapshot
	if err := envelope.Open(key, data, snapshotKind, &s); err != nil {
		return Snapshot{}, err
	}
	if s.Stream != stream || s.Checkpoint != checkpoint {
		return Snapshot{}, fmt.Errorf("snapshot %s names stream %q checkpoint %d: %w", key, s.Stream, s.Checkpoint, envelope.ErrCorrupt)
	}
	s.key = key
	return s, nil
}

func (n *Node) cacheSnapshot(s Snapshot) {
	n.mu.Lock()
	n.snapshots[s.key] = s
	n.mu.Unlock()
}

// deleteSnapshot removes a snapshot record nothing uses any more. Its files
// become garbage for the materializer's collection.
func (n *Node) deleteSnapshot(ctx context.Context, s Snapshot) error {
	if err := n.store.Delete(ctx, s.key); err != nil {
		return fmt.Errorf("stream %s: delete snapshot %s: %w", s.Stream, s.key, err)
	}
	n.mu.Lock()
	delete(n.snapshots, s.key)
	n.mu.Unlock()
	return nil
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
func (n *Node) AdoptSnapshots(ctx context.Context) (int, error) {
	n.mu.Lock()
	byStream := map[string][]*Writer{}
	for _, w := range n.writers {
		byStream[w.cfg.Stream] = append(byStream[w.cfg.Stream], w)
	}
	n.mu.Unlock()
	truncated := 0
	var errs []error
	for stream, ws := range byStream {
		snaps, err := n.Snapshots(ctx, stream)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, w := range ws {
			_, sqn, ok := newestSnapshotWithLog(snaps, w.logID)
			if !ok || sqn == 0 {
				continue
			}
			w.mu.Lock()
			current := w.truncatedBefore
			w.mu.Unlock()
			if sqn+1 <= current {
				continue
			}
			err := w.Truncate(ctx, sqn+1)
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
