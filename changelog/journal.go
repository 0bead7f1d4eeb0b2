package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
)

const journalEntryKind = "journal-entry"

// maxAppendFailures bounds how often an append retries after attempts that
// made no progress (transient errors). Lost races are not counted: each one
// means another writer appended, so contention cannot exhaust the bound.
const maxAppendFailures = 16

// journal reads and appends one stream's journal on the blob store. It caches
// the fold of every entry read so far; refresh reads only newer entries.
type journal struct {
	store       upload.BlobStore
	stream      string
	incarnation string
	now         func() time.Time
	nonce       func() string
	keyGroups   int
	gone        atomic.Bool // the stream was deleted: this journal is dead

	// compactEvery: the appender of an entry whose seq is a multiple of it
	// writes the compacted state at that seq (journal_compact.go).
	compactEvery int
	// appendBound bounds the time from an append's journal read to its
	// put; an attempt slower than that verifies its position afterwards
	// (see the invariant in journal_compact.go). A quarter of the grace
	// after which compacted entries may be deleted.
	appendBound time.Duration
	stats       journalStats

	statsMu      sync.Mutex
	lastStateErr error

	mu    sync.Mutex // guards state; held across blob-store I/O to serialise appends
	state journalState
}

// journalStats counts what compaction did, for tests and measurements.
type journalStats struct {
	EntriesRead    atomic.Int64 // journal entry GETs
	StatesRead     atomic.Int64 // compacted states loaded
	StatesWritten  atomic.Int64 // compacted states written (or found written)
	CorruptStates  atomic.Int64 // compacted-state reads that skipped a bad object
	EntriesDeleted atomic.Int64
	Withdrawn      atomic.Int64 // stale entries an append withdrew
}

func newJournal(store upload.BlobStore, cfg StreamConfig, now func() time.Time, nonce func() string) *journal {
	st := newJournalState(cfg.KeyGroups)
	st.incarnation = cfg.Incarnation
	return &journal{
		store: store, stream: cfg.Name, incarnation: cfg.Incarnation, keyGroups: cfg.KeyGroups, now: now, nonce: nonce, state: st,
		compactEvery: defaultJournalCompactEvery, appendBound: 10 * time.Minute / 4,
	}
}

// withCompaction sets how often states are compacted and the grace after
// which compacted entries may be deleted.
func (j *journal) withCompaction(every int, grace time.Duration) *journal {
	if every > 0 {
		j.compactEvery = every
	}
	if grace > 0 {
		j.appendBound = grace / 4
	}
	return j
}

// refresh reads and folds every entry after the cached position. The blob
// reads happen outside the lock, so concurrent refreshes (every writer of a
// checkpoint does one) run in parallel instead of queueing; entries another
// refresh folded meanwhile are skipped.
func (j *journal) refresh(ctx context.Context) error {
	j.mu.Lock()
	from := j.state.seq
	j.mu.Unlock()
	r, err := j.read(ctx, from)
	j.mu.Lock()
	defer j.mu.Unlock()
	_, _, aerr := j.merge(r)
	return errors.Join(aerr, err)
}

// journalRead is what read found after a position: possibly a compacted
// state to start from, then entries in order.
type journalRead struct {
	base    *journalState
	entries []JournalEntry
}

// read reads what follows position from. With nothing cached (from 0) it
// starts from the newest compacted state. When entries after from are
// missing (compacted and deleted), or when it read more than one entry (a
// reader that far behind may have crossed a compacted position, and below
// the second-newest state only states are authoritative: see
// journal_compact.go), it adopts the newest compacted state above from, if
// any, and keeps only the entries after it. The entries returned are
// contiguous from the start position, up to the first error.
func (j *journal) read(ctx context.Context, from uint64) (journalRead, error) {
	var r journalRead
	start, checked := from, false
	if from == 0 {
		st, ok, _, err := j.loadState(ctx, 0)
		if err != nil {
			return r, err
		}
		if ok {
			r.base, start = &st, st.seq
			j.stats.StatesRead.Add(1)
		}
		checked = true
	}
	for {
		entries, err := j.readAfter(ctx, start)
		gone := errors.Is(err, errEntryGone)
		if gone {
			err = nil
		}
		gap := contiguous(entries, start)
		whole := gap == len(entries) && !gone
		if whole && (checked || len(entries) <= 1) {
			r.entries = entries
			return r, err
		}
		if !whole && checked && r.base != nil && r.base.seq == start {
			// Already restarted from the newest state: still a gap.
			r.entries = entries[:gap]
			return r, errors.Join(j.missing(start, entries, gap), err)
		}
		st, ok, skipped, lerr := j.loadState(ctx, start)
		if lerr != nil {
			r.entries = entries[:gap]
			return r, lerr
		}
		checked = true
		if !ok {
			r.entries = entries[:gap]
			if !whole {
				return r, errors.Join(j.missing(start, entries, gap), skipped, err)
			}
			return r, err
		}
		r.base, start = &st, st.seq
		j.stats.StatesRead.Add(1)
		if whole {
			for len(entries) > 0 && entries[0].Seq <= st.seq {
				entries = entries[1:]
			}
			if contiguous(entries, start) == len(entries) {
				r.entries = entries
				return r, err
			}
		}
		// Read again after the state.
	}
}

// missing describes a gap at entries[gap] after start.
func (j *journal) missing(start uint64, entries []JournalEntry, gap int) error {
	last := start
	if gap > 0 {
		last = entries[gap-1].Seq
	}
	next := "(none listed)"
	if gap < len(entries) {
		next = strconv.FormatUint(entries[gap].Seq, 10)
	}
	return fmt.Errorf("stream %s: journal entry %d is missing (next entry: %s) and no compacted state covers it: %w",
		j.stream, last+1, next, envelope.ErrCorrupt)
}

// contiguous returns how many of entries follow seq without a gap.
func contiguous(entries []JournalEntry, seq uint64) int {
	for i, e := range entries {
		if e.Seq != seq+uint64(i)+1 {
			return i
		}
	}
	return len(entries)
}

// merge folds r into j.state (the caller holds j.mu): it adopts r's
// compacted state if that is ahead of the cache, then folds the entries not
// folded yet. It returns the entries it folded and whether it adopted a
// state (entries below it were never seen).
func (j *journal) merge(r journalRead) (folded []JournalEntry, jumped bool, err error) {
	if r.base != nil && r.base.seq > j.state.seq {
		j.state, jumped = r.base.clone(), true
	}
	for _, e := range r.entries {
		if e.Seq <= j.state.seq {
			continue
		}
		if aerr := j.state.apply(e); aerr != nil {
			return folded, jumped, fmt.Errorf("stream %s: journal entry %d: %w", j.stream, e.Seq, aerr)
		}
		folded = append(folded, e)
	}
	return folded, jumped, nil
}

// errEntryGone: a listed entry was deleted before it was read.
var errEntryGone = errors.New("journal entry deleted while reading")

// readAfter reads the entries after seq, in order, up to the first error.
func (j *journal) readAfter(ctx context.Context, seq uint64) ([]JournalEntry, error) {
	prefix := journalPrefix(j.stream)
	startAfter := ""
	if seq > 0 {
		startAfter = journalKey(j.stream, seq)
	}
	var read []JournalEntry
	for obj, err := range upload.Walk(ctx, j.store, prefix, startAfter) {
		if err != nil {
			return read, fmt.Errorf("stream %s: list journal: %w", j.stream, err)
		}
		n, err := strconv.ParseUint(strings.TrimPrefix(obj.Key, prefix), 10, 64)
		if err != nil || journalKey(j.stream, n) != obj.Key {
			return read, fmt.Errorf("stream %s: journal object %s: not an entry name: %w", j.stream, obj.Key, envelope.ErrCorrupt)
		}
		e, err := j.readEntry(ctx, obj.Key)
		if errors.Is(err, upload.ErrNotFound) {
			// Listed, then deleted: compaction collected it. What
			// follows is a gap, which read resolves from a state.
			return read, errEntryGone
		}
		if err != nil {
			return read, err
		}
		if e.Seq != n {
			return read, fmt.Errorf("stream %s: journal object %s holds entry %d: %w", j.stream, obj.Key, e.Seq, envelope.ErrCorrupt)
		}
		read = append(read, e)
	}
	return read, nil
}

// refreshLocked folds new entries into j.state and returns them, and
// whether it adopted a compacted state (skipping entries). The caller holds
// j.mu (append keeps it across its whole read-propose-write).
func (j *journal) refreshLocked(ctx context.Context) ([]JournalEntry, bool, error) {
	r, err := j.read(ctx, j.state.seq)
	folded, jumped, aerr := j.merge(r)
	return folded, jumped, errors.Join(aerr, err)
}

func (j *journal) readEntry(ctx context.Context, key string) (JournalEntry, error) {
	j.stats.EntriesRead.Add(1)
	data, err := readAll(ctx, j.store, key)
	if err != nil {
		return JournalEntry{}, fmt.Errorf("stream %s: read journal entry: %w", j.stream, err)
	}
	var e JournalEntry
	if err := envelope.Open(key, data, journalEntryKind, &e); err != nil {
		return JournalEntry{}, fmt.Errorf("stream %s: %w", j.stream, err)
	}
	return e, nil
}

// errNothingToAppend, returned by a proposal, ends an append successfully
// without writing: the state already says what the caller wanted.
var errNothingToAppend = errors.New("nothing to append")

// append writes the entry that propose builds from the newest state at the
// next position. If another writer takes that position first, it re-reads the
// journal and asks propose again, so a proposal always sees every entry
// before the one it writes. propose may return errNothingToAppend, or any
// other error to stop. append returns the entry as written, or the zero
// entry when nothing was appended.
//
// A write whose acknowledgement was lost (a timeout after the object was
// created) is recognised by its nonce when the journal is re-read.
func (j *journal) append(ctx context.Context, propose func(*journalState) (JournalEntry, error)) (JournalEntry, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	nonce := j.nonce()
	var lastErr error
	unknown := false // an attempt's outcome is unknown
	for failures := 0; failures < maxAppendFailures; {
		listed := j.now()
		read, jumped, err := j.refreshLocked(ctx)
		for _, e := range read {
			if e.Nonce == nonce {
				return j.appended(ctx, e) // an earlier attempt landed after all
			}
		}
		if err != nil {
			return JournalEntry{}, errors.Join(err, lastErr)
		}
		if jumped && unknown {
			// The cache jumped to a compacted state past entries it never
			// read: one of them may be the attempt whose outcome is
			// unknown. Say so rather than try again (and maybe twice).
			return JournalEntry{}, fmt.Errorf("stream %s: journal compacted past an append whose outcome is unknown: %w", j.stream, lastErr)
		}
		// Appends decide who may write and what is restorable: first make
		// sure the stream is still the one this journal belongs to.
		if err := j.checkCatalog(ctx); err != nil {
			return JournalEntry{}, err
		}
		e, err := propose(&j.state)
		if errors.Is(err, errNothingToAppend) {
			return JournalEntry{}, nil
		}
		if err != nil {
			return JournalEntry{}, err
		}
		e.Seq, e.Nonce, e.TimeMs, e.Incarnation = j.state.seq+1, nonce, j.now().UnixMilli(), j.incarnation
		// Validate against a copy first: a proposal that does not follow
		// from the state is a bug and must never reach the blob store.
		trial := j.state.clone()
		if err := trial.apply(e); err != nil {
			return JournalEntry{}, fmt.Errorf("stream %s: proposed %w", j.stream, err)
		}
		data, err := envelope.Seal(journalEntryKind, e)
		if err != nil {
			return JournalEntry{}, fmt.Errorf("stream %s: %w", j.stream, err)
		}
		key := journalKey(j.stream, e.Seq)
		err = j.store.PutIfAbsent(ctx, key, bytes.NewReader(data), int64(len(data)))
		if err == nil && j.now().Sub(listed) > j.appendBound {
			// The entry landed: finish the check even if the caller gave
			// up meanwhile, so a landed entry is not reported as failed.
			vctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			stale, verr := j.floorCovers(vctx, e.Seq)
			cancel()
			// No floor at or above the position: it was never deleted
			// (floors are recorded first), the put is good. A floor is
			// proof of a stale put only within grace/2 of the read.
			if verr == nil && stale && j.now().Sub(listed) > 2*j.appendBound {
				verr = fmt.Errorf("a journal floor covers it, %v after the journal read: %w", j.now().Sub(listed), upload.ErrTransient)
			}
			if verr != nil {
				// Landed, but maybe at a position compacted away: the
				// outcome is unknown (the caller re-reads).
				return JournalEntry{}, fmt.Errorf("stream %s: append journal entry %d: slow put, cannot verify its position: %w", j.stream, e.Seq, verr)
			}
			if stale {
				// The position was taken and compacted long ago: this
				// entry is outside the journal's order. Withdraw it.
				j.stats.Withdrawn.Add(1)
				if derr := j.store.Delete(ctx, key); derr != nil {
					return JournalEntry{}, fmt.Errorf("stream %s: withdraw stale journal entry %d: %w", j.stream, e.Seq, derr)
				}
				continue
			}
		}
		switch {
		case err == nil:
			j.state = trial
			return j.appended(ctx, e)
		case errors.Is(err, upload.ErrAlreadyExists):
			// Lost the race: re-read and decide again.
		case upload.IsTransient(err):
			// Unknown outcome: re-read; the nonce tells if it landed.
			failures++
			unknown = true
			lastErr = fmt.Errorf("stream %s: append journal entry %d: %w", j.stream, e.Seq, err)
			if ctx.Err() != nil {
				return JournalEntry{}, errors.Join(ctx.Err(), lastErr)
			}
		default:
			return JournalEntry{}, fmt.Errorf("stream %s: append journal entry %d: %w", j.stream, e.Seq, err)
		}
	}
	return JournalEntry{}, fmt.Errorf("stream %s: journal append gave up after %d failed attempts: %w", j.stream, maxAppendFailures, lastErr)
}

// appended finishes an append that landed: the appender of every
// compactEvery-th entry writes the compacted state there. Its error does not
// fail the append (the entry is in the journal); it is kept for stateErr,
// and garbage collection writes a state when the newest one lags.
func (j *journal) appended(ctx context.Context, e JournalEntry) (JournalEntry, error) {
	if j.state.seq == e.Seq && e.Seq%uint64(j.compactEvery) == 0 {
		st := j.state
		j.noteStateErr(j.writeState(ctx, &st))
	}
	return e, nil
}

// checkCatalog fails with ErrStreamNotFound, and marks the journal gone, if
// the stream was deleted or replaced by a new stream of the same name.
func (j *journal) checkCatalog(ctx context.Context) error {
	cfg, err := getStream(ctx, j.store, j.stream)
	if errors.Is(err, ErrStreamNotFound) || (err == nil && cfg.Incarnation != j.incarnation) {
		j.gone.Store(true)
		return fmt.Errorf("stream %s: deleted since this node read it: %w", j.stream, ErrStreamNotFound)
	}
	return err
}

func (j *journal) isGone() bool { return j.gone.Load() }

// snapshot returns a copy of the cached state, safe to read without locks.
func (j *journal) snapshot() journalState {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.state.clone()
}

// readAll fetches a whole small object.
func readAll(ctx context.Context, store upload.BlobStore, key string) ([]byte, error) {
	rc, err := store.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", key, err)
	}
	return data, nil
}
