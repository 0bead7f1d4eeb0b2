package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
)

// Journal compaction. A stream's journal grows by one entry per epoch open,
// close and checkpoint; reading it from scratch costs one GET per entry. So
// the fold is stored now and then as a compacted state:
//
//	streams/<name>/journal-state/<seq, 20 digits>   (envelope kind "journal-state")
//
// holding journalState exactly as folding entries 1..seq gives it. A reader
// with nothing cached (or one that finds entries missing) loads the newest
// compacted state it can verify and folds only the entries after it.
//
// Invariant (one total order survives compaction): entries stay the
// authority. A compacted state at S is written only from a fold that read
// every entry up to S, create-only, and folding is deterministic, so any two
// states at S are identical and "state S + entries after S" is the fold of
// every entry. Entry n+1 is still won by exactly one create-only put, which
// requires that its key was never written before; deleting entries could
// re-open a key, so entries are deleted only at or below the second-newest
// compacted state S', and only once the newest one (S > S') is older than
// the journal grace. A node whose last journal read saw a head at or below
// S' read it before entry S existed, so before the newest state was written:
// more than a grace ago. Before deleting, GC records a journal floor
// at S' (journal-floor/<S'>). An append whose read-to-put took longer than
// appendBound (grace/4) checks after its put for a floor at or above its
// position: a floor written before the check, less than grace/2 after the
// read, cannot come from a state that folded this put (that state would
// have to be older than the grace first), so it proves the position was
// someone else's, compacted and deleted: the append withdraws its entry
// and tries again. Past grace/2 the check proves nothing either way, and
// the append reports an unknown outcome. (A compacted state at or above the
// position proves nothing: other appenders may have read this entry and
// compacted past it within the check's latency.) Readers that find a gap (entries deleted
// under them) reload the newest compacted state: it covers the gap.
//
// Bounding the state itself: journalState holds every complete checkpoint.
// Garbage collection appends a checkpoints-forget entry for those nothing
// needs (see forgettable): the newest JournalKeepCheckpoints (at least
// RetainCheckpoints), those marked retained, those with a snapshot record,
// those a registered CDC subscription holds (its hold point and every later
// one), those a live epoch or a closed epoch's final part starts from, the
// bases of all of those (recursively), and any completed within GCGrace are
// kept.
// The forget entry is folded like any other, so every node agrees on which
// records exist. Restore, retain or open-from of a forgotten checkpoint fails
// with ErrCheckpointNotFound: its segments are not protected any more.

const (
	journalStateKind = "journal-state"
	// defaultJournalCompactEvery is Options.JournalCompactEvery's default.
	defaultJournalCompactEvery = 256
	// defaultJournalKeepCheckpoints is Options.JournalKeepCheckpoints's
	// default.
	defaultJournalKeepCheckpoints = 64
	// forgetMin is the fewest records worth a forget entry: each entry is
	// itself journal growth.
	forgetMin = 8
)

// ErrRetainedCheckpointForgotten: a checkpoint is marked retained but its
// journal record was forgotten (the mark was created while the record was
// being forgotten). Garbage collection stops rather than guess what the
// checkpoint needs; release the mark to resume it.
var ErrRetainedCheckpointForgotten = errors.New("retained checkpoint's record was forgotten")

func journalStatePrefix(ns streamNS) string { return streamPrefix(ns) + "journal-state/" }

// A journal floor (an empty object, streams/<name>/journal-floor/<seq>)
// records, before any entry is deleted, that entries up to seq are being
// deleted: a slow append that finds one at or above its position knows it
// re-created a deleted key.
func journalFloorPrefix(ns streamNS) string { return streamPrefix(ns) + "journal-floor/" }

func journalFloorKey(ns streamNS, seq uint64) string {
	return fmt.Sprintf("%s%020d", journalFloorPrefix(ns), seq)
}

func journalStateKey(ns streamNS, seq uint64) string {
	return fmt.Sprintf("%s%020d", journalStatePrefix(ns), seq)
}

// journalStateDoc is the stored form of journalState.
type journalStateDoc struct {
	Stream      string            `json:"stream"`
	Incarnation string            `json:"incarnation"`
	KeyGroups   int               `json:"key_groups"`
	Seq         uint64            `json:"seq"`
	Live        []epochDoc        `json:"live"`
	FencedBy    map[uint64]uint64 `json:"fenced_by,omitempty"`
	FencedFloor uint64            `json:"fenced_floor,omitempty"`
	EpochFrom   map[uint64]uint64 `json:"epoch_from,omitempty"`
	ForgotUpTo  uint64            `json:"forgot_up_to,omitempty"`
	Checkpoints []checkpointDoc   `json:"checkpoints"`
	// EverOwned lists the key groups some epoch opened, as ranges.
	EverOwned []keygroup.Range `json:"ever_owned"`
}

type epochDoc struct {
	Epoch          uint64         `json:"epoch"`
	KeyGroups      keygroup.Range `json:"key_groups"`
	Node           string         `json:"node"`
	FromCheckpoint uint64         `json:"from_checkpoint,omitempty"`
	Closed         bool           `json:"closed,omitempty"`
	FinalPart      *PartRef       `json:"final_part,omitempty"`
}

type checkpointDoc struct {
	ID            uint64    `json:"id"`
	Parts         []PartRef `json:"parts"`
	CompletedAtMs int64     `json:"completed_at_ms"`
}

// encodeJournalState seals s as the compacted state of stream.
func encodeJournalState(stream string, s *journalState) ([]byte, error) {
	d := journalStateDoc{
		Stream: stream, Incarnation: s.incarnation, KeyGroups: s.keyGroups, Seq: s.seq,
		FencedBy: s.fencedBy, FencedFloor: s.fencedFloor, EpochFrom: s.epochFrom, ForgotUpTo: s.forgotUpTo,
		Live: []epochDoc{}, Checkpoints: []checkpointDoc{}, EverOwned: []keygroup.Range{},
	}
	for _, ep := range s.live {
		ed := epochDoc{Epoch: ep.Epoch, KeyGroups: ep.KeyGroups, Node: ep.Node, FromCheckpoint: ep.FromCheckpoint, Closed: ep.Closed}
		if ep.Closed {
			fp := ep.FinalPart
			ed.FinalPart = &fp
		}
		d.Live = append(d.Live, ed)
	}
	for _, cp := range s.checkpoints {
		d.Checkpoints = append(d.Checkpoints, checkpointDoc(cp))
	}
	for g, owned := range s.everOwned {
		if !owned {
			continue
		}
		if n := len(d.EverOwned); n > 0 && int(d.EverOwned[n-1].Hi) == g-1 {
			d.EverOwned[n-1].Hi = uint16(g)
			continue
		}
		d.EverOwned = append(d.EverOwned, keygroup.Range{Lo: uint16(g), Hi: uint16(g)})
	}
	data, err := envelope.Seal(journalStateKind, d)
	if err != nil {
		return nil, fmt.Errorf("stream %s: journal state %d: %w", stream, s.seq, err)
	}
	return data, nil
}

// decodeJournalState verifies and decodes the compacted state stored at
// key for the stream cfg. Anything that is not a state this stream's fold
// could have produced is an error naming the object: envelope.ErrCorrupt,
// or ErrStreamNotFound for a state of another incarnation.
func decodeJournalState(key string, data []byte, cfg StreamConfig) (journalState, error) {
	var d journalStateDoc
	if err := envelope.Open(key, data, journalStateKind, &d); err != nil {
		return journalState{}, fmt.Errorf("stream %s: journal state: %w", cfg.Name, err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("stream %s: journal state %s: %s: %w", cfg.Name, key, fmt.Sprintf(format, args...), envelope.ErrCorrupt)
	}
	switch {
	case d.Stream != cfg.Name:
		return journalState{}, bad("belongs to stream %q", d.Stream)
	case d.Incarnation != cfg.Incarnation:
		return journalState{}, fmt.Errorf("stream %s: journal state %s belongs to another incarnation of the stream: %w", cfg.Name, key, ErrStreamNotFound)
	case d.KeyGroups != cfg.KeyGroups:
		return journalState{}, bad("%d key groups, the stream has %d", d.KeyGroups, cfg.KeyGroups)
	case d.Seq == 0:
		return journalState{}, bad("seq 0")
	case d.FencedFloor > d.Seq:
		return journalState{}, bad("fenced floor %d above seq %d", d.FencedFloor, d.Seq)
	}
	s := newJournalState(cfg.KeyGroups)
	s.incarnation, s.seq, s.fencedFloor, s.forgotUpTo = d.Incarnation, d.Seq, d.FencedFloor, d.ForgotUpTo
	for i, ed := range d.Live {
		if err := ed.KeyGroups.Validate(cfg.KeyGroups); err != nil {
			return journalState{}, bad("live epoch %d: %v", ed.Epoch, err)
		}
		if ed.Epoch == 0 || ed.Epoch > d.Seq {
			return journalState{}, bad("live epoch %d at seq %d", ed.Epoch, d.Seq)
		}
		if i > 0 && d.Live[i-1].KeyGroups.Hi >= ed.KeyGroups.Lo {
			return journalState{}, bad("live epochs not sorted and disjoint")
		}
		if ed.Closed != (ed.FinalPart != nil) || (ed.FinalPart != nil && ed.FinalPart.Epoch != ed.Epoch) {
			return journalState{}, bad("live epoch %d: final part does not match", ed.Epoch)
		}
		ep := EpochState{Epoch: ed.Epoch, KeyGroups: ed.KeyGroups, Node: ed.Node, FromCheckpoint: ed.FromCheckpoint, Closed: ed.Closed}
		if ed.FinalPart != nil {
			ep.FinalPart = *ed.FinalPart
		}
		s.live = append(s.live, ep)
	}
	for ep, by := range d.FencedBy {
		if ep >= by || by > d.Seq {
			return journalState{}, bad("epoch %d fenced by %d", ep, by)
		}
		s.fencedBy[ep] = by
	}
	for ep, from := range d.EpochFrom {
		if ep == 0 || ep > d.Seq || from == 0 {
			return journalState{}, bad("epoch %d starts from checkpoint %d", ep, from)
		}
		s.epochFrom[ep] = from
	}
	for i, cd := range d.Checkpoints {
		if i > 0 && cd.ID <= d.Checkpoints[i-1].ID {
			return journalState{}, bad("checkpoints not in ascending id order")
		}
		for _, p := range cd.Parts {
			if err := p.KeyGroups.Validate(cfg.KeyGroups); err != nil {
				return journalState{}, bad("checkpoint %d: %v", cd.ID, err)
			}
		}
		s.checkpoints = append(s.checkpoints, CheckpointComplete(cd))
	}
	for _, r := range d.EverOwned {
		if err := r.Validate(cfg.KeyGroups); err != nil {
			return journalState{}, bad("ever owned: %v", err)
		}
		for g := int(r.Lo); g <= int(r.Hi); g++ {
			s.everOwned[g] = true
		}
	}
	return s, nil
}

// storedState names one compacted state object.
type storedState struct {
	seq     uint64
	key     string
	modTime time.Time
}

// listStates lists the stream's compacted states in ascending seq order.
func (j *journal) listStates(ctx context.Context, startAfter string) ([]storedState, error) {
	prefix := journalStatePrefix(j.ns())
	var out []storedState
	for o, err := range upload.Walk(ctx, j.store, prefix, startAfter) {
		if err != nil {
			return nil, fmt.Errorf("stream %s: list journal states: %w", j.stream, err)
		}
		n, err := strconv.ParseUint(strings.TrimPrefix(o.Key, prefix), 10, 64)
		if err != nil || journalStateKey(j.ns(), n) != o.Key {
			continue // not ours (a stray object); never read, never deleted
		}
		out = append(out, storedState{seq: n, key: o.Key, modTime: o.ModTime})
	}
	return out, nil
}

// loadState returns the newest compacted state above seq that verifies
// (ok false if there is none). A state that does not verify is skipped for
// the next older one; its error is returned in skipped (and remembered, see
// stats), naming the object.
func (j *journal) loadState(ctx context.Context, above uint64) (st journalState, ok bool, skipped, err error) {
	startAfter := ""
	if above > 0 {
		startAfter = journalStateKey(j.ns(), above)
	}
	states, err := j.listStates(ctx, startAfter)
	if err != nil {
		return journalState{}, false, nil, err
	}
	var errs []error
	for i := len(states) - 1; i >= 0; i-- {
		data, rerr := readAll(ctx, j.store, states[i].key)
		if rerr != nil {
			if errors.Is(rerr, upload.ErrNotFound) {
				continue // collected meanwhile: an older one may do
			}
			return journalState{}, false, errors.Join(errs...), fmt.Errorf("stream %s: read journal state: %w", j.stream, rerr)
		}
		s, derr := decodeJournalState(states[i].key, data, StreamConfig{Name: j.stream, KeyGroups: j.keyGroups, Incarnation: j.incarnation})
		if derr != nil {
			errs = append(errs, derr)
			continue
		}
		if s.seq != states[i].seq {
			errs = append(errs, fmt.Errorf("stream %s: journal state %s holds seq %d: %w", j.stream, states[i].key, s.seq, envelope.ErrCorrupt))
			continue
		}
		j.noteStateErr(errors.Join(errs...))
		return s, true, errors.Join(errs...), nil
	}
	j.noteStateErr(errors.Join(errs...))
	return journalState{}, false, errors.Join(errs...), nil
}

// writeState stores s as a compacted state, create-only. The fold is
// deterministic, so a state already there is the same state; a write whose
// outcome is unknown is left for the next compaction to settle (nothing
// depends on a state existing: readers fall back to older ones and
// entries).
func (j *journal) writeState(ctx context.Context, s *journalState) error {
	data, err := encodeJournalState(j.stream, s)
	if err != nil {
		return err
	}
	key := journalStateKey(j.ns(), s.seq)
	err = j.store.PutIfAbsent(ctx, key, bytes.NewReader(data), int64(len(data)))
	if err != nil && !errors.Is(err, upload.ErrAlreadyExists) {
		return fmt.Errorf("stream %s: write journal state %d: %w", j.stream, s.seq, err)
	}
	j.stats.StatesWritten.Add(1)
	return nil
}

// floorCovers reports whether garbage collection recorded a journal floor
// at or above seq: then position seq was taken, compacted and (to be)
// deleted before, unless the floor is younger than the caller's
// put (see the invariant at the top of the file).
func (j *journal) floorCovers(ctx context.Context, seq uint64) (bool, error) {
	after := ""
	if seq > 1 {
		after = journalFloorKey(j.ns(), seq-1)
	}
	page, err := j.store.List(ctx, journalFloorPrefix(j.ns()), after, 1)
	if err != nil {
		return false, fmt.Errorf("stream %s: list journal floors: %w", j.stream, err)
	}
	return len(page.Objects) > 0, nil
}

func (j *journal) noteStateErr(err error) {
	if err == nil {
		return
	}
	j.stats.CorruptStates.Add(1)
	j.statsMu.Lock()
	j.lastStateErr = err
	j.statsMu.Unlock()
}

// stateErr returns the last error met reading or writing a compacted state
// that did not fail the caller (an older state or the entries served).
func (j *journal) stateErr() error {
	j.statsMu.Lock()
	defer j.statsMu.Unlock()
	return j.lastStateErr
}

// compactJournal is garbage collection's pass over one stream's journal
// (called from checkpointReferences, after it refreshed the journal): it
// forgets checkpoint records nothing needs, writes a compacted state if the
// newest one is CompactEvery entries behind, and deletes entries and states
// the invariant at the top of this file allows.
func (n *Node) compactJournal(ctx context.Context, h *streamHandle) error {
	j := h.journal
	if err := n.forgetCheckpoints(ctx, h); err != nil {
		return err
	}
	st := j.snapshot()
	states, err := j.listStates(ctx, "")
	if err != nil {
		return err
	}
	var newest uint64
	if len(states) > 0 {
		newest = states[len(states)-1].seq
	}
	if st.seq > 0 && st.seq-newest >= uint64(j.compactEvery) {
		if err := j.writeState(ctx, &st); err != nil {
			return err
		}
	}
	// The fail-safe check of retention marks listed after the forget runs
	// in checkpointReferences, on the listing it makes anyway.
	return j.deleteCompacted(ctx, states, n.clock.Now(), n.opts.GCGrace)
}

// deleteCompacted deletes the entries at or below the second-newest
// compacted state, and the states below it, once the newest state is older
// than the grace (see the invariant at the top of the file).
func (j *journal) deleteCompacted(ctx context.Context, states []storedState, now time.Time, grace time.Duration) error {
	if len(states) < 2 {
		return nil
	}
	newest, floor := states[len(states)-1], states[len(states)-2]
	if newest.modTime.After(now.Add(-grace)) {
		return nil
	}
	floorKey := journalFloorKey(j.ns(), floor.seq)
	if err := j.store.PutIfAbsent(ctx, floorKey, bytes.NewReader(nil), 0); err != nil && !errors.Is(err, upload.ErrAlreadyExists) {
		return fmt.Errorf("gc: stream %s: record journal floor: %w", j.stream, err)
	}
	prefix := journalPrefix(j.ns())
	stop := journalKey(j.ns(), floor.seq)
	var errs []error
	for o, err := range upload.Walk(ctx, j.store, prefix, "") {
		if err != nil {
			return fmt.Errorf("gc: stream %s: list journal: %w", j.stream, err)
		}
		if o.Key > stop {
			break
		}
		if err := j.store.Delete(ctx, o.Key); err != nil && !errors.Is(err, upload.ErrNotFound) {
			errs = append(errs, fmt.Errorf("gc: delete %s: %w", o.Key, err))
			continue
		}
		j.stats.EntriesDeleted.Add(1)
	}
	floors, err := listNumbered(ctx, j.store, journalFloorPrefix(j.ns()))
	if err != nil {
		return fmt.Errorf("gc: stream %s: list journal floors: %w", j.stream, err)
	}
	for _, f := range floors {
		if f < floor.seq { // the newest floor covers whatever these did
			if err := j.store.Delete(ctx, journalFloorKey(j.ns(), f)); err != nil && !errors.Is(err, upload.ErrNotFound) {
				errs = append(errs, fmt.Errorf("gc: delete journal floor %d: %w", f, err))
			}
		}
	}
	for _, s := range states[:len(states)-2] {
		if err := j.store.Delete(ctx, s.key); err != nil && !errors.Is(err, upload.ErrNotFound) {
			errs = append(errs, fmt.Errorf("gc: delete %s: %w", s.key, err))
		}
	}
	return errors.Join(errs...)
}

// forgetCheckpoints appends a checkpoints-forget entry for the records
// nothing needs, if there are at least forgetMin of them.
func (n *Node) forgetCheckpoints(ctx context.Context, h *streamHandle) error {
	if len(h.journal.snapshot().checkpoints) < n.journalKeep()+forgetMin {
		return nil
	}
	keep := map[uint64]bool{}
	snaps, err := n.Snapshots(ctx, h.cfg.Name)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	for _, s := range snaps {
		keep[s.Checkpoint] = true
	}
	// Listed last, right before the append: a mark created after this
	// is caught by checkpointReferences' check (ErrRetainedCheckpointForgotten).
	marked, err := n.retainedCheckpoints(ctx, h.cfg.ns())
	if err != nil {
		return err
	}
	for _, id := range marked {
		keep[id] = true
	}
	// Registered subscriptions keep their hold point and every checkpoint
	// after it (subscription.go). A subscription created after this
	// listing waits for the round and then finds its hold forgotten
	// (expired): it is refused.
	st := h.journal.snapshot()
	held, err := n.subscriptionHolds(ctx, h, &st, false)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	young := n.clock.Now().Add(-n.opts.GCGrace).UnixMilli()
	_, err = h.journal.append(ctx, func(s *journalState) (JournalEntry, error) {
		keep := maps.Clone(keep)
		for _, cp := range s.checkpoints {
			if held.covers(cp.ID) {
				keep[cp.ID] = true
			}
		}
		ids := forgettable(s, n.journalKeep(), keep, young)
		if len(ids) < forgetMin {
			return JournalEntry{}, errNothingToAppend
		}
		return JournalEntry{Kind: EntryCheckpointsForget, Forget: &CheckpointsForget{IDs: ids, FencedBelow: s.seq}}, nil
	})
	if err != nil {
		return fmt.Errorf("gc: stream %s: forget checkpoints: %w", h.cfg.Name, err)
	}
	return nil
}

func (n *Node) journalKeep() int { return max(n.opts.JournalKeepCheckpoints, n.opts.RetainCheckpoints) }

// forgettable returns, ascending, the complete checkpoints of s that
// nothing needs: not among the newest keepNewest, not in keep, not
// completed at or after youngMs, not a live epoch's base or a closed
// epoch's final part's checkpoint, and not the base of any of those
// (recursively, through the parts' epochs).
func forgettable(s *journalState, keepNewest int, keep map[uint64]bool, youngMs int64) []uint64 {
	needed := map[uint64]bool{}
	for i, cp := range s.checkpoints {
		if i >= len(s.checkpoints)-keepNewest || keep[cp.ID] || cp.CompletedAtMs >= youngMs {
			needed[cp.ID] = true
		}
	}
	for _, ep := range s.live {
		needed[ep.FromCheckpoint] = true
		if ep.Closed {
			needed[ep.FinalPart.Checkpoint] = true
		}
	}
	// Close over bases, newest first: a base is older than what uses it.
	for i := len(s.checkpoints) - 1; i >= 0; i-- {
		cp := s.checkpoints[i]
		if !needed[cp.ID] {
			continue
		}
		for _, p := range cp.Parts {
			if from := s.epochFrom[p.Epoch]; from != 0 {
				needed[from] = true
			}
		}
	}
	var out []uint64
	for _, cp := range s.checkpoints {
		if !needed[cp.ID] {
			out = append(out, cp.ID)
		}
	}
	return slices.Clip(out)
}
