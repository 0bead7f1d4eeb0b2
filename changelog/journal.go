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
	gone        atomic.Bool // the stream was deleted: this journal is dead

	mu    sync.Mutex // guards state; held across blob-store I/O to serialise appends
	state journalState
}

func newJournal(store upload.BlobStore, cfg StreamConfig, now func() time.Time, nonce func() string) *journal {
	st := newJournalState(cfg.KeyGroups)
	st.incarnation = cfg.Incarnation
	return &journal{store: store, stream: cfg.Name, incarnation: cfg.Incarnation, now: now, nonce: nonce, state: st}
}

// refresh reads and folds every entry after the cached position. The blob
// reads happen outside the lock, so concurrent refreshes (every writer of a
// checkpoint does one) run in parallel instead of queueing; entries another
// refresh folded meanwhile are skipped.
func (j *journal) refresh(ctx context.Context) error {
	j.mu.Lock()
	from := j.state.seq
	j.mu.Unlock()
	entries, err := j.readAfter(ctx, from)
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, e := range entries {
		if e.Seq <= j.state.seq {
			continue
		}
		if aerr := j.state.apply(e); aerr != nil {
			return errors.Join(fmt.Errorf("stream %s: journal entry %d: %w", j.stream, e.Seq, aerr), err)
		}
	}
	return err
}

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

// refreshLocked folds new entries into j.state and returns them. The
// caller holds j.mu (append keeps it across its whole read-propose-write).
func (j *journal) refreshLocked(ctx context.Context) ([]JournalEntry, error) {
	entries, err := j.readAfter(ctx, j.state.seq)
	for i, e := range entries {
		if aerr := j.state.apply(e); aerr != nil {
			return entries[:i], errors.Join(fmt.Errorf("stream %s: journal entry %d: %w", j.stream, e.Seq, aerr), err)
		}
	}
	return entries, err
}

func (j *journal) readEntry(ctx context.Context, key string) (JournalEntry, error) {
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
	for failures := 0; failures < maxAppendFailures; {
		read, err := j.refreshLocked(ctx)
		for _, e := range read {
			if e.Nonce == nonce {
				return e, nil // an earlier attempt landed after all
			}
		}
		if err != nil {
			return JournalEntry{}, errors.Join(err, lastErr)
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
		switch {
		case err == nil:
			j.state = trial
			return e, nil
		case errors.Is(err, upload.ErrAlreadyExists):
			// Lost the race: re-read and decide again.
		case upload.IsTransient(err):
			// Unknown outcome: re-read; the nonce tells if it landed.
			failures++
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
