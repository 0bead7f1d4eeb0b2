package server

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

// pebbleNode is a node serving reads from a PebbleState, on directories
// that outlive it so that a test can restart it.
type pebbleNode struct {
	*testClients
	node *changelog.Node
	srv  *Server
	ps   *PebbleState
	stop func()
}

type pebbleDirs struct{ blob, data, state string }

func newPebbleDirs(t *testing.T) pebbleDirs {
	d := t.TempDir()
	return pebbleDirs{blob: filepath.Join(d, "blob"), data: filepath.Join(d, "data"), state: filepath.Join(d, "data", "state")}
}

// startPebbleNode runs a node on dirs. With tee, reads come from a
// PebbleState whose hooks also feed a LiveState (returned) for comparison.
func startPebbleNode(t *testing.T, dirs pebbleDirs, tee bool) (*pebbleNode, *LiveState) {
	t.Helper()
	return startPebbleNodeWith(t, dirs, tee, Options{})
}

// startPebbleNodeWith is startPebbleNode with the server's ReadWait and
// FoldQueueBytes taken from o.
func startPebbleNodeWith(t *testing.T, dirs pebbleDirs, tee bool, o Options) (*pebbleNode, *LiveState) {
	t.Helper()
	ctx := context.Background()
	store, err := file.Open(dirs.blob)
	if err != nil {
		t.Fatal(err)
	}
	nodeOpts := changelog.Options{Store: store, DataDir: dirs.data, GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	var live *LiveState
	opts := Options{StateDir: dirs.state, ReadWait: o.ReadWait, FoldQueueBytes: o.FoldQueueBytes}
	if tee {
		ps, err := OpenPebbleState(node, dirs.state, PebbleStateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if o.ReadWait > 0 {
			ps.readWait = o.ReadWait
		}
		if o.FoldQueueBytes > 0 {
			ps.queueBytes = o.FoldQueueBytes
		}
		live = NewLiveState(node)
		opts = Options{State: teeState{ps, live}}
	}
	srv, err := New(node, opts)
	if err != nil {
		t.Fatal(err)
	}
	ps := srv.owned
	if tee {
		ps = srv.state.(teeState).PebbleState
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), Protocols: new(http.Protocols)}
	hs.Protocols.SetUnencryptedHTTP2(true)
	go hs.Serve(ln)
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: p}}
	url := "http://" + ln.Addr().String()
	n := &pebbleNode{
		testClients: &testClients{
			url: url, http: hc,
			streams:    dstlv1connect.NewStreamServiceClient(hc, url),
			writers:    dstlv1connect.NewWriterServiceClient(hc, url),
			state:      dstlv1connect.NewStateServiceClient(hc, url),
			checkpoint: dstlv1connect.NewCheckpointServiceClient(hc, url),
		},
		node: node, srv: srv, ps: ps,
	}
	var once sync.Once
	n.stop = func() {
		once.Do(func() {
			hs.Close()
			if err := srv.Shutdown(ctx); err != nil {
				t.Errorf("shutdown: %v", err)
			}
			if err := node.Close(ctx); err != nil {
				t.Errorf("close node: %v", err)
			}
			if err := srv.Close(); err != nil {
				t.Errorf("close server: %v", err)
			}
			if tee {
				if err := ps.Close(); err != nil {
					t.Errorf("close state: %v", err)
				}
			}
			store.Close()
		})
	}
	t.Cleanup(n.stop)
	return n, live
}

// teeState reads from the PebbleState and feeds both with the hooks.
type teeState struct {
	*PebbleState
	live *LiveState
}

func (s teeState) WriterOpened(ctx context.Context, w *changelog.Writer) error {
	if err := s.live.WriterOpened(ctx, w); err != nil {
		return err
	}
	return s.PebbleState.WriterOpened(ctx, w)
}

func (s teeState) Appended(stream, id string, first uint64, batch []changelog.Change) {
	s.live.Appended(stream, id, first, batch)
	s.PebbleState.Appended(stream, id, first, batch)
}

func (s teeState) WriterClosed(stream, id string) {
	s.live.WriterClosed(stream, id)
	s.PebbleState.WriterClosed(stream, id)
}

func (s teeState) WriterFenced(stream, id string) {
	s.live.WriterFenced(stream, id)
	s.PebbleState.WriterFenced(stream, id)
}

func (s teeState) Forget(stream string) {
	s.live.Forget(stream)
	s.PebbleState.Forget(stream)
}

// must(f()).get(t) fails the test if f returned an error.
func must[T any](v T, err error) result[T] { return result[T]{v, err} }

type result[T any] struct {
	v   T
	err error
}

func (r result[T]) get(t *testing.T) T {
	t.Helper()
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.v
}

func (n *pebbleNode) create(t *testing.T, stream string, keyGroups uint32) {
	t.Helper()
	must(n.streams.CreateStream(context.Background(), connect.NewRequest(&dstlv1.CreateStreamRequest{Name: stream, KeyGroups: keyGroups}))).get(t)
}

func (n *pebbleNode) open(t *testing.T, req *dstlv1.OpenWriterRequest) *dstlv1.OpenWriterResponse {
	t.Helper()
	return must(n.writers.OpenWriter(context.Background(), connect.NewRequest(req))).get(t).Msg
}

func (n *pebbleNode) append(t *testing.T, id string, changes ...*dstlv1.Change) *dstlv1.AppendResponse {
	t.Helper()
	return must(n.writers.Append(context.Background(), connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: changes}))).get(t).Msg
}

func (n *pebbleNode) get(t *testing.T, stream string, kg uint32, state, key string) (string, bool) {
	t.Helper()
	res := must(n.state.Get(context.Background(), connect.NewRequest(&dstlv1.GetRequest{Stream: stream, KeyGroup: &kg, State: state, Key: []byte(key)}))).get(t)
	return string(res.Msg.Value), res.Msg.Found
}

// scan reads every page of a scan.
func (n *pebbleNode) scan(t *testing.T, req *dstlv1.ScanRequest) []string {
	t.Helper()
	var out []string
	for pages := 0; ; pages++ {
		res := must(n.state.Scan(context.Background(), connect.NewRequest(req))).get(t)
		for _, e := range res.Msg.Entries {
			out = append(out, fmt.Sprintf("%d/%s/%s=%s", e.KeyGroup, e.State, e.Key, e.Value))
		}
		if res.Msg.NextPageToken == "" {
			return out
		}
		if pages > 10000 {
			t.Fatal("scan does not end")
		}
		req.PageToken = res.Msg.NextPageToken
	}
}

func change(op dstlv1.Op, kg uint32, state, key, value string) *dstlv1.Change {
	return &dstlv1.Change{KeyGroup: kg, State: state, Op: op, Key: []byte(key), Value: []byte(value)}
}

func wantGet(t *testing.T, n *pebbleNode, stream string, kg uint32, state, key, want string, found bool) {
	t.Helper()
	got, ok := n.get(t, stream, kg, state, key)
	if ok != found || got != want {
		t.Fatalf("get %d/%s/%s: %q found=%v, want %q found=%v", kg, state, key, got, ok, want, found)
	}
}

func wantScan(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("%s:\n got  %q\n want %q", what, got, want)
	}
}

// Put, delete, merge, clear; scans by state, prefix, key groups and pages;
// a stream's deletion.
func TestPebbleStateOps(t *testing.T) {
	n, _ := startPebbleNode(t, newPebbleDirs(t), false)
	if n.ps == nil {
		t.Fatal("StateDir did not make a PebbleState")
	}
	n.create(t, "s", 4)
	id := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"}).WriterId
	P, D, M, C := dstlv1.Op_OP_PUT, dstlv1.Op_OP_DELETE, dstlv1.Op_OP_MERGE, dstlv1.Op_OP_CLEAR
	n.append(t, id,
		change(P, 0, "a", "k1", "v1"), change(P, 0, "a", "k2", "v2"), change(P, 1, "a", "k1", "x"),
		change(P, 0, "b", "k1", "b1"), change(M, 2, "", "m", "1"), change(M, 2, "", "m", "2"))
	n.append(t, id, change(D, 0, "a", "k2", ""), change(M, 2, "", "m", "3"), change(P, 3, "b", "p/1", "q"), change(P, 3, "b", "p/2", "r"), change(P, 3, "b", "z", "s"))
	wantGet(t, n, "s", 0, "a", "k1", "v1", true)
	wantGet(t, n, "s", 0, "a", "k2", "", false)
	wantGet(t, n, "s", 2, "", "m", "123", true)
	wantGet(t, n, "s", 1, "b", "k1", "", false)
	all := []string{"0/a/k1=v1", "0/b/k1=b1", "1/a/k1=x", "2//m=123", "3/b/p/1=q", "3/b/p/2=r", "3/b/z=s"}
	for _, size := range []int32{0, 1, 2, 3, 7} {
		wantScan(t, fmt.Sprintf("scan, pages of %d", size), n.scan(t, &dstlv1.ScanRequest{Stream: "s", PageSize: size}), all...)
	}
	wantScan(t, "state b", n.scan(t, &dstlv1.ScanRequest{Stream: "s", State: "b", PageSize: 1}), "0/b/k1=b1", "3/b/p/1=q", "3/b/p/2=r", "3/b/z=s")
	wantScan(t, "prefix p/", n.scan(t, &dstlv1.ScanRequest{Stream: "s", Prefix: []byte("p/"), PageSize: 1}), "3/b/p/1=q", "3/b/p/2=r")
	wantScan(t, "key groups 1..2", n.scan(t, &dstlv1.ScanRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 1, Hi: 2}, PageSize: 1}), "1/a/k1=x", "2//m=123")

	// Clear empties one (key group, state) only; merge after delete and
	// after clear starts over.
	n.append(t, id, change(C, 0, "a", "", ""), change(D, 2, "", "m", ""), change(M, 2, "", "m", "4"), change(C, 3, "b", "", ""), change(M, 3, "b", "p/1", "n"))
	wantScan(t, "after clears", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), "0/b/k1=b1", "1/a/k1=x", "2//m=4", "3/b/p/1=n")

	// A deleted stream's data is gone; a new stream of that name is empty.
	must(n.writers.CloseWriter(context.Background(), connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: id}))).get(t)
	must(n.streams.DeleteStream(context.Background(), connect.NewRequest(&dstlv1.DeleteStreamRequest{Name: "s"}))).get(t)
	n.create(t, "s", 2)
	wantScan(t, "recreated stream", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}))
	id = n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"}).WriterId
	n.append(t, id, change(P, 1, "a", "k", "new"))
	wantScan(t, "recreated stream after a put", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), "1/a/k=new")
}

// A writer resumed after a restart serves what it appended before (Replay),
// on top of the checkpoint it started from; until it resumes, its key
// groups serve the checkpoint (its view is dropped by the reopen).
func TestPebbleStateResumeAfterRestart(t *testing.T) {
	dirs := newPebbleDirs(t)
	n, _ := startPebbleNode(t, dirs, false)
	n.create(t, "s", 4)
	P, M := dstlv1.Op_OP_PUT, dstlv1.Op_OP_MERGE
	w := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"})
	n.append(t, w.WriterId, change(P, 0, "a", "k", "1"), change(M, 1, "a", "m", "x"), change(P, 3, "a", "gone", "?"))
	must(n.writers.Checkpoint(context.Background(), connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: w.WriterId, CheckpointId: 1}))).get(t)
	must(n.writers.CloseWriter(context.Background(), connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: w.WriterId}))).get(t)
	// A writer from checkpoint 1 appends, persists, and the node restarts.
	w = n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"})
	if w.FromCheckpoint != 1 {
		t.Fatalf("writer from checkpoint %d, want 1", w.FromCheckpoint)
	}
	n.append(t, w.WriterId, change(P, 0, "a", "k", "2"), change(M, 1, "a", "m", "y"), change(dstlv1.Op_OP_DELETE, 3, "a", "gone", ""))
	n.append(t, w.WriterId, change(M, 1, "a", "m", "z"))
	want := []string{"0/a/k=2", "1/a/m=xyz"}
	wantScan(t, "before the restart", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), want...)
	n.stop()
	if _, err := os.Stat(filepath.Join(dirs.state, "db")); err != nil {
		t.Fatalf("state dir: %v", err)
	}

	n, _ = startPebbleNode(t, dirs, false)
	// Without a writer, reads serve checkpoint 1.
	wantScan(t, "after the restart, no writer", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), "0/a/k=1", "1/a/m=x", "3/a/gone=?")
	r := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", ResumeEpoch: w.Epoch})
	if r.LastSqn != 4 {
		t.Fatalf("resumed at SQN %d, want 4", r.LastSqn)
	}
	wantScan(t, "resumed", n.scan(t, &dstlv1.ScanRequest{Stream: "s"}), want...)
	res := n.append(t, r.WriterId, change(M, 1, "a", "m", "!"))
	if res.FirstSqn != 5 {
		t.Fatalf("append after resume at SQN %d", res.FirstSqn)
	}
	wantGet(t, n, "s", 1, "a", "m", "xyz!", true)
}

// Key groups without a writer serve the newest checkpoint; a closed
// writer's view serves until a newer writer opens its key groups; a fenced
// writer's view is dropped.
func TestPebbleStateKeyGroupsWithoutWriter(t *testing.T) {
	n, live := startPebbleNode(t, newPebbleDirs(t), true)
	n.ps.refreshEvery, live.refreshEvery = 0, 0
	n.create(t, "s", 8)
	P := dstlv1.Op_OP_PUT
	ctx := context.Background()
	w := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s"})
	for kg := range uint32(8) {
		n.append(t, w.WriterId, change(P, kg, "a", "k", "cp1"))
	}
	must(n.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: w.WriterId, CheckpointId: 1}))).get(t)
	for kg := range uint32(8) {
		n.append(t, w.WriterId, change(P, kg, "a", "k", "after"))
	}
	must(n.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: w.WriterId}))).get(t)
	check := func(what string, want ...string) {
		t.Helper()
		got := n.scan(t, &dstlv1.ScanRequest{Stream: "s", PageSize: 3})
		wantScan(t, what, got, want...)
		compareWithLive(t, n.ps, live, "s", keygroup.Full(8))
	}
	kv := func(from, to uint32, v string) (out []string) {
		for kg := from; kg <= to; kg++ {
			out = append(out, fmt.Sprintf("%d/a/k=%s", kg, v))
		}
		return out
	}
	check("closed writer", kv(0, 7, "after")...)

	// A writer of key groups 2..3 from checkpoint 1 replaces the closed
	// view: every other key group serves checkpoint 1.
	w2 := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 2, Hi: 3}})
	n.append(t, w2.WriterId, change(P, 2, "a", "k", "w2"))
	check("writer of 2..3", slices.Concat(kv(0, 1, "cp1"), kv(2, 2, "w2"), kv(3, 7, "cp1"))...)
	// A second writer of 6..7 completes checkpoint 2 with the first.
	w3 := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 6, Hi: 7}})
	n.append(t, w3.WriterId, change(P, 7, "a", "k", "w3"), change(P, 7, "b", "x", "w3"))
	// Key groups 0..1 and 4..5 have no writer: checkpoint 2 leaves them as
	// they were in checkpoint 1 (their parts are carried over).
	res := must(n.checkpoint.CreateCheckpoint(ctx, connect.NewRequest(&dstlv1.CreateCheckpointRequest{Stream: "s"}))).get(t)
	cp2 := res.Msg.GetComplete() // then it holds w2's and w3's changes
	t.Logf("checkpoint 2 complete: %v", cp2)
	check("two writers", slices.Concat(kv(0, 1, "cp1"), kv(2, 2, "w2"), kv(3, 6, "cp1"), kv(7, 7, "w3"), []string{"7/b/x=w3"})...)

	// A writer of 3..6 fences both: their views go, the new writer's key
	// groups serve its checkpoint, the others the newest checkpoint.
	w4 := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 3, Hi: 6}})
	n.append(t, w4.WriterId, change(P, 5, "a", "k", "w4"))
	for _, id := range []string{w2.WriterId, w3.WriterId} {
		_, err := n.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{change(P, 6, "a", "k", "x")}}))
		if err == nil {
			t.Fatalf("append of fenced writer %s succeeded", id)
		}
	}
	want := slices.Concat(kv(0, 1, "cp1"), kv(2, 2, "cp1"), kv(3, 4, "cp1"), kv(5, 5, "w4"), kv(6, 6, "cp1"), kv(7, 7, "cp1"))
	if cp2 {
		want = slices.Concat(kv(0, 1, "cp1"), kv(2, 2, "w2"), kv(3, 4, "cp1"), kv(5, 5, "w4"), kv(6, 6, "cp1"), kv(7, 7, "w3"), []string{"7/b/x=w3"})
	}
	check("after the fence", want...)
}

// compareWithLive checks that both read paths return the same for every
// key of the stream, in full scans and key by key.
func compareWithLive(t *testing.T, ps *PebbleState, live *LiveState, stream string, r keygroup.Range) {
	t.Helper()
	ctx := context.Background()
	a, _, err := ps.Scan(ctx, ScanQuery{Stream: stream, KeyGroups: r, Limit: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := live.Scan(ctx, ScanQuery{Stream: stream, KeyGroups: r, Limit: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(a, b, func(x, y Entry) bool { return compareEntries(&x, &y) == 0 && bytes.Equal(x.Value, y.Value) }) {
		t.Fatalf("PebbleState and LiveState differ:\n pebble %v\n live   %v", a, b)
	}
	for _, e := range b {
		v, ok, err := ps.Get(ctx, stream, e.KeyGroup, e.State, e.Key)
		if err != nil || !ok || !bytes.Equal(v, e.Value) {
			t.Fatalf("get %d/%s/%s: %q %v %v, want %q", e.KeyGroup, e.State, e.Key, v, ok, err, e.Value)
		}
	}
}

// Batches that finish out of order apply in SQN order.
func TestPebbleStateAppendedOutOfOrder(t *testing.T) {
	n, _ := startPebbleNode(t, newPebbleDirs(t), false)
	n.create(t, "s", 2)
	ctx := context.Background()
	w, err := n.node.OpenWriter(ctx, changelog.WriterConfig{Stream: "s", KeyGroups: keygroup.Full(2)})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.ps.WriterOpened(ctx, w); err != nil {
		t.Fatal(err)
	}
	type batch struct {
		first uint64
		b     []changelog.Change
	}
	var batches []batch
	for i := range 6 {
		b := []changelog.Change{{KeyGroup: 1, State: "a", Op: changelog.OpMerge, Key: []byte("m"), Value: []byte{byte('0' + i)}}}
		first, _, err := w.Append(ctx, b, changelog.Buffered)
		if err != nil {
			t.Fatal(err)
		}
		batches = append(batches, batch{first, b})
	}
	for _, i := range []int{3, 1, 5, 0, 4, 2, 2} {
		n.ps.Appended("s", w.LogID(), batches[i].first, batches[i].b)
	}
	v, ok, err := n.ps.Get(ctx, "s", 1, "a", []byte("m"))
	if err != nil || !ok || string(v) != "012345" {
		t.Fatalf("merge of out-of-order batches: %q %v %v", v, ok, err)
	}
}

// Random batches through the server, read back through the API and
// compared with a map model and with LiveState fed the same hooks; with
// appends running concurrently (batches finish out of order), checkpoints,
// writers replaced over random key-group ranges, and restarts.
func TestPebbleStateRandomized(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("DSTL_MODEL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (DSTL_MODEL_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	const keyGroups = 8
	dirs := newPebbleDirs(t)
	n, live := startPebbleNode(t, dirs, true)
	n.ps.refreshEvery, live.refreshEvery = 0, 0
	n.create(t, "s", keyGroups)
	ctx := context.Background()
	states := []string{"", "a", "bb"}
	keys := []string{"k", "k1", "k2", "p/x", "p/y", "z"}

	// model: the state one writer of every key group sees.
	model := stateModel{}
	randChange := func() *dstlv1.Change {
		op := []dstlv1.Op{dstlv1.Op_OP_PUT, dstlv1.Op_OP_PUT, dstlv1.Op_OP_MERGE, dstlv1.Op_OP_MERGE, dstlv1.Op_OP_DELETE, dstlv1.Op_OP_CLEAR}[rng.IntN(6)]
		c := change(op, rng.Uint32N(keyGroups), states[rng.IntN(len(states))], keys[rng.IntN(len(keys))], strconv.Itoa(rng.IntN(100)))
		if op == dstlv1.Op_OP_CLEAR && rng.IntN(3) > 0 {
			c.Op = dstlv1.Op_OP_PUT // clears are rare
		}
		return c
	}
	checkModel := func(what string) {
		t.Helper()
		var want []string
		for k, v := range model {
			want = append(want, fmt.Sprintf("%d/%s/%s=%s", k.kg, k.state, k.key, v))
		}
		slices.SortFunc(want, func(a, b string) int {
			// (key group, state, key) order; key groups are one digit here
			ka, kb := splitEntry(a), splitEntry(b)
			return compareEntries(&ka, &kb)
		})
		got := n.scan(t, &dstlv1.ScanRequest{Stream: "s", PageSize: int32(1 + rng.IntN(5))})
		wantScan(t, what, got, want...)
		// A filtered scan and some gets.
		st := states[rng.IntN(len(states))]
		lo := rng.Uint32N(keyGroups)
		hi := lo + rng.Uint32N(keyGroups-lo)
		var wantF []string
		for _, e := range want {
			ke := splitEntry(e)
			if (st == "" || ke.State == st) && uint32(ke.KeyGroup) >= lo && uint32(ke.KeyGroup) <= hi && bytes.HasPrefix(ke.Key, []byte("p/")) {
				wantF = append(wantF, e)
			}
		}
		gotF := n.scan(t, &dstlv1.ScanRequest{Stream: "s", State: st, Prefix: []byte("p/"), KeyGroups: &dstlv1.KeyGroupRange{Lo: lo, Hi: hi}, PageSize: int32(1 + rng.IntN(3))})
		wantScan(t, what+fmt.Sprintf(" (state %q, key groups %d..%d, prefix p/)", st, lo, hi), gotF, wantF...)
		for range 5 {
			k := modelKey{rng.Uint32N(keyGroups), states[rng.IntN(len(states))], keys[rng.IntN(len(keys))]}
			v, ok := model[k]
			wantGet(t, n, "s", k.kg, k.state, k.key, v, ok)
		}
		compareWithLive(t, n.ps, live, "s", keygroup.Full(keyGroups))
	}

	type writer struct {
		id    string
		epoch uint64
		r     keygroup.Range
	}
	// Writers partition the key groups.
	open := func(lo, hi uint16, from uint64) writer {
		w := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: uint32(lo), Hi: uint32(hi)}, FromCheckpoint: from})
		return writer{w.WriterId, w.Epoch, keygroup.Range{Lo: lo, Hi: hi}}
	}
	writers := []writer{open(0, keyGroups-1, 0)}
	var cpModel stateModel // the model at the newest complete checkpoint
	cpID := uint64(0)

	for step := range 60 {
		switch x := rng.IntN(20); {
		case x < 14: // concurrent batches
			type done struct {
				first   uint64
				changes []*dstlv1.Change
			}
			var (
				mu   sync.Mutex
				res  []done
				wg   sync.WaitGroup
				errs []error
			)
			for range 1 + rng.IntN(4) {
				var changes []*dstlv1.Change
				for range 1 + rng.IntN(20) {
					changes = append(changes, randChange())
				}
				// Route each change to the writer of its key group: one
				// batch per writer.
				per := map[int][]*dstlv1.Change{}
				for _, c := range changes {
					i := slices.IndexFunc(writers, func(w writer) bool { return w.r.Contains(uint16(c.KeyGroup)) })
					per[i] = append(per[i], c)
				}
				for i, cs := range per {
					wg.Go(func() {
						r, err := n.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: writers[i].id, Changes: cs}))
						mu.Lock()
						defer mu.Unlock()
						if err != nil {
							errs = append(errs, err)
							return
						}
						res = append(res, done{r.Msg.FirstSqn, cs})
					})
				}
			}
			wg.Wait()
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			// Writers own disjoint key groups: the model order only
			// matters within a writer, i.e. by SQN.
			slices.SortFunc(res, func(a, b done) int { return int(a.first) - int(b.first) })
			for _, d := range res {
				for _, c := range d.changes {
					model.apply(c)
				}
			}
		case x < 16: // checkpoint every writer
			cpID++
			for _, w := range writers {
				must(n.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: w.id, CheckpointId: cpID}))).get(t)
			}
			cpModel = maps.Clone(model)
		case x < 18: // new writers over a random split, from the newest checkpoint
			if cpModel == nil {
				continue
			}
			for _, w := range writers {
				must(n.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: w.id}))).get(t)
			}
			cut := uint16(rng.IntN(keyGroups))
			writers = writers[:0]
			if cut > 0 {
				writers = append(writers, open(0, cut-1, cpID))
			}
			writers = append(writers, open(cut, keyGroups-1, cpID))
			model = maps.Clone(cpModel)
		default: // restart: every writer resumes its epoch
			n.stop()
			n, live = startPebbleNode(t, dirs, true)
			n.ps.refreshEvery, live.refreshEvery = 0, 0
			for i, w := range writers {
				r := n.open(t, &dstlv1.OpenWriterRequest{Stream: "s", ResumeEpoch: w.epoch, KeyGroups: &dstlv1.KeyGroupRange{Lo: uint32(w.r.Lo), Hi: uint32(w.r.Hi)}})
				writers[i].id = r.WriterId
			}
		}
		checkModel(fmt.Sprintf("step %d", step))
	}
}

// splitEntry parses "kg/state/key=value" as printed by pebbleNode.scan
// (states hold no '/', keys no '=').
func splitEntry(s string) Entry {
	kgs, rest, _ := bytes.Cut([]byte(s), []byte("/"))
	state, rest, _ := bytes.Cut(rest, []byte("/"))
	key, _, _ := bytes.Cut(rest, []byte("="))
	kg, _ := strconv.Atoi(string(kgs))
	return Entry{KeyGroup: uint16(kg), State: string(state), Key: key}
}

// modelKey is a key of the tests' map models of a stream's state.
type modelKey struct {
	kg         uint32
	state, key string
}

// stateModel is a map model of a stream's state: changes folded as the
// server folds them.
type stateModel map[modelKey]string

func (m stateModel) apply(c *dstlv1.Change) {
	k := modelKey{c.KeyGroup, c.State, string(c.Key)}
	switch c.Op {
	case dstlv1.Op_OP_PUT:
		m[k] = string(c.Value)
	case dstlv1.Op_OP_DELETE:
		delete(m, k)
	case dstlv1.Op_OP_MERGE:
		m[k] += string(c.Value)
	case dstlv1.Op_OP_CLEAR:
		for o := range m {
			if o.kg == k.kg && o.state == k.state {
				delete(m, o)
			}
		}
	}
}
