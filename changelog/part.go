package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

const partKind = "checkpoint-part"

// Part is one writer's part of a checkpoint: everything needed to rebuild
// the state of its key groups at that checkpoint from the blob store alone,
// namely the checkpoint its epoch started from plus its own log up to
// UpToSQN. It is stored create-only at
// streams/<stream>/checkpoints/<id>/<epoch> (or .../final/<epoch> for the
// final part written when an epoch closes).
type Part struct {
	Stream     string         `json:"stream"`
	Epoch      uint64         `json:"epoch"`
	KeyGroups  keygroup.Range `json:"key_groups"`
	Checkpoint uint64         `json:"checkpoint"` // 0 for a closed epoch's final part
	LogID      string         `json:"log_id"`
	// FromCheckpoint is the complete checkpoint the epoch started from
	// (0: empty state).
	FromCheckpoint uint64 `json:"from_checkpoint"`
	// TruncatedBefore: the log's changes below this SQN were released by
	// Truncate and are not listed (a snapshot must cover them; 0 or 1: none).
	TruncatedBefore uint64 `json:"truncated_before"`
	// UpToSQN is the last SQN of the log the part covers.
	UpToSQN uint64 `json:"up_to_sqn"`
	// Segments lists, in SQN order, the segments holding the log's changes
	// in [TruncatedBefore, UpToSQN], with this log's blocks in each.
	Segments []SegmentBlocks `json:"segments"`
	// Metadata is the client's opaque metadata (e.g. source offsets),
	// returned on restore.
	Metadata []byte `json:"metadata,omitempty"`
}

// SegmentBlocks names a segment object and one log's blocks in it.
type SegmentBlocks struct {
	Key    string      `json:"key"`
	Size   int64       `json:"size"`
	Blocks []BlockSpan `json:"blocks"`
}

// BlockSpan is one block of a log inside a segment.
type BlockSpan struct {
	Offset   uint64 `json:"offset"`
	Length   uint64 `json:"length"`
	FirstSQN uint64 `json:"first_sqn"`
	LastSQN  uint64 `json:"last_sqn"`
}

func (s SegmentBlocks) lastSQN() uint64 {
	if len(s.Blocks) == 0 {
		return 0
	}
	return s.Blocks[len(s.Blocks)-1].LastSQN
}

func (s SegmentBlocks) firstSQN() uint64 {
	if len(s.Blocks) == 0 {
		return 0
	}
	return s.Blocks[0].FirstSQN
}

func spansOf(blocks []segments.BlockInfo) []BlockSpan {
	out := make([]BlockSpan, len(blocks))
	for i, b := range blocks {
		out[i] = BlockSpan{Offset: b.Offset, Length: b.Length, FirstSQN: b.FirstSQN, LastSQN: b.LastSQN}
	}
	return out
}

func checkpointPrefix(ns streamNS, id uint64) string {
	return fmt.Sprintf("%scheckpoints/%020d/", streamPrefix(ns), id)
}

func partKey(ns streamNS, id, epoch uint64) string {
	if id == 0 {
		return fmt.Sprintf("%sfinal/%020d", streamPrefix(ns), epoch)
	}
	return fmt.Sprintf("%s%020d", checkpointPrefix(ns, id), epoch)
}

// writePart stores p create-only. Writing the same part twice (a retried
// checkpoint) is fine as long as the stored one covers the same SQN.
func writePart(ctx context.Context, store upload.BlobStore, ns streamNS, p Part) (PartRef, error) {
	key := partKey(ns, p.Checkpoint, p.Epoch)
	ref := PartRef{Epoch: p.Epoch, KeyGroups: p.KeyGroups, Checkpoint: p.Checkpoint, Key: key}
	data, err := envelope.Seal(partKind, p)
	if err != nil {
		return PartRef{}, err
	}
	err = store.PutIfAbsent(ctx, key, bytes.NewReader(data), int64(len(data)))
	if errors.Is(err, upload.ErrAlreadyExists) {
		old, rerr := readPart(ctx, store, key)
		if rerr != nil {
			return PartRef{}, rerr
		}
		if old.UpToSQN != p.UpToSQN || old.LogID != p.LogID {
			return PartRef{}, fmt.Errorf("checkpoint %d part of epoch %d already recorded up to SQN %d, now %d; use a new checkpoint id: %w", p.Checkpoint, p.Epoch, old.UpToSQN, p.UpToSQN, ErrCheckpointConflict)
		}
		return ref, nil
	}
	if err != nil {
		return PartRef{}, fmt.Errorf("write checkpoint part %s: %w", key, err)
	}
	return ref, nil
}

func readPart(ctx context.Context, store upload.BlobStore, key string) (Part, error) {
	data, err := readAll(ctx, store, key)
	if err != nil {
		return Part{}, fmt.Errorf("read checkpoint part: %w", err)
	}
	var p Part
	if err := envelope.Open(key, data, partKind, &p); err != nil {
		return Part{}, err
	}
	return p, nil
}
