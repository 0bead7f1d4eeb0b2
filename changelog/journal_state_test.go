package changelog

import (
	"errors"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

func openEntry(seq uint64, lo, hi uint16, from uint64) JournalEntry {
	return JournalEntry{Seq: seq, Kind: EntryEpochOpen, Open: &EpochOpen{KeyGroups: keygroup.Range{Lo: lo, Hi: hi}, FromCheckpoint: from}}
}

func completeEntry(seq, id uint64, parts ...PartRef) JournalEntry {
	return JournalEntry{Seq: seq, Kind: EntryCheckpointComplete, Checkpoint: &CheckpointComplete{ID: id, Parts: parts}}
}

func part(epoch uint64, lo, hi uint16, id uint64) PartRef {
	return PartRef{Epoch: epoch, KeyGroups: keygroup.Range{Lo: lo, Hi: hi}, Checkpoint: id}
}

// TestJournalStateFold walks the state machine through opens, fencing,
// rescaling, closes and checkpoint completions, checking after each entry
// which epochs are live and which entries are refused.
func TestJournalStateFold(t *testing.T) {
	type step struct {
		name    string
		entry   JournalEntry
		wantErr error // nil: must apply
		live    []uint64
		fenced  map[uint64]uint64
	}
	steps := []step{
		{name: "first writer owns everything", entry: openEntry(1, 0, 127, 0), live: []uint64{1}},
		{name: "entry out of order", entry: openEntry(3, 0, 127, 0), wantErr: errJournalInvalid, live: []uint64{1}},
		{name: "range outside the stream", entry: openEntry(2, 0, 128, 0), wantErr: errJournalInvalid, live: []uint64{1}},
		{name: "restore from a checkpoint that is not complete", entry: openEntry(2, 0, 127, 9), wantErr: errJournalInvalid, live: []uint64{1}},
		{name: "checkpoint with a part of the live epoch", entry: completeEntry(2, 5, part(1, 0, 127, 5)), live: []uint64{1}},
		{name: "older checkpoint id refused", entry: completeEntry(3, 5, part(1, 0, 127, 5)), wantErr: ErrCheckpointTooOld, live: []uint64{1}},
		{name: "rescale: lower half fences epoch 1", entry: openEntry(3, 0, 63, 5), live: []uint64{3}, fenced: map[uint64]uint64{1: 3}},
		{name: "orphaned upper half blocks checkpoints", entry: completeEntry(4, 6, part(3, 0, 63, 6)), wantErr: ErrOrphanedKeyGroups, live: []uint64{3}},
		{name: "upper half reopened", entry: openEntry(4, 64, 127, 5), live: []uint64{3, 4}},
		{name: "a fenced epoch's part is refused", entry: completeEntry(5, 6, part(1, 0, 127, 6)), wantErr: errJournalInvalid, live: []uint64{3, 4}},
		{name: "a missing part is refused", entry: completeEntry(5, 6, part(3, 0, 63, 6)), wantErr: errJournalInvalid, live: []uint64{3, 4}},
		{name: "both halves complete checkpoint 6", entry: completeEntry(5, 6, part(3, 0, 63, 6), part(4, 64, 127, 6)), live: []uint64{3, 4}},
		{name: "close of a fenced epoch refused", entry: JournalEntry{Seq: 6, Kind: EntryEpochClose, Close: &EpochClose{Epoch: 1, FinalPart: part(1, 0, 127, 6)}}, wantErr: errJournalInvalid, live: []uint64{3, 4}},
		{name: "upper half closes", entry: JournalEntry{Seq: 6, Kind: EntryEpochClose, Close: &EpochClose{Epoch: 4, FinalPart: part(4, 64, 127, 6)}}, live: []uint64{3, 4}},
		{name: "unknown kind", entry: JournalEntry{Seq: 7, Kind: "bogus"}, wantErr: errJournalInvalid, live: []uint64{3, 4}},
		{name: "one writer takes everything back", entry: openEntry(7, 0, 127, 6), live: []uint64{7}, fenced: map[uint64]uint64{1: 3, 3: 7, 4: 7}},
	}
	s := newJournalState(128)
	for _, st := range steps {
		before := s.clone()
		err := s.apply(st.entry)
		switch {
		case st.wantErr == nil && err != nil:
			t.Fatalf("%s: %v", st.name, err)
		case st.wantErr != nil && !errors.Is(err, st.wantErr):
			t.Fatalf("%s: got %v, want %v", st.name, err, st.wantErr)
		case st.wantErr != nil && s.seq != before.seq:
			t.Fatalf("%s: a refused entry moved the state", st.name)
		}
		var live []uint64
		for _, ep := range s.live {
			live = append(live, ep.Epoch)
		}
		if !equalU64(live, st.live) {
			t.Fatalf("%s: live epochs %v, want %v", st.name, live, st.live)
		}
		for ep, by := range st.fenced {
			if got, ok := s.fenced(ep); !ok || got != by {
				t.Fatalf("%s: epoch %d fenced by %d (%v), want %d", st.name, ep, got, ok, by)
			}
		}
	}
	if got := s.lastCheckpoint(); got != 6 {
		t.Fatalf("last checkpoint %d, want 6", got)
	}
}

func equalU64(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
