package changelog

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"iter"
	"slices"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// ErrLogTruncated: a replay asked for changes below the log's truncation
// point; they were released and may already be deleted.
var ErrLogTruncated = errors.New("log prefix truncated")

// Replay yields the writer's changes with SQN in (after, upTo] (upTo 0:
// everything appended so far) whose key group is in r, in SQN order. It
// reads only the blocks it needs from uploaded segments, then the
// un-uploaded tail in memory. Yielded Key and Value are only valid until
// the next iteration (Clone to keep them).
func (w *Writer) Replay(ctx context.Context, after, upTo uint64, r keygroup.Range) iter.Seq2[segments.Change, error] {
	w.mu.Lock()
	segs := slices.Clone(w.segs)
	truncated := w.truncatedBefore
	if upTo == 0 {
		upTo = w.next - 1
	}
	// Copy the entries in (after, upTo] only (the tail is in SQN order): a
	// short replay of a long tail, as the read store's catch-up does, then
	// costs what it reads. Copied because Uploaded clears uploaded entries
	// in place (so their arenas can be freed) while this iterator may
	// still be reading them.
	bySQN := func(c segments.Change, sqn uint64) int { return cmp.Compare(c.SQN, sqn) }
	lo, _ := slices.BinarySearchFunc(w.tail, after+1, bySQN)
	hi, _ := slices.BinarySearchFunc(w.tail, upTo+1, bySQN)
	tail := slices.Clone(w.tail[lo:max(lo, hi)])
	w.mu.Unlock()
	return func(yield func(segments.Change, error) bool) {
		if after+1 < truncated {
			yield(segments.Change{}, fmt.Errorf("writer %s: replay after %d, log truncated before %d: %w", w.logID, after, truncated, ErrLogTruncated))
			return
		}
		last := after
		for c, err := range replaySegments(ctx, w.node.store, w.logID, segs, after, upTo, r) {
			if err != nil {
				yield(c, err)
				return
			}
			last = c.SQN
			if !yield(c, nil) {
				return
			}
		}
		for _, c := range tail {
			if c.SQN <= last || !r.Contains(c.KeyGroup) {
				continue
			}
			if c.SQN > upTo {
				return
			}
			if !yield(c, nil) {
				return
			}
		}
	}
}

// replaySegments yields logID's changes in (after, upTo] with key groups in
// r from the listed segments, in SQN order, each SQN once (a segment may
// repeat changes another already holds, after a crash re-upload).
func replaySegments(ctx context.Context, store upload.BlobStore, logID string, segs []SegmentBlocks, after, upTo uint64, r keygroup.Range) iter.Seq2[segments.Change, error] {
	return func(yield func(segments.Change, error) bool) {
		last := after
		for _, s := range segs {
			if s.lastSQN() <= last || (upTo != 0 && s.firstSQN() > upTo) {
				continue
			}
			if err := ctx.Err(); err != nil {
				yield(segments.Change{}, err)
				return
			}
			rd, err := segments.Open(upload.ReaderAt(ctx, store, s.Key, s.Size), s.Size, s.Key)
			if err != nil {
				yield(segments.Change{}, fmt.Errorf("replay %s: %w", logID, err))
				return
			}
			q := segments.Query{LogID: logID, AfterSQN: last, UpToSQN: upTo, KeyGroupLo: r.Lo, KeyGroupHi: r.Hi, KeyGroupsSet: true}
			for c, err := range rd.Changes(q) {
				if err != nil {
					yield(c, fmt.Errorf("replay %s: %w", logID, err))
					return
				}
				if c.SQN <= last {
					continue
				}
				last = c.SQN
				if !yield(c, nil) {
					return
				}
			}
			// Changes filtered out by key group still advance the position.
			if l := s.lastSQN(); l > last && (upTo == 0 || l <= upTo) {
				last = l
			} else if upTo != 0 && l > upTo {
				last = upTo
			}
		}
	}
}
