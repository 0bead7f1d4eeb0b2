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
	"github.com/dstl-dev/dstl/changelog/keygroup"
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
	all := []kgRange{{0, testKeyGroups - 1}}
	lazyScenario(t, all, all)
}

// TestLazyRescaleKilledMidHydration is the same with a rescale: two
// writers (key groups 0..3, 4..7) checkpoint on the first node, three
// (0..2, 3..5, 6..7) open from it on the second, each range importing
// only the snapshot files it overlaps, clipped to it.
func TestLazyRescaleKilledMidHydration(t *testing.T) {
	t.Parallel()
	lazyScenario(t, []kgRange{{0, 3}, {4, 7}}, []kgRange{{0, 2}, {3, 5}, {6, 7}})
}

type kgRange struct{ lo, hi uint32 }

func (r kgRange) has(key string) bool {
	kg := uint32(keygroup.OfString(key, testKeyGroups))
	return r.lo <= kg && kg <= r.hi
}

func (r kgRange) proto() *dstlv1.KeyGroupRange { return &dstlv1.KeyGroupRange{Lo: r.lo, Hi: r.hi} }

func lazyScenario(t *testing.T, from, to []kgRange) {
	const stream = "lazy"
	blob := "file://" + t.TempDir()
	fastMat := []string{"--materialize-interval", "200ms", "--materialize-jitter", "0"}
	a := startNode(t, "node-a", nodeConfig{dataDir: t.TempDir(), blob: blob, args: fastMat})
	c := a.clients("connect")
	createStream(t, c, stream)
	m := model{}
	type writer struct {
		r    kgRange
		id   string
		last uint64
	}
	var ws []*writer
	for _, r := range from {
		w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream, KeyGroups: r.proto()})
		ws = append(ws, &writer{r: r, id: w.GetWriterId()})
	}
	// 12 MiB of incompressible values: ~50 s to hydrate at 256 KiB/s, far
	// longer than the steps before the kill take on a loaded machine.
	value := make([]byte, 2<<10)
	for b := range 24 {
		batches := make([][]*dstlv1.Change, len(ws))
		for i := range 256 {
			_, _ = rand.Read(value)
			ch := put("blob", fmt.Sprintf("k-%02d-%03d", b, i), hex.EncodeToString(value))
			for j, w := range ws {
				if w.r.has(string(ch.GetKey())) {
					batches[j] = append(batches[j], ch)
				}
			}
			m.apply(ch)
		}
		for j, w := range ws {
			w.last = appendBatch(t, c, w.id, dstlv1.Durability_DURABILITY_BUFFERED, w.last, batches[j])
		}
	}
	for _, w := range ws {
		checkpointPart(t, c, w.id, 1)
	}
	waitSnapshotOf(t, a, stream, 1, 60*time.Second)
	a.Kill()

	dataB := t.TempDir()
	slow := []string{"--hydrate-bandwidth", fmt.Sprint(256 << 10), "--materialize=false"}
	b := startNode(t, "node-b", nodeConfig{dataDir: dataB, blob: blob, args: slow})
	cb := b.clients("grpc")
	began := time.Now()
	ws = ws[:0]
	var epochs []uint64
	for _, r := range to {
		w := openWriter(t, cb, &dstlv1.OpenWriterRequest{Stream: stream, KeyGroups: r.proto()})
		if w.GetFromCheckpoint() != 1 {
			t.Fatalf("node-b opened %v from checkpoint %d, want 1", r, w.GetFromCheckpoint())
		}
		ws = append(ws, &writer{r: r, id: w.GetWriterId(), last: w.GetLastSqn()})
		epochs = append(epochs, w.GetEpoch())
	}
	k := stateKey{"blob", "k-07-123"}
	checkGets(t, cb, stream, model{k: m[k]})
	t.Logf("node-b: %d writer opens + first read in %v", len(to), time.Since(began).Round(time.Millisecond))

	h := hydrationOf(t, cb, stream)
	if h == nil || h.GetLocalBytes() >= h.GetTotalBytes() || h.GetTotalBytes() == 0 {
		t.Fatalf("hydration right after a lazy open at 256 KiB/s: %v, want some bytes still remote", h)
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
	for j, w := range ws {
		var more []*dstlv1.Change
		for _, ch := range puts("more", fmt.Sprintf("m%d", j), "during-hydration", 60) {
			if w.r.has(string(ch.GetKey())) {
				more = append(more, ch)
				m.apply(ch)
			}
		}
		if len(more) > 0 {
			w.last = appendBatch(t, cb, w.id, dstlv1.Durability_DURABILITY_LOCAL, w.last, more)
		}
	}
	for _, w := range ws {
		checkpointPart(t, cb, w.id, 2)
	}
	if h := hydrationOf(t, cb, stream); h.GetLocalFiles() >= h.GetTotalFiles() {
		t.Fatalf("hydration finished before the kill (%v): raise the state size or lower --hydrate-bandwidth", h)
	}
	b.Kill()

	b2 := startNode(t, "node-b-restarted", nodeConfig{dataDir: dataB, blob: blob, args: []string{"--hydrate-bandwidth", "0", "--materialize=false"}})
	cb = b2.clients("connect")
	for i, w := range ws {
		r := openWriter(t, cb, &dstlv1.OpenWriterRequest{Stream: stream, KeyGroups: w.r.proto(), ResumeEpoch: epochs[i]})
		if r.GetLastSqn() != w.last {
			t.Fatalf("resumed writer %s: last_sqn %d, want %d", w.id, r.GetLastSqn(), w.last)
		}
	}
	checkModel(t, "scan after the kill, hydration restarted", scanAll(t, cb, stream, 500), m)
	poll(t, 60*time.Second, "hydration after the restart", func() (bool, string) {
		h := hydrationOf(t, cb, stream)
		return h == nil || h.GetLocalFiles() == h.GetTotalFiles(), fmt.Sprintf("hydration %v", h)
	})
	checkModel(t, "scan after hydration", scanAll(t, cb, stream, 500), m)
}

// checkpointPart records a writer's part of checkpoint id (complete or
// not: other writers may still have to record theirs).
func checkpointPart(t *testing.T, c *apiClients, writer string, id uint64) {
	t.Helper()
	if _, err := c.writers.Checkpoint(ctxT(t), connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: writer, CheckpointId: id})); err != nil {
		t.Fatalf("Checkpoint %d of %s: %v", id, writer, err)
	}
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
