package crash

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/toolbin"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestMaterializeCrash: the real `dstl materialize --once` binary (built
// once per run, without -race) is SIGKILLed at seeded random moments while
// it folds a stream's newest checkpoint into its local Pebble store (or
// rebuilds that store from the newest snapshot), exports and uploads the
// snapshot's SST file, publishes the snapshot record, and collects garbage
// (snapshot records nothing uses, then snapshot files unreferenced in two
// listings a grace period apart; every grace period is a few ms, and the
// sightings persist in its data directory, so consecutive runs progress).
// Between runs, and in a third of the rounds while the run goes on, the
// parent (a changelog node with the stream's only writer) appends
// overwrites, deletes, merges and clears over a 200k-key state of 100-byte
// values, completes checkpoints, marks and releases some; between runs it
// also adopts the published snapshots (its log is truncated below them)
// and collects its garbage, so the changelog really shrinks and old
// snapshots really die.
//
// After every run, killed or not:
//   - every snapshot record covers exactly its checkpoint's SQN, and its
//     files exist; the newest record never goes away;
//   - every retained checkpoint (the newest RetainCheckpoints and the
//     marked ones) plans, and everything its plan reads exists; a plan
//     on a snapshot not yet verified is restored on an empty store
//     (snapshot import, then the replay renumbered) in a helper process
//     and compared with the parent's model of that checkpoint, key by
//     key (merges make a change folded twice, or lost, visible); a plan on
//     verified snapshots must replay exactly the log from the snapshot's
//     SQN to the checkpoint's.
//
// At the end, after clean runs until two in a row delete no record: every
// retained checkpoint is restored and compared again, and the blob store
// holds exactly the snapshot records retained checkpoints use plus the
// newest, exactly the SST files they reference, exactly the segments the
// retained checkpoints and the writer need, and the materializer's spool
// is empty.
//
// Kills are aimed at phases the parent sees from outside (polling the file
// system: the store's LOCK file, its import staging, the materializer's
// spool, the blob store's temporary files, the SST files and the snapshot
// records) and classified afterwards from what the killed run left behind;
// the counts per phase are logged. A run that fails (exits non-zero) fails
// the test, after one more run shows whether the materializer recovers.
func TestMaterializeCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("real-process crash test of the materializer; skipped in -short mode")
	}
	cfg := matConfig{
		keys: 200_000, mergeKeys: 3_000, churn: 6_000,
		minRounds: 20, maxRounds: 40, budget: 30 * time.Second,
		retain: 2, segGrace: 5 * time.Millisecond, fileGrace: 5 * time.Millisecond,
	}
	seed := crashSeed(t)
	t.Logf("seed %d (%s=%d to reproduce)", seed, envCrashSeed, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d: reproduce with %s=%d go test -run '^%s$' -v ./tests/crash", seed, envCrashSeed, seed, t.Name())
		}
	})
	newMatRig(t, cfg, seed).run()
}

// matConfig sizes the materializer crash test.
type matConfig struct {
	keys, mergeKeys int
	// churn is the mean number of changes appended before each checkpoint.
	churn int
	// At least minRounds and at most maxRounds materializer runs, and no
	// new round once budget has passed.
	minRounds, maxRounds int
	budget               time.Duration
	// retain is the writer node's RetainCheckpoints; segGrace its GCGrace.
	retain   int
	segGrace time.Duration
	// fileGrace is the materializer's --snapshot-gc-grace.
	fileGrace time.Duration
}

const matStream = "mat"

// buildDstl builds ./cmd/dstl into dir (without -race: the child is the
// product, the test binary is what the race detector watches).
func buildDstl(ctx context.Context, dir string) (string, time.Duration, error) {
	root, err := toolbin.RepoRoot()
	if err != nil {
		return "", 0, err
	}
	bin := filepath.Join(dir, "dstl")
	start := time.Now()
	// "go test" puts its toolchain's bin directory first in PATH.
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/dstl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", 0, fmt.Errorf("go build ./cmd/dstl: %w\n%s", err, out)
	}
	return bin, time.Since(start), nil
}

// releasedGraceFlag returns the flag of `dstl materialize` that sets how
// long a snapshot file released by a deleted record is kept (if it has
// one): the test sets every grace period to a few milliseconds.
func releasedGraceFlag(ctx context.Context, bin string) string {
	out, _ := exec.CommandContext(ctx, bin, "materialize", "--help").Output()
	return releasedGraceRE.FindString(string(out))
}

var releasedGraceRE = regexp.MustCompile(`--[a-z-]*released[a-z-]*grace[a-z-]*`)

// matRoundLease is the materializer's --snapshot-round-lease (its minimum).
const matRoundLease = time.Second

// Kill targets: what the parent waits for before it kills a run.
type matTarget int

const (
	tgtNone          matTarget = iota // let the run finish
	tgtAnytime                        // a uniform time after the spawn
	tgtExport                         // a random time after an SST starts spooling
	tgtUpload                         // as soon as an SST's PutIfAbsent is seen
	tgtBeforePublish                  // as soon as a new SST object exists and no export runs
	tgtAfterPublish                   // as soon as the new snapshot record exists
	tgtGC                             // a few ms after the run reported its snapshot
	tgtRecordGC                       // as soon as a snapshot record was deleted
	tgtFileGC                         // as soon as an SST file was deleted
	tgtImport                         // a random time after a snapshot import starts staging files
	tgtRebuild                        // as soon as the store's LOCK file vanishes (removed to rebuild it)
)

var matTargetNames = map[matTarget]string{
	tgtNone: "none", tgtAnytime: "anytime", tgtExport: "export", tgtUpload: "upload",
	tgtBeforePublish: "before-publish", tgtAfterPublish: "after-publish", tgtGC: "gc",
	tgtRecordGC: "record-gc", tgtFileGC: "file-gc", tgtImport: "import", tgtRebuild: "rebuild",
}

// matTargetWeights: how often each target is drawn (percent).
var matTargetWeights = []struct {
	t matTarget
	w int
}{
	{tgtNone, 6}, {tgtAnytime, 14}, {tgtExport, 10}, {tgtUpload, 10}, {tgtBeforePublish, 11},
	{tgtAfterPublish, 10}, {tgtGC, 8}, {tgtRecordGC, 11}, {tgtFileGC, 10}, {tgtImport, 5}, {tgtRebuild, 5},
}

// Phases a run can be killed in, as classified from what it left behind.
const (
	phStartup     = "open/plan/fold (nothing exported yet)"
	phRebuild     = "store being removed for a rebuild"
	phImport      = "snapshot import (files staged)"
	phExport      = "export: spooling an SST"
	phUpload      = "export: SST PutIfAbsent in flight"
	phPrePublish  = "SSTs uploaded, record not yet written"
	phPublish     = "record PutIfAbsent in flight"
	phPostPublish = "record published, GC not started"
	phGC          = "GC, nothing deleted yet"
	phRecordGC    = "GC: snapshot records deleted"
	phFileGC      = "GC: SST files deleted"
	phCompleted   = "completed (not killed)"
	phFailed      = "failed"
)

var matPhaseOrder = []string{phStartup, phRebuild, phImport, phExport, phUpload, phPrePublish, phPublish, phPostPublish, phGC, phRecordGC, phFileGC, phCompleted}

// matRig is the parent: the writer's node, the model, the materializer's
// directories, the verifier.
type matRig struct {
	t   *testing.T
	ctx context.Context
	cfg matConfig
	rng *rand.Rand
	bin string // dstl
	// gcFlags set the materializer's grace periods.
	gcFlags []string

	blobRoot string
	blob     upload.BlobStore
	matDir   string // the materializer's --data-dir, kept across runs

	node   *changelog.Node
	w      *changelog.Writer
	work   *matWorkload
	model  *matModel
	models map[uint64]*matModel // the checkpoints that may still be retained
	sqnOf  map[uint64]uint64    // every checkpoint's SQN
	lastID uint64
	marked map[uint64]bool

	// verifier lists and plans on an empty data directory; the helper
	// restores; verified holds the plan signatures already restored and
	// compared.
	verifier *changelog.Node
	helper   matHelper
	verified map[string]bool
	// verifiedSnaps: snapshot records a fully verified plan started from.
	verifiedSnaps map[string]bool
	scratch       string

	// Measurements.
	targets map[string]int
	phases  map[string]int
	runs    []time.Duration // of runs that completed
	// stage names what runs now, recordFate who deleted each snapshot
	// record (by file name), for messages.
	stage        string
	recordFate   map[string]string
	lastPhase    string
	published    uint64 // newest checkpoint a record was ever seen for
	fullRestores int
	objectChecks int
	// structuralChecks counts plans checked by their shape (on verified
	// snapshots) instead of a restore.
	structuralChecks int
	fullSnaps        int
	deltaSnaps       int
	// Deletions by the materializer runs, and by the writer's node.
	recordsGone, filesGone int
	writerRecordsGone      int
	truncatedTo            uint64
	segsCollected          int
	// Where the time goes.
	tWriter, tChild, tCheck, tHelper time.Duration
	tHelperRestore, tHelperCompare   time.Duration
}

func newMatRig(t *testing.T, cfg matConfig, seed uint64) *matRig {
	ctx := t.Context()
	r := &matRig{
		t: t, ctx: ctx, cfg: cfg, rng: rand.New(rand.NewPCG(seed, 0x3a7e)),
		blobRoot: t.TempDir(), matDir: t.TempDir(), scratch: t.TempDir(),
		recordFate: map[string]string{},
		models:     map[uint64]*matModel{}, sqnOf: map[uint64]uint64{}, marked: map[uint64]bool{},
		verified: map[string]bool{}, verifiedSnaps: map[string]bool{}, targets: map[string]int{}, phases: map[string]int{},
	}
	// The two programs: the real dstl, and the helper.
	var wg sync.WaitGroup
	var dstlErr, helperErr error
	var dstlTook, helperTook time.Duration
	binDir := t.TempDir()
	wg.Go(func() { r.bin, dstlTook, dstlErr = buildDstl(ctx, binDir) })
	wg.Go(func() { r.helper, helperTook, helperErr = newMatHelper(ctx, binDir) })
	wg.Wait()
	if err := errors.Join(dstlErr, helperErr); err != nil {
		t.Fatal(err)
	}
	t.Logf("built dstl in %v, helper %s in %v (race detector: %v)", dstlTook.Round(time.Millisecond), r.helper.bin, helperTook.Round(time.Millisecond), matRace)

	r.gcFlags = []string{"--snapshot-gc-grace", cfg.fileGrace.String()}
	if flag := releasedGraceFlag(ctx, r.bin); flag != "" {
		r.gcFlags = append(r.gcFlags, flag, cfg.fileGrace.String())
	}
	// A killed round's files stay protected until its lease expires: the
	// shortest lease keeps the test's collection within seconds.
	r.gcFlags = append(r.gcFlags, "--snapshot-round-lease", matRoundLease.String())
	t.Logf("materializer runs: dstl materialize --once %s", strings.Join(r.gcFlags, " "))

	blob, err := file.Open(r.blobRoot)
	if err != nil {
		t.Fatal(err)
	}
	r.blob = blob
	r.work = newMatWorkload(cfg.keys, cfg.mergeKeys)
	r.model = newMatModel(r.work)

	// The load runs in the helper, on the writer's data directory; the
	// writer's node resumes its epoch.
	start := time.Now()
	dataDir := t.TempDir()
	epoch, last, err := r.helper.load(ctx, r.blobRoot, dataDir, cfg.keys, cfg.mergeKeys)
	if err != nil {
		t.Fatal(err)
	}
	ops := matLoadOps(r.work)
	if last != uint64(len(ops)) {
		t.Fatalf("load: last SQN %d, want %d", last, len(ops))
	}
	r.model.apply(ops, 1)
	r.lastID = 1
	r.models[1], r.sqnOf[1] = r.model.clone(), r.model.sqn
	opts := changelog.Options{Store: blob, DataDir: dataDir, GCInterval: -1, GCGrace: cfg.segGrace, RetainCheckpoints: cfg.retain}
	if r.node, err = changelog.Open(ctx, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.node.Close(context.Background()) })
	if r.w, err = r.node.OpenWriter(ctx, changelog.WriterConfig{Stream: matStream, KeyGroups: keygroup.Full(matKeyGroups), Resume: epoch}); err != nil {
		t.Fatal(err)
	}
	if r.w.LastSQN() != last {
		t.Fatalf("resumed epoch %d at SQN %d, the load ended at %d", epoch, r.w.LastSQN(), last)
	}
	if r.verifier, err = changelog.Open(ctx, changelog.Options{Store: blob, DataDir: t.TempDir(), GCInterval: -1}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.verifier.Close(context.Background()) })
	t.Logf("loaded %d keys (+%d merge-state keys): SQNs 1..%d, checkpoint 1, in %v",
		cfg.keys, cfg.mergeKeys, last, time.Since(start).Round(time.Millisecond))
	return r
}

func (r *matRig) run() {
	t := r.t
	began := time.Now()
	round := 0
	for round < r.cfg.maxRounds && (round < r.cfg.minRounds || time.Since(began) < r.cfg.budget) {
		round++
		t0 := time.Now()
		r.stage = fmt.Sprintf("round %d", round)
		// A third of the rounds run the writer's step (without its
		// garbage collection) while the materializer runs.
		concurrent := round > 1 && r.rng.IntN(3) == 0
		target, delay := r.pickTarget()
		if round > 1 && !concurrent {
			// Rounds that aim at the materializer's garbage collection
			// leave the writer node's collection out, so that there are
			// snapshot records left for the materializer's node to delete.
			gc := target != tgtRecordGC && target != tgtFileGC
			if err := r.writerStep(gc); err != nil {
				t.Fatalf("round %d: writer: %v", round, err)
			}
		}
		t1 := time.Now()
		var writerErr error
		var wg sync.WaitGroup
		if concurrent {
			wg.Go(func() { writerErr = r.writerStep(false) })
		}
		run := r.runChild(round, target, delay, wg.Wait)
		if writerErr != nil {
			t.Fatalf("round %d: writer (concurrent): %v", round, writerErr)
		}
		t2 := time.Now()
		r.targets[matTargetNames[target]]++
		r.phases[run.phase]++
		r.lastPhase = run.phase
		if testing.Verbose() {
			mode := ""
			if concurrent {
				mode = " (writer concurrent)"
			}
			t.Logf("round %d: checkpoint %d (SQN %d)%s, target %s+%v: %s after %v%s",
				round, r.lastID, r.model.sqn, mode, matTargetNames[target], delay.Round(time.Microsecond),
				run.phase, run.dur.Round(time.Millisecond), run.summary)
		}
		if run.phase == phFailed {
			// Is the materializer stuck, or did it recover?
			again := r.runChild(round, tgtNone, 0, func() {})
			t.Logf("round %d: run again without a kill: %s%s", round, again.phase, again.summary)
			return
		}
		r.check(round, false)
		r.tWriter += t1.Sub(t0)
		r.tChild += t2.Sub(t1)
		r.tCheck += time.Since(t2)
		if t.Failed() {
			return
		}
	}
	r.finish(round)
	var phases []string
	for _, p := range matPhaseOrder {
		phases = append(phases, fmt.Sprintf("%s: %d", p, r.phases[p]))
	}
	t.Logf("%d rounds, %d checkpoints, SQN %d; kills by phase {%s}; targets %v; snapshots published: %d full, %d delta; "+
		"materializer runs deleted %d snapshot records and %d SST files, the writer's node %d records; writer truncated before %d, %d segments collected; "+
		"%d full restores, %d plans checked by shape, %d re-checked by object existence; in %v (writer %v, materializer runs %v, checks %v of which the helper %v: imports and replays %v, comparisons %v)",
		round, r.lastID, r.model.sqn, strings.Join(phases, ", "), r.targets, r.fullSnaps, r.deltaSnaps,
		r.recordsGone, r.filesGone, r.writerRecordsGone, r.truncatedTo, r.segsCollected, r.fullRestores, r.structuralChecks, r.objectChecks, time.Since(began).Round(time.Millisecond),
		r.tWriter.Round(time.Millisecond), r.tChild.Round(time.Millisecond), r.tCheck.Round(time.Millisecond), r.tHelper.Round(time.Millisecond),
		r.tHelperRestore.Round(time.Millisecond), r.tHelperCompare.Round(time.Millisecond))
}

// writerStep is the writer's work between (or during) two materializer
// runs: one or two checkpoints of churn, sometimes a retention mark set or
// released, and, if gc, now and then snapshot adoption (truncation) and
// garbage collection: between the writer node's collections the
// materializer's finds snapshot records to delete.
func (r *matRig) writerStep(gc bool) error {
	ctx := r.ctx
	for range 1 + r.rng.IntN(2) {
		n := r.cfg.churn/2 + r.rng.IntN(r.cfg.churn)
		if err := r.appendOps(r.work.churn(r.rng, n)); err != nil {
			return err
		}
		if err := r.checkpoint(); err != nil {
			return err
		}
	}
	if len(r.marked) < 3 && r.rng.IntN(5) == 0 {
		if err := r.node.RetainCheckpoint(ctx, matStream, r.lastID, true); err != nil {
			return fmt.Errorf("retain checkpoint %d: %w", r.lastID, err)
		}
		r.marked[r.lastID] = true
	} else if len(r.marked) > 0 && r.rng.IntN(4) == 0 {
		ids := slices.Sorted(maps.Keys(r.marked))
		id := ids[r.rng.IntN(len(ids))]
		if err := r.node.RetainCheckpoint(ctx, matStream, id, false); err != nil {
			return fmt.Errorf("release checkpoint %d: %w", id, err)
		}
		delete(r.marked, id)
	}
	// Models of checkpoints that can never be retained again.
	for id := range r.models {
		if id+uint64(r.cfg.retain) <= r.lastID && !r.marked[id] {
			delete(r.models, id)
		}
	}
	if gc && r.rng.IntN(2) == 0 {
		return r.collectWriterGarbage()
	}
	return nil
}

// collectWriterGarbage is what the writer's node does before each of its
// background collections.
func (r *matRig) collectWriterGarbage() error {
	ctx := r.ctx
	if _, err := r.node.AdoptSnapshots(ctx); err != nil {
		return fmt.Errorf("adopt snapshots: %w", err)
	}
	time.Sleep(r.cfg.segGrace)
	before := r.scanFS()
	st, err := r.node.CollectGarbage(ctx)
	if err != nil {
		return fmt.Errorf("writer node GC: %w", err)
	}
	for _, name := range sortedDiff(before.records, r.scanFS().records) {
		r.recordFate[name] = "deleted by the writer node's GC (" + r.stage + ")"
	}
	r.segsCollected += st.Deleted
	r.writerRecordsGone += st.SnapshotsDeleted
	return nil
}

func (r *matRig) appendOps(ops []matOp) error {
	first := r.w.LastSQN() + 1
	changes := r.work.changes(ops, first)
	for off := 0; off < len(changes); off += 4096 {
		batch := changes[off:min(off+4096, len(changes))]
		f, _, err := r.w.Append(r.ctx, batch, changelog.Buffered)
		if err != nil {
			return fmt.Errorf("append: %w", err)
		}
		if f != first+uint64(off) {
			return fmt.Errorf("append: first SQN %d, want %d", f, first+uint64(off))
		}
	}
	r.model.apply(ops, first)
	return nil
}

func (r *matRig) checkpoint() error {
	id := r.lastID + 1
	res, err := r.w.Checkpoint(r.ctx, id, nil)
	if err != nil || !res.Complete {
		return fmt.Errorf("checkpoint %d: %+v, %w", id, res, err)
	}
	r.lastID = id
	r.models[id] = r.model.clone()
	r.sqnOf[id] = r.model.sqn
	return nil
}

func (r *matRig) pickTarget() (matTarget, time.Duration) {
	x := r.rng.IntN(100)
	target := tgtNone
	for _, tw := range matTargetWeights {
		if x < tw.w {
			target = tw.t
			break
		}
		x -= tw.w
	}
	switch r.lastPhase {
	case phStartup, phRebuild, phImport, phExport, phUpload, phPrePublish, phPublish:
		// The store is past the snapshot it was built on, or half
		// folded: this run rebuilds it.
		switch r.rng.IntN(6) {
		case 0, 1:
			target = tgtRebuild
		case 2:
			target = tgtImport
		}
	}
	var delay time.Duration
	switch target {
	case tgtAnytime:
		// Uniform over a typical run (the mean of the completed ones).
		est := 2 * time.Second
		if len(r.runs) > 0 {
			var sum time.Duration
			for _, d := range r.runs {
				sum += d
			}
			est = sum / time.Duration(len(r.runs))
		}
		delay = time.Duration(r.rng.Int64N(int64(est)))
	case tgtExport:
		delay = time.Duration(r.rng.Int64N(int64(60 * time.Millisecond)))
	case tgtGC:
		delay = time.Duration(r.rng.Int64N(int64(15 * time.Millisecond)))
	case tgtImport:
		delay = time.Duration(r.rng.Int64N(int64(20 * time.Millisecond)))
	}
	return target, delay
}

// matFS is what the parent sees of a run from outside.
type matFS struct {
	locks, spool, staging, tmp, sst, records map[string]bool
}

func readNames(dir string) map[string]bool {
	out := map[string]bool{}
	des, _ := os.ReadDir(dir) // a missing directory is empty
	for _, de := range des {
		out[de.Name()] = true
	}
	return out
}

func (r *matRig) scanFS() matFS {
	stream := filepath.Join(r.blobRoot, "streams", matStream)
	// The stream's store is stores/<hex(name)>-<incarnation>.
	staging := map[string]bool{}
	dirs, _ := filepath.Glob(filepath.Join(r.matDir, "stores", hex.EncodeToString([]byte(matStream))+"-*", "staging"))
	for _, d := range dirs {
		for n := range readNames(d) {
			staging[filepath.Join(d, n)] = true
		}
	}
	locks := map[string]bool{}
	found, _ := filepath.Glob(filepath.Join(r.matDir, "stores", hex.EncodeToString([]byte(matStream))+"-*", "db", "LOCK"))
	for _, l := range found {
		locks[l] = true
	}
	return matFS{
		locks:   locks,
		spool:   readNames(filepath.Join(r.matDir, "stores", "spool")),
		staging: staging,
		tmp:     readNames(filepath.Join(r.blobRoot, upload.ReservedPrefix)),
		sst:     readNames(filepath.Join(stream, "sst")),
		records: readNames(filepath.Join(stream, "snapshots")),
	}
}

// matObs is what changed since a run started.
type matObs struct {
	lockGone, spool, staging, tmp, newSST, sstGone, newRecord, recordGone bool
}

func newNames(before, now map[string]bool) bool {
	for n := range now {
		if !before[n] {
			return true
		}
	}
	return false
}

func (before matFS) diff(now matFS) matObs {
	return matObs{
		lockGone:   newNames(now.locks, before.locks),
		spool:      newNames(before.spool, now.spool),
		staging:    newNames(before.staging, now.staging),
		tmp:        newNames(before.tmp, now.tmp),
		newSST:     newNames(before.sst, now.sst),
		sstGone:    newNames(now.sst, before.sst),
		newRecord:  newNames(before.records, now.records),
		recordGone: newNames(now.records, before.records),
	}
}

// fires says whether a kill target's event has happened.
func (o matObs) fires(target matTarget) bool {
	switch target {
	case tgtImport:
		return o.staging
	case tgtExport:
		return o.spool
	case tgtUpload:
		return o.spool && o.tmp
	case tgtBeforePublish:
		return o.newSST && !o.spool
	case tgtAfterPublish:
		return o.newRecord
	case tgtRecordGC:
		return o.recordGone
	case tgtFileGC:
		return o.sstGone
	}
	return false
}

// classify names the phase a killed run was in from what it left behind
// (progress only moves forward: the latest sign wins).
func (o matObs) classify(reported bool) string {
	switch {
	case o.sstGone:
		return phFileGC
	case o.recordGone:
		return phRecordGC
	case reported:
		return phGC
	case o.newRecord:
		return phPostPublish
	case o.tmp && !o.spool:
		return phPublish
	case o.spool && o.tmp:
		return phUpload
	case o.spool:
		return phExport
	case o.newSST:
		return phPrePublish
	case o.staging:
		return phImport
	case o.lockGone:
		return phRebuild
	}
	return phStartup
}

// matRun is one materializer run.
type matRun struct {
	phase   string
	dur     time.Duration
	summary string
}

// lineWriter collects a child's stdout lines and signals the first line
// that reports the stream's snapshot (the run then collects garbage).
type lineWriter struct {
	mu       sync.Mutex
	buf      bytes.Buffer
	lines    []string
	reported chan struct{}
	once     sync.Once
}

func (lw *lineWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	lw.buf.Write(p)
	for {
		line, err := lw.buf.ReadString('\n')
		if err != nil {
			lw.buf.Reset()
			lw.buf.WriteString(line) // incomplete: keep it
			return len(p), nil
		}
		line = strings.TrimSuffix(line, "\n")
		lw.lines = append(lw.lines, line)
		if strings.HasPrefix(line, matStream+": snapshot of checkpoint") || strings.HasPrefix(line, matStream+": up to date") {
			lw.once.Do(func() { close(lw.reported) })
		}
	}
}

func (lw *lineWriter) snapshot() []string {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return slices.Clone(lw.lines)
}

// matChildEnv is the parent's environment without DSTL_* and AWS_*
// variables, so that only the flags configure the child.
func matChildEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "DSTL_") || strings.HasPrefix(kv, "AWS_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// runChild runs `dstl materialize --once` and kills it when target fires
// (plus delay). settle waits for whatever else runs meanwhile (the
// writer), before the run's leftovers are classified.
func (r *matRig) runChild(round int, target matTarget, delay time.Duration, settle func()) matRun {
	t := r.t
	cmd := exec.Command(r.bin, "materialize", "--once",
		"--blob", r.blobRoot, "--data-dir", r.matDir, "--stream", matStream, "--log-level", "warn")
	cmd.Args = append(cmd.Args, r.gcFlags...)
	cmd.Env = matChildEnv()
	out := &lineWriter{reported: make(chan struct{})}
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = out, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	before := r.scanFS()
	start := time.Now()
	if err := cmd.Start(); err != nil {
		settle()
		t.Fatalf("start %s: %v", r.bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	var killAt time.Time
	if target == tgtAnytime {
		killAt = start.Add(delay)
	}
	// The rebuild's RemoveAll takes well under a millisecond: watch the
	// store's LOCK file without sleeping, and kill the moment it is gone.
	var locks []string
	if target == tgtRebuild {
		locks = slices.Collect(maps.Keys(before.locks))
	}
	var werr error
	killed := false
wait:
	for {
		select {
		case werr = <-exited:
			break wait
		default:
		}
		now := time.Now()
		if killAt.IsZero() && target != tgtNone && target != tgtAnytime {
			fired := false
			if target == tgtRebuild {
				for _, l := range locks {
					if _, err := os.Lstat(l); errors.Is(err, fs.ErrNotExist) {
						fired = true
					}
				}
			} else if target == tgtGC {
				select {
				case <-out.reported:
					fired = true
				default:
				}
			} else {
				fired = before.diff(r.scanFS()).fires(target)
			}
			if fired {
				killAt = now.Add(delay)
			}
		}
		if !killAt.IsZero() && !now.Before(killAt) {
			_ = cmd.Process.Kill() // SIGKILL
			werr = <-exited
			killed = true
			break
		}
		if now.Sub(start) > 90*time.Second {
			_ = cmd.Process.Kill()
			<-exited
			settle()
			t.Fatalf("round %d: dstl materialize still running after 90s; stdout:\n%s\nstderr:\n%s", round, strings.Join(out.snapshot(), "\n"), stderr.String())
		}
		switch {
		case target == tgtRebuild && len(locks) > 0 && killAt.IsZero():
		case target == tgtNone || target == tgtAnytime || !killAt.IsZero():
			time.Sleep(time.Millisecond)
		default:
			time.Sleep(100 * time.Microsecond)
		}
	}
	run := matRun{dur: time.Since(start)}
	lines := out.snapshot()
	settle()
	after := r.scanFS()
	for _, name := range sortedDiff(before.records, after.records) {
		r.recordFate[name] = fmt.Sprintf("deleted by the materializer run of round %d (%s)", round, r.stage)
	}
	r.recordsGone += len(sortedDiff(before.records, after.records))
	r.filesGone += len(sortedDiff(before.sst, after.sst))
	var ee *exec.ExitError
	signaled := errors.As(werr, &ee) && ee.Sys().(syscall.WaitStatus).Signaled()
	switch {
	case werr == nil:
		run.phase = phCompleted
		r.runs = append(r.runs, run.dur)
	case killed && signaled:
		reported := false
		select {
		case <-out.reported:
			reported = true
		default:
		}
		run.phase = before.diff(after).classify(reported)
	default:
		t.Errorf("round %d: dstl materialize failed (the previous run ended in phase %q): %v\nstdout:\n%s\nstderr:\n%s", round, r.lastPhase, werr, strings.Join(lines, "\n"), stderr.String())
		run.phase = phFailed
	}
	for _, l := range lines {
		switch {
		case strings.Contains(l, ": failed:") && run.phase != phFailed:
			t.Errorf("round %d: dstl materialize reported a failure on a healthy blob store (the previous run ended in phase %q): %s", round, r.lastPhase, l)
		case strings.Contains(l, "(full)"):
			r.fullSnaps++
		case strings.Contains(l, "(delta)"):
			r.deltaSnaps++
		}
		run.summary += "\n\t" + l
	}
	if s := strings.TrimSpace(stderr.String()); s != "" && run.phase != phFailed {
		run.summary += "\n\tstderr: " + strings.ReplaceAll(s, "\n", "\n\tstderr: ")
	}
	return run
}

// retainedIDs returns the checkpoints garbage collection must keep
// restorable: the newest cfg.retain and the marked ones.
func (r *matRig) retainedIDs() []uint64 {
	t, ctx := r.t, r.ctx
	cps, err := r.verifier.Checkpoints(ctx, matStream)
	if err != nil {
		t.Fatalf("checkpoints: %v", err)
	}
	if n := len(cps); n == 0 || cps[n-1].ID != r.lastID {
		var ids []uint64
		for _, cp := range cps {
			ids = append(ids, cp.ID)
		}
		// What a node with an empty cache reads.
		fresh := "?"
		if n, err := changelog.Open(ctx, changelog.Options{Store: r.blob, DataDir: t.TempDir(), GCInterval: -1}); err == nil {
			fcps, err := n.Checkpoints(ctx, matStream)
			var fids []uint64
			for _, cp := range fcps {
				fids = append(fids, cp.ID)
			}
			fresh = fmt.Sprintf("%v (%v)", fids, err)
			_ = n.Close(ctx)
		}
		t.Fatalf("the journal's newest complete checkpoint is not %d: %d complete %v; a fresh node reads %s", r.lastID, n, ids, fresh)
	}
	ids := map[uint64]bool{}
	for _, cp := range cps[max(0, len(cps)-r.cfg.retain):] {
		ids[cp.ID] = true
	}
	marked, err := r.verifier.RetainedCheckpoints(ctx, matStream)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range marked {
		ids[id] = true
	}
	if got, want := slices.Sorted(slices.Values(marked)), slices.Sorted(maps.Keys(r.marked)); !slices.Equal(got, want) {
		t.Errorf("retention marks on the blob store %v, want %v", got, want)
	}
	return slices.Sorted(maps.Keys(ids))
}

// check verifies the invariants after a run: every snapshot record is
// sound and has its files; every retained checkpoint restores exactly.
// With full set, every retained checkpoint is restored, even one whose
// plan was verified before.
func (r *matRig) check(round int, full bool) {
	t, ctx := r.t, r.ctx
	snaps, err := r.verifier.Snapshots(ctx, matStream)
	if err != nil {
		t.Fatalf("round %d: snapshots: %v", round, err)
	}
	logID := r.w.LogID()
	for _, s := range snaps {
		want, ok := r.sqnOf[s.Checkpoint]
		if !ok {
			t.Errorf("round %d: snapshot record of checkpoint %d, which the writer never completed", round, s.Checkpoint)
			continue
		}
		if len(s.Logs) != 1 || s.Logs[logID] != want {
			t.Errorf("round %d: snapshot of checkpoint %d covers logs %v, want {%s: %d}", round, s.Checkpoint, s.Logs, logID, want)
		}
		files, err := snapshotFiles(s)
		if err != nil {
			t.Errorf("round %d: snapshot of checkpoint %d: %v", round, s.Checkpoint, err)
			continue
		}
		if bad, err := checkObjects(ctx, r.blob, files); err != nil {
			t.Fatal(err)
		} else if bad != "" {
			t.Errorf("round %d: LOST FILES: snapshot record of checkpoint %d exists, but %s", round, s.Checkpoint, bad)
		}
	}
	// The newest record is never deleted: a later one may replace it as
	// the newest, never nothing.
	newest := uint64(0)
	if len(snaps) > 0 {
		newest = snaps[len(snaps)-1].Checkpoint
	}
	if newest < r.published {
		t.Errorf("round %d: the newest snapshot record is of checkpoint %d, but one of checkpoint %d was published before", round, newest, r.published)
	}
	r.published = max(r.published, newest)

	var req matVerifyRequest
	var pending []changelog.RestorePlan
	for _, id := range r.retainedIDs() {
		want, ok := r.models[id]
		if !ok {
			t.Fatalf("round %d: no model of retained checkpoint %d", round, id)
		}
		pl, err := r.verifier.PlanRestore(ctx, matStream, id, keygroup.Full(matKeyGroups))
		if err != nil {
			t.Errorf("round %d: LOST: retained checkpoint %d (SQN %d) cannot be planned: %v", round, id, r.sqnOf[id], err)
			continue
		}
		// Whatever else is checked: everything the plan reads exists.
		objs, err := planObjects(pl)
		if err != nil {
			t.Fatal(err)
		}
		if bad, err := checkObjects(ctx, r.blob, objs); err != nil {
			t.Fatal(err)
		} else if bad != "" {
			t.Errorf("round %d: LOST: retained checkpoint %d restores from %s, but %s", round, id, describePlan(pl), bad)
			continue
		}
		sig := planSignature(pl)
		if !full && r.verified[sig] {
			// Restored exactly before, from immutable objects that all
			// still exist.
			r.objectChecks++
			continue
		}
		if !full && r.onVerifiedBases(pl) {
			// Every snapshot it starts from restored exactly before: the
			// plan must replay exactly the writer's log from each base's
			// SQN to the checkpoint's.
			r.structuralChecks++
			if d := r.planShape(pl); d != "" {
				t.Errorf("round %d: WRONG PLAN: retained checkpoint %d (SQN %d) restores from %s: %s", round, id, r.sqnOf[id], describePlan(pl), d)
			}
			continue
		}
		pending = append(pending, pl)
		req.Checks = append(req.Checks, matVerifyCheck{Checkpoint: id, Sig: sig, Model: matModelWire{SQN: want.sqn, Put: want.put, Merges: want.merges}})
	}
	if len(req.Checks) == 0 {
		return
	}
	req.Keys, req.MergeKeys = r.cfg.keys, r.cfg.mergeKeys
	start := time.Now()
	results, err := r.helper.verify(ctx, r.blobRoot, filepath.Join(r.scratch, strconv.Itoa(round)), req)
	r.tHelper += time.Since(start)
	if err != nil {
		t.Fatalf("round %d: verify: %v", round, err)
	}
	for i, res := range results {
		c := req.Checks[i]
		r.fullRestores++
		r.tHelperRestore += res.Restore
		r.tHelperCompare += res.Compare
		switch {
		case res.Err != "":
			t.Errorf("round %d: LOST: retained checkpoint %d (SQN %d) does not restore from %s: %s", round, c.Checkpoint, r.sqnOf[c.Checkpoint], res.Plan, res.Err)
		case res.Sig != c.Sig:
			t.Errorf("round %d: checkpoint %d: the helper planned %s, another plan than the parent's", round, c.Checkpoint, res.Plan)
		case res.Diff != "":
			t.Errorf("round %d: WRONG STATE: retained checkpoint %d (SQN %d) restored from %s: %s", round, c.Checkpoint, r.sqnOf[c.Checkpoint], res.Plan, res.Diff)
		default:
			r.verified[c.Sig] = true
			for _, b := range pending[i].Bases {
				r.verifiedSnaps[b.Snapshot.Key()] = true
			}
		}
	}
}

// onVerifiedBases: the plan starts from snapshots only, each of which
// some plan fully restored and compared before.
func (r *matRig) onVerifiedBases(pl changelog.RestorePlan) bool {
	if len(pl.Bases) == 0 {
		return false
	}
	for _, b := range pl.Bases {
		if !r.verifiedSnaps[b.Snapshot.Key()] {
			return false
		}
	}
	return true
}

// planShape checks a plan of the single writer's checkpoint on one base:
// the base covers every key group, and the steps replay exactly its log
// after the base's SQN up to the checkpoint's.
func (r *matRig) planShape(pl changelog.RestorePlan) string {
	full := keygroup.Full(matKeyGroups)
	base, ok := pl.SingleBase()
	if !ok {
		return "not exactly one base covering every key group"
	}
	after, upTo := base.Logs[r.w.LogID()], r.sqnOf[pl.Checkpoint]
	switch {
	case after == upTo && len(pl.Steps) == 0:
		return ""
	case len(pl.Steps) != 1:
		return fmt.Sprintf("%d replay steps, want one of %s (%d, %d]", len(pl.Steps), r.w.LogID(), after, upTo)
	}
	s := pl.Steps[0]
	if s.LogID != r.w.LogID() || s.After != after || s.UpTo != upTo || s.KeyGroups != full {
		return fmt.Sprintf("replays %s (%d, %d] of key groups %v, want %s (%d, %d] of %v", s.LogID, s.After, s.UpTo, s.KeyGroups, r.w.LogID(), after, upTo, full)
	}
	return ""
}

// finish runs the materializer to completion until garbage collection
// has had its two listings, then checks every retained checkpoint again
// and that nothing leaked.
func (r *matRig) finish(round int) {
	t := r.t
	if err := r.writerStep(false); err != nil {
		t.Fatalf("final writer step: %v", err)
	}
	// The leases of killed rounds protect their files until they expire;
	// after that, the files get their full grace like any others.
	time.Sleep(matRoundLease + 100*time.Millisecond)
	// Until two runs in a row delete no snapshot record: the files of the
	// last records deleted are then seen unreferenced twice, a grace
	// period apart.
	for i, quiet := 1, 0; quiet < 2; i++ {
		if i > 6 {
			t.Fatalf("snapshot records are still being deleted after %d clean runs", i-1)
		}
		deleted := r.recordsGone + r.writerRecordsGone
		r.stage = fmt.Sprintf("final run %d", i)
		run := r.runChild(round+i, tgtNone, 0, func() {})
		if run.phase != phCompleted {
			t.Fatalf("final run %d: %s", i, run.phase)
		}
		if testing.Verbose() {
			t.Logf("final run %d: %s after %v%s", i, run.phase, run.dur.Round(time.Millisecond), run.summary)
		}
		r.stage = fmt.Sprintf("writer node GC after final run %d", i)
		if err := r.collectWriterGarbage(); err != nil {
			t.Fatal(err)
		}
		if r.recordsGone+r.writerRecordsGone == deleted {
			quiet++
		} else {
			quiet = 0
		}
		time.Sleep(2 * r.cfg.fileGrace)
	}
	r.check(round+1, true)
	r.checkLeaks()
}

// gcSightings is the materializer's file of first sightings of
// unreferenced files.
func (r *matRig) gcSightings() string {
	found, _ := filepath.Glob(filepath.Join(r.matDir, "stores", hex.EncodeToString([]byte(matStream))+"-*.gc.json"))
	if len(found) == 0 {
		return filepath.Join(r.matDir, "stores", "(none).gc.json")
	}
	return found[0]
}

// checkLeaks: the blob store holds exactly the snapshot records, SST files
// and segments that retained checkpoints and the writer need.
func (r *matRig) checkLeaks() {
	t, ctx := r.t, r.ctx
	snaps, err := r.verifier.Snapshots(ctx, matStream)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) == 0 {
		t.Fatal("no snapshot record at the end")
	}
	newest := snaps[len(snaps)-1]
	if newest.Checkpoint != r.lastID {
		t.Errorf("the newest snapshot is of checkpoint %d after a clean run, want %d", newest.Checkpoint, r.lastID)
	}
	wantRecords := map[string]bool{newest.Key(): true}
	wantSegs := map[string]bool{}
	for _, id := range r.retainedIDs() {
		pl, err := r.verifier.PlanRestore(ctx, matStream, id, keygroup.Full(matKeyGroups))
		if err != nil {
			t.Fatalf("plan checkpoint %d: %v", id, err)
		}
		for _, b := range pl.Bases {
			wantRecords[b.Snapshot.Key()] = true
		}
		for _, s := range pl.Steps {
			for _, seg := range s.Segments {
				wantSegs[seg.Key] = true
			}
		}
	}
	// The writer references its segments from its truncation point on:
	// below the newest snapshot of its log (AdoptSnapshots).
	truncated := newest.Logs[r.w.LogID()] + 1
	r.truncatedTo = truncated
	parts, err := r.verifier.CheckpointParts(ctx, matStream, r.lastID)
	if err != nil || len(parts) != 1 {
		t.Fatalf("parts of checkpoint %d: %v, %v", r.lastID, parts, err)
	}
	for _, seg := range parts[0].Segments {
		for _, b := range seg.Blocks {
			if b.LastSQN >= truncated {
				wantSegs[seg.Key] = true
			}
		}
	}
	wantFiles := map[string]bool{}
	gotRecords := map[string]bool{}
	for _, s := range snaps {
		gotRecords[s.Key()] = true
		files, err := snapshotFiles(s)
		if err != nil {
			t.Fatal(err)
		}
		for f := range files {
			wantFiles[f] = true
		}
	}
	if extra := sortedDiff(gotRecords, wantRecords); len(extra) > 0 {
		t.Errorf("LEAK: snapshot records no retained checkpoint uses (and not the newest): %v", extra)
	}
	if missing := sortedDiff(wantRecords, gotRecords); len(missing) > 0 {
		t.Errorf("snapshot records retained checkpoints restore from are missing: %v", missing)
	}
	cfg, err := r.verifier.Stream(ctx, matStream)
	if err != nil {
		t.Fatal(err)
	}
	sstPrefix := changelog.SnapshotFilePrefix(matStream, cfg.Incarnation)
	files, err := listKeys(ctx, r.blob, sstPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if extra := sortedDiff(files, wantFiles); len(extra) > 0 {
		seen, _ := os.ReadFile(r.gcSightings())
		var why []string
		for _, f := range extra {
			// streams/<s>/sst/<checkpoint:020d>-<nonce>-NNNNNN.sst
			ckpt, _, _ := strings.Cut(strings.TrimPrefix(f, sstPrefix), "-")
			fate, ok := r.recordFate[ckpt]
			if !ok {
				fate = "never seen deleted"
			}
			why = append(why, fmt.Sprintf("%s (modified %v; the record of its checkpoint: %s)", f, files[f].ModTime.Format(time.StampMicro), fate))
		}
		t.Errorf("LEAK: %d SST files no snapshot record references, after clean runs %v apart with %v: %s; the materializer's sightings: %s",
			len(extra), 2*r.cfg.fileGrace, r.gcFlags, strings.Join(why, "; "), seen)
	}
	if missing := sortedDiff(wantFiles, files); len(missing) > 0 {
		t.Errorf("SST files referenced by snapshot records are missing: %v", missing)
	}
	segs, err := listKeys(ctx, r.blob, "segments/")
	if err != nil {
		t.Fatal(err)
	}
	for key := range segs {
		if !strings.HasPrefix(key, "segments/"+r.node.ID()+"/") {
			t.Errorf("a segment of another node than the writer's: %s", key)
		}
	}
	if extra := sortedDiff(segs, wantSegs); len(extra) > 0 {
		t.Errorf("LEAK: %d segments neither a retained checkpoint nor the writer needs: %v", len(extra), extra)
	}
	if missing := sortedDiff(wantSegs, segs); len(missing) > 0 {
		t.Errorf("segments retained checkpoints need are missing: %v", missing)
	}
	// A killed export leaves its spooled SST behind; the materializer's
	// data directory must not grow with every crash.
	left := r.scanFS()
	if len(left.spool) > 0 {
		var size int64
		for name := range left.spool {
			if info, err := os.Stat(filepath.Join(r.matDir, "stores", "spool", name)); err == nil {
				size += info.Size()
			}
		}
		t.Errorf("LEAK: %d spool files (%d bytes) left in %s by killed exports, after clean runs: %v",
			len(left.spool), size, filepath.Join(r.matDir, "stores", "spool"), slices.Sorted(maps.Keys(left.spool)))
	}
	t.Logf("end: %d snapshot records (%d retained checkpoints), %d SST files, %d segments; %d temporary files of killed puts in the blob store's %s (removed by the file store after an hour)",
		len(snaps), len(r.retainedIDs()), len(files), len(segs), len(left.tmp), upload.ReservedPrefix)
}
