package changelog

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload/file"
)

// BenchmarkJournalOpen measures a node opening a stream whose journal has
// 10,000 entries (16 epochs, then checkpoint completions) on the file blob
// store: uncompacted (every entry read, one GET each) and compacted every
// 256 entries (the newest state plus the entries after it). Reported per
// open: blob GETs and time.
//
//	go test -run '^$' -bench BenchmarkJournalOpen -benchtime 5x ./changelog
func BenchmarkJournalOpen(b *testing.B) {
	const total = 10_000
	for _, compacted := range []bool{false, true} {
		b.Run(fmt.Sprintf("entries=%d/compacted=%v", total, compacted), func(b *testing.B) {
			ctx := context.Background()
			store, err := file.Open(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer store.Close()
			cfg := StreamConfig{Name: "s", KeyGroups: 128, Incarnation: "test"}
			testJournal(store, cfg, "setup") // creates the stream
			st := newJournalState(cfg.KeyGroups)
			st.incarnation = cfg.Incarnation
			for seq := uint64(1); seq <= total; seq++ {
				e := JournalEntry{Seq: seq, Nonce: fmt.Sprint(seq), TimeMs: time.Now().UnixMilli(), Incarnation: cfg.Incarnation}
				ids := forgettable(&st, defaultJournalKeepCheckpoints, nil, 1<<62)
				switch {
				case seq <= 16:
					lo := uint16((seq - 1) * 8)
					e.Kind, e.Open = EntryEpochOpen, &EpochOpen{KeyGroups: keygroup.Range{Lo: lo, Hi: lo + 7}, Node: "n"}
				case compacted && seq%defaultJournalCompactEvery == 0 && len(ids) > 0:
					// What garbage collection appends: keep the records
					// still needed only.
					e.Kind, e.Forget = EntryCheckpointsForget, &CheckpointsForget{IDs: ids, FencedBelow: seq}
				default:
					id := st.lastCheckpoint() + 1
					var parts []PartRef
					for _, ep := range st.live {
						parts = append(parts, PartRef{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Checkpoint: id, Key: fmt.Sprintf("streams/s/checkpoints/%020d/%020d", id, ep.Epoch)})
					}
					e.Kind, e.Checkpoint = EntryCheckpointComplete, &CheckpointComplete{ID: id, Parts: parts}
				}
				if err := st.apply(e); err != nil {
					b.Fatal(err)
				}
				data, err := envelope.Seal(journalEntryKind, e)
				if err != nil {
					b.Fatal(err)
				}
				if err := store.PutIfAbsent(ctx, journalKey("s", seq), bytes.NewReader(data), int64(len(data))); err != nil {
					b.Fatal(err)
				}
				if compacted && seq%defaultJournalCompactEvery == 0 {
					j := testJournal(store, cfg, "compactor")
					if err := j.writeState(ctx, &st); err != nil {
						b.Fatal(err)
					}
				}
			}
			var gets int64
			b.ResetTimer()
			for range b.N {
				j := testJournal(store, cfg, "reader")
				if err := j.refresh(ctx); err != nil {
					b.Fatal(err)
				}
				if s := j.snapshot(); s.seq != total {
					b.Fatalf("opened at %d", s.seq)
				}
				gets += j.stats.EntriesRead.Load() + j.stats.StatesRead.Load()
			}
			b.ReportMetric(float64(gets)/float64(b.N), "GETs/open")
		})
	}
}
