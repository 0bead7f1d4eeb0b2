package crash

import (
	"context"
	"encoding/gob"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/toolbin"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload/file"
)

// The materializer crash test's helper process: the test binary
// re-executed, never under the race detector (when the test runs under it,
// a plain build of this package is made for the helper), for the work
// whose cost the race detector would multiply and which it would not
// watch usefully: the initial load of the stream, and restoring checkpoints
// into empty stores and comparing them with the model.
const (
	envMatRole     = "DSTL_MAT_ROLE" // "load" or "verify"
	envMatBlobs    = "DSTL_MAT_BLOBS"
	envMatData     = "DSTL_MAT_DATA"
	envMatKeys     = "DSTL_MAT_KEYS"     // load: "<keys> <mergeKeys>"
	envMatRequest  = "DSTL_MAT_REQUEST"  // verify: gob of matVerifyRequest
	envMatResponse = "DSTL_MAT_RESPONSE" // verify: gob of []matVerifyResult
	envMatScratch  = "DSTL_MAT_SCRATCH"  // verify: an empty directory
	matLoadAck     = "LOADED"            // load: "LOADED <epoch> <last SQN>"
	matHelperTest  = "^TestMaterializeHelper$"
	matHelperLimit = 3 * time.Minute // -test.timeout of a helper
)

// TestMaterializeHelper is the helper process of TestMaterializeCrash; it
// does nothing unless that test started it.
func TestMaterializeHelper(t *testing.T) {
	role := os.Getenv(envMatRole)
	if role == "" {
		t.Skip("the helper of TestMaterializeCrash; started by it")
	}
	var err error
	switch role {
	case "load":
		err = helperLoad(t.Context())
	case "verify":
		err = helperVerify(t.Context())
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		t.Fatalf("helper %s: %v", role, err)
	}
}

// matLoadOps are the changes of the initial load: one put of every key, in
// key order (SQN i+1 for key i).
func matLoadOps(w *matWorkload) []matOp {
	ops := make([]matOp, 0, w.keys+w.mergeKeys)
	for i := range w.keys + w.mergeKeys {
		ops = append(ops, matOp{op: changelog.OpPut, i: int32(i), kg: w.kg[i]})
	}
	return ops
}

// helperLoad creates the stream, opens its writer on the parent's node
// (same data directory, hence same node id), appends the load, completes
// checkpoint 1 and closes the node gracefully: the epoch stays live for
// the parent to resume.
func helperLoad(ctx context.Context) error {
	var keys, mergeKeys int
	if _, err := fmt.Sscan(os.Getenv(envMatKeys), &keys, &mergeKeys); err != nil {
		return fmt.Errorf("%s: %w", envMatKeys, err)
	}
	blob, err := file.Open(os.Getenv(envMatBlobs))
	if err != nil {
		return err
	}
	n, err := changelog.Open(ctx, changelog.Options{Store: blob, DataDir: os.Getenv(envMatData), GCInterval: -1})
	if err != nil {
		return err
	}
	if _, err := n.CreateStream(ctx, matStream, matKeyGroups); err != nil {
		return err
	}
	w, err := n.OpenWriter(ctx, changelog.WriterConfig{Stream: matStream, KeyGroups: keygroup.Full(matKeyGroups)})
	if err != nil {
		return err
	}
	work := newMatWorkload(keys, mergeKeys)
	changes := work.changes(matLoadOps(work), 1)
	for off := 0; off < len(changes); off += 4096 {
		if _, _, err := w.Append(ctx, changes[off:min(off+4096, len(changes))], changelog.Buffered); err != nil {
			return err
		}
	}
	if res, err := w.Checkpoint(ctx, 1, nil); err != nil || !res.Complete {
		return fmt.Errorf("checkpoint 1: %+v, %w", res, err)
	}
	epoch, last := w.Epoch(), w.LastSQN()
	if err := n.Close(ctx); err != nil {
		return err
	}
	fmt.Printf("%s %d %d\n", matLoadAck, epoch, last)
	return nil
}

// matVerifyRequest asks the helper to restore checkpoints and compare
// them with their models.
type matVerifyRequest struct {
	Keys, MergeKeys int
	Checks          []matVerifyCheck
}

type matVerifyCheck struct {
	Checkpoint uint64
	// Sig is the signature of the plan the parent made: the helper's
	// plan must be the same (nothing runs meanwhile).
	Sig   string
	Model matModelWire
}

type matModelWire struct {
	SQN    uint64
	Put    []uint32
	Merges map[int32][]uint32
}

type matVerifyResult struct {
	Checkpoint uint64
	Sig        string
	Plan       string
	Replayed   int
	Diff       string // what differs from the model ("": nothing)
	Err        string // the restore failed
	// Took is the whole check, Restore its import and replay.
	Took, Restore, Compare time.Duration
}

func helperVerify(ctx context.Context) error {
	f, err := os.Open(os.Getenv(envMatRequest))
	if err != nil {
		return err
	}
	var req matVerifyRequest
	err = gob.NewDecoder(f).Decode(&req)
	f.Close()
	if err != nil {
		return fmt.Errorf("decode request: %w", err)
	}
	scratch := os.Getenv(envMatScratch)
	blob, err := file.Open(os.Getenv(envMatBlobs))
	if err != nil {
		return err
	}
	n, err := changelog.Open(ctx, changelog.Options{Store: blob, DataDir: filepath.Join(scratch, "node"), GCInterval: -1})
	if err != nil {
		return err
	}
	defer n.Close(ctx)
	work := newMatWorkload(req.Keys, req.MergeKeys)
	var results []matVerifyResult
	for i, c := range req.Checks {
		start := time.Now()
		res := matVerifyResult{Checkpoint: c.Checkpoint}
		model := &matModel{w: work, sqn: c.Model.SQN, put: c.Model.Put, merges: c.Model.Merges}
		if model.merges == nil {
			model.merges = map[int32][]uint32{}
		}
		if err := verifyOne(ctx, n, filepath.Join(scratch, fmt.Sprintf("store-%d", i)), c, model, &res); err != nil {
			res.Err = err.Error()
		}
		res.Took = time.Since(start)
		results = append(results, res)
	}
	out, err := os.Create(os.Getenv(envMatResponse))
	if err != nil {
		return err
	}
	if err := gob.NewEncoder(out).Encode(results); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func verifyOne(ctx context.Context, n *changelog.Node, dir string, c matVerifyCheck, model *matModel, res *matVerifyResult) error {
	pl, err := n.PlanRestore(ctx, matStream, c.Checkpoint, keygroup.Full(matKeyGroups))
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	res.Sig, res.Plan = planSignature(pl), describePlan(pl)
	st, err := materializer.Open(dir, materializer.Options{})
	if err != nil {
		return err
	}
	defer func() {
		_ = st.Close()
		_ = os.RemoveAll(dir)
	}()
	start := time.Now()
	if res.Replayed, err = matRestore(ctx, n, st, matStream, pl); err != nil {
		return err
	}
	res.Restore = time.Since(start)
	start = time.Now()
	res.Diff, err = model.compare(ctx, st, matStream)
	res.Compare = time.Since(start)
	return err
}

// matHelper runs helper processes.
type matHelper struct {
	bin string // the test binary to re-execute (not under -race)
}

// newMatHelper returns the helper: this test binary if it is not under the
// race detector, else a plain build of this package (made in dir).
func newMatHelper(ctx context.Context, dir string) (matHelper, time.Duration, error) {
	if !matRace {
		return matHelper{bin: os.Args[0]}, 0, nil
	}
	root, err := toolbin.RepoRoot()
	if err != nil {
		return matHelper{}, 0, err
	}
	start := time.Now()
	bin := filepath.Join(dir, "crash.test")
	cmd := exec.CommandContext(ctx, "go", "test", "-c", "-o", bin, "./tests/crash")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return matHelper{}, 0, fmt.Errorf("go test -c ./tests/crash: %w\n%s", err, out)
	}
	return matHelper{bin: bin}, time.Since(start), nil
}

func (h matHelper) run(ctx context.Context, env ...string) (string, error) {
	cmd := exec.CommandContext(ctx, h.bin, "-test.run="+matHelperTest, "-test.timeout="+matHelperLimit.String())
	cmd.Env = append(matChildEnv(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helper %s: %w\n%s", strings.Join(env, " "), err, out)
	}
	return string(out), nil
}

// load runs the initial load; it returns the writer's epoch and last SQN.
func (h matHelper) load(ctx context.Context, blobRoot, dataDir string, keys, mergeKeys int) (epoch, last uint64, err error) {
	out, err := h.run(ctx, envMatRole+"=load", envMatBlobs+"="+blobRoot, envMatData+"="+dataDir,
		envMatKeys+"="+strconv.Itoa(keys)+" "+strconv.Itoa(mergeKeys))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, matLoadAck+" "); ok {
			if _, err := fmt.Sscan(rest, &epoch, &last); err != nil {
				return 0, 0, fmt.Errorf("helper: %q: %w", line, err)
			}
			return epoch, last, nil
		}
	}
	return 0, 0, errors.New("helper: no " + matLoadAck + " line in:\n" + out)
}

// verify restores each check's checkpoint in a helper process and returns
// the results, in order.
func (h matHelper) verify(ctx context.Context, blobRoot, scratch string, req matVerifyRequest) ([]matVerifyResult, error) {
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)
	reqPath, respPath := filepath.Join(scratch, "request.gob"), filepath.Join(scratch, "response.gob")
	f, err := os.Create(reqPath)
	if err != nil {
		return nil, err
	}
	if err := gob.NewEncoder(f).Encode(req); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	if _, err := h.run(ctx, envMatRole+"=verify", envMatBlobs+"="+blobRoot, envMatRequest+"="+reqPath,
		envMatResponse+"="+respPath, envMatScratch+"="+scratch); err != nil {
		return nil, err
	}
	f, err = os.Open(respPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var results []matVerifyResult
	if err := gob.NewDecoder(f).Decode(&results); err != nil {
		return nil, fmt.Errorf("helper response: %w", err)
	}
	if len(results) != len(req.Checks) {
		return nil, fmt.Errorf("helper: %d results for %d checks", len(results), len(req.Checks))
	}
	return results, nil
}
