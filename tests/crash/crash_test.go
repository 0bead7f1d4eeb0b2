package crash

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

// envCrashSeed reproduces a run's kill schedule and workload choices (the
// exact kill points also depend on timing).
const envCrashSeed = "DSTL_CRASH_SEED"

// crashConfig is one crash test's schedule.
type crashConfig struct {
	profile string
	// At least minRounds and at most maxRounds child runs, and no new round
	// once budget has passed.
	minRounds, maxRounds int
	budget               time.Duration
	// A round kills its child after a random time in [killMin, killMax)
	// counted from the child's START; with probability pEarly it kills at a
	// random time in [0, earlyMax) from the spawn instead, often while the
	// node is still recovering.
	killMin, killMax time.Duration
	pEarly           float64
	earlyMax         time.Duration
	// retain: the child keeps only this many newest checkpoints from
	// garbage collection (0: it collects no garbage), so only those, and
	// the verifier's final one, can still be restored.
	retain int
}

// TestCrashKillDuringUpload: a child appends (buffered and local), persists
// and checkpoints with slow, hedged segment uploads and is SIGKILLed at
// random moments; it restarts on the same data directory and resumes its
// epoch. Nothing acknowledged is lost, nothing is duplicated, the log is a
// gap-free prefix, and every checkpoint restores exactly what it covers.
func TestCrashKillDuringUpload(t *testing.T) {
	runCrashTest(t, crashConfig{
		profile: profileUpload, minRounds: 8, maxRounds: 40, budget: 7 * time.Second,
		killMin: 50 * time.Millisecond, killMax: 400 * time.Millisecond,
		pEarly: 0.2, earlyMax: 300 * time.Millisecond,
	})
}

// TestCrashKillDuringCheckpoint: the same with a checkpoint after every
// small append and latency on every blob-store call, so that kills land
// inside Checkpoint (persist, part write, journal append).
func TestCrashKillDuringCheckpoint(t *testing.T) {
	runCrashTest(t, crashConfig{
		profile: profileCheckpoint, minRounds: 6, maxRounds: 30, budget: 5 * time.Second,
		killMin: 30 * time.Millisecond, killMax: 300 * time.Millisecond,
		pEarly: 0.15, earlyMax: 300 * time.Millisecond,
	})
}

// TestCrashKillDuringTruncation: persists are followed by truncations of
// everything persisted, and garbage collection deletes the released
// segments while the child runs; after each kill recovery must still know
// where the log stands (no SQN reused, nothing acknowledged lost) and where
// it was truncated.
func TestCrashKillDuringTruncation(t *testing.T) {
	runCrashTest(t, crashConfig{
		profile: profileTruncate, minRounds: 6, maxRounds: 30, budget: 4 * time.Second,
		killMin: 30 * time.Millisecond, killMax: 300 * time.Millisecond,
		pEarly: 0.15, earlyMax: 300 * time.Millisecond, retain: 1,
	})
}

func crashSeed(t *testing.T) uint64 {
	if s := os.Getenv(envCrashSeed); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", envCrashSeed, s, err)
		}
		return seed
	}
	return uint64(time.Now().UnixNano())
}

func runCrashTest(t *testing.T, cfg crashConfig) {
	if testing.Short() {
		t.Skip("real-process crash test; skipped in -short mode")
	}
	seed := crashSeed(t)
	t.Logf("seed %d (%s=%d to reproduce)", seed, envCrashSeed, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d: reproduce with %s=%d go test -race -run '^%s$' ./tests/crash", seed, envCrashSeed, seed, t.Name())
		}
	})
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	dataDir, blobDir := t.TempDir(), t.TempDir()
	h := newHistory("crash-" + cfg.profile)
	began := time.Now()
	round := 0
	for round < cfg.maxRounds && (round < cfg.minRounds || time.Since(began) < cfg.budget) {
		round++
		early := rng.Float64() < cfg.pEarly
		var after time.Duration
		if early {
			after = time.Duration(rng.Int64N(int64(cfg.earlyMax)))
		} else {
			after = cfg.killMin + time.Duration(rng.Int64N(int64(cfg.killMax-cfg.killMin)))
		}
		run := runChild(t, childEnv{
			data: dataDir, blobs: blobDir, seed: rng.Uint64(), round: round,
			stream: h.stream, epoch: h.epoch, profile: cfg.profile,
		}, early, after)
		h.kills++
		if early {
			h.earlyKills++
		}
		if run.torn != "" {
			h.torn++
		}
		h.absorb(t, round, run)
		h.prevLines = run.lines
		if t.Failed() {
			return
		}
	}
	t.Logf("%d rounds, %d SIGKILLs (%d timed from spawn), %d torn lines, acks %v, %d checkpoints acknowledged; max durable SQN %d (%s), max SQN tried %d, truncated before %d; in %v",
		round, h.kills, h.earlyKills, h.torn, h.acks, len(h.checkpoints), h.maxDurable, h.maxDurableWhy, h.maxTried, h.truncAcked, time.Since(began).Round(time.Millisecond))
	verify(t, h, dataDir, blobDir, cfg.retain)
}

type childEnv struct {
	data, blobs string
	seed        uint64
	round       int
	stream      string
	epoch       uint64
	profile     string
}

type childRun struct {
	lines  []string // complete lines
	torn   string   // an incomplete last line (the kill tore it)
	stderr string
}

// runChild starts the child, kills it with SIGKILL `after` its START line
// (or its spawn, if fromSpawn), and returns what it printed. A child that
// exits on its own, or reports a data race, fails the test.
func runChild(t *testing.T, env childEnv, fromSpawn bool, after time.Duration) childRun {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.timeout=2m")
	cmd.Env = append(os.Environ(),
		envRole+"=child",
		envData+"="+env.data,
		envBlobs+"="+env.blobs,
		envSeed+"="+strconv.FormatUint(env.seed, 10),
		envRound+"="+strconv.Itoa(env.round),
		envStream+"="+env.stream,
		envEpoch+"="+strconv.FormatUint(env.epoch, 10),
		envProfile+"="+env.profile,
	)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	spawned := time.Now()

	var (
		mu      sync.Mutex
		run     childRun
		started = make(chan struct{})
		eof     = make(chan struct{})
	)
	go func() {
		defer close(eof)
		br := bufio.NewReader(out)
		seen := false
		for {
			s, err := br.ReadString('\n')
			if err != nil {
				mu.Lock()
				run.torn = s
				mu.Unlock()
				return
			}
			line := strings.TrimSuffix(s, "\n")
			mu.Lock()
			run.lines = append(run.lines, line)
			mu.Unlock()
			if !seen && strings.HasPrefix(line, "START ") {
				seen = true
				close(started)
			}
		}
	}()

	exitedEarly := false
	if fromSpawn {
		select {
		case <-time.After(after):
		case <-eof:
			exitedEarly = true
		}
	} else {
		select {
		case <-started:
			select {
			case <-time.After(after):
			case <-eof:
				exitedEarly = true
			}
		case <-eof:
			exitedEarly = true
		case <-time.After(30 * time.Second):
			t.Errorf("round %d: no START from the child after 30s", env.round)
		}
	}
	_ = cmd.Process.Kill() // SIGKILL on Unix
	<-eof
	werr := cmd.Wait()
	run.stderr = stderr.String()
	killed := false
	var ee *exec.ExitError
	if errors.As(werr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			killed = true
		}
	}
	if exitedEarly || !killed {
		t.Errorf("round %d: the child exited by itself (%v) after %v; stdout tail:\n%s\nstderr:\n%s",
			env.round, werr, time.Since(spawned), tail(run.lines, 15), run.stderr)
	}
	if strings.Contains(run.stderr, "DATA RACE") {
		t.Errorf("round %d: the child reported a data race:\n%s", env.round, run.stderr)
	}
	return run
}

func tail(lines []string, n int) string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// absorb checks one round's output against what earlier rounds acknowledged
// and adds its acknowledgements to the history.
func (h *history) absorb(t *testing.T, round int, run childRun) {
	t.Helper()
	bad := func(line, format string, args ...any) {
		t.Errorf("round %d: %q: %s", round, line, fmt.Sprintf(format, args...))
	}
	nums := func(line string, f []string, n int) []uint64 {
		if len(f) != n {
			bad(line, "want %d numbers", n)
			return make([]uint64, n)
		}
		out := make([]uint64, n)
		for i, s := range f {
			v, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				bad(line, "%v", err)
			}
			out[i] = v
		}
		return out
	}
	// The last APPEND announced: its durability and predicted SQNs.
	var appendMode string
	var appendFirst, appendLast uint64
	for _, line := range run.lines {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "OPEN":
		case "START":
			v := nums(line, f[1:], 3)
			if int(v[0]) != round {
				bad(line, "round %d", v[0])
			}
			if h.epoch == 0 {
				h.epoch = v[1]
			} else if v[1] != h.epoch {
				bad(line, "resumed epoch %d, asked for %d", v[1], h.epoch)
			}
			last := v[2]
			// Recovery must bring back every acknowledged durable change...
			if last < h.maxDurable {
				bad(line, "LOST: recovered up to SQN %d, but SQN %d was acknowledged durable (%s); the previous run ended with:\n%s",
					last, h.maxDurable, h.maxDurableWhy, tail(h.prevLines, 25))
			}
			// ...and nothing that was never appended.
			if last > h.maxTried {
				bad(line, "recovered up to SQN %d, but no SQN above %d was ever appended", last, h.maxTried)
			}
			h.starts = append(h.starts, start{round: round, last: last})
			h.maxTried = max(h.maxTried, last)
		case "APPEND":
			if len(f) != 4 {
				bad(line, "malformed")
				continue
			}
			v := nums(line, f[2:], 2)
			appendMode, appendFirst, appendLast = f[1], v[0], v[1]
			h.maxTried = max(h.maxTried, v[1])
		case "ACK":
			if len(f) < 2 {
				bad(line, "malformed")
				continue
			}
			h.acks[f[1]]++
			switch f[1] {
			case "buffered", "local":
				v := nums(line, f[2:], 2)
				if f[1] != appendMode || v[0] != appendFirst || v[1] != appendLast {
					bad(line, "does not match the announced APPEND %s %d %d", appendMode, appendFirst, appendLast)
				}
				if f[1] == "local" {
					h.durable(v[1], fmt.Sprintf("round %d: %s", round, line))
				}
			case "persist":
				v := nums(line, f[2:], 1)
				h.durable(v[0], fmt.Sprintf("round %d: %s", round, line))
			case "checkpoint":
				v := nums(line, f[2:], 2)
				if old, ok := h.checkpoints[v[0]]; ok {
					bad(line, "checkpoint %d acknowledged twice (first at SQN %d)", v[0], old)
				}
				h.checkpoints[v[0]] = v[1]
				h.durable(v[1], fmt.Sprintf("round %d: %s", round, line))
			case "truncate":
				v := nums(line, f[2:], 1)
				h.truncAcked = max(h.truncAcked, v[0])
			default:
				bad(line, "unknown acknowledgement")
			}
		case "TRUNCATE":
			v := nums(line, f[1:], 1)
			h.truncTried = max(h.truncTried, v[0])
		case "FAILED":
			// A persist or checkpoint failed: nothing was acknowledged, but
			// on a healthy local blob store it must not happen.
			bad(line, "a persist or checkpoint failed on a healthy blob store")
		case "NOTE":
			t.Logf("round %d: %s", round, line)
		case "ERR":
			bad(line, "the child failed")
		default:
			// Test framework output; the child prints none before it is killed.
		}
	}
}

// verify recovers the node in-process after the last kill and checks the
// log and every checkpoint against the history.
func verify(t *testing.T, h *history, dataDir, blobDir string, retain int) {
	t.Helper()
	ctx := context.Background()
	if h.epoch == 0 {
		t.Fatalf("no child ever opened its writer")
	}
	store, err := file.Open(blobDir)
	if err != nil {
		t.Fatal(err)
	}
	opts := changelog.Options{Store: store, DataDir: dataDir, GCInterval: -1}
	opts.Scheduler.BatchDelay = time.Millisecond
	n, err := changelog.Open(ctx, opts)
	if err != nil {
		t.Fatalf("recover node: %v", err)
	}
	full := keygroup.Full(keyGroups)
	w, err := n.OpenWriter(ctx, changelog.WriterConfig{Stream: h.stream, KeyGroups: full, Resume: h.epoch})
	if err != nil {
		n.Close(ctx)
		t.Fatalf("resume epoch %d: %v", h.epoch, err)
	}
	last := w.LastSQN()
	if last < h.maxDurable {
		t.Errorf("LOST: recovered up to SQN %d, but SQN %d was acknowledged durable (%s)", last, h.maxDurable, h.maxDurableWhy)
	}
	if last > h.maxTried {
		t.Errorf("recovered up to SQN %d, but no SQN above %d was ever appended", last, h.maxTried)
	}
	ph, err := w.Persist(ctx, 0)
	if err != nil || ph.UpToSQN != last {
		t.Fatalf("persist after recovery: %+v, %v (want up to %d)", ph, err, last)
	}

	// A truncated log refuses a replay of its released prefix.
	if h.truncAcked > 1 {
		for _, err := range w.Replay(ctx, 0, 0, full) {
			if !errors.Is(err, changelog.ErrLogTruncated) {
				t.Errorf("replay from 0 of a log truncated before %d (acknowledged): %v, want ErrLogTruncated", h.truncAcked, err)
			}
			break
		}
	}
	// The log is exactly 1..last (from the newest truncation point a child
	// may have recorded), each SQN once, each the change its run appended.
	want := max(h.truncTried, 1)
	for c, err := range w.Replay(ctx, want-1, 0, full) {
		if err != nil {
			t.Fatalf("replay: %v", err)
		}
		switch {
		case c.SQN < want:
			t.Errorf("DUPLICATE or out of order: SQN %d after %d", c.SQN, want-1)
		case c.SQN > want:
			t.Errorf("GAP: SQN %d follows %d", c.SQN, want-1)
		}
		if exp := h.expected(c.SQN); !sameChange(c, exp) {
			t.Errorf("SQN %d: got %s, want the change of round %d: kg=%d op=%v key=%q value=%q",
				c.SQN, describe(c), h.roundOf(c.SQN), exp.KeyGroup, exp.Op, exp.Key, exp.Value)
		}
		want = max(want, c.SQN+1)
	}
	if want-1 != last && !(last == 0 && want == 1) {
		t.Errorf("replay ends at SQN %d, the writer's LastSQN is %d", want-1, last)
	}

	// A final checkpoint of the resumed writer covers everything.
	cps, err := n.Checkpoints(ctx, h.stream)
	if err != nil {
		t.Fatal(err)
	}
	finalID := uint64(1)
	if len(cps) > 0 {
		finalID = cps[len(cps)-1].ID + 1
	}
	for {
		res, err := w.Checkpoint(ctx, finalID, fmt.Appendf(nil, "sqn=%d", last))
		if errors.Is(err, changelog.ErrCheckpointTooOld) || errors.Is(err, changelog.ErrCheckpointConflict) {
			// A killed child recorded its part of this id without
			// completing it: move on, as a client would.
			finalID++
			continue
		}
		if err != nil || !res.Complete {
			t.Fatalf("final checkpoint %d: %+v, %v", finalID, res, err)
		}
		break
	}
	h.checkpoints[finalID] = last
	if err := n.Close(ctx); err != nil {
		t.Errorf("close recovered node: %v", err)
	}
	if t.Failed() {
		return
	}

	// Every checkpoint restores, on a node with an empty disk, to exactly
	// the state of the changes it covers.
	fresh, err := changelog.Open(ctx, changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close(ctx)
	complete, err := fresh.Checkpoints(ctx, h.stream)
	if err != nil {
		t.Fatal(err)
	}
	isComplete := map[uint64]bool{}
	for _, cp := range complete {
		isComplete[cp.ID] = true
	}
	for id, sqn := range h.checkpoints {
		if !isComplete[id] {
			t.Errorf("LOST: checkpoint %d (SQN %d) was acknowledged but is not complete in the journal", id, sqn)
		}
	}
	restorable := 0 // complete[restorable:] must restore
	if retain > 0 {
		restorable = max(0, len(complete)-1-retain)
	}
	restored := 0
	for i, cp := range complete {
		parts, err := fresh.CheckpointParts(ctx, h.stream, cp.ID)
		if err != nil {
			t.Errorf("checkpoint %d: parts: %v", cp.ID, err)
			continue
		}
		if len(parts) != 1 {
			t.Errorf("checkpoint %d: %d parts, want 1", cp.ID, len(parts))
			continue
		}
		p := parts[0]
		upTo := p.UpToSQN
		if p.Epoch != h.epoch {
			t.Errorf("checkpoint %d: part of epoch %d, want %d", cp.ID, p.Epoch, h.epoch)
		}
		// The child read LastSQN just before Checkpoint and put it in the
		// metadata: with one appender it is exactly what the part covers.
		if got := string(p.Metadata); got != fmt.Sprintf("sqn=%d", upTo) {
			t.Errorf("checkpoint %d: part covers SQN %d, but LastSQN before Checkpoint was %s", cp.ID, upTo, got)
		}
		if sqn, ok := h.checkpoints[cp.ID]; ok && sqn != upTo {
			t.Errorf("checkpoint %d: acknowledged at SQN %d, its part covers %d", cp.ID, sqn, upTo)
		}
		if i < restorable {
			continue // no longer retained: its segments may be collected
		}
		got := state{}
		var restoreErr error
		for c, err := range fresh.RestoreChanges(ctx, h.stream, cp.ID, full) {
			if err != nil {
				restoreErr = err
				break
			}
			got.apply(c.KeyGroup, c.State, c.Op, c.Key, c.Value)
		}
		// Without snapshots (the materializer's, not built yet) a part whose
		// log was truncated cannot be restored: it must be refused, never
		// restored to a state that lacks the released prefix.
		if p.TruncatedBefore > 1 {
			if !errors.Is(restoreErr, changelog.ErrLogTruncated) {
				t.Errorf("checkpoint %d: log truncated before %d, restore gave %v, want ErrLogTruncated", cp.ID, p.TruncatedBefore, restoreErr)
			}
			continue
		}
		if restoreErr != nil {
			t.Fatalf("restore checkpoint %d: %v", cp.ID, restoreErr)
		}
		restored++
		if d := got.diff(h.stateOf(p.TruncatedBefore, upTo)); d != "" {
			t.Errorf("checkpoint %d (SQNs %d..%d) restores a wrong state: %s", cp.ID, p.TruncatedBefore, upTo, d)
		}
	}
	t.Logf("verified: log %d..%d gap-free without duplicates; %d complete checkpoints (%d acknowledged by children), %d of them retained and restored exactly",
		max(h.truncTried, 1), last, len(complete), len(h.checkpoints)-1, restored)
}
