package crash

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// envTwoMatRounds runs TestMaterializeTwoMaterializers for exactly this many
// rounds (default: 8 to 14 within a 40 s budget). With DSTL_CRASH_SEED it
// reproduces a run's decisions (kill moments, recreations, workload); the
// exact interleaving also depends on timing.
const envTwoMatRounds = "DSTL_MAT2_ROUNDS"

// TestMaterializeTwoMaterializers: two real `dstl materialize` processes,
// each with its own data directory, on one blob store: A long-running
// (snapshots every 250 ms, file collection every 300 ms), B a loop of
// overlapping `--once` runs. Both are SIGKILLed at seeded random moments and
// restarted, while the parent (the stream's only writer) appends,
// checkpoints, marks and releases retention, adopts snapshots and collects
// garbage, and in some rounds closes its writer, deletes the stream and
// creates it again (a new incarnation: the model starts over, and a record of the old incarnation must never be
// used by, nor block, the new one). Grace periods and round leases are 1 s
// (the minimum lease; ReleasedGrace ≥ the publication time two concurrent
// materializers need), so records and files really are collected during the
// test.
//
// After every round both processes are stopped (SIGKILL, or SIGTERM and a
// clean exit) and TestMaterializeCrash's checks run: every snapshot record
// of the current incarnation covers exactly its checkpoint and has its
// files, the newest never goes away, every retained checkpoint plans, every
// object its plan reads exists, and new plans are restored on an empty
// store in a helper process and compared with the model key by key. At the
// end, after clean runs of both materializers until nothing changes: every
// retained checkpoint restored again, and the blob store holds exactly the
// records, SST files and segments the retained checkpoints and the writer
// need (a record of an old incarnation, or a lease, is a leak), and no
// spool file is left in either data directory.
func TestMaterializeTwoMaterializers(t *testing.T) {
	if testing.Short() {
		t.Skip("real-process test of two materializers; skipped in -short mode")
	}
	cfg := matConfig{
		keys: 50_000, mergeKeys: 2_000, churn: 3_000,
		minRounds: 8, maxRounds: 14, budget: 40 * time.Second,
		retain: 2, segGrace: 5 * time.Millisecond, fileGrace: time.Second,
	}
	if s := os.Getenv(envTwoMatRounds); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number of rounds", envTwoMatRounds, s)
		}
		cfg.minRounds, cfg.maxRounds = n, n
	}
	seed := crashSeed(t)
	t.Logf("seed %d (%s=%d to reproduce)", seed, envCrashSeed, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d: reproduce with %s=%d go test -run '^%s$' -v ./tests/crash", seed, envCrashSeed, seed, t.Name())
		}
	})
	x := &twoMatRig{matRig: newMatRig(t, cfg, seed), lease: matRoundLease, failures: map[string]int{}, outcomes: map[string]int{},
		master: rand.New(rand.NewPCG(seed, 0x2a7))}
	// newMatRig passes --snapshot-round-lease matRoundLease already.
	x.dirA, x.dirB = x.matRig.matDir, t.TempDir()
	t.Logf("materializers: A: dstl materialize %s; B: dstl materialize --once %s",
		strings.Join(x.argsA(), " "), strings.Join(x.matRig.gcFlags, " "))
	x.run()
}

// twoMatRig is matRig (writer, model, verifier, helper, checks) with two
// materializers: A in matRig.matDir, B in dirB.
type twoMatRig struct {
	*matRig
	dirA, dirB string
	lease      time.Duration
	// master draws each round's plan; the writer's steps (matRig.rng)
	// are reseeded from it every round, so a seed reproduces every
	// round's decisions however many steps the previous ones took.
	master *rand.Rand

	// Figures (owned by the test goroutine; B's loop hands its own back).
	recreations, busyRetries int
	markersCleared           atomic.Int64
	recreated                bool // in this round
	killsA, termsA, startsA  int
	runsB, killsB            int
	// outcomes counts how each process ended; failures the distinct
	// failure lines (exits that were neither a kill nor a success, and
	// warnings of A) by their error text.
	outcomes map[string]int
	failures map[string]int
}

// argsA are the long-running materializer's arguments (without --once).
func (x *twoMatRig) argsA() []string {
	return append([]string{"--materialize-interval", "250ms", "--materialize-jitter", "0", "--gc-interval", "300ms"}, x.matRig.gcFlags...)
}

// matProc is one running `dstl materialize`.
type matProc struct {
	name    string
	cmd     *exec.Cmd
	out     *lineWriter
	stderr  bytes.Buffer // read only after exited
	exited  chan struct{}
	err     error
	killed  bool
	started time.Time
}

func (x *twoMatRig) start(name, dir string, once bool) (*matProc, error) {
	args := []string{"materialize", "--blob", x.blobRoot, "--data-dir", dir, "--stream", matStream, "--log-level", "warn"}
	if once {
		args = append(args, "--once")
		args = append(args, x.matRig.gcFlags...)
	} else {
		args = append(args, x.argsA()...)
	}
	p := &matProc{name: name, out: &lineWriter{reported: make(chan struct{})}, exited: make(chan struct{})}
	p.cmd = exec.Command(x.bin, args...)
	p.cmd.Env = matChildEnv()
	p.cmd.Stdout, p.cmd.Stderr = p.out, &p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", x.bin, err)
	}
	p.started = time.Now()
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// kill SIGKILLs the process (by its pid) and waits for it.
func (p *matProc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	p.killed = true
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// stop sends SIGTERM and waits (at most limit, then SIGKILL): a clean stop
// must exit 0.
func (p *matProc) stop(limit time.Duration) error {
	// A SIGTERM before the process installed its handler kills it
	// (nothing is done yet): let it start first.
	time.Sleep(time.Until(p.started.Add(500 * time.Millisecond)))
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return p.err
	case <-time.After(limit):
		p.kill()
		return fmt.Errorf("%s did not stop within %v of SIGTERM", p.name, limit)
	}
}

// outcome classifies an exited process: "killed", "ok" or "failed", with
// its failure lines (stdout ": failed:" lines and stderr WARN/ERROR lines).
func (p *matProc) outcome() (string, []string) {
	var bad []string
	for _, l := range p.out.snapshot() {
		if strings.Contains(l, ": failed:") {
			bad = append(bad, l)
		}
	}
	for _, l := range strings.Split(p.stderr.String(), "\n") {
		if strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
			bad = append(bad, l)
		}
	}
	var ee *exec.ExitError
	switch {
	case p.killed && errors.As(p.err, &ee) && ee.Sys().(syscall.WaitStatus).Signaled():
		return "killed", bad
	case p.err == nil:
		return "ok", bad
	}
	return "failed", append(bad, fmt.Sprintf("exit: %v; stderr: %s", p.err, strings.TrimSpace(p.stderr.String())))
}

// failureKind strips what differs between two occurrences of one failure
// (times, nonces, numbers) so that they are counted together.
func failureKind(line string) string {
	if _, rest, ok := strings.Cut(line, "err="); ok {
		line = rest
	} else if _, rest, ok := strings.Cut(line, ": failed: "); ok {
		line = rest
	}
	var b strings.Builder
	digits := false
	for _, c := range line {
		if c >= '0' && c <= '9' || c >= 'a' && c <= 'f' && digits {
			if !digits {
				b.WriteByte('#')
			}
			digits = true
			continue
		}
		digits = false
		b.WriteRune(c)
	}
	return b.String()
}

// note records how a process ended; it returns its failure lines.
func (x *twoMatRig) note(p *matProc) []string {
	kind, bad := p.outcome()
	x.outcomes[p.name+" "+kind]++
	for _, l := range bad {
		x.failures[failureKind(l)]++
	}
	return bad
}

// clearDeadMarkers removes the GC round markers (gc/<node id>/…) of the
// materializer in dir, which the caller killed: the process is gone, and
// the file store has nothing of it in flight, so its round can delete
// nothing more. A node restarted after kill -9 does not remove them
// itself; every RetainCheckpoint would then wait GCMaxRound plus the clock
// skew margin (3 min) for them, as documented (issue 9 S6), which most
// runs of this test would hit. Called before the next process starts on
// dir.
func (x *twoMatRig) clearDeadMarkers(dir string) error {
	id, err := os.ReadFile(filepath.Join(dir, "node", "node-id"))
	if errors.Is(err, os.ErrNotExist) {
		return nil // killed before its node opened
	} else if err != nil {
		return err
	}
	keys, err := listKeys(x.ctx, x.blob, "gc/"+strings.TrimSpace(string(id))+"/")
	if err != nil {
		return err
	}
	for k := range keys {
		if err := x.blob.Delete(x.ctx, k); err != nil {
			return err
		}
		x.markersCleared.Add(1)
	}
	return nil
}

// roundPlan is what a round does, drawn from the seed before it starts.
type roundPlan struct {
	dur time.Duration
	// killA: SIGKILL A this long into the round (and restart it); 0: no.
	killA time.Duration
	// endA: at the end A gets SIGKILL (else SIGTERM); endB: B's run in
	// flight at the end is killed (else awaited).
	endA, endB bool
	// recreate: delete and recreate the stream after this many writer
	// steps (-1: no).
	recreate     int
	seedB, seedW uint64
}

func (x *twoMatRig) plan(round int) roundPlan {
	rng := x.master
	p := roundPlan{dur: time.Second + time.Duration(rng.Int64N(int64(2500*time.Millisecond))), recreate: -1, seedB: rng.Uint64(), seedW: rng.Uint64()}
	if rng.IntN(2) == 0 {
		p.killA = time.Duration(rng.Int64N(int64(p.dur)))
	}
	p.endA, p.endB = rng.IntN(10) < 7, rng.IntN(2) == 0
	if round > 1 && rng.IntN(4) == 0 {
		p.recreate = rng.IntN(3)
	}
	return p
}

func (x *twoMatRig) run() {
	t := x.t
	began := time.Now()
	round := 0
	for round < x.cfg.maxRounds && (round < x.cfg.minRounds || time.Since(began) < x.cfg.budget) {
		round++
		x.stage = fmt.Sprintf("round %d", round)
		p := x.plan(round)
		t0 := time.Now()
		if err := x.round(round, p); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		t1 := time.Now()
		if testing.Verbose() {
			t.Logf("round %d (%v, took %v, kill A at %v, end A by %s, recreate after step %d): incarnation %d, checkpoint %d (SQN %d)",
				round, p.dur.Round(time.Millisecond), t1.Sub(t0).Round(time.Millisecond), p.killA.Round(time.Millisecond), map[bool]string{true: "SIGKILL", false: "SIGTERM"}[p.endA],
				p.recreate, x.recreations+1, x.lastID, x.model.sqn)
		}
		x.recreated = false
		x.warmVerifier()
		x.check(round, false)
		x.tChild += t1.Sub(t0)
		x.tCheck += time.Since(t1)
		if t.Failed() {
			return
		}
	}
	x.finish2(round)
	t.Logf("%d rounds, %d recreations (%d CreateStream retries after ErrStreamBusy), %d GC round markers of killed materializers removed, incarnation checkpoint %d, SQN %d; A: %d starts, %d mid-round kills, %d SIGTERMs; B: %d runs, %d killed; outcomes %v; "+
		"snapshots published by B: %d full, %d delta; the writer's node deleted %d records, %d segments; %d full restores, %d plans checked by shape, %d by object existence; in %v (rounds %v, checks %v of which the helper %v)",
		round, x.recreations, x.busyRetries, x.markersCleared.Load(), x.lastID, x.model.sqn, x.startsA, x.killsA, x.termsA, x.runsB, x.killsB, x.outcomes,
		x.fullSnaps, x.deltaSnaps, x.writerRecordsGone, x.segsCollected, x.fullRestores, x.structuralChecks, x.objectChecks,
		time.Since(began).Round(time.Millisecond), x.tChild.Round(time.Millisecond), x.tCheck.Round(time.Millisecond), x.tHelper.Round(time.Millisecond))
	if len(x.failures) > 0 {
		var lines []string
		for _, k := range slices.Sorted(maps.Keys(x.failures)) {
			lines = append(lines, fmt.Sprintf("%4d× %s", x.failures[k], k))
		}
		t.Logf("materializer failures and warnings during the rounds (tolerated: runs race each other, kills and recreations):\n%s", strings.Join(lines, "\n"))
	}
}

// warmVerifier: after a recreation the verifier's cached view of the
// stream is stale, and its first listing says so (ErrStreamNotFound; the
// next call reads the new stream).
func (x *twoMatRig) warmVerifier() {
	if _, err := x.verifier.Snapshots(x.ctx, matStream); err != nil && !errors.Is(err, changelog.ErrStreamNotFound) {
		x.t.Fatalf("snapshots: %v", err)
	}
}

// round runs A, B's loop and the writer for p.dur, then stops both
// materializers.
func (x *twoMatRig) round(round int, p roundPlan) error {
	deadline := time.Now().Add(p.dur)
	x.rng = rand.New(rand.NewPCG(p.seedW, 0x3a7e))
	a, err := x.start("A", x.dirA, false)
	if err != nil {
		return err
	}
	x.startsA++

	// B: --once runs back to back, each killed at a uniform moment of a
	// typical run or left to finish.
	type bResult struct {
		runs, kills int
		procs       []*matProc
		err         error
	}
	bDone := make(chan bResult, 1)
	go func() {
		rng := rand.New(rand.NewPCG(p.seedB, 0xb))
		var res bResult
		defer func() { bDone <- res }()
		for time.Now().Before(deadline) {
			b, err := x.start("B", x.dirB, true)
			if err != nil {
				res.err = err
				return
			}
			res.runs++
			res.procs = append(res.procs, b)
			var kill <-chan time.Time
			if rng.IntN(2) == 0 {
				kill = time.After(time.Duration(rng.Int64N(int64(1500 * time.Millisecond))))
			}
			select {
			case <-b.exited:
			case <-kill:
				b.kill()
				res.kills++
			case <-time.After(time.Until(deadline)):
				if p.endB {
					b.kill()
					res.kills++
				} else {
					<-b.exited
				}
			}
			if b.killed {
				if res.err = x.clearDeadMarkers(x.dirB); res.err != nil {
					return
				}
			}
			if b.killed || b.err != nil {
				continue
			}
			time.Sleep(time.Duration(rng.Int64N(int64(100 * time.Millisecond))))
		}
	}()

	// The writer: steps until the deadline, the recreation among them.
	wDone := make(chan error, 1)
	wrng := rand.New(rand.NewPCG(p.seedW, 0x3))
	go func() {
		wDone <- func() error {
			for step := 0; step == 0 || time.Now().Before(deadline); step++ {
				if step == p.recreate {
					if err := x.recreate(); err != nil {
						return fmt.Errorf("recreate: %w", err)
					}
					continue
				}
				began := time.Now()
				if err := x.writerStep(true); err != nil {
					return err
				}
				if d := time.Since(began); d > 5*time.Second {
					markers, _ := listKeys(x.ctx, x.blob, "gc/")
					x.t.Logf("round %d: a writer step took %v (GC round markers now: %v)", round, d.Round(time.Millisecond), slices.Sorted(maps.Keys(markers)))
				}
				// A few checkpoints a second, not a tight loop.
				time.Sleep(time.Duration(50+wrng.IntN(150)) * time.Millisecond)
			}
			return nil
		}()
	}()

	// A: killed mid-round (and restarted), then stopped at the deadline.
	var procsA []*matProc
	if p.killA > 0 {
		time.Sleep(p.killA)
		a.kill()
		x.killsA++
		procsA = append(procsA, a)
		if err := x.clearDeadMarkers(x.dirA); err != nil {
			return err
		}
		if a, err = x.start("A", x.dirA, false); err != nil {
			return err
		}
		x.startsA++
	}
	time.Sleep(time.Until(deadline))
	if p.endA {
		a.kill()
		if err := x.clearDeadMarkers(x.dirA); err != nil {
			return err
		}
	} else {
		x.termsA++
		if err := a.stop(15 * time.Second); err != nil {
			x.t.Errorf("round %d: A after SIGTERM: %v\nstderr:\n%s", round, err, a.stderr.String())
		}
	}
	procsA = append(procsA, a)
	werr := <-wDone
	b := <-bDone
	x.runsB += b.runs
	x.killsB += b.kills
	for _, q := range append(procsA, b.procs...) {
		x.note(q)
		for _, l := range q.out.snapshot() {
			switch {
			case strings.Contains(l, "(full)"):
				x.fullSnaps++
			case strings.Contains(l, "(delta)"):
				x.deltaSnaps++
			}
		}
	}
	return errors.Join(werr, b.err)
}

// recreate closes the writer, deletes the stream and creates it again
// (deleting again while a materializer of the old incarnation still stores
// a file or lease under the name: ErrStreamBusy), opens a new writer and
// loads it; the model starts over at checkpoint 1.
func (x *twoMatRig) recreate() error {
	ctx := x.ctx
	if err := x.w.Close(ctx); err != nil {
		return fmt.Errorf("close writer: %w", err)
	}
	for attempt := 0; ; attempt++ {
		if err := x.node.DeleteStream(ctx, matStream); err != nil {
			return fmt.Errorf("delete stream: %w", err)
		}
		_, err := x.node.CreateStream(ctx, matStream, matKeyGroups)
		if err == nil {
			break
		}
		if !errors.Is(err, changelog.ErrStreamBusy) || attempt >= 50 {
			return fmt.Errorf("create stream (attempt %d): %w", attempt+1, err)
		}
		x.busyRetries++
		time.Sleep(10 * time.Millisecond)
	}
	w, err := x.node.OpenWriter(ctx, changelog.WriterConfig{Stream: matStream, KeyGroups: keygroup.Full(matKeyGroups)})
	if err != nil {
		return fmt.Errorf("open writer: %w", err)
	}
	x.w = w
	x.recreations++
	x.recreated = true
	x.model = newMatModel(x.work)
	x.models, x.sqnOf, x.marked = map[uint64]*matModel{}, map[uint64]uint64{}, map[uint64]bool{}
	x.verified, x.verifiedSnaps = map[string]bool{}, map[string]bool{}
	x.published = 0
	x.lastID = 0 // the new incarnation numbers its checkpoints from 1 again
	if err := x.appendOps(matLoadOps(x.work)); err != nil {
		return err
	}
	return x.checkpoint()
}

// finish2: clean runs of B and A (--once), with the writer node's
// collection after each, until two in a row change nothing under the
// stream's snapshots/, sst/ and sst-leases/; then every retained checkpoint
// is restored again and nothing may have leaked.
func (x *twoMatRig) finish2(round int) {
	t := x.t
	if err := x.writerStep(false); err != nil {
		t.Fatalf("final writer step: %v", err)
	}
	// Leases of killed rounds expire, files of killed rounds age past
	// GCGrace.
	time.Sleep(x.lease + x.cfg.fileGrace)
	prev := x.snapshotObjects()
	for i, quiet := 1, 0; quiet < 2; i++ {
		if i > 10 {
			t.Fatalf("snapshot objects still change after %d clean rounds of both materializers", i-1)
		}
		x.stage = fmt.Sprintf("final run %d", i)
		for _, m := range []struct{ name, dir string }{{"B", x.dirB}, {"A", x.dirA}} {
			p, err := x.start(m.name, m.dir, true)
			if err != nil {
				t.Fatal(err)
			}
			<-p.exited
			if kind, bad := p.outcome(); kind != "ok" || len(bad) > 0 {
				t.Fatalf("final run %d of %s on a quiet blob store: %s %v\nstdout:\n%s", i, m.name, kind, bad, strings.Join(p.out.snapshot(), "\n"))
			} else if testing.Verbose() {
				t.Logf("final run %d of %s: %s", i, m.name, strings.Join(p.out.snapshot(), "; "))
			}
		}
		if err := x.collectWriterGarbage(); err != nil {
			t.Fatal(err)
		}
		now := x.snapshotObjects()
		if maps.Equal(now, prev) {
			quiet++
		} else {
			quiet = 0
		}
		prev = now
		time.Sleep(x.cfg.fileGrace + 100*time.Millisecond)
	}
	x.warmVerifier()
	x.check(round+1, true)
	x.checkLeaks()
	x.checkLeaks2()
}

// snapshotObjects lists every key under the stream's snapshots/, sst/ and
// sst-leases/.
func (x *twoMatRig) snapshotObjects() map[string]bool {
	out := map[string]bool{}
	for _, dir := range []string{"snapshots/", "sst/", "sst-leases/"} {
		keys, err := listKeys(x.ctx, x.blob, "streams/"+matStream+"/"+dir)
		if err != nil {
			x.t.Fatal(err)
		}
		for k := range keys {
			out[k] = true
		}
	}
	return out
}

// checkLeaks2 adds to checkLeaks (which sees records through the node,
// so not one of another incarnation, and the spool of A only): the raw
// snapshots/ listing holds only the records the node lists, no lease is
// left, and B's spool is empty too.
func (x *twoMatRig) checkLeaks2() {
	t, ctx := x.t, x.ctx
	snaps, err := x.verifier.Snapshots(ctx, matStream)
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, s := range snaps {
		listed[s.Key()] = true
	}
	raw, err := listKeys(ctx, x.blob, "streams/"+matStream+"/snapshots/")
	if err != nil {
		t.Fatal(err)
	}
	if extra := sortedDiff(raw, listed); len(extra) > 0 {
		t.Errorf("LEAK: snapshot records the node does not list (of another incarnation, or unreadable): %v", extra)
	}
	leases, err := listKeys(ctx, x.blob, "streams/"+matStream+"/sst-leases/")
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) > 0 {
		t.Errorf("LEAK: round leases left after clean runs (%v after the last kill): %v", x.lease, slices.Sorted(maps.Keys(leases)))
	}
	if spool := readNames(filepath.Join(x.dirB, "stores", "spool")); len(spool) > 0 {
		t.Errorf("LEAK: %d spool files left in B's data directory: %v", len(spool), slices.Sorted(maps.Keys(spool)))
	}
	// Local stores of deleted incarnations are caches; report them.
	for _, d := range []string{x.dirA, x.dirB} {
		stores, _ := filepath.Glob(filepath.Join(d, "stores", "*-*"))
		var dirs []string
		for _, s := range stores {
			if info, err := os.Stat(s); err == nil && info.IsDir() {
				dirs = append(dirs, filepath.Base(s))
			}
		}
		t.Logf("local stores in %s after %d recreations: %v", d, x.recreations, dirs)
	}
}
