package crash

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestTruncationSurvivesRestart: a writer's truncation point survives a
// restart of its node (it is kept in the local log's metadata), so after
// the restart a replay of the released prefix still fails with
// ErrLogTruncated instead of silently skipping it, and the next checkpoint
// part still says where the log starts.
func TestTruncationSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dataDir := t.TempDir()
	opts := changelog.Options{Store: store, DataDir: dataDir, GCInterval: -1, GCGrace: time.Nanosecond, RetainCheckpoints: 1}
	opts.Scheduler.BatchDelay = time.Millisecond
	full := keygroup.Full(keyGroups)

	n, err := changelog.Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.CreateStream(ctx, "trunc", keyGroups); err != nil {
		t.Fatal(err)
	}
	w, err := n.OpenWriter(ctx, changelog.WriterConfig{Stream: "trunc", KeyGroups: full})
	if err != nil {
		t.Fatal(err)
	}
	epoch := w.Epoch()
	mustAppend := func(w *changelog.Writer, first uint64, size int) {
		t.Helper()
		if _, _, err := w.Append(ctx, batchFor(first, size, 1), changelog.Local); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Persist(ctx, 0); err != nil {
			t.Fatal(err)
		}
	}
	mustAppend(w, 1, 10)
	if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	mustAppend(w, 11, 10)
	if err := w.Truncate(ctx, 11); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Checkpoint(ctx, 2, nil); err != nil {
		t.Fatal(err)
	}
	// Checkpoint 1 is no longer retained and SQNs 1..10 are released: GC
	// deletes the segment holding them.
	if st, err := n.CollectGarbage(ctx); err != nil || st.Deleted == 0 {
		t.Fatalf("gc: %+v, %v (want the released prefix deleted)", st, err)
	}
	for _, err := range w.Replay(ctx, 0, 0, full) {
		if !errors.Is(err, changelog.ErrLogTruncated) {
			t.Fatalf("before restart: replay from 0: %v, want ErrLogTruncated", err)
		}
		break
	}
	if err := n.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// Restart on the same data directory and resume the epoch.
	n, err = changelog.Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	w, err = n.OpenWriter(ctx, changelog.WriterConfig{Stream: "trunc", KeyGroups: full, Resume: epoch})
	if err != nil {
		t.Fatal(err)
	}
	var first uint64
	var replayErr error
	for c, err := range w.Replay(ctx, 0, 0, full) {
		if err != nil {
			replayErr = err
			break
		}
		if first == 0 {
			first = c.SQN
		}
	}
	if !errors.Is(replayErr, changelog.ErrLogTruncated) {
		t.Errorf("after restart: replay from 0 = changes from SQN %d with error %v; want ErrLogTruncated (the log is truncated before 11)", first, replayErr)
	}
	if _, err := w.Checkpoint(ctx, 3, nil); err != nil {
		t.Fatal(err)
	}
	parts, err := n.CheckpointParts(ctx, "trunc", 3)
	if err != nil || len(parts) != 1 {
		t.Fatalf("parts of checkpoint 3: %v, %v", parts, err)
	}
	if p := parts[0]; p.TruncatedBefore != 11 {
		t.Errorf("after restart: checkpoint 3's part says the log starts at SQN %d (TruncatedBefore), want 11; its first segment starts at SQN %d",
			p.TruncatedBefore, firstSQN(p))
	}
}

func firstSQN(p changelog.Part) uint64 {
	if len(p.Segments) == 0 || len(p.Segments[0].Blocks) == 0 {
		return 0
	}
	return p.Segments[0].Blocks[0].FirstSQN
}
