package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// cliResult is one run of the dstl CLI.
type cliResult struct {
	stdout, stderr string
	code           int
}

// dstlCLI runs the dstl binary with args (no DSTL_* settings from the
// environment).
func dstlCLI(t *testing.T, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, dstlBin, args...)
	cmd.Env = childEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("dstl %s: %v", strings.Join(args, " "), err)
	}
	return r
}

// cliOK runs the CLI and fails the test unless it exits 0.
func cliOK(t *testing.T, args ...string) string {
	t.Helper()
	r := dstlCLI(t, args...)
	if r.code != 0 {
		t.Fatalf("dstl %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// requireCLI skips the test unless the binary has the subcommand (the CLI is
// being finished in parallel; a missing command must not hide the rest).
func requireCLI(t *testing.T, command ...string) {
	t.Helper()
	r := dstlCLI(t, append(command, "--help")...)
	if r.code != 0 || !strings.Contains(r.stdout, "dstl "+strings.Join(command, " ")) {
		t.Skipf("the dstl binary has no `dstl %s` command yet (help: exit %d, %q)", strings.Join(command, " "), r.code, firstLines(r.stdout+r.stderr, 3))
	}
}

// TestCLI drives a node with the dstl CLI: stream create, put, get (found
// and absent), scan, checkpoint create and list, and a get after SIGKILL and
// restart; segment ls reads the blob store directly.
func TestCLI(t *testing.T) {
	t.Parallel()
	dataDir := t.TempDir()
	n := startNode(t, "node", nodeConfig{dataDir: dataDir})
	srv := "--server=" + n.URL
	const stream = "cli"

	t.Run("stream-create", func(t *testing.T) {
		requireCLI(t, "stream", "create")
		cliOK(t, srv, "stream", "create", stream, "--key-groups", "8")
		resp, err := n.clients("connect").streams.GetStream(ctxT(t), connect.NewRequest(&dstlv1.GetStreamRequest{Name: stream}))
		if err != nil {
			t.Fatalf("GetStream after `dstl stream create`: %v", err)
		}
		if got := resp.Msg.GetStream(); got.GetKeyGroups() != testKeyGroups {
			t.Errorf("stream made by the CLI: %v, want %d key groups", got, testKeyGroups)
		}
		r := dstlCLI(t, srv, "stream", "create", stream)
		if r.code == 0 || !strings.Contains(r.stderr, "already_exists") {
			t.Errorf("dstl stream create of an existing stream: exit %d, stderr %q; want non-zero, already_exists", r.code, r.stderr)
		}
	})
	if t.Failed() {
		return
	}
	t.Run("put-get", func(t *testing.T) {
		requireCLI(t, "put")
		requireCLI(t, "get")
		cliOK(t, srv, "put", stream, "k1", "hello world")
		cliOK(t, srv, "put", stream, "k2", "v2", "--state", "other")
		cliOK(t, srv, "put", stream, "k1", "hello again", "--durability", "buffered")
		if out := cliOK(t, srv, "get", stream, "k1"); out != "hello again\n" {
			t.Errorf("dstl get %s k1 = %q, want %q", stream, out, "hello again\n")
		}
		if out := cliOK(t, srv, "get", stream, "k2", "--state", "other"); out != "v2\n" {
			t.Errorf("dstl get %s k2 --state other = %q, want %q", stream, out, "v2\n")
		}
		r := dstlCLI(t, srv, "get", stream, "k2") // state "default"
		if r.code != 1 || r.stdout != "" || !strings.Contains(r.stderr, "not found") {
			t.Errorf("dstl get of an absent key: exit %d, stdout %q, stderr %q; want exit 1, nothing, not found", r.code, r.stdout, r.stderr)
		}
		r = dstlCLI(t, srv, "get", "no-such-stream", "k")
		if r.code == 0 || !strings.Contains(r.stderr, "not_found") {
			t.Errorf("dstl get of an unknown stream: exit %d, stderr %q", r.code, r.stderr)
		}
		// The API sees the same.
		c := n.clients("grpc")
		checkGets(t, c, stream, model{{"default", "k1"}: "hello again", {"other", "k2"}: "v2"})
	})
	t.Run("scan", func(t *testing.T) {
		requireCLI(t, "scan")
		out := cliOK(t, srv, "--json", "scan", stream)
		got := model{}
		for line := range strings.Lines(out) {
			var kv struct {
				State string `json:"state"`
				Key   []byte `json:"key"`
				Value []byte `json:"value"`
			}
			if err := json.Unmarshal([]byte(line), &kv); err != nil {
				t.Fatalf("dstl scan --json line %q: %v", line, err)
			}
			got[stateKey{kv.State, string(kv.Key)}] = string(kv.Value)
		}
		checkModel(t, "dstl scan --json", got, model{{"default", "k1"}: "hello again", {"other", "k2"}: "v2"})
	})
	t.Run("checkpoint-create-list", func(t *testing.T) {
		requireCLI(t, "checkpoint", "create")
		requireCLI(t, "checkpoint", "list")
		// Three puts made checkpoints 1..3.
		ids := checkpointIDs(t, cliOK(t, srv, "--json", "checkpoint", "list", stream))
		if len(ids) != 3 || ids[2] != "3" {
			t.Errorf("dstl checkpoint list after 3 puts: ids %v, want [1 2 3]", ids)
		}
		// Right after `dstl put` (its writer checkpointed and closed) every
		// change is in checkpoint 3: nothing to do, and that is no error.
		r := dstlCLI(t, srv, "checkpoint", "create", stream)
		if r.code != 0 || !strings.Contains(r.stdout, "already in complete checkpoint 3") {
			t.Errorf("dstl checkpoint create right after dstl put: exit %d, stdout %q, stderr %q; want exit 0, already in complete checkpoint 3", r.code, r.stdout, r.stderr)
		}
		var upToDate struct {
			UpToDate bool `json:"up_to_date"`
		}
		if out := cliOK(t, srv, "--json", "checkpoint", "create", stream); json.Unmarshal([]byte(out), &upToDate) != nil || !upToDate.UpToDate {
			t.Errorf("dstl --json checkpoint create right after dstl put: %s; want up_to_date", out)
		}
		// An application's writer on the node; the operator checkpoints it.
		c := n.clients("connect")
		w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream})
		appendBatch(t, c, w.GetWriterId(), dstlv1.Durability_DURABILITY_BUFFERED, w.GetLastSqn(), []*dstlv1.Change{put("default", "k3", "from the writer")})
		out := cliOK(t, srv, "--json", "checkpoint", "create", stream, "--metadata", "operator")
		var created struct {
			Checkpoint struct {
				ID    string `json:"id"`
				Parts []struct {
					Metadata []byte `json:"metadata"`
				} `json:"parts"`
			} `json:"checkpoint"`
			Complete bool `json:"complete"`
		}
		if err := json.Unmarshal([]byte(out), &created); err != nil {
			t.Fatalf("dstl --json checkpoint create: %v\n%s", err, out)
		}
		if cp := created.Checkpoint; !created.Complete || cp.ID != "4" || len(cp.Parts) != 1 || string(cp.Parts[0].Metadata) != "operator" {
			t.Errorf("dstl --json checkpoint create: %s; want complete checkpoint 4 with metadata \"operator\"", out)
		}
		ids = checkpointIDs(t, cliOK(t, srv, "--json", "checkpoint", "list", stream))
		if len(ids) != 4 || ids[3] != "4" {
			t.Errorf("dstl checkpoint list: ids %v, want [1 2 3 4]", ids)
		}
		if table := cliOK(t, srv, "checkpoint", "list", stream); !strings.Contains(table, "ID") || len(strings.Split(strings.TrimSpace(table), "\n")) != 5 {
			t.Errorf("dstl checkpoint list (table):\n%s", table)
		}
	})
	t.Run("get-after-kill", func(t *testing.T) {
		requireCLI(t, "get")
		n.Kill()
		n2 := startNode(t, "node-restarted", nodeConfig{dataDir: dataDir})
		srv2 := "--server=" + n2.URL
		for key, want := range map[string]string{"k1": "hello again\n", "k3": "from the writer\n"} {
			if out := cliOK(t, srv2, "get", stream, key); out != want {
				t.Errorf("after SIGKILL and restart: dstl get %s %s = %q, want %q", stream, key, out, want)
			}
		}
		// The application's writer was live when the node was killed: its
		// epoch may hold changes no checkpoint covers, and only its (resumed)
		// writer can checkpoint them, so that is an error naming it.
		r := dstlCLI(t, srv2, "checkpoint", "create", stream)
		if r.code == 0 || !strings.Contains(r.stderr, "failed_precondition") || !strings.Contains(r.stderr, "resume") {
			t.Errorf("dstl checkpoint create with a recovered live epoch: exit %d, stderr %q; want failed_precondition naming the epoch to resume", r.code, r.stderr)
		}
	})
	t.Run("segment-ls", func(t *testing.T) {
		requireCLI(t, "segment", "ls")
		out := cliOK(t, "--json", "segment", "ls", "--blob", filepath.Join(dataDir, "blobs"))
		logs := 0
		for line := range strings.Lines(out) {
			var seg struct {
				Key  string `json:"key"`
				Logs []struct {
					Log string `json:"log"`
				} `json:"logs"`
				Error string `json:"error"`
			}
			if err := json.Unmarshal([]byte(line), &seg); err != nil {
				t.Fatalf("dstl segment ls --json line %q: %v", line, err)
			}
			if seg.Error != "" || !strings.HasPrefix(seg.Key, "segments/") {
				t.Errorf("dstl segment ls: %s", line)
			}
			for _, l := range seg.Logs {
				if strings.HasPrefix(l.Log, stream+"/") {
					logs++
				}
			}
		}
		if logs < 4 { // 3 puts' writers and the application's writer
			t.Errorf("dstl segment ls: %d log entries of stream %s, want ≥ 4:\n%s", logs, stream, out)
		}
	})
}

// checkpointIDs parses `dstl --json checkpoint list` (a
// ListCheckpointsResponse in protojson; uint64 ids are strings).
func checkpointIDs(t *testing.T, out string) []string {
	t.Helper()
	var resp struct {
		Checkpoints []struct {
			ID string `json:"id"`
		} `json:"checkpoints"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("dstl checkpoint list --json: %v\n%s", err, out)
	}
	var ids []string
	for _, c := range resp.Checkpoints {
		ids = append(ids, c.ID)
	}
	return ids
}
