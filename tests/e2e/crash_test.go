package e2e

import (
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/internal/s3server"
)

// TestKillRestartRestore: a node takes appends of every durability, a
// persist and a checkpoint, and is SIGKILLed. Restarted on the same data
// directory it resumes the writer's epoch with every acknowledged durable
// change (even those only in its local log), and reads show them. A second
// node with an EMPTY data directory and the same blob store restores the
// checkpoints completed before and after the kill, exactly.
func TestKillRestartRestore(t *testing.T) {
	t.Parallel()
	crashScenario(t, crashEnv{blob: "file://" + t.TempDir(), protocol: "grpc"})
}

// TestKillRestartRestoreS3 is the same scenario on a real S3-compatible
// server (versitygw on loopback), over the Connect protocol.
func TestKillRestartRestoreS3(t *testing.T) {
	t.Parallel()
	s3 := s3server.Start(t)
	crashScenario(t, crashEnv{
		blob: s3.URL("dstl/e2e"),
		env: []string{
			"AWS_ACCESS_KEY_ID=" + s3.AccessKey,
			"AWS_SECRET_ACCESS_KEY=" + s3.SecretKey,
			"AWS_EC2_METADATA_DISABLED=true",
		},
		protocol: "connect",
	})
}

type crashEnv struct {
	blob     string
	env      []string
	protocol string
}

func crashScenario(t *testing.T, e crashEnv) {
	began := time.Now()
	const stream = "orders"
	// A long upload interval: only persists and checkpoints upload, so the
	// local appends after the persist live only in the node's local log
	// when it is killed.
	slow := []string{"--upload-interval", "1h"}
	dataA := t.TempDir()
	a := startNode(t, "node-a", nodeConfig{dataDir: dataA, blob: e.blob, env: e.env, args: slow})
	c := a.clients(e.protocol)
	createStream(t, c, stream)
	w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream})
	if w.GetLastSqn() != 0 || w.GetFromCheckpoint() != 0 || w.GetKeyGroups().GetHi() != testKeyGroups-1 {
		t.Fatalf("OpenWriter on a new stream: %v", w)
	}
	id := w.GetWriterId()
	m := model{}
	var last uint64
	appendAll := func(d dstlv1.Durability, changes []*dstlv1.Change) {
		t.Helper()
		last = appendBatch(t, c, id, d, last, changes)
		for _, ch := range changes {
			m.apply(ch)
		}
	}

	// 1. Buffered appends made durable by checkpoint 1.
	appendAll(dstlv1.Durability_DURABILITY_BUFFERED, append(puts("count", "k", "v1", 60),
		change(dstlv1.Op_OP_MERGE, "list", "m-1", "a"),
		change(dstlv1.Op_OP_MERGE, "list", "m-1", "b")))
	checkpoint(t, c, id, 1, "offsets=1")
	cp1 := m.clone()

	// 2. Local appends (fsynced in the local log), with a delete and a merge.
	appendAll(dstlv1.Durability_DURABILITY_LOCAL, append(puts("count", "k", "v2", 30),
		change(dstlv1.Op_OP_DELETE, "count", "k-059", ""),
		change(dstlv1.Op_OP_MERGE, "list", "m-1", "c")))

	// 3. Buffered appends made durable by a persist.
	appendAll(dstlv1.Durability_DURABILITY_BUFFERED, puts("other", "p", "v3", 40))
	if up := persist(t, c, id); up != last {
		t.Fatalf("Persist: up to %d, want %d", up, last)
	}

	// 4. Local appends after the persist: only in the local log.
	appendAll(dstlv1.Durability_DURABILITY_LOCAL, append(puts("count", "k", "v4", 10),
		change(dstlv1.Op_OP_MERGE, "list", "m-1", "d")))
	durable := last // every step so far acknowledged its changes durable
	mDurable := m.clone()

	// 5. Buffered appends never persisted: they may be lost, but only as a
	// suffix of the log.
	b5 := puts("buf", "z", "v5", 10)
	appendAll(dstlv1.Durability_DURABILITY_BUFFERED, b5)
	tried := last
	checkModel(t, "scan before the kill", scanAll(t, c, stream, 0), m)

	a.Kill()
	t.Logf("SIGKILLed node-a after SQN %d (durable up to %d)", tried, durable)

	// Restart on the same data directory and resume the epoch.
	a2 := startNode(t, "node-a-restarted", nodeConfig{dataDir: dataA, blob: e.blob, env: e.env, args: slow})
	c = a2.clients(e.protocol)
	r := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream, ResumeEpoch: w.GetEpoch()})
	if r.GetWriterId() != id || r.GetEpoch() != w.GetEpoch() {
		t.Fatalf("resume epoch %d: got writer %q epoch %d, want %q", w.GetEpoch(), r.GetWriterId(), r.GetEpoch(), id)
	}
	if r.GetLastSqn() < durable || r.GetLastSqn() > tried {
		t.Fatalf("resumed writer: last_sqn %d, want ≥ %d (every acknowledged durable SQN) and ≤ %d (every SQN appended)", r.GetLastSqn(), durable, tried)
	}
	t.Logf("resumed %s: last_sqn %d (durable %d, appended %d)", id, r.GetLastSqn(), durable, tried)
	// What survived of the buffered batch is exactly its first
	// last_sqn-durable changes.
	want := mDurable.clone()
	for _, ch := range b5[:r.GetLastSqn()-durable] {
		want.apply(ch)
	}
	checkModel(t, "scan after restart and resume", scanAll(t, c, stream, 7), want)
	checkGets(t, c, stream, want, stateKey{"count", "k-059"}, stateKey{"nope", "k-000"})
	if t.Failed() {
		return
	}

	// The writer goes on from its recovered SQN, and checkpoints again.
	m, last = want, r.GetLastSqn()
	appendAll(dstlv1.Durability_DURABILITY_LOCAL, append(puts("after", "q", "v6", 5),
		change(dstlv1.Op_OP_PUT, "count", "k-001", "v6")))
	checkpoint(t, c, id, 2, "offsets=2")
	cp2 := m.clone()
	list, err := c.checkpoints.ListCheckpoints(ctxT(t), connect.NewRequest(&dstlv1.ListCheckpointsRequest{Stream: stream}))
	if err != nil {
		t.Fatalf("ListCheckpoints: %v", err)
	}
	var ids []uint64
	for _, cp := range list.Msg.GetCheckpoints() {
		ids = append(ids, cp.GetId())
	}
	if !slices.Equal(ids, []uint64{1, 2}) {
		t.Errorf("ListCheckpoints: ids %v, want [1 2]", ids)
	}
	if code := a2.Terminate(time.Minute); code != 0 {
		t.Fatalf("node-a-restarted exited %d after SIGTERM, want 0", code)
	}

	// A node with an empty data directory and the same blob store.
	b := startNode(t, "node-b-empty", nodeConfig{dataDir: t.TempDir(), blob: e.blob, env: e.env})
	c = b.clients(e.protocol)
	got, err := c.checkpoints.GetCheckpoint(ctxT(t), connect.NewRequest(&dstlv1.GetCheckpointRequest{Stream: stream, Id: 1}))
	if err != nil {
		t.Fatalf("GetCheckpoint 1 on node-b: %v", err)
	}
	if parts := got.Msg.GetCheckpoint().GetParts(); len(parts) != 1 || string(parts[0].GetMetadata()) != "offsets=1" || parts[0].GetEpoch() != w.GetEpoch() {
		t.Errorf("GetCheckpoint 1 on node-b: parts %v, want one part of epoch %d with metadata offsets=1", parts, w.GetEpoch())
	}
	// Key groups without a writer on this node serve the newest complete
	// checkpoint (docs/api.md).
	checkModel(t, "node-b scan without a writer (newest checkpoint, 2)", scanAll(t, c, stream, 0), cp2)

	wb := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream, FromCheckpoint: 1})
	if wb.GetFromCheckpoint() != 1 || wb.GetEpoch() <= w.GetEpoch() || wb.GetLastSqn() != 0 {
		t.Errorf("OpenWriter from checkpoint 1 on node-b: %v", wb)
	}
	if md := wb.GetRestoredMetadata(); len(md) != 1 || string(md[0]) != "offsets=1" {
		t.Errorf("OpenWriter from checkpoint 1: restored_metadata %q, want [offsets=1]", md)
	}
	checkModel(t, "node-b scan of a writer restored from checkpoint 1", scanAll(t, c, stream, 13), cp1)
	checkGets(t, c, stream, cp1, stateKey{"other", "p-000"}, stateKey{"after", "q-000"})

	wb2 := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream, FromCheckpoint: 2})
	if md := wb2.GetRestoredMetadata(); len(md) != 1 || string(md[0]) != "offsets=2" {
		t.Errorf("OpenWriter from checkpoint 2: restored_metadata %q, want [offsets=2]", md)
	}
	checkModel(t, "node-b scan of a writer restored from checkpoint 2", scanAll(t, c, stream, 0), cp2)
	_, err = c.writers.Append(ctxT(t), connect.NewRequest(&dstlv1.AppendRequest{
		WriterId: wb.GetWriterId(), Changes: []*dstlv1.Change{put("count", "k-000", "zombie")},
	}))
	wantCode(t, "Append by the writer fenced by a newer epoch on the same node", err, connect.CodeFailedPrecondition)
	checkGets(t, c, stream, model{{"count", "k-000"}: cp2[stateKey{"count", "k-000"}]})
	t.Logf("scenario (%s, %s) took %v", e.protocol, strings.SplitN(e.blob, ":", 2)[0], time.Since(began).Round(time.Millisecond))
}
