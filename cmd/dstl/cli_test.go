package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// cliNode is a real node served over h2c on a loopback port.
type cliNode struct {
	url     string
	blobDir string
	node    *changelog.Node
	stop    func()
}

func startCLINode(t *testing.T) *cliNode {
	t.Helper()
	return startCLINodeIn(t, t.TempDir(), changelog.Options{GCInterval: -1})
}

// startCLINodeIn starts a node keeping its data and blobs in dir; opts gets
// Store and DataDir filled in. Stop it with stop (idempotent) or let the
// test's cleanup do it.
func startCLINodeIn(t *testing.T, dir string, opts changelog.Options) *cliNode {
	t.Helper()
	ctx := context.Background()
	blobDir := filepath.Join(dir, "blobs")
	store, err := blobstore.Open(ctx, blobDir)
	if err != nil {
		t.Fatal(err)
	}
	opts.Store, opts.DataDir = store, filepath.Join(dir, "data")
	node, err := changelog.Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	api, err := server.New(node, server.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: api.Handler(), Protocols: new(http.Protocols), ReadHeaderTimeout: 10 * time.Second}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = srv.Close() // the CLI's idle HTTP/2 connections would hold a graceful Shutdown
			if err := api.Shutdown(ctx); err != nil {
				t.Error(err)
			}
			if err := node.Close(ctx); err != nil {
				t.Error(err)
			}
			_ = store.Close()
		})
	}
	t.Cleanup(stop)
	return &cliNode{url: "http://" + ln.Addr().String(), blobDir: blobDir, node: node, stop: stop}
}

// run executes the CLI in-process as main does and returns stdout and the
// error main would print as "dstl: <err>".
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// (n *cliNode) cli runs the CLI against n.
func (n *cliNode) cli(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return runCLI(t, append([]string{"--server", n.url}, args...)...)
}

func (n *cliNode) mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := n.cli(t, args...)
	if err != nil {
		t.Fatalf("dstl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func wantCLIErr(t *testing.T, err error, substrs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one mentioning %q", substrs)
	}
	for _, s := range substrs {
		if !strings.Contains(err.Error(), s) {
			t.Fatalf("error %q does not mention %q", err, s)
		}
	}
}

func unmarshalCLIJSON[M any, PM interface {
	*M
	proto.Message
}](t *testing.T, s string) PM {
	t.Helper()
	m := PM(new(M))
	if err := protojson.Unmarshal([]byte(s), m); err != nil {
		t.Fatalf("output is not protojson: %v\n%s", err, s)
	}
	return m
}

func TestStreamCommands(t *testing.T) {
	n := startCLINode(t)
	out := n.mustCLI(t, "stream", "create", "orders", "--key-groups", "8")
	if !strings.Contains(out, "orders") || !strings.Contains(out, "8") || !strings.HasPrefix(out, "NAME") {
		t.Fatalf("create printed %q", out)
	}
	_, err := n.cli(t, "stream", "create", "orders")
	wantCLIErr(t, err, "already_exists", "already exists", "orders")

	n.mustCLI(t, "stream", "create", "users")
	out = n.mustCLI(t, "stream", "list")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 3 || !strings.HasPrefix(lines[1], "orders ") || !strings.HasPrefix(lines[2], "users ") {
		t.Fatalf("list printed %q", out)
	}
	list := unmarshalCLIJSON[dstlv1.ListStreamsResponse](t, n.mustCLI(t, "stream", "list", "--json"))
	if len(list.GetStreams()) != 2 || list.GetStreams()[1].GetKeyGroups() != keygroup.Default {
		t.Fatalf("list --json: %v", list)
	}
	got := unmarshalCLIJSON[dstlv1.GetStreamResponse](t, n.mustCLI(t, "--json", "stream", "get", "orders"))
	if got.GetStream().GetName() != "orders" || got.GetStream().GetKeyGroups() != 8 || got.GetStream().GetCreatedAtMs() == 0 {
		t.Fatalf("get --json: %v", got)
	}

	if out := n.mustCLI(t, "stream", "delete", "users"); !strings.Contains(out, "deleted stream users") {
		t.Fatalf("delete printed %q", out)
	}
	_, err = n.cli(t, "stream", "get", "users")
	wantCLIErr(t, err, "not_found", "users")
	_, err = n.cli(t, "stream", "delete", "users")
	wantCLIErr(t, err, "not_found")
	_, err = n.cli(t, "stream", "create", "--", "-bad")
	wantCLIErr(t, err, "invalid_argument")
	_, err = n.cli(t, "stream", "create", "bad/name")
	wantCLIErr(t, err, "invalid_argument")
}

func TestPutGetDel(t *testing.T) {
	n := startCLINode(t)
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "16")

	out := n.mustCLI(t, "put", "s", "k1", "hello world")
	kg := keygroup.OfString("k1", 16)
	if want := fmt.Sprintf("put s/default key k1 (key group %d): committed in checkpoint 1\n", kg); out != want {
		t.Fatalf("put printed %q, want %q", out, want)
	}
	if out := n.mustCLI(t, "get", "s", "k1"); out != "hello world\n" {
		t.Fatalf("get printed %q", out)
	}
	// A second state, JSON output of put.
	var res writeResult
	if err := json.Unmarshal([]byte(n.mustCLI(t, "put", "s", "k1", "other", "--state", "st2", "--json")), &res); err != nil {
		t.Fatal(err)
	}
	if res.CheckpointID != 2 || res.KeyGroup != uint32(kg) || res.Op != "put" || string(res.Key) != "k1" || res.SQN != 1 {
		t.Fatalf("put --json: %+v", res)
	}
	if out := n.mustCLI(t, "get", "s", "k1", "--state", "st2"); out != "other\n" {
		t.Fatalf("get --state st2 printed %q", out)
	}
	g := unmarshalCLIJSON[dstlv1.GetResponse](t, n.mustCLI(t, "get", "s", "k1", "--json"))
	if !g.GetFound() || string(g.GetValue()) != "hello world" || g.GetKeyGroup() != uint32(kg) {
		t.Fatalf("get --json: %v", g)
	}

	// Every put is a complete checkpoint.
	cps := unmarshalCLIJSON[dstlv1.ListCheckpointsResponse](t, n.mustCLI(t, "checkpoint", "list", "s", "--json"))
	if len(cps.GetCheckpoints()) != 2 {
		t.Fatalf("checkpoints after two puts: %v", cps)
	}

	out = n.mustCLI(t, "del", "s", "k1")
	if !strings.HasPrefix(out, "delete s/default key k1") || !strings.Contains(out, "checkpoint 3") {
		t.Fatalf("del printed %q", out)
	}
	out, err := n.cli(t, "get", "s", "k1")
	wantCLIErr(t, err, "not found", "k1")
	if out != "" {
		t.Fatalf("get of a deleted key printed %q", out)
	}
	out, err = n.cli(t, "get", "s", "k1", "--json")
	wantCLIErr(t, err, "not found")
	if g := unmarshalCLIJSON[dstlv1.GetResponse](t, out); g.GetFound() || g.GetKeyGroup() != uint32(kg) {
		t.Fatalf("get --json of a deleted key: %v", g)
	}
	if out := n.mustCLI(t, "get", "s", "k1", "--state", "st2"); out != "other\n" {
		t.Fatalf("the other state lost its key: %q", out)
	}

	_, err = n.cli(t, "put", "nope", "k", "v")
	wantCLIErr(t, err, "not_found", "nope")
	_, err = n.cli(t, "get", "nope", "k")
	wantCLIErr(t, err, "not_found", "nope")
	_, err = n.cli(t, "put", "s", "k", "v", "--durability", "sometimes")
	wantCLIErr(t, err, "--durability")
	_, err = n.cli(t, "put", "s", "k")
	wantCLIErr(t, err, "accepts 3 arg(s)")
}

// TestPutFencesAndCarriesMetadata: put fences an open writer and carries
// the client metadata of the checkpoint it starts from.
func TestPutFencesAndCarriesMetadata(t *testing.T) {
	n := startCLINode(t)
	ctx := context.Background()
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "4")
	w := dstlv1connect.NewWriterServiceClient(newHTTPClient(n.url), n.url)
	ow, err := w.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: ow.Msg.GetWriterId(), CheckpointId: 5, Metadata: []byte("offset=42")})); err != nil {
		t.Fatal(err)
	}
	out := n.mustCLI(t, "put", "s", "k", "v")
	if !strings.Contains(out, "checkpoint 6") {
		t.Fatalf("put printed %q", out)
	}
	_, err = w.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: ow.Msg.GetWriterId(), Changes: []*dstlv1.Change{{Op: dstlv1.Op_OP_PUT, Key: []byte("x")}}}))
	if code := connect.CodeOf(err); code != connect.CodeFailedPrecondition && code != connect.CodeNotFound {
		t.Fatalf("append of the fenced writer: %v", err)
	}
	cp := unmarshalCLIJSON[dstlv1.GetCheckpointResponse](t, n.mustCLI(t, "checkpoint", "get", "s", "6", "--json"))
	if parts := cp.GetCheckpoint().GetParts(); len(parts) != 1 || string(parts[0].GetMetadata()) != "offset=42" {
		t.Fatalf("checkpoint 6 parts: %v", parts)
	}
}

// TestPutSurvivesRestartAndGC: what put and del commit is a complete
// checkpoint: it is there after garbage collection (keeping only the newest
// checkpoint) and a restart of the node.
func TestPutSurvivesRestartAndGC(t *testing.T) {
	dir := t.TempDir()
	opts := changelog.Options{GCInterval: -1, GCGrace: time.Nanosecond, RetainCheckpoints: 1}
	n := startCLINodeIn(t, dir, opts)
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "4")
	for i := range 5 {
		n.mustCLI(t, "put", "s", fmt.Sprintf("k%d", i), fmt.Sprintf("v%d", i))
	}
	n.mustCLI(t, "del", "s", "k2")
	n.mustCLI(t, "put", "s", "k3", "v3b", "--durability", "buffered")
	if st, err := n.node.CollectGarbage(context.Background()); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("gc: %+v", st)
	}
	n.stop()

	n = startCLINodeIn(t, dir, opts)
	got := n.mustCLI(t, "scan", "s")
	kvs := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(got), "\n")[1:] {
		f := strings.Fields(l)
		kvs[f[2]] = f[3]
	}
	if fmt.Sprint(kvs) != "map[k0:v0 k1:v1 k3:v3b k4:v4]" {
		t.Fatalf("after GC and restart, scan printed:\n%s", got)
	}
	if out := n.mustCLI(t, "get", "s", "k3"); out != "v3b\n" {
		t.Fatalf("get k3 after restart: %q", out)
	}
}

// openCLIWriterWith appends count keys "key-000".. through the API.
func openCLIWriterWith(t *testing.T, n *cliNode, stream string, keyGroups, count int) string {
	t.Helper()
	ctx := context.Background()
	w := dstlv1connect.NewWriterServiceClient(newHTTPClient(n.url), n.url)
	ow, err := w.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: stream}))
	if err != nil {
		t.Fatal(err)
	}
	req := &dstlv1.AppendRequest{WriterId: ow.Msg.GetWriterId(), Durability: dstlv1.Durability_DURABILITY_BUFFERED}
	for i := range count {
		key := fmt.Sprintf("key-%03d", i)
		req.Changes = append(req.Changes, &dstlv1.Change{
			KeyGroup: uint32(keygroup.OfString(key, keyGroups)), State: "st", Op: dstlv1.Op_OP_PUT,
			Key: []byte(key), Value: fmt.Appendf(nil, "value %d", i),
		})
	}
	if _, err := w.Append(ctx, connect.NewRequest(req)); err != nil {
		t.Fatal(err)
	}
	return ow.Msg.GetWriterId()
}

func TestScanAndCheckpoints(t *testing.T) {
	n := startCLINode(t)
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "8")
	// Nothing was ever written: nothing to checkpoint, and no error.
	if out := n.mustCLI(t, "checkpoint", "create", "s"); out != "stream s has no changes; nothing to checkpoint\n" {
		t.Fatalf("checkpoint create of an empty stream printed %q", out)
	}
	openCLIWriterWith(t, n, "s", 8, 57)

	// Pages of 5: every entry, once, in (key group, state, key) order.
	out := n.mustCLI(t, "scan", "s", "--page-size", "5")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 58 || !strings.HasPrefix(lines[0], "KEY GROUP") {
		t.Fatalf("scan printed %d lines:\n%s", len(lines), out)
	}
	seen := map[string]bool{}
	prev := -1
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		var kg int
		fmt.Sscan(f[0], &kg)
		if kg < prev || seen[f[2]] || f[1] != "st" || !strings.HasPrefix(f[2], "key-") {
			t.Fatalf("bad or out-of-order line %q", l)
		}
		prev, seen[f[2]] = kg, true
	}
	out = n.mustCLI(t, "scan", "s", "--page-size", "4", "--limit", "10", "--json")
	sc := bufio.NewScanner(strings.NewReader(out))
	count := 0
	for sc.Scan() {
		kv := unmarshalCLIJSON[dstlv1.KeyValue](t, sc.Text())
		if !strings.HasPrefix(string(kv.GetKey()), "key-") || !strings.HasPrefix(string(kv.GetValue()), "value ") {
			t.Fatalf("scan --json line %q", sc.Text())
		}
		count++
	}
	if count != 10 {
		t.Fatalf("scan --limit 10 printed %d entries", count)
	}
	out = n.mustCLI(t, "scan", "s", "--prefix", "key-01", "--page-size", "3")
	if c := strings.Count(out, "\n") - 1; c != 10 {
		t.Fatalf("scan --prefix key-01: %d entries\n%s", c, out)
	}
	out = n.mustCLI(t, "scan", "s", "--key-groups", "2..3", "--state", "st")
	for _, l := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		if !strings.HasPrefix(l, "2 ") && !strings.HasPrefix(l, "3 ") {
			t.Fatalf("scan --key-groups 2..3 printed %q", l)
		}
	}
	if out := n.mustCLI(t, "scan", "s", "--state", "other"); strings.Count(out, "\n") != 1 {
		t.Fatalf("scan of an empty state printed %q", out)
	}
	_, err := n.cli(t, "scan", "s", "--key-groups", "3")
	wantCLIErr(t, err, "lo..hi")
	_, err = n.cli(t, "scan", "s", "--key-groups", "0..8")
	wantCLIErr(t, err, "invalid_argument")
	_, err = n.cli(t, "scan", "nope")
	wantCLIErr(t, err, "not_found")

	// Checkpoints of the open writer.
	out = n.mustCLI(t, "checkpoint", "create", "s")
	if !strings.Contains(out, "id:         1") || !strings.Contains(out, "s/") || !strings.Contains(out, "0..7") {
		t.Fatalf("checkpoint create printed:\n%s", out)
	}
	cr := unmarshalCLIJSON[dstlv1.CreateCheckpointResponse](t, n.mustCLI(t, "checkpoint", "create", "s", "--json", "--metadata", "m"))
	if !cr.GetComplete() || cr.GetCheckpoint().GetId() != 2 || string(cr.GetCheckpoint().GetParts()[0].GetMetadata()) != "m" {
		t.Fatalf("checkpoint create --json: %v", cr)
	}
	out = n.mustCLI(t, "checkpoint", "list", "s")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 3 || !strings.HasPrefix(lines[1], "1 ") || !strings.HasPrefix(lines[2], "2 ") {
		t.Fatalf("checkpoint list printed:\n%s", out)
	}
	out = n.mustCLI(t, "checkpoint", "get", "s", "2")
	if !regexp.MustCompile(`retained:\s+no\n`).MatchString(out) || !strings.Contains(out, "UP TO SQN") ||
		!regexp.MustCompile(`restores from:\s+the changelog alone`).MatchString(out) || !regexp.MustCompile(`materializer lag:\s+57 changes`).MatchString(out) {
		t.Fatalf("checkpoint get printed:\n%s", out)
	}
	if out := n.mustCLI(t, "checkpoint", "retain", "s", "1"); out != "retained checkpoint 1 of stream s\n" {
		t.Fatalf("retain printed %q", out)
	}
	g := unmarshalCLIJSON[dstlv1.GetCheckpointResponse](t, n.mustCLI(t, "checkpoint", "get", "s", "1", "--json"))
	if !g.GetCheckpoint().GetRetained() || g.GetCheckpoint().GetParts()[0].GetUpToSqn() != 57 {
		t.Fatalf("checkpoint get --json after retain: %v", g)
	}
	n.mustCLI(t, "checkpoint", "retain", "s", "1", "--release")
	if g := unmarshalCLIJSON[dstlv1.GetCheckpointResponse](t, n.mustCLI(t, "checkpoint", "get", "s", "1", "--json")); g.GetCheckpoint().GetRetained() {
		t.Fatal("still retained after --release")
	}
	_, err = n.cli(t, "checkpoint", "get", "s", "9")
	wantCLIErr(t, err, "not_found", "9")
	_, err = n.cli(t, "checkpoint", "get", "s", "x")
	wantCLIErr(t, err, "positive integer")
	_, err = n.cli(t, "checkpoint", "list", "nope")
	wantCLIErr(t, err, "not_found", "nope")
}

func TestSegmentCommands(t *testing.T) {
	n := startCLINode(t)
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "8")
	wid := openCLIWriterWith(t, n, "s", 8, 20)
	n.mustCLI(t, "checkpoint", "create", "s")

	out := n.mustCLI(t, "segment", "ls", "--blob", n.blobDir)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "KEY") || !strings.Contains(lines[1], wid+":1..20") || lines[2] != fmt.Sprintf("1 objects, %s", strings.Fields(lines[1])[1]+" B") {
		t.Fatalf("segment ls printed:\n%s", out)
	}
	// DSTL_BLOB, a file:// URL, and JSON.
	t.Setenv("DSTL_BLOB", "file://"+n.blobDir)
	out = n.mustCLI(t, "segment", "ls", "--json")
	var s segmentSummary
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("segment ls --json: %v\n%s", err, out)
	}
	if s.Blocks != 1 || s.Changes != 20 || len(s.Logs) != 1 || s.Logs[0].Log != wid || s.Logs[0].FirstSQN != 1 || s.Logs[0].LastSQN != 20 || s.Error != "" {
		t.Fatalf("segment ls --json: %+v", s)
	}
	node := strings.Split(s.Key, "/")[1]
	if out := n.mustCLI(t, "segment", "ls", "--node", node); !strings.Contains(out, "1 objects") {
		t.Fatalf("segment ls --node printed:\n%s", out)
	}
	if out := n.mustCLI(t, "segment", "ls", "--node", "other"); !strings.Contains(out, "0 objects") {
		t.Fatalf("segment ls --node other printed:\n%s", out)
	}

	out = n.mustCLI(t, "segment", "cat", s.Key)
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 21 || !strings.Contains(lines[1], "key-000") || !strings.Contains(out, "value 19") {
		t.Fatalf("segment cat printed:\n%s", out)
	}
	out = n.mustCLI(t, "segment", "cat", strings.TrimPrefix(s.Key, "segments/"), "--json", "--log", wid, "--after", "5", "--up-to", "8")
	var sqns []uint64
	for l := range strings.Lines(out) {
		var c changeJSON
		if err := json.Unmarshal([]byte(l), &c); err != nil {
			t.Fatalf("segment cat --json: %v\n%s", err, out)
		}
		if c.Log != wid || c.Op != "put" || c.State != "st" || string(c.Key) != fmt.Sprintf("key-%03d", c.SQN-1) {
			t.Fatalf("segment cat --json line %q", l)
		}
		sqns = append(sqns, c.SQN)
	}
	if fmt.Sprint(sqns) != "[6 7 8]" {
		t.Fatalf("segment cat --after 5 --up-to 8: sqns %v", sqns)
	}
	out = n.mustCLI(t, "segment", "cat", s.Key, "--key-groups", "4..4")
	for _, l := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		if f := strings.Fields(l); f[2] != "4" {
			t.Fatalf("segment cat --key-groups 4..4 printed %q", l)
		}
	}
	if out := n.mustCLI(t, "segment", "cat", s.Key, "--log", "other/1"); strings.Count(out, "\n") != 1 {
		t.Fatalf("segment cat of another log printed:\n%s", out)
	}

	_, err := n.cli(t, "segment", "cat", "segments/none.seg")
	wantCLIErr(t, err, "segments/none.seg", "not found")
	_, err = n.cli(t, "segment", "ls", "--blob", filepath.Join(t.TempDir(), "missing"))
	wantCLIErr(t, err, "missing", "no such file")

	// A damaged object is reported by name and makes ls fail.
	data, err := os.ReadFile(filepath.Join(n.blobDir, filepath.FromSlash(s.Key)))
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)-20] ^= 0xff
	bad := filepath.Join(n.blobDir, "segments", node, "zz-bad.seg")
	if err := os.WriteFile(bad, data, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = n.cli(t, "segment", "ls")
	wantCLIErr(t, err, "1 of 2 objects")
	if !strings.Contains(out, "zz-bad.seg") || !strings.Contains(out, "ERROR:") {
		t.Fatalf("segment ls with a damaged object printed:\n%s", out)
	}
	_, err = n.cli(t, "segment", "cat", "segments/"+node+"/zz-bad.seg")
	wantCLIErr(t, err, "zz-bad.seg")
}

// TestServerFromEnvironment: the persistent --server flag is bound to
// DSTL_SERVER by the root's bindSettings, and a flag wins over it.
func TestServerFromEnvironment(t *testing.T) {
	n := startCLINode(t)
	t.Setenv("DSTL_SERVER", n.url)
	if _, err := runCLI(t, "stream", "create", "s"); err != nil {
		t.Fatal(err)
	}
	out, err := runCLI(t, "stream", "list", "--json")
	if err != nil || !strings.Contains(out, `"name":"s"`) && !strings.Contains(out, `"name": "s"`) {
		t.Fatalf("stream list with DSTL_SERVER: %v %q", err, out)
	}
	t.Setenv("DSTL_SERVER", "http://127.0.0.1:1")
	_, err = runCLI(t, "stream", "list")
	wantCLIErr(t, err, "unavailable", "cannot reach the dstl node at http://127.0.0.1:1")
	if _, err := runCLI(t, "--server", n.url, "stream", "get", "s"); err != nil {
		t.Fatalf("--server does not win over DSTL_SERVER: %v", err)
	}
	t.Setenv("DSTL_SERVER", "ftp://x")
	_, err = runCLI(t, "stream", "list")
	wantCLIErr(t, err, "--server")
}

func TestTimeout(t *testing.T) {
	// A listener that accepts and never answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	start := time.Now()
	_, err = runCLI(t, "--server", "http://"+ln.Addr().String(), "stream", "list", "--timeout", "200ms")
	wantCLIErr(t, err, "deadline_exceeded", "200ms")
	if time.Since(start) > 5*time.Second {
		t.Fatalf("--timeout 200ms took %v", time.Since(start))
	}
}

func TestHelpers(t *testing.T) {
	for in, want := range map[string]string{"abc": "abc", "a b": "a b", "": `""`, "a\x00": `"a\x00"`, `"q"`: `"\"q\""`, "\xff": `"\xff"`, "tab\t": `"tab\t"`, "é": "é"} {
		if got := display([]byte(in)); got != want {
			t.Errorf("display(%q) = %s, want %s", in, got, want)
		}
	}
	for in, want := range map[string]string{"0..7": "0 7", " 3 .. 5 ": "3 5", "32767..32767": "32767 32767"} {
		lo, hi, err := parseKeyGroupRange(in)
		if err != nil || fmt.Sprint(lo, hi) != want {
			t.Errorf("parseKeyGroupRange(%q) = %d, %d, %v", in, lo, hi, err)
		}
	}
	for _, in := range []string{"", "3", "5..4", "a..b", "0..70000", "-1..2"} {
		if _, _, err := parseKeyGroupRange(in); err == nil {
			t.Errorf("parseKeyGroupRange(%q) accepted", in)
		}
	}
	for in, want := range map[string]string{"127.0.0.1:7600": "http://127.0.0.1:7600", "https://h:1/": "https://h:1", "http://h:1/api": "http://h:1/api"} {
		if got, err := serverURL(in); err != nil || got != want {
			t.Errorf("serverURL(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "ftp://h", "http://", "http://u:p@h"} {
		if _, err := serverURL(in); err == nil {
			t.Errorf("serverURL(%q) accepted", in)
		}
	}
	if got := humanBytes(1536); got != "1.5 KiB" {
		t.Errorf("humanBytes(1536) = %s", got)
	}
}
