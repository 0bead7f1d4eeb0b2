package changelog

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/dstl-dev/dstl/changelog/locallog"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// recoveredLog is a log this node wrote before a restart. Its un-uploaded
// changes (from the local log) are uploaded again at once; a client can
// reattach to it with WriterConfig.Resume while its epoch is live.
type recoveredLog struct {
	meta   walMeta
	writer *Writer // registered with the scheduler, not live until resumed
}

// incarnationSeqs is the gap of segment sequence numbers each start of a
// node leaves after the newest segment it lists: more than any incarnation
// ever uploads, so every segment of an earlier incarnation — even a PUT
// still in flight when it was killed, landing after the restart listed the
// segments — has a lower sequence than every segment of a later one.
const incarnationSeqs = 1 << 32

// recoveryMark records one restart that recovered a log (issue 9 S4). The
// restart continued the log after UpTo: every SQN ≤ UpTo was uploaded or in
// the local log, but a change above it may have had an SQN only in the
// dead incarnation's memory (buffered), which the log then reused for a
// different change. A segment of an incarnation before the restart
// (sequence below Below) that holds the log's SQNs above UpTo can only be
// such a late PUT: its blocks are never read.
//
// Invariant: SQNs of a log are never reused in what any reader sees. The
// mark is in the local log before the restarted incarnation uploads any
// segment, and every scan applies all of a log's marks.
type recoveryMark struct {
	Below uint64 `json:"below"` // first segment sequence of the restarted incarnation
	UpTo  uint64 `json:"up_to"` // the log's last SQN known at the restart
}

// staleBlock says whether a block of a log, in a segment of sequence seq,
// is a dead incarnation's late upload of SQNs the log reused.
func staleBlock(marks []recoveryMark, seq uint64, b segments.BlockInfo) bool {
	for _, m := range marks {
		if seq < m.Below && b.LastSQN > m.UpTo {
			return true
		}
	}
	return false
}

func segmentPrefix(node string) string { return "segments/" + node + "/" }

// segmentSeq parses the flush sequence number out of a segment key
// (segments/<node>/<20-digit seq>-<suffix>.seg).
func segmentSeq(prefix, key string) (uint64, bool) {
	name := strings.TrimPrefix(key, prefix)
	if len(name) < 20 {
		return 0, false
	}
	seq, err := strconv.ParseUint(name[:20], 10, 64)
	return seq, err == nil
}

// listSegments lists every segment object this node wrote.
func listSegments(ctx context.Context, store upload.BlobStore, node string) ([]upload.ObjectInfo, error) {
	var out []upload.ObjectInfo
	for o, err := range upload.Walk(ctx, store, segmentPrefix(node), "") {
		if err != nil {
			return nil, fmt.Errorf("list segments of node %s: %w", node, err)
		}
		out = append(out, o)
	}
	return out, nil
}

// scanSegments reads the index of every listed segment (one range read
// each) and returns, per log id, its segments in upload order. This rebuilds
// what a node knew about its logs' segments before a restart.
//
// stale drops blocks a dead incarnation uploaded late (see recoveryMark).
func scanSegments(ctx context.Context, store upload.BlobStore, objs []upload.ObjectInfo, want func(logID string) bool, stale func(key string, b segments.BlockInfo) bool) (map[string][]SegmentBlocks, error) {
	out := map[string][]SegmentBlocks{}
	for _, o := range objs {
		rd, err := segments.Open(upload.ReaderAt(ctx, store, o.Key, o.Size), o.Size, o.Key)
		if err != nil {
			return nil, fmt.Errorf("scan segments: %w", err)
		}
		byLog := map[string][]segments.BlockInfo{}
		for _, b := range rd.Blocks() {
			if want(b.LogID) && !stale(o.Key, b) {
				byLog[b.LogID] = append(byLog[b.LogID], b)
			}
		}
		for id, blocks := range byLog {
			out[id] = append(out[id], SegmentBlocks{Key: o.Key, Size: o.Size, Blocks: spansOf(blocks)})
		}
	}
	for _, segs := range out {
		slices.SortStableFunc(segs, func(a, b SegmentBlocks) int {
			switch {
			case a.firstSQN() < b.firstSQN():
				return -1
			case a.firstSQN() > b.firstSQN():
				return 1
			}
			return 0
		})
	}
	return out, nil
}

// recover turns the local log's survivors into recovered writers whose
// un-uploaded changes are handed to the scheduler again. SQNs make it
// idempotent: a change already in an uploaded segment (its upload mark was
// lost in the crash) is dropped from the tail, and replay skips duplicates.
func (n *Node) recover(ctx context.Context, rec *locallog.Recovered, objs []upload.ObjectInfo) error {
	if rec == nil || len(rec.Logs) == 0 {
		return nil
	}
	metas := make(map[string]walMeta, len(rec.Logs))
	for logID, rl := range rec.Logs {
		var meta walMeta
		if err := json.Unmarshal(rl.Meta, &meta); err != nil || logIDOf(meta.Stream, meta.Epoch) != logID {
			return fmt.Errorf("changelog: recover log %s: bad metadata %q: %w", logID, rl.Meta, locallog.ErrCorrupt)
		}
		metas[logID] = meta
	}
	prefix := segmentPrefix(n.id)
	segs, err := scanSegments(ctx, n.store, objs, func(id string) bool { _, ok := rec.Logs[id]; return ok },
		func(key string, b segments.BlockInfo) bool {
			seq, ok := segmentSeq(prefix, key)
			return ok && staleBlock(metas[b.LogID].Recovered, seq, b)
		})
	if err != nil {
		return fmt.Errorf("changelog: recover: %w", err)
	}
	var total int64
	for logID, rl := range rec.Logs {
		meta := metas[logID]
		w := &Writer{
			node: n, cfg: WriterConfig{Stream: meta.Stream, KeyGroups: meta.KeyGroups}, epoch: meta.Epoch,
			logID: logID, from: meta.FromCheckpoint, truncatedBefore: max(meta.TruncatedBefore, 1), done: make(chan struct{}),
		}
		for _, s := range segs[logID] {
			w.uploaded = max(w.uploaded, s.lastSQN())
		}
		w.segs = dropBefore(segs[logID], w.truncatedBefore)
		// A truncation point is only ever recorded for uploaded changes, and
		// its segments may be gone: never reuse an SQN below it.
		w.uploaded = max(w.uploaded, rl.Uploaded, w.truncatedBefore-1)
		for _, c := range rl.Changes {
			if c.SQN <= w.uploaded {
				continue
			}
			if want := w.uploaded + uint64(len(w.tail)) + 1; c.SQN != want {
				return fmt.Errorf("changelog: recover log %s: local log has SQN %d where %d was expected: %w", logID, c.SQN, want, locallog.ErrCorrupt)
			}
			c.LogID = logID
			w.tail = append(w.tail, c)
			total += upload.ChangeBytes(c)
		}
		w.next = w.uploaded + uint64(len(w.tail)) + 1
		w.walDurable = w.next - 1
		// Durable before this incarnation uploads anything: SQNs from
		// w.next on may be reused (see recoveryMark).
		w.recovered = append(slices.Clip(meta.Recovered), recoveryMark{Below: n.firstSeq, UpTo: w.next - 1})
		if err := n.wal.SetMeta(ctx, logID, w.meta(w.truncatedBefore)); err != nil {
			return fmt.Errorf("changelog: recover log %s: record recovery: %w", logID, err)
		}
		n.recovered[logID] = &recoveredLog{meta: meta, writer: w}
		n.sched.Register(w)
		n.log.Info("recovered log", "log", logID, "uploaded", w.uploaded, "pending", len(w.tail))
	}
	// Recovered bytes count against the in-flight bound like appends. One
	// reservation: the scheduler admits any size when nothing is in flight,
	// and it is not running yet, so a second one could wait forever.
	if err := n.sched.Reserve(ctx, total); err != nil {
		return fmt.Errorf("changelog: recover: %w", err)
	}
	return nil
}

// resumeWriter reattaches a recovered log whose epoch is still live.
func (n *Node) resumeWriter(ctx context.Context, h *streamHandle, cfg WriterConfig) (*Writer, error) {
	logID := logIDOf(cfg.Stream, cfg.Resume)
	n.mu.Lock()
	rl, ok := n.recovered[logID]
	if live, isLive := n.writers[logID]; isLive {
		n.mu.Unlock()
		if live.cfg.KeyGroups != cfg.KeyGroups {
			return nil, fmt.Errorf("resume %s: key groups %s, the epoch owns %s: %w", logID, cfg.KeyGroups, live.cfg.KeyGroups, ErrInvalidChange)
		}
		return live, nil
	}
	n.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("resume %s: this node holds no such log: %w", logID, ErrWriterNotFound)
	}
	if rl.meta.KeyGroups != cfg.KeyGroups {
		return nil, fmt.Errorf("resume %s: key groups %s, the epoch owns %s: %w", logID, cfg.KeyGroups, rl.meta.KeyGroups, ErrInvalidChange)
	}
	if err := h.journal.refresh(ctx); err != nil {
		return nil, err
	}
	st := h.journal.snapshot()
	if by, fenced := st.fenced(cfg.Resume); fenced {
		return nil, fmt.Errorf("resume %s: fenced by epoch %d: %w", logID, by, ErrFenced)
	}
	if i := st.liveIndex(cfg.Resume); i < 0 || st.live[i].Closed {
		return nil, fmt.Errorf("resume %s: epoch is not live: %w", logID, ErrFenced)
	}
	n.mu.Lock()
	if n.recovered[logID] != rl {
		n.mu.Unlock()
		return n.resumeWriter(ctx, h, cfg) // raced with another resume
	}
	delete(n.recovered, logID)
	w := rl.writer
	w.stream = h
	w.cfg = cfg
	n.writers[logID] = w
	n.mu.Unlock()
	return w, nil
}
