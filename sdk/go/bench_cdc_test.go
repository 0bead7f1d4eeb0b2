package dstl_test

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/cdc/cdctest"
	"github.com/dstl-dev/dstl/cdc/feed"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/materializer"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// CDC through the SDK (issue 11): replay, follow lag, and snapshot then
// follow, each embedded (the in-process client: the node's Subscribe
// handler called directly, messages handed over a channel) and remote
// (dstl.Dial over loopback h2c), both clients of the same node in one run,
// so that their ratio is the wire's cost.
//
//	go test -run '^$' -bench BenchmarkSubscribeReplay -benchtime 1x ./sdk/go/
//	go test -run '^$' -bench BenchmarkFollowLag -benchtime 1x ./sdk/go/
//	DSTL_BENCH_STATE_MB=1024 go test -run '^$' -bench BenchmarkSnapshotFollow -benchtime 1x -timeout 30m ./sdk/go/
//
// Knobs: DSTL_BENCH_CHANGES (replay, default 1M, as cdc/feed's
// BenchmarkReplay); DSTL_BENCH_FOLLOW_RATE (changes/s the follow-lag writer
// appends, default 10000), DSTL_BENCH_CHECKPOINT_INTERVAL (default 1s),
// DSTL_BENCH_CHECKPOINTS (checkpoints measured, default 20);
// DSTL_BENCH_STATE_MB (snapshot, default 64) and DSTL_BENCH_BLOB (file or
// s3) as for BenchmarkRestore.

// cdcBenchNode is one node (changelog + server) on a blob store, with an
// in-process client and a remote client over loopback TCP.
type cdcBenchNode struct {
	node    *changelog.Node
	clients map[string]*dstl.Client // by mode
	// sent counts the bytes the node wrote to its TCP connections.
	sent *atomic.Int64
}

// countingListener counts the bytes written to the connections it accepts.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, l.n}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func openCDCBenchNode(b *testing.B, blobURL string, sopts server.Options) *cdcBenchNode {
	b.Helper()
	ctx := b.Context()
	dir := b.TempDir()
	store, err := blobstore.Open(ctx, blobURL)
	if err != nil {
		b.Fatal(err)
	}
	node, err := changelog.Open(ctx, changelog.Options{Store: store, DataDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	sopts.StateDir = filepath.Join(dir, "state")
	api, err := server.New(node, sopts)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	sent := new(atomic.Int64)
	hs := &http.Server{Handler: api.Handler(), Protocols: new(http.Protocols)}
	hs.Protocols.SetUnencryptedHTTP2(true)
	go hs.Serve(countingListener{ln, sent})
	h := api.InProcess()
	local, err := dstl.NewInProcessClient(dstl.Handlers{
		Streams: h.Streams, Writers: h.Writers, State: h.State, Checkpoints: h.Checkpoints,
		CDC: h.CDC, Subscribe: h.Subscribe,
	})
	if err != nil {
		b.Fatal(err)
	}
	remote, err := dstl.Dial(ctx, "http://"+ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	// The same without zstd (what a connect client that only knows gzip
	// gets): the SDK's default against the wire's common denominator.
	remoteGzip, err := dstl.Dial(ctx, "http://"+ln.Addr().String(), dstl.WithConnectOptions(connect.WithAcceptCompression("zstd", nil, nil)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx := context.Background()
		_ = remote.Close()
		_ = remoteGzip.Close()
		_ = local.Close()
		_ = hs.Shutdown(ctx)
		_ = api.Shutdown(ctx)
		_ = node.Close(ctx)
		_ = api.Close()
		_ = store.Close()
	})
	return &cdcBenchNode{node: node, clients: map[string]*dstl.Client{"embedded": local, "remote": remote, "remote-gzip": remoteGzip}, sent: sent}
}

func benchEnvInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func benchEnvDuration(b *testing.B, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		b.Fatalf("%s=%q: want a positive duration", name, v)
	}
	return d
}

// percentile is the nearest-rank p-th percentile (0 < p <= 100) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// BenchmarkSubscribeReplay replays cdc/feed BenchmarkReplay's workload (1M
// committed changes by default) through Client.Subscribe with NoFollow
// into a consumer that counts and discards the events: mode=feed is the
// feed alone in process (the baseline, as BenchmarkReplay), embedded the
// in-process client, remote the client over loopback h2c.
func BenchmarkSubscribeReplay(b *testing.B) {
	total := benchEnvInt(b, "DSTL_BENCH_CHANGES", 1_000_000)
	n := openCDCBenchNode(b, benchBlobURL(b), server.Options{})
	cdctest.WriteReplayWorkload(b, n.node, "s", total)
	for _, mode := range []string{"feed", "embedded", "remote", "remote-gzip"} {
		for _, form := range []dstl.Form{dstl.FormUpsert, dstl.FormRetract} {
			b.Run("mode="+mode+"/form="+form.String(), func(b *testing.B) {
				ctx := b.Context()
				var events, messages int
				sent0, cpu0 := n.sent.Load(), processCPU()
				start := time.Now()
				for b.Loop() {
					events, messages = 0, 0
					if mode == "feed" {
						f := cdc.FormUpsert
						if form == dstl.FormRetract {
							f = cdc.FormRetract
						}
						err := feed.Run(ctx, feed.Config{Node: n.node, Dir: b.TempDir()}, feed.Request{Stream: "s", Form: f, NoFollow: true}, func(bt *feed.Batch) error {
							events += len(bt.Events)
							messages++
							return nil
						})
						if err != nil {
							b.Fatal(err)
						}
						continue
					}
					sub := n.clients[mode].Subscribe(ctx, "s", dstl.SubscribeOptions{Form: form, NoFollow: true})
					for ev, err := range sub.Changes() {
						if err != nil {
							b.Fatal(err)
						}
						if !ev.Kind.IsMarker() {
							events++
						}
					}
				}
				sec := time.Since(start).Seconds() / float64(b.N)
				b.ReportMetric(float64(total)/sec, "changes/s")
				b.ReportMetric(float64(events)/sec, "events/s")
				// CPU of both ends (one process): steadier than wall time
				// on a shared machine.
				b.ReportMetric(float64((processCPU()-cpu0).Nanoseconds())/float64(b.N)/float64(total), "cpu-ns/change")
				if strings.HasPrefix(mode, "remote") {
					b.ReportMetric(float64(n.sent.Load()-sent0)/float64(b.N)/float64(total), "wireB/change")
				}
			})
		}
	}
}

// BenchmarkFollowLag: a writer appends DSTL_BENCH_FOLLOW_RATE changes/s
// (100-byte values over 100k keys, a batch every 10 ms) and checkpoints
// every DSTL_BENCH_CHECKPOINT_INTERVAL; a follower subscribed at
// StartLatest (upsert form) records when each checkpoint-complete marker
// arrives. Lag is the time from the return of the Checkpoint call to the
// marker's delivery; reported p50, p99 and max over
// DSTL_BENCH_CHECKPOINTS checkpoints. Writer and follower use the same
// client (the checkpoint call wakes the feeds of its node);
// mode=remote-poll follows on a second node sharing the blob store, which
// only polls (every CDCPollInterval, 200 ms).
func BenchmarkFollowLag(b *testing.B) {
	rate := benchEnvInt(b, "DSTL_BENCH_FOLLOW_RATE", 10_000)
	interval := benchEnvDuration(b, "DSTL_BENCH_CHECKPOINT_INTERVAL", time.Second)
	checkpoints := benchEnvInt(b, "DSTL_BENCH_CHECKPOINTS", 20)
	for _, mode := range []string{"embedded", "remote", "remote-poll"} {
		b.Run("mode="+mode, func(b *testing.B) {
			for b.Loop() {
				blobURL := benchBlobURL(b)
				n := openCDCBenchNode(b, blobURL, server.Options{})
				wc, fc := n.clients["embedded"], n.clients["embedded"]
				switch mode {
				case "remote":
					wc, fc = n.clients["remote"], n.clients["remote"]
				case "remote-poll":
					wc, fc = n.clients["remote"], openCDCBenchNode(b, blobURL, server.Options{}).clients["remote"]
				}
				lags := followLag(b, wc, fc, rate, interval, checkpoints)
				b.ReportMetric(percentile(lags, 50).Seconds()*1e3, "p50-ms")
				b.ReportMetric(percentile(lags, 99).Seconds()*1e3, "p99-ms")
				b.ReportMetric(percentile(lags, 100).Seconds()*1e3, "max-ms")
			}
		})
	}
}

// followLag runs the follow-lag workload: wc writes, fc follows.
func followLag(b *testing.B, wc, fc *dstl.Client, rate int, interval time.Duration, checkpoints int) []time.Duration {
	ctx, cancel := context.WithCancel(b.Context())
	defer cancel()
	if _, err := wc.CreateStream(ctx, "follow", 128); err != nil {
		b.Fatal(err)
	}
	w, err := wc.OpenWriter(ctx, "follow", dstl.WriterOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Abort()
	// Checkpoint 1 first, so that StartLatest means "after 1" on either node.
	if err := w.Put(ctx, "v", []byte("init"), []byte("x")); err != nil {
		b.Fatal(err)
	}
	if _, err := w.Checkpoint(ctx, 1, nil); err != nil {
		b.Fatal(err)
	}

	var mu sync.Mutex
	delivered := map[uint64]time.Time{}
	last := make(chan struct{})
	followErr := make(chan error, 1)
	go func() {
		sub := fc.Subscribe(ctx, "follow", dstl.SubscribeOptions{Start: dstl.StartLatest})
		for ev, err := range sub.Changes() {
			if err != nil {
				followErr <- err
				return
			}
			if ev.Kind == dstl.EventCheckpointComplete {
				mu.Lock()
				delivered[ev.Checkpoint] = time.Now()
				mu.Unlock()
				if ev.Checkpoint == uint64(checkpoints)+1 {
					close(last)
					followErr <- nil
					return
				}
			}
		}
	}()

	// The subscription resolves "latest" once its feed starts: give it
	// time, so that it follows from checkpoint 1 (a checkpoint it misses
	// at the start is not counted).
	time.Sleep(500 * time.Millisecond)
	rng := rand.New(rand.NewPCG(3, 4))
	returned := map[uint64]time.Time{}
	const tick = 10 * time.Millisecond
	perTick := max(1, rate*int(tick)/int(time.Second))
	t := time.NewTicker(tick)
	defer t.Stop()
	nextCP := time.Now().Add(interval)
	for id := uint64(2); id <= uint64(checkpoints)+1; {
		<-t.C
		for range perTick {
			value := make([]byte, 100)
			for j := 0; j+8 <= len(value); j += 8 {
				binary.LittleEndian.PutUint64(value[j:], rng.Uint64())
			}
			if err := w.Put(ctx, "v", fmt.Appendf(nil, "key-%012d", rng.IntN(100_000)), value); err != nil {
				b.Fatal(err)
			}
		}
		if time.Now().Before(nextCP) {
			continue
		}
		nextCP = nextCP.Add(interval)
		if _, err := w.Checkpoint(ctx, id, nil); err != nil {
			b.Fatal(err)
		}
		returned[id] = time.Now()
		id++
	}
	select {
	case <-last:
	case err := <-followErr:
		if err != nil {
			b.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		b.Fatal("the last checkpoint was not delivered in 30 s")
	}
	mu.Lock()
	defer mu.Unlock()
	var lags []time.Duration
	for id := uint64(2); id <= uint64(checkpoints)+1; id++ {
		d, ok := delivered[id]
		switch {
		case ok:
			lags = append(lags, d.Sub(returned[id]))
		case len(lags) > 0:
			b.Fatalf("checkpoint %d was not delivered", id)
		default:
			b.Logf("checkpoint %d completed before the follower started", id)
		}
	}
	if len(lags) == 0 {
		b.Fatal("no checkpoint delivered")
	}
	return lags
}

// BenchmarkSnapshotFollow: a state of DSTL_BENCH_STATE_MB (default 64
// MiB) of 1 KiB random values is written and checkpointed, and the
// checkpoint snapshotted (the materializer, synchronously); then a
// subscription with StartSnapshot reads it: the time to the first row
// (first-row-s), to the snapshot's checkpoint-complete marker
// (snapshot-s), rows/s and MB/s of values; then the writer (same node)
// updates 1000 keys and checkpoints, and follow-lag-ms is the time from
// that Checkpoint call's return to the delivery of its marker. After each
// iteration the new checkpoint is snapshotted too, so that every
// iteration starts from a snapshotted checkpoint.
func BenchmarkSnapshotFollow(b *testing.B) {
	const keyGroups = 128
	stateBytes := benchStateBytes(b)
	rows := stateBytes / benchValueSize
	ctx := b.Context()
	n := openCDCBenchNode(b, benchBlobURL(b), server.Options{})
	c := n.clients["embedded"]
	if _, err := c.CreateStream(ctx, "state", keyGroups); err != nil {
		b.Fatal(err)
	}
	w, err := c.OpenWriter(ctx, "state", dstl.WriterOptions{CacheBytes: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Abort()
	put := func(i int) {
		value := make([]byte, benchValueSize)
		if _, err := crand.Read(value); err != nil {
			b.Fatal(err)
		}
		if err := w.Put(ctx, "s", fmt.Appendf(nil, "key:%09d", i), value); err != nil {
			b.Fatal(err)
		}
	}
	writeStart := time.Now()
	for i := range rows {
		put(i)
	}
	cp := uint64(1)
	if _, err := w.Checkpoint(ctx, cp, nil); err != nil {
		b.Fatal(err)
	}
	written := time.Since(writeStart)
	mat, err := materializer.New(n.node, b.TempDir(), materializer.Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer mat.Close()
	materialize := func() {
		if _, err := mat.MaterializeStream(ctx, "state", true); err != nil {
			b.Fatal(err)
		}
	}
	matStart := time.Now()
	materialize()
	b.Logf("%d MiB: written and checkpointed in %v, snapshotted in %v", stateBytes>>20, written.Round(time.Millisecond), time.Since(matStart).Round(time.Millisecond))

	for _, mode := range modes {
		b.Run("mode="+mode, func(b *testing.B) {
			for b.Loop() {
				sub := n.clients[mode].Subscribe(ctx, "state", dstl.SubscribeOptions{Start: dstl.StartSnapshot})
				returned := make(chan time.Time, 1)
				var first, snapshot time.Duration
				var delivered time.Time
				got := 0
				start := time.Now()
				for ev, err := range sub.Changes() {
					if err != nil {
						b.Fatal(err)
					}
					if ev.Kind == dstl.EventReset {
						continue
					}
					if ev.Snapshot {
						if ev.Kind != dstl.EventCheckpointComplete {
							if got == 0 {
								first = time.Since(start)
							}
							got++
							continue
						}
						snapshot = time.Since(start)
						if ev.Checkpoint != cp || got != rows {
							b.Fatalf("snapshot of checkpoint %d with %d rows, want %d with %d", ev.Checkpoint, got, cp, rows)
						}
						// Follow: 1000 updates, one more checkpoint.
						go func() {
							for i := range 1000 {
								put(i * (rows / 1000))
							}
							if _, err := w.Checkpoint(ctx, cp+1, nil); err != nil {
								b.Error(err)
							}
							returned <- time.Now()
						}()
						continue
					}
					if ev.Kind == dstl.EventCheckpointComplete && ev.Checkpoint == cp+1 {
						delivered = time.Now()
						break
					}
				}
				lag := delivered.Sub(<-returned)
				cp++
				materialize()
				b.ReportMetric(first.Seconds(), "first-row-s")
				b.ReportMetric(snapshot.Seconds(), "snapshot-s")
				b.ReportMetric(float64(rows)/snapshot.Seconds(), "rows/s")
				b.ReportMetric(float64(stateBytes)/(1<<20)/snapshot.Seconds(), "MiB/s")
				b.ReportMetric(lag.Seconds()*1e3, "follow-lag-ms")
			}
		})
	}
}
