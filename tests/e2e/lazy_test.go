package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// TestLazyRestoreKilledMidHydration: a node with an EMPTY data directory
// opens a writer from a snapshotted checkpoint of another (killed) node.
// The open imports the snapshot lazily: reads are served at once, from
// files still on the blob store, while the node hydrates them slowly
// (--hydrate-bandwidth). `dstl stream get` and GetStream show the progress.
// The node is SIGKILLed in the middle of the hydration and restarted on
// the same data directory: the resumed writer serves exactly the model,
// hydration completes, and what it appended before the kill survives.
func TestLazyRestoreKilledMidHydration(t *testing.T) {
	t.Parallel()
	const stream = "lazy"
	blob := "file://" + t.TempDir()
	fastMat := []string{"--materialize-interval", "200ms", "--materialize-jitter", "0"}
	a := startNode(t, "node-a", nodeConfig{dataDir: t.TempDir(), blob: blob, args: fastMat})
	c := a.clients("connect")
	createStream(t, c, stream)
	w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream})
	m := model{}
	var last uint64
	// 12 MiB of incompressible values: slow to hydrate at 1 MiB/s.
	value := make([]byte, 2<<10)
	for b := range 24 {
		var batch []*dstlv1.Change
		for i := range 256 {
			_, _ = rand.Read(value)
			batch = append(batch, put("blob", fmt.Sprintf("k-%02d-%03d", b, i), hex.EncodeToString(value)))
		}
		last = appendBatch(t, c, w.GetWriterId(), dstlv1.Durability_DURABILITY_BUFFERED, last, batch)
		for _, ch := range batch {
			m.apply(ch)
		}
	}
	checkpoint(t, c, w.GetWriterId(), 1, "cp1")
	waitSnapshotOf(t, a, stream, 1, 60*time.Second)
	a.Kill()

	dataB := t.TempDir()
	slow := []string{"--hydrate-bandwidth", fmt.Sprint(1 << 20), "--materialize=false"}
	b := startNode(t, "node-b", nodeConfig{dataDir: dataB, blob: blob, args: slow})
	cb := b.clients("grpc")
	began := time.Now()
	wb := openWriter(t, cb, &dstlv1.OpenWriterRequest{Stream: stream})
	if wb.GetFromCheckpoint() != 1 {
		t.Fatalf("node-b opened from checkpoint %d, want 1", wb.GetFromCheckpoint())
	}
	k := stateKey{"blob", "k-07-123"}
	checkGets(t, cb, stream, model{k: m[k]})
	t.Logf("node-b: writer open + first read in %v", time.Since(began).Round(time.Millisecond))

	h := hydrationOf(t, cb, stream)
	if h == nil || h.GetLocalBytes() >= h.GetTotalBytes() || h.GetTotalBytes() == 0 {
		t.Fatalf("hydration right after a lazy open at 1 MiB/s: %v, want some bytes still remote", h)
	}
	out := cliOK(t, "--server="+b.URL, "stream", "get", stream)
	if !strings.Contains(out, "HYDRATED") || !strings.Contains(out, "files)") {
		t.Errorf("dstl stream get during hydration does not show it:\n%s", out)
	}
	t.Logf("dstl stream get during hydration:\n%s", out)
	// Every read during hydration is exact (blocks fetched from the blob
	// store on demand).
	checkModel(t, "scan during hydration", scanAll(t, cb, stream, 500), m)

	// Appends during hydration, made durable by a checkpoint, then a kill
	// while files are still remote.
	lastB := wb.GetLastSqn()
	more := puts("more", "m", "during-hydration", 50)
	lastB = appendBatch(t, cb, wb.GetWriterId(), dstlv1.Durability_DURABILITY_LOCAL, lastB, more)
	for _, ch := range more {
		m.apply(ch)
	}
	checkpoint(t, cb, wb.GetWriterId(), 2, "cp2")
	if h := hydrationOf(t, cb, stream); h.GetLocalFiles() >= h.GetTotalFiles() {
		t.Fatalf("hydration finished before the kill (%v): raise the state size or lower --hydrate-bandwidth", h)
	}
	b.Kill()

	b2 := startNode(t, "node-b-restarted", nodeConfig{dataDir: dataB, blob: blob, args: []string{"--hydrate-bandwidth", "0", "--materialize=false"}})
	cb = b2.clients("connect")
	r := openWriter(t, cb, &dstlv1.OpenWriterRequest{Stream: stream, ResumeEpoch: wb.GetEpoch()})
	if r.GetLastSqn() != lastB {
		t.Fatalf("resumed writer: last_sqn %d, want %d", r.GetLastSqn(), lastB)
	}
	checkModel(t, "scan after the kill, hydration restarted", scanAll(t, cb, stream, 500), m)
	poll(t, 60*time.Second, "hydration after the restart", func() (bool, string) {
		h := hydrationOf(t, cb, stream)
		return h == nil || h.GetLocalFiles() == h.GetTotalFiles(), fmt.Sprintf("hydration %v", h)
	})
	checkModel(t, "scan after hydration", scanAll(t, cb, stream, 500), m)
}

// hydrationOf returns the stream's hydration on the node (nil: nothing was
// restored lazily there).
func hydrationOf(t *testing.T, c *apiClients, stream string) *dstlv1.Hydration {
	t.Helper()
	res, err := c.streams.GetStream(ctxT(t), connect.NewRequest(&dstlv1.GetStreamRequest{Name: stream}))
	if err != nil {
		t.Fatalf("GetStream %s: %v", stream, err)
	}
	return res.Msg.GetStream().GetHydration()
}
