package changelog

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// The stream journal is a sequence of entries numbered 1, 2, 3, … each
// stored create-only at streams/<name>/journal/<seq>. Because creating entry
// seq+1 succeeds for exactly one writer, the journal is a single total order
// that every node agrees on. Its state (journalState) is a deterministic fold
// over the entries: the same entries always give the same state, which is
// what lets a node with an empty disk rebuild everything from the blob store.
//
// Invariant (fencing, brief invariant 3): an epoch is live from its
// epoch-open entry until an epoch-open of an overlapping range follows it.
// A checkpoint-complete entry is valid only if it names a part from exactly
// the epochs live at its position. A writer appends it only after reading
// the journal up to the position it writes at, so a fenced writer's
// checkpoint can never complete after the epoch that fenced it.

// Entry kinds.
const (
	EntryEpochOpen          = "epoch-open"
	EntryEpochClose         = "epoch-close"
	EntryCheckpointComplete = "checkpoint-complete"
	// EntryCheckpointsForget drops the records of complete checkpoints
	// nothing needs any more (see journal_compact.go), so the state stays
	// bounded however many checkpoints a stream makes.
	EntryCheckpointsForget = "checkpoints-forget"
)

// JournalEntry is one record of a stream's journal.
type JournalEntry struct {
	Seq    uint64 `json:"seq"`
	Kind   string `json:"kind"`
	TimeMs int64  `json:"time_ms"`
	// Nonce identifies the proposer, so that an append whose acknowledgement
	// was lost recognises its own entry when it re-reads the journal.
	Nonce string `json:"nonce"`
	// Incarnation is the stream's (StreamConfig.Incarnation).
	Incarnation string `json:"incarnation,omitempty"`

	Open       *EpochOpen          `json:"open,omitempty"`
	Close      *EpochClose         `json:"close,omitempty"`
	Checkpoint *CheckpointComplete `json:"checkpoint,omitempty"`
	Forget     *CheckpointsForget  `json:"forget,omitempty"`
}

// CheckpointsForget removes the records of complete checkpoints IDs
// (strictly ascending) from the state, and forgets which epoch fenced each
// epoch below FencedBelow (they stay fenced: every epoch below it that is
// not live is). The fold refuses to forget the newest complete checkpoint
// or one a live epoch, or a part of a remaining checkpoint, starts from, so
// what is left is always restorable as far as the journal is concerned.
type CheckpointsForget struct {
	IDs         []uint64 `json:"ids"`
	FencedBelow uint64   `json:"fenced_below"`
}

// EpochOpen records a writer taking ownership of a key-group range. Its
// epoch number is the entry's Seq.
type EpochOpen struct {
	KeyGroups keygroup.Range `json:"key_groups"`
	Node      string         `json:"node"`
	// FromCheckpoint is the complete checkpoint the writer's state starts
	// from, 0 for an empty state.
	FromCheckpoint uint64 `json:"from_checkpoint"`
}

// EpochClose records that a live epoch stopped writing; its final part
// stands for its key groups in every later checkpoint until a new epoch
// opens over them.
type EpochClose struct {
	Epoch     uint64  `json:"epoch"`
	FinalPart PartRef `json:"final_part"`
}

// CheckpointComplete records that checkpoint ID is complete and restorable.
type CheckpointComplete struct {
	ID    uint64    `json:"id"`
	Parts []PartRef `json:"parts"`
	// CompletedAtMs is the time of the entry that completed it (filled in
	// from the entry, not stored twice).
	CompletedAtMs int64 `json:"-"`
}

// PartRef names one writer's part of a checkpoint.
type PartRef struct {
	Epoch     uint64         `json:"epoch"`
	KeyGroups keygroup.Range `json:"key_groups"`
	// Checkpoint is the id the part was recorded for (for a closed epoch's
	// final part, an earlier one than the checkpoint that carries it).
	Checkpoint uint64 `json:"checkpoint"`
	// Key is the part object's blob key.
	Key string `json:"key"`
}

// EpochState is a live epoch: the current owner of its key groups.
type EpochState struct {
	Epoch          uint64
	KeyGroups      keygroup.Range
	Node           string
	FromCheckpoint uint64
	// Closed epochs no longer write; FinalPart stands for them.
	Closed    bool
	FinalPart PartRef
}

// errJournalInvalid marks an entry that does not follow from the state
// before it: a bug or a corrupted journal, never a normal race.
var errJournalInvalid = errors.New("invalid journal entry")

// journalState is the fold of a stream's journal up to Seq.
type journalState struct {
	keyGroups   int
	incarnation string
	seq         uint64
	// live holds the live epochs sorted by KeyGroups.Lo; ranges are disjoint.
	live []EpochState
	// fencedBy maps a fenced epoch to the epoch that fenced it; entries
	// below fencedFloor are forgotten (every epoch below it that is not
	// live is fenced, by an epoch no longer known).
	fencedBy    map[uint64]uint64
	fencedFloor uint64
	// epochFrom maps an epoch that started from a checkpoint to that
	// checkpoint, for live epochs and those with a part in checkpoints: a
	// restore of a checkpoint goes through the checkpoints its parts'
	// epochs started from, so those must not be forgotten.
	epochFrom map[uint64]uint64
	// forgotUpTo is the newest checkpoint id a forget entry removed.
	forgotUpTo uint64
	// checkpoints holds the complete checkpoints in ascending ID order.
	checkpoints []CheckpointComplete
	// everOwned marks the key groups some epoch has opened: they hold state,
	// so every checkpoint must have a part covering them.
	everOwned []bool
}

func newJournalState(keyGroups int) journalState {
	return journalState{keyGroups: keyGroups, fencedBy: map[uint64]uint64{}, epochFrom: map[uint64]uint64{}, everOwned: make([]bool, keyGroups)}
}

// apply folds e into s, or returns an error wrapping errJournalInvalid and
// leaves s unchanged.
func (s *journalState) apply(e JournalEntry) error {
	if e.Seq != s.seq+1 {
		return fmt.Errorf("entry %d after %d: %w", e.Seq, s.seq, errJournalInvalid)
	}
	if e.Incarnation != s.incarnation {
		return fmt.Errorf("entry %d belongs to another incarnation of the stream (deleted and created again): %w", e.Seq, ErrStreamNotFound)
	}
	switch {
	case e.Kind == EntryEpochOpen && e.Open != nil:
		if err := e.Open.KeyGroups.Validate(s.keyGroups); err != nil {
			return fmt.Errorf("entry %d: %v: %w", e.Seq, err, errJournalInvalid)
		}
		if e.Open.FromCheckpoint != 0 {
			if _, ok := s.checkpoint(e.Open.FromCheckpoint); !ok {
				return fmt.Errorf("entry %d: restores from checkpoint %d, which is not complete: %w", e.Seq, e.Open.FromCheckpoint, errJournalInvalid)
			}
		}
		kept := s.live[:0:0]
		for _, ep := range s.live {
			if ep.KeyGroups.Overlaps(e.Open.KeyGroups) {
				s.fencedBy[ep.Epoch] = e.Seq
				continue
			}
			kept = append(kept, ep)
		}
		kept = append(kept, EpochState{Epoch: e.Seq, KeyGroups: e.Open.KeyGroups, Node: e.Open.Node, FromCheckpoint: e.Open.FromCheckpoint})
		slices.SortFunc(kept, func(a, b EpochState) int { return int(a.KeyGroups.Lo) - int(b.KeyGroups.Lo) })
		s.live = kept
		if e.Open.FromCheckpoint != 0 {
			s.epochFrom[e.Seq] = e.Open.FromCheckpoint
		}
		for g := int(e.Open.KeyGroups.Lo); g <= int(e.Open.KeyGroups.Hi); g++ {
			s.everOwned[g] = true
		}
	case e.Kind == EntryEpochClose && e.Close != nil:
		i := s.liveIndex(e.Close.Epoch)
		if i < 0 || s.live[i].Closed {
			return fmt.Errorf("entry %d: close of epoch %d, which is not live and open: %w", e.Seq, e.Close.Epoch, errJournalInvalid)
		}
		if e.Close.FinalPart.Epoch != e.Close.Epoch {
			return fmt.Errorf("entry %d: close of epoch %d with a part of epoch %d: %w", e.Seq, e.Close.Epoch, e.Close.FinalPart.Epoch, errJournalInvalid)
		}
		s.live[i].Closed = true
		s.live[i].FinalPart = e.Close.FinalPart
	case e.Kind == EntryCheckpointComplete && e.Checkpoint != nil:
		if err := s.checkCompletion(e.Checkpoint.ID, e.Checkpoint.Parts); err != nil {
			return fmt.Errorf("entry %d: %w: %w", e.Seq, err, errJournalInvalid)
		}
		cp := *e.Checkpoint
		cp.CompletedAtMs = e.TimeMs
		s.checkpoints = append(s.checkpoints, cp)
	case e.Kind == EntryCheckpointsForget && e.Forget != nil:
		if err := s.forget(e.Seq, *e.Forget); err != nil {
			return fmt.Errorf("entry %d: %w: %w", e.Seq, err, errJournalInvalid)
		}
	default:
		return fmt.Errorf("entry %d: unknown kind %q: %w", e.Seq, e.Kind, errJournalInvalid)
	}
	s.seq = e.Seq
	return nil
}

// checkCompletion verifies that parts can complete checkpoint id now: the
// id is new, every key group that holds state has a live owner, and there is
// exactly one part per live epoch, of that epoch.
func (s *journalState) checkCompletion(id uint64, parts []PartRef) error {
	if last := s.lastCheckpoint(); id <= last {
		return fmt.Errorf("checkpoint %d, newest complete is %d: %w", id, last, ErrCheckpointTooOld)
	}
	if orphans := s.orphaned(); len(orphans) > 0 {
		return fmt.Errorf("checkpoint %d: key groups %v hold state but have no open writer since their epoch was fenced: %w", id, orphans, ErrOrphanedKeyGroups)
	}
	if len(parts) != len(s.live) {
		return fmt.Errorf("checkpoint %d has %d parts for %d live epochs", id, len(parts), len(s.live))
	}
	for i, ep := range s.live {
		if parts[i].Epoch != ep.Epoch || parts[i].KeyGroups != ep.KeyGroups {
			return fmt.Errorf("checkpoint %d part %d is epoch %d (%s), live is epoch %d (%s)", id, i, parts[i].Epoch, parts[i].KeyGroups, ep.Epoch, ep.KeyGroups)
		}
	}
	return nil
}

// completable reports whether checkpoint id could still complete from this
// state: it is not complete, newer than the newest complete one, and no
// key groups are orphaned. A state read later may say otherwise.
func (s *journalState) completable(id uint64) bool {
	_, done := s.checkpoint(id)
	return !done && id > s.lastCheckpoint() && len(s.orphaned()) == 0
}

// partsComplete reports whether every live epoch has a part: a closed one
// its final part, an open one a part in recorded.
func (s *journalState) partsComplete(recorded map[uint64]bool) bool {
	for _, ep := range s.live {
		if !ep.Closed && !recorded[ep.Epoch] {
			return false
		}
	}
	return true
}

// fenced reports whether epoch is no longer live, and which epoch fenced it
// (0 when a forget entry dropped that: see CheckpointsForget).
func (s *journalState) fenced(epoch uint64) (by uint64, ok bool) {
	if by, ok = s.fencedBy[epoch]; ok {
		return by, true
	}
	if epoch < s.fencedFloor && s.liveIndex(epoch) < 0 {
		return 0, true
	}
	return 0, false
}

// forget folds a forget entry at seq, or fails leaving s unchanged.
func (s *journalState) forget(seq uint64, f CheckpointsForget) error {
	if f.FencedBelow > seq {
		return fmt.Errorf("forget fenced epochs below %d at %d", f.FencedBelow, seq)
	}
	drop := make(map[uint64]bool, len(f.IDs))
	for i, id := range f.IDs {
		if i > 0 && id <= f.IDs[i-1] {
			return fmt.Errorf("forget: checkpoint ids not ascending")
		}
		if _, ok := s.checkpoint(id); !ok {
			return fmt.Errorf("forget checkpoint %d, which is not complete", id)
		}
		if id == s.lastCheckpoint() {
			return fmt.Errorf("forget the newest complete checkpoint %d", id)
		}
		drop[id] = true
	}
	for _, ep := range s.live {
		if drop[ep.FromCheckpoint] {
			return fmt.Errorf("forget checkpoint %d, which live epoch %d starts from", ep.FromCheckpoint, ep.Epoch)
		}
	}
	kept := make([]CheckpointComplete, 0, len(s.checkpoints)-len(drop))
	for _, cp := range s.checkpoints {
		if !drop[cp.ID] {
			kept = append(kept, cp)
		}
	}
	for _, cp := range kept {
		for _, p := range cp.Parts {
			if from := s.epochFrom[p.Epoch]; drop[from] {
				return fmt.Errorf("forget checkpoint %d, which part %s of checkpoint %d starts from", from, p.Key, cp.ID)
			}
		}
	}
	// Keep the bases of what is left only: those are what restores need.
	needed := map[uint64]bool{}
	for _, ep := range s.live {
		needed[ep.Epoch] = true
	}
	for _, cp := range kept {
		for _, p := range cp.Parts {
			needed[p.Epoch] = true
		}
	}
	for ep := range s.epochFrom {
		if !needed[ep] {
			delete(s.epochFrom, ep)
		}
	}
	for ep := range s.fencedBy {
		if ep < f.FencedBelow {
			delete(s.fencedBy, ep)
		}
	}
	s.fencedFloor = max(s.fencedFloor, f.FencedBelow)
	if n := len(f.IDs); n > 0 {
		s.forgotUpTo = max(s.forgotUpTo, f.IDs[n-1])
	}
	s.checkpoints = kept
	return nil
}

// forgotten reports whether checkpoint id may have been complete once but
// its record was forgotten: it is not restorable any more.
func (s *journalState) forgotten(id uint64) bool {
	_, ok := s.checkpoint(id)
	return !ok && id <= s.forgotUpTo
}

func (s *journalState) liveIndex(epoch uint64) int {
	return slices.IndexFunc(s.live, func(e EpochState) bool { return e.Epoch == epoch })
}

func (s *journalState) lastCheckpoint() uint64 {
	if len(s.checkpoints) == 0 {
		return 0
	}
	return s.checkpoints[len(s.checkpoints)-1].ID
}

func (s *journalState) checkpoint(id uint64) (CheckpointComplete, bool) {
	i, ok := slices.BinarySearchFunc(s.checkpoints, id, func(c CheckpointComplete, id uint64) int {
		switch {
		case c.ID < id:
			return -1
		case c.ID > id:
			return 1
		}
		return 0
	})
	if !ok {
		return CheckpointComplete{}, false
	}
	return s.checkpoints[i], true
}

// orphaned returns the key groups that hold state (some epoch opened them)
// but that no live epoch owns, because a partially overlapping epoch fenced
// their owner. A checkpoint cannot complete until a writer reopens them.
func (s *journalState) orphaned() []keygroup.Range {
	var out []keygroup.Range
	covered := make([]bool, s.keyGroups)
	for _, ep := range s.live {
		for g := int(ep.KeyGroups.Lo); g <= int(ep.KeyGroups.Hi); g++ {
			covered[g] = true
		}
	}
	for g := 0; g < s.keyGroups; g++ {
		if !s.everOwned[g] || covered[g] {
			continue
		}
		if n := len(out); n > 0 && int(out[n-1].Hi) == g-1 {
			out[n-1].Hi = uint16(g)
			continue
		}
		out = append(out, keygroup.Range{Lo: uint16(g), Hi: uint16(g)})
	}
	return out
}

// clone returns a deep copy of s.
func (s *journalState) clone() journalState {
	c := *s
	c.live = slices.Clone(s.live)
	c.checkpoints = slices.Clone(s.checkpoints)
	c.everOwned = slices.Clone(s.everOwned)
	c.fencedBy = maps.Clone(s.fencedBy)
	c.epochFrom = maps.Clone(s.epochFrom)
	if c.fencedBy == nil {
		c.fencedBy = map[uint64]uint64{}
	}
	if c.epochFrom == nil {
		c.epochFrom = map[uint64]uint64{}
	}
	return c
}
