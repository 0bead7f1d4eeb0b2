package crash

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

// Environment of a child run (set by the parent, see runChild).
const (
	envRole    = "DSTL_CRASH_ROLE" // "child"
	envData    = "DSTL_CRASH_DATA"
	envBlobs   = "DSTL_CRASH_BLOBS"
	envSeed    = "DSTL_CRASH_CHILD_SEED"
	envRound   = "DSTL_CRASH_ROUND"
	envStream  = "DSTL_CRASH_STREAM"
	envEpoch   = "DSTL_CRASH_EPOCH" // 0: open a new epoch; else resume it
	envProfile = "DSTL_CRASH_PROFILE"
)

// Workload profiles.
const (
	// profileUpload: a mix of buffered and local appends, persists and a few
	// checkpoints, with periodic flushes and slow (hedged) segment puts, so
	// that most kills land while a segment is being uploaded or the local log
	// is being fsynced.
	profileUpload = "upload"
	// profileCheckpoint: small appends, each followed by a checkpoint, with
	// latency on every blob-store call, so that most kills land inside
	// Checkpoint: its persist, its part write, or its journal append.
	profileCheckpoint = "checkpoint"
	// profileTruncate: appends, and persists each followed by a truncation
	// of everything persisted, with garbage collection running every few
	// milliseconds, so that released segments are deleted before a kill and
	// recovery has to rebuild the log's position without them.
	profileTruncate = "truncate"
)

// The child's protocol, one line per event on stdout, each written with one
// write call after the event:
//
//	OPEN                          node opened (local log recovered)
//	START <round> <epoch> <last>  writer opened or resumed; last = LastSQN
//	APPEND <mode> <first> <last>  about to call Append (SQNs predicted)
//	ACK buffered|local <first> <last>
//	ACK persist <upTo>
//	ACK checkpoint <id> <sqn>     complete; sqn = LastSQN read just before
//	TRUNCATE <before>             about to call Truncate
//	ACK truncate <before>
//	FAILED <op> <error>           a persist or checkpoint failed (not an
//	                              acknowledgement; the parent decides)
//	NOTE <text>
//	ERR <text>                    unexpected error; the child exits 3
//
// Only a line ending in '\n' counts: a kill may tear the last one.

// TestCrashChild is the child process of the crash tests; it does nothing
// unless the parent started it.
func TestCrashChild(t *testing.T) {
	if os.Getenv(envRole) != "child" {
		t.Skip("the child of the crash tests; started by TestCrash*")
	}
	os.Exit(childMain())
}

func emit(format string, args ...any) {
	// os.Stdout is unbuffered: one Write is one write(2) of a short line.
	_, _ = os.Stdout.Write(fmt.Appendf(nil, format+"\n", args...))
}

func childMain() (code int) {
	fail := func(format string, args ...any) int {
		emit("ERR "+format, args...)
		return 3
	}
	seed, err1 := strconv.ParseUint(os.Getenv(envSeed), 10, 64)
	round, err2 := strconv.Atoi(os.Getenv(envRound))
	epoch, err3 := strconv.ParseUint(os.Getenv(envEpoch), 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return fail("bad environment: %v", err)
	}
	stream, profile := os.Getenv(envStream), os.Getenv(envProfile)
	// The parent kills us long before this; it only guards against orphans.
	time.AfterFunc(90*time.Second, func() { emit("ERR child timed out"); os.Exit(4) })

	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, uint64(round)))
	base, err := file.Open(os.Getenv(envBlobs))
	if err != nil {
		return fail("blob store: %v", err)
	}
	opts := changelog.Options{DataDir: os.Getenv(envData), GCInterval: -1}
	opts.Scheduler.BatchDelay = time.Millisecond
	var faults faulty.Options
	switch profile {
	case profileUpload:
		opts.Scheduler.Interval = 15 * time.Millisecond
		opts.Scheduler.HedgeAfter = 25 * time.Millisecond
		faults = faulty.Options{Seed: seed, PerOp: map[faulty.Op]faulty.Faults{
			faulty.OpPut:      {Latency: 0.8, MaxDelay: 60 * time.Millisecond},
			faulty.OpGetRange: {Latency: 0.1, MaxDelay: 5 * time.Millisecond},
		}}
	case profileCheckpoint:
		opts.Scheduler.Interval = -1
		faults = faulty.Options{Seed: seed, All: faulty.Faults{Latency: 0.6, MaxDelay: 15 * time.Millisecond}}
	case profileTruncate:
		opts.Scheduler.Interval = 15 * time.Millisecond
		opts.GCInterval, opts.JournalRefresh = 5*time.Millisecond, 5*time.Millisecond
		// The grace must outlast an upload and its acknowledgement (it is
		// what keeps GC from deleting a segment before its log references
		// it); 300ms is a few rounds here.
		opts.GCGrace, opts.RetainCheckpoints = 300*time.Millisecond, 1
		faults = faulty.Options{Seed: seed, PerOp: map[faulty.Op]faulty.Faults{
			faulty.OpPut: {Latency: 0.5, MaxDelay: 20 * time.Millisecond},
		}}
	default:
		return fail("unknown profile %q", profile)
	}
	opts.Store = faulty.Wrap(base, faults)

	n, err := changelog.Open(ctx, opts)
	if err != nil {
		return fail("open node: %v", err)
	}
	emit("OPEN")
	full := keygroup.Full(keyGroups)
	var w *changelog.Writer
	if epoch == 0 {
		// An earlier run may have created the stream (and even opened an
		// epoch) before it was killed without telling us.
		if _, err := n.CreateStream(ctx, stream, keyGroups); err != nil && !errors.Is(err, changelog.ErrStreamExists) {
			return fail("create stream: %v", err)
		}
		w, err = n.OpenWriter(ctx, changelog.WriterConfig{Stream: stream, KeyGroups: full})
	} else {
		w, err = n.OpenWriter(ctx, changelog.WriterConfig{Stream: stream, KeyGroups: full, Resume: epoch})
	}
	if err != nil {
		return fail("open writer (resume %d): %v", epoch, err)
	}
	cps, err := n.Checkpoints(ctx, stream)
	if err != nil {
		return fail("checkpoints: %v", err)
	}
	nextID := uint64(1)
	if len(cps) > 0 {
		nextID = cps[len(cps)-1].ID + 1
	}
	emit("START %d %d %d", round, w.Epoch(), w.LastSQN())

	appendBatch := func(size int, d changelog.Durability) error {
		want := w.LastSQN() + 1 // we are the only appender
		emit("APPEND %v %d %d", d, want, want+uint64(size)-1)
		first, last, err := w.Append(ctx, batchFor(want, size, round), d)
		if err != nil {
			return fmt.Errorf("append %v: %w", d, err)
		}
		if first != want || last != want+uint64(size)-1 {
			return fmt.Errorf("append %v: got SQNs %d..%d, predicted %d..%d", d, first, last, want, want+uint64(size)-1)
		}
		emit("ACK %v %d %d", d, first, last)
		return nil
	}
	checkpoint := func() error {
		for {
			// Exact: only this goroutine appends, and Checkpoint persists
			// every change appended before it is called.
			last := w.LastSQN()
			res, err := w.Checkpoint(ctx, nextID, fmt.Appendf(nil, "sqn=%d", last))
			if errors.Is(err, changelog.ErrCheckpointTooOld) || errors.Is(err, changelog.ErrCheckpointConflict) {
				// A killed run recorded its part of this id (with another
				// SQN) without completing it: a client moves on to a new id.
				emit("NOTE checkpoint %d refused (%v); next id", nextID, err)
				nextID++
				continue
			}
			if err != nil {
				if !errors.Is(err, changelog.ErrFenced) {
					emit("FAILED checkpoint %d: %v", nextID, err)
					return nil
				}
				return fmt.Errorf("checkpoint %d: %w", nextID, err)
			}
			if !res.Complete {
				return fmt.Errorf("checkpoint %d: not complete with a single writer", nextID)
			}
			emit("ACK checkpoint %d %d", nextID, last)
			nextID++
			return nil
		}
	}
	// persist persists everything, then runs then (if not nil). A failed
	// persist is reported, not fatal: the parent judges it, and the next
	// persist retries.
	persist := func(then func(changelog.PersistHandle) error) error {
		h, err := w.Persist(ctx, 0)
		if err != nil {
			if errors.Is(err, changelog.ErrFenced) {
				return err
			}
			emit("FAILED persist: %v", err)
			return nil
		}
		emit("ACK persist %d", h.UpToSQN)
		if then != nil {
			return then(h)
		}
		return nil
	}
	durability := func(pLocal float64) changelog.Durability {
		if rng.Float64() < pLocal {
			return changelog.Local
		}
		return changelog.Buffered
	}
	for {
		var err error
		switch profile {
		case profileUpload:
			switch x := rng.Float64(); {
			case x < 0.80:
				err = appendBatch(1+rng.IntN(32), durability(0.4))
			case x < 0.93:
				err = persist(nil)
			default:
				err = checkpoint()
			}
		case profileCheckpoint:
			if err = appendBatch(1+rng.IntN(6), durability(0.3)); err == nil {
				err = checkpoint()
			}
		case profileTruncate:
			switch x := rng.Float64(); {
			case x < 0.6:
				err = appendBatch(1+rng.IntN(16), durability(0.3))
			case x < 0.95:
				err = persist(func(h changelog.PersistHandle) error {
					before := h.UpToSQN + 1
					emit("TRUNCATE %d", before)
					if err := w.Truncate(ctx, before); err != nil {
						return fmt.Errorf("truncate before %d: %w", before, err)
					}
					emit("ACK truncate %d", before)
					return nil
				})
			default:
				err = checkpoint()
			}
		}
		if err != nil {
			return fail("%v", err)
		}
	}
}
