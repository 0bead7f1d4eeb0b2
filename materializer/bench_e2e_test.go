package materializer_test

// End-to-end benchmarks of the materializer: data written through a real
// changelog.Node and Writer onto a real blob store (the file store, or a
// versitygw started on loopback by internal/s3server), folded into real
// Pebble stores and published as snapshots. See "## Benchmarks: snapshots,
// footprint, checkpoint latency" in docs/materializer.md for the commands
// and the figures.
//
//   - BenchmarkMaterializeStream: one iteration appends N changes and
//     checkpoints them (untimed), then runs MaterializeStream (timed):
//     changes/s folded, bytes uploaded per snapshot.
//   - BenchmarkSnapshotBytes: a state of K keys × 100 B with a full base
//     snapshot; one iteration changes 1 % of the keys, checkpoints and
//     materializes: incremental-bytes, full-bytes, incremental-x.
//   - BenchmarkFootprint: steady state under a 50 %-overwrite workload with
//     snapshot adoption and both garbage collections after every
//     checkpoint: footprint-x = every object on the blob store ÷ live state.
//   - BenchmarkCheckpointLatencyGrowingState: the in-process materializer
//     runs (m.Run) while the state grows to DSTL_BENCH_STATE_MB on loopback
//     S3; p50/p99 of Writer.Checkpoint per state-size bucket.
//
// Run each with -benchtime 1x (the last two are one whole scenario per
// iteration); sizes are scaled by environment variables (see each
// benchmark). None of them runs without -bench.

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
	"github.com/dstl-dev/dstl/upload/file"
)

const (
	e2eStream    = "bench"
	e2eKeyGroups = 128
	e2eState     = "s"
	e2eKeyLen    = 16 // "key-%012d"
	e2eValueLen  = 100
	e2eBatch     = 1000 // changes per Append
	// e2eEntryBytes is the logical size of one live key: key + value.
	e2eEntryBytes = e2eKeyLen + e2eValueLen
)

// envInt reads a positive integer from the environment (def if unset).
func envInt(b *testing.B, name string, def int) int {
	b.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return v
}

// envFloat reads a non-negative number from the environment (def if unset).
func envFloat(b *testing.B, name string, def float64) float64 {
	b.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 {
		b.Fatalf("%s=%q: want a non-negative number", name, s)
	}
	return v
}

// e2eBlob opens a blob store for b: "file" (a directory under b.TempDir())
// or "s3" (a fresh bucket on a versitygw started on loopback for b).
func e2eBlob(b *testing.B, kind string) upload.BlobStore {
	b.Helper()
	var (
		s   upload.BlobStore
		err error
	)
	switch kind {
	case "file":
		s, err = file.Open(b.TempDir())
	case "s3":
		srv := s3server.Start(b)
		b.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
		b.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
		b.Setenv("AWS_CONFIG_FILE", filepath.Join(b.TempDir(), "none"))
		b.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(b.TempDir(), "none"))
		s, err = blobstore.Open(context.Background(), srv.URL("bench"))
	default:
		b.Fatalf("unknown blob store %q", kind)
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// pebbleLog drops Pebble's informational lines and sends its errors to the
// standard logger (not b.Logf: Pebble may log from its own goroutines).
type pebbleLog struct{}

func (pebbleLog) Infof(string, ...any)           {}
func (pebbleLog) Errorf(format string, a ...any) { log.Printf("pebble: "+format, a...) }
func (pebbleLog) Fatalf(format string, a ...any) { panic(fmt.Sprintf("pebble: "+format, a...)) }

// e2eEnv is one node with one writer owning every key group of the stream,
// and a materializer over the node's blob store.
type e2eEnv struct {
	blob upload.BlobStore
	node *changelog.Node
	w    *changelog.Writer
	m    *materializer.Materializer
	ckpt uint64 // newest checkpoint id taken
	vals valueGen
	buf  []changelog.Change
}

// newE2E opens the node (options no, Store and DataDir filled in), creates
// the stream, opens the writer and the materializer (config mc; Streams
// and the Pebble logger filled in). Everything is closed when b ends.
func newE2E(b *testing.B, blob upload.BlobStore, no changelog.Options, mc materializer.Config, text bool) *e2eEnv {
	b.Helper()
	ctx := context.Background()
	no.Store, no.DataDir = blob, b.TempDir()
	node, err := changelog.Open(ctx, no)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := node.Close(ctx); err != nil {
			b.Errorf("close node: %v", err)
		}
	})
	if _, err := node.CreateStream(ctx, e2eStream, e2eKeyGroups); err != nil {
		b.Fatal(err)
	}
	w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: e2eStream, KeyGroups: keygroup.Range{Lo: 0, Hi: e2eKeyGroups - 1}})
	if err != nil {
		b.Fatal(err)
	}
	mc.Streams = []string{e2eStream}
	mc.Store.Logger = pebbleLog{}
	m, err := materializer.New(node, b.TempDir(), mc)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := m.Close(); err != nil {
			b.Errorf("close materializer: %v", err)
		}
	})
	return &e2eEnv{blob: blob, node: node, w: w, m: m, vals: newValueGen(1, text)}
}

// valueGen makes 100-byte values: random bytes (incompressible) or random
// alphanumeric text (≈6 bits per byte: zstd keeps ~75 %).
type valueGen struct {
	rng  *rand.ChaCha8
	text bool
}

func newValueGen(seed uint64, text bool) valueGen {
	var s [32]byte
	s[0], s[1] = byte(seed), byte(seed>>8)
	return valueGen{rng: rand.NewChaCha8(s), text: text}
}

// fill overwrites p with values.
func (g valueGen) fill(p []byte) {
	_, _ = g.rng.Read(p)
	if g.text {
		const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
		for i, c := range p {
			p[i] = alnum[int(c)%len(alnum)]
		}
	}
}

func keyOf(id uint64) []byte   { return fmt.Appendf(make([]byte, 0, e2eKeyLen), "key-%012d", id) }
func groupOf(id uint64) uint16 { return uint16(id % e2eKeyGroups) }

// op is one change of the workload: a put (with a fresh value) or a delete
// of key id.
type op struct {
	id  uint64
	del bool
}

// write appends ops in batches of e2eBatch (buffered) and returns the
// payload bytes (keys + values) appended. pace, if set, is called after
// each batch with the bytes appended so far.
func (e *e2eEnv) write(b *testing.B, ops []op, pace func(int64)) int64 {
	b.Helper()
	ctx := context.Background()
	vals := make([]byte, e2eBatch*e2eValueLen)
	var payload int64
	for start := 0; start < len(ops); start += e2eBatch {
		chunk := ops[start:min(start+e2eBatch, len(ops))]
		e.vals.fill(vals[:len(chunk)*e2eValueLen])
		e.buf = e.buf[:0]
		for i, o := range chunk {
			c := changelog.Change{KeyGroup: groupOf(o.id), State: e2eState, Op: changelog.OpPut, Key: keyOf(o.id)}
			if o.del {
				c.Op = changelog.OpDelete
			} else {
				c.Value = vals[i*e2eValueLen : (i+1)*e2eValueLen]
			}
			payload += int64(len(c.Key) + len(c.Value))
			e.buf = append(e.buf, c)
		}
		if _, _, err := e.w.Append(ctx, e.buf, changelog.Buffered); err != nil {
			b.Fatal(err)
		}
		if pace != nil {
			pace(payload)
		}
	}
	return payload
}

// checkpoint takes the next checkpoint (with one writer it completes) and
// returns how long Writer.Checkpoint took and the part's blob key.
func (e *e2eEnv) checkpoint(b *testing.B) (time.Duration, string) {
	b.Helper()
	e.ckpt++
	t0 := time.Now()
	res, err := e.w.Checkpoint(context.Background(), e.ckpt, nil)
	d := time.Since(t0)
	if err != nil {
		b.Fatal(err)
	}
	if !res.Complete {
		b.Fatalf("checkpoint %d: not complete with one writer", e.ckpt)
	}
	return d, res.Part.Key
}

// materialize forces a snapshot of the newest checkpoint.
func (e *e2eEnv) materialize(b *testing.B) materializer.SnapshotResult {
	b.Helper()
	res, err := e.m.MaterializeStream(context.Background(), e2eStream, true)
	if err != nil {
		b.Fatal(err)
	}
	if res.Snapshot == nil || res.Snapshot.Checkpoint != e.ckpt {
		b.Fatalf("checkpoint %d: no snapshot published (%+v)", e.ckpt, res)
	}
	return res
}

// puts returns puts of ids [from, from+n).
func puts(from uint64, n int) []op {
	out := make([]op, n)
	for i := range out {
		out[i] = op{id: from + uint64(i)}
	}
	return out
}

func valueKinds() []string { return []string{"random", "text"} }

// BenchmarkMaterializeStream: end-to-end materialization throughput. One
// iteration appends DSTL_BENCH_CHANGES (default 500,000) puts of keys drawn
// uniformly from a keyspace of 4× that many, 100-byte random values, and
// checkpoints them (untimed); the timed part is MaterializeStream(force):
// plan, replay of the segments from the blob store, fold into Pebble,
// export and upload of the snapshot files, publication. The first
// iteration folds into an empty store and uploads a base; later ones a
// delta or a base as MaxDeltaRatio decides.
//
//	go test -run '^$' -bench MaterializeStream -benchtime 1x ./materializer
func BenchmarkMaterializeStream(b *testing.B) {
	for _, store := range []string{"file", "s3"} {
		b.Run("store="+store, func(b *testing.B) { benchMaterializeStream(b, store) })
	}
}

func benchMaterializeStream(b *testing.B, store string) {
	n := envInt(b, "DSTL_BENCH_CHANGES", 500_000)
	e := newE2E(b, e2eBlob(b, store), changelog.Options{GCInterval: -1}, materializer.Config{GCInterval: -1}, false)
	rng := rand.New(rand.NewPCG(11, 12))
	var folded, uploaded, payload int64
	var snapshots, bases, files int
	for b.Loop() {
		b.StopTimer()
		ops := make([]op, n)
		for i := range ops {
			ops[i] = op{id: rng.Uint64N(4 * uint64(n))}
		}
		payload += e.write(b, ops, nil)
		e.checkpoint(b)
		b.StartTimer()
		res := e.materialize(b)
		folded += res.Folded
		uploaded += res.Uploaded
		files += res.Files
		snapshots++
		if res.Base {
			bases++
		}
	}
	sec := b.Elapsed().Seconds()
	b.ReportMetric(float64(folded)/sec, "changes/s")
	b.ReportMetric(float64(payload)/sec/1e6, "MB/s")
	b.ReportMetric(float64(uploaded)/float64(snapshots), "bytes/snapshot")
	b.ReportMetric(float64(files)/float64(snapshots), "files/snapshot")
	b.ReportMetric(float64(bases)/float64(snapshots), "base-share")
}

// BenchmarkSnapshotBytes: a state of DSTL_BENCH_KEYS (default 200,000)
// keys × 100-byte values with a full base snapshot (setup, untimed); one
// iteration changes 1 % of the keys (distinct keys, new values),
// checkpoints and materializes (timed). incremental-bytes is the mean of
// res.Uploaded over the iterations that published a delta; full-bytes the
// base run's bytes (the size of a forced full export); incremental-x their
// ratio.
//
//	go test -run '^$' -bench SnapshotBytes -benchtime 1x ./materializer
func BenchmarkSnapshotBytes(b *testing.B) {
	for _, v := range valueKinds() {
		b.Run("values="+v, func(b *testing.B) { benchSnapshotBytes(b, v == "text") })
	}
}

func benchSnapshotBytes(b *testing.B, text bool) {
	k := envInt(b, "DSTL_BENCH_KEYS", 200_000)
	e := newE2E(b, e2eBlob(b, "file"), changelog.Options{GCInterval: -1}, materializer.Config{GCInterval: -1}, text)
	e.write(b, puts(0, k), nil)
	e.checkpoint(b)
	base := e.materialize(b)
	if !base.Base {
		b.Fatal("first snapshot is not a base")
	}
	man, err := materializer.DecodeManifest(*base.Snapshot)
	if err != nil {
		b.Fatal(err)
	}
	full := man.Runs[0].Bytes
	rng := rand.New(rand.NewPCG(21, 22))
	changed := max(k/100, 1)
	var deltaBytes int64
	var deltas, bases int
	for b.Loop() {
		b.StopTimer()
		ops := make([]op, changed)
		for i, id := range rng.Perm(k)[:changed] {
			ops[i] = op{id: uint64(id)}
		}
		e.write(b, ops, nil)
		e.checkpoint(b)
		b.StartTimer()
		res := e.materialize(b)
		if res.Base {
			bases++
			continue
		}
		deltas++
		deltaBytes += res.Uploaded
	}
	if deltas == 0 {
		b.Fatal("no delta snapshot")
	}
	inc := float64(deltaBytes) / float64(deltas)
	b.ReportMetric(inc, "incremental-bytes")
	b.ReportMetric(float64(full), "full-bytes")
	b.ReportMetric(inc/float64(full), "incremental-x")
	b.ReportMetric(float64(full)/float64(int64(k)*e2eEntryBytes), "full/logical")
	b.ReportMetric(float64(bases), "bases")
}

// blobUsage is what the blob store holds, by kind of object.
type blobUsage struct {
	total, segments, sst, sstReferenced, records, journal, other int64
	objects, metaObjects                                         int
}

// usage lists every object on the blob store and classifies it.
func usage(b *testing.B, e *e2eEnv) blobUsage {
	b.Helper()
	ctx := context.Background()
	var u blobUsage
	cfg, err := e.node.Stream(ctx, e2eStream)
	if err != nil {
		b.Fatal(err)
	}
	sstPrefix := changelog.SnapshotFilePrefix(e2eStream, cfg.Incarnation)
	sizes := map[string]int64{}
	for o, err := range upload.Walk(ctx, e.blob, "", "") {
		if err != nil {
			b.Fatal(err)
		}
		u.objects++
		u.total += o.Size
		switch {
		case strings.HasPrefix(o.Key, "segments/"):
			u.segments += o.Size
		case strings.HasPrefix(o.Key, sstPrefix):
			u.sst += o.Size
			sizes[o.Key] = o.Size
		case strings.Contains(o.Key, "/snapshots/"):
			u.records += o.Size
			u.metaObjects++
		case strings.Contains(o.Key, "/journal/"):
			u.journal += o.Size
			u.metaObjects++
		default: // checkpoint parts, stream catalog, …
			u.other += o.Size
			u.metaObjects++
		}
	}
	// The files the published snapshot records reference (the rest waits
	// for CollectFiles' second sighting).
	snaps, err := e.node.Snapshots(ctx, e2eStream)
	if err != nil {
		b.Fatal(err)
	}
	seen := map[string]bool{}
	for _, s := range snaps {
		man, err := materializer.DecodeManifest(s)
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range man.Runs {
			for _, f := range r.Files {
				if !seen[f.Name] {
					seen[f.Name] = true
					u.sstReferenced += sizes[f.Name]
				}
			}
		}
	}
	return u
}

// footprintCase is one configuration of BenchmarkFootprint.
type footprintCase struct {
	name string
	text bool
	// ckpts: checkpoints per cycle (the cycle's writes are split between
	// them); only the last one is materialized.
	ckpts int
	// grace is the materializer's GCGrace (0: 1 ns); each cycle then
	// advances its (fake) clock by cycleTime.
	grace, cycleTime time.Duration
}

// BenchmarkFootprint: the blob-store footprint in steady state under a
// 50 %-overwrite workload. A live state of DSTL_BENCH_FOOTPRINT_KEYS
// (default 100,000) keys × 100 B; each of DSTL_BENCH_CYCLES (default 40)
// cycles writes DSTL_BENCH_CHURN_PCT (default 10) % of K: half overwrite
// random live keys, half put new keys while deleting as many random live
// keys (the live set stays K),
// then checkpoints, MaterializeStream (forced), node.AdoptSnapshots,
// node.CollectGarbage and m.CollectFiles, and lists every object on the
// blob store. RetainCheckpoints is at its default, 3.
//
//   - values=random: incompressible values, all grace periods 1 ns (the
//     materializer still deletes a file only at its second unreferenced
//     sighting, i.e. one cycle later).
//   - values=text: the same with alphanumeric values (zstd keeps ~75 %).
//   - values=random,ckpts-per-snapshot=6: the cycle's writes go to 6
//     checkpoints, only the last is materialized (production cadence:
//     checkpoints every 10 s, snapshots every 60 s).
//   - values=random,production-graces: the materializer's GCGrace (10 min,
//     for files never referenced) and ReleasedGrace (1 min, for files a
//     deleted record released) at their production defaults, with its
//     clock advanced by 60 s per cycle (the default Interval).
//
// footprint-x is the total ÷ live state (Σ len(key)+len(value) of the live
// keys) after the last cycle; footprint-avg-x / footprint-max-x are over
// the steady-state window: whole base-to-base periods of the second half
// of the cycles (window-cycles long); segments-bytes, sst-bytes,
// sst-referenced-bytes (files the snapshot records reference) and
// meta-bytes (snapshot records, journal, checkpoint parts, catalog) are
// averages over the same window, meta-objects the count after the last
// cycle.
//
//	go test -run '^$' -bench Footprint -benchtime 1x -v ./materializer
func BenchmarkFootprint(b *testing.B) {
	for _, c := range []footprintCase{
		{name: "values=random", ckpts: 1},
		{name: "values=text", text: true, ckpts: 1},
		{name: "values=random,ckpts-per-snapshot=6", ckpts: 6},
		{name: "values=random,production-graces", ckpts: 1, grace: 10 * time.Minute, cycleTime: time.Minute},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				benchFootprint(b, c)
			}
		})
	}
}

func benchFootprint(b *testing.B, fc footprintCase) {
	k := envInt(b, "DSTL_BENCH_FOOTPRINT_KEYS", 100_000)
	cycles := envInt(b, "DSTL_BENCH_CYCLES", 40)
	churn := envFloat(b, "DSTL_BENCH_CHURN_PCT", 10)
	if cycles < 8 {
		b.Fatalf("DSTL_BENCH_CYCLES=%d: at least 8", cycles)
	}
	ctx := context.Background()
	mc := materializer.Config{GCInterval: -1, GCGrace: time.Nanosecond, ReleasedGrace: time.Nanosecond}
	var fake *clock.Fake
	if fc.grace > 0 {
		// Production graces: GCGrace as given, ReleasedGrace its default.
		fake = clock.NewFake(time.Now())
		mc.GCGrace, mc.ReleasedGrace, mc.Clock = fc.grace, 0, fake
	}
	e := newE2E(b, e2eBlob(b, "file"), changelog.Options{GCInterval: -1, GCGrace: time.Nanosecond}, mc, fc.text)
	live := make([]uint64, k)
	for i := range live {
		live[i] = uint64(i)
	}
	next := uint64(k)
	liveBytes := float64(int64(k) * e2eEntryBytes)
	e.write(b, puts(0, k), nil)
	e.checkpoint(b)
	e.materialize(b)
	rng := rand.New(rand.NewPCG(31, 32))
	half := max(int(float64(k)*churn/200), 1)
	var hist []blobUsage
	var bases []int // indexes into hist of the cycles that uploaded a base
	b.Logf("cycle  snapshot  uploaded  total MB  segments MB  sst MB (referenced)  meta KB (objects)  footprint-x")
	for c := 1; c <= cycles; c++ {
		ops := make([]op, 0, 3*half)
		for range half {
			ops = append(ops, op{id: live[rng.IntN(k)]})
		}
		for range half {
			i := rng.IntN(k)
			ops = append(ops, op{id: live[i], del: true}, op{id: next})
			live[i] = next
			next++
		}
		per := (len(ops) + fc.ckpts - 1) / fc.ckpts
		for i := 0; i < len(ops); i += per {
			e.write(b, ops[i:min(i+per, len(ops))], nil)
			e.checkpoint(b)
		}
		res := e.materialize(b)
		if fake != nil {
			fake.Advance(fc.cycleTime)
		}
		if _, err := e.node.AdoptSnapshots(ctx); err != nil {
			b.Fatal(err)
		}
		if _, err := e.node.CollectGarbage(ctx); err != nil {
			b.Fatal(err)
		}
		if _, err := e.m.CollectFiles(ctx, e2eStream); err != nil {
			b.Fatal(err)
		}
		u := usage(b, e)
		kind := "delta"
		if res.Base {
			kind = "base"
			bases = append(bases, len(hist))
		}
		hist = append(hist, u)
		b.Logf("%5d  %-8s  %5.2f MB  %8.2f  %11.2f  %6.2f (%6.2f)  %7.1f (%7d)  %11.3f",
			c, kind, float64(res.Uploaded)/1e6, float64(u.total)/1e6, float64(u.segments)/1e6,
			float64(u.sst)/1e6, float64(u.sstReferenced)/1e6, float64(u.records+u.journal+u.other)/1e3, u.metaObjects,
			float64(u.total)/liveBytes)
	}
	// The steady-state window: whole base-to-base periods within the
	// second half of the cycles, or the second half if it has fewer than
	// two bases.
	lo, hi := len(hist)/2, len(hist)
	if i := slices.IndexFunc(bases, func(c int) bool { return c >= lo }); i >= 0 && i+1 < len(bases) {
		lo, hi = bases[i], bases[len(bases)-1]
	}
	window := hist[lo:hi]
	n := int64(len(window))
	var avg blobUsage
	var maxTotal int64
	for _, u := range window {
		avg.total += u.total
		avg.segments += u.segments
		avg.sst += u.sst
		avg.sstReferenced += u.sstReferenced
		avg.other += u.records + u.journal + u.other
		maxTotal = max(maxTotal, u.total)
	}
	avg.total, avg.segments, avg.sst, avg.sstReferenced, avg.other = avg.total/n, avg.segments/n, avg.sst/n, avg.sstReferenced/n, avg.other/n
	b.Logf("steady-state window: cycles %d..%d", lo+1, hi)
	b.ReportMetric(float64(hist[len(hist)-1].total)/liveBytes, "footprint-x")
	b.ReportMetric(float64(avg.total)/liveBytes, "footprint-avg-x")
	b.ReportMetric(float64(maxTotal)/liveBytes, "footprint-max-x")
	b.ReportMetric(liveBytes, "live-bytes")
	b.ReportMetric(float64(avg.segments), "segments-bytes")
	b.ReportMetric(float64(avg.sst), "sst-bytes")
	b.ReportMetric(float64(avg.sstReferenced), "sst-referenced-bytes")
	b.ReportMetric(float64(avg.other), "meta-bytes")
	b.ReportMetric(float64(hist[len(hist)-1].metaObjects), "meta-objects")
	b.ReportMetric(float64(n), "window-cycles")
}

// latencyBucket is a state-size bucket of
// BenchmarkCheckpointLatencyGrowingState: checkpoints taken while the state
// was in (previous bucket's upTo, upTo].
type latencyBucket struct {
	label string
	upTo  int64
	lat   []time.Duration
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(p*float64(len(sorted)-1)+0.5)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkCheckpointLatencyGrowingState: checkpoint latency while the
// state grows, on a loopback S3 server (versitygw), with the node's
// background snapshot adoption and segment collection (every 10 s, 30 s
// grace) and, in materializer=on, the in-process materializer running
// (m.Run: Interval 1 s, Poll 250 ms, file collection every 10 s with a
// 30 s grace). materializer=off is the control: nothing is materialized,
// so the log is never truncated.
//
// One writer appends puts of new keys (16 + 100 random bytes, 128 key
// groups) paced at DSTL_BENCH_APPEND_MBPS (default 4 MB/s of payload; 0:
// as fast as it can) until the state is DSTL_BENCH_STATE_MB (default 1024)
// MiB; after every DSTL_BENCH_CHECKPOINT_MB (default 2) MiB it calls
// Writer.Checkpoint, which persists the tail appended since the scheduler's
// last flush, stores the part and completes the checkpoint, and records
// its latency. p50/p99 are reported per state bucket: @100MB = checkpoints
// taken with a state of up to 100 MiB, @500MB = (100, 500] MiB, @1GB =
// (500, 1024], @2GB = (1024, 2048]. p99-growth is the last bucket's p99 ÷
// the first's: flat means ≈ 1. The log has a row per 100 MiB: latencies,
// the size of the checkpoint part (it lists the segments since the log's
// truncation point) and how far the newest snapshot is behind.
//
//	go test -run '^$' -bench CheckpointLatencyGrowingState -benchtime 1x -timeout 60m -v ./materializer
//	DSTL_BENCH_STATE_MB=2048 go test -run '^$' -bench 'CheckpointLatencyGrowingState/materializer=on' -benchtime 1x -timeout 60m -v ./materializer
func BenchmarkCheckpointLatencyGrowingState(b *testing.B) {
	stateMB := envInt(b, "DSTL_BENCH_STATE_MB", 1024)
	stepMB := envFloat(b, "DSTL_BENCH_CHECKPOINT_MB", 2)
	rate := envFloat(b, "DSTL_BENCH_APPEND_MBPS", 4) * 1e6
	if stepMB <= 0 {
		b.Fatal("DSTL_BENCH_CHECKPOINT_MB must be positive")
	}
	for _, on := range []bool{true, false} {
		name := "materializer=on"
		if !on {
			name = "materializer=off"
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				benchCheckpointLatency(b, on, int64(stateMB)<<20, int64(stepMB*(1<<20)), rate)
			}
		})
	}
}

func benchCheckpointLatency(b *testing.B, materialize bool, stateBytes, stepBytes int64, rate float64) {
	ctx := context.Background()
	e := newE2E(b, e2eBlob(b, "s3"),
		changelog.Options{GCInterval: 10 * time.Second, GCGrace: 30 * time.Second},
		materializer.Config{Interval: time.Second, Poll: 250 * time.Millisecond, GCInterval: 10 * time.Second, GCGrace: 30 * time.Second}, false)
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var runErr error
	if materialize {
		wg.Go(func() { runErr = e.m.Run(runCtx) })
	}
	stopRun := sync.OnceFunc(func() {
		stop()
		wg.Wait()
	})
	b.Cleanup(stopRun) // runs before the materializer and the node close

	var buckets []*latencyBucket
	for _, bk := range []struct {
		label string
		mb    int64
	}{{"100MB", 100}, {"500MB", 500}, {"1GB", 1024}, {"2GB", 2048}, {"4GB", 4096}} {
		buckets = append(buckets, &latencyBucket{label: bk.label, upTo: bk.mb << 20})
		if bk.mb<<20 >= stateBytes {
			break
		}
	}
	// Rows of the log table: one per 100 MiB of state.
	type row struct {
		lat              []time.Duration
		partBytes        int64 // of the row's last checkpoint
		snapCkpt, behind uint64
	}
	const rowBytes = 100 << 20
	rows := make([]row, (stateBytes+rowBytes-1)/rowBytes)

	perStep := int(max(stepBytes/e2eEntryBytes, 1))
	start := time.Now()
	var appended int64
	pace := func(n int64) {
		if rate <= 0 {
			return
		}
		if d := time.Duration(float64(appended+n)/rate*float64(time.Second)) - time.Since(start); d > 0 {
			time.Sleep(d)
		}
	}
	next := uint64(0)
	for appended < stateBytes {
		appended += e.write(b, puts(next, perStep), pace)
		next += uint64(perStep)
		d, part := e.checkpoint(b)
		for _, bk := range buckets {
			if appended <= bk.upTo || bk == buckets[len(buckets)-1] {
				bk.lat = append(bk.lat, d)
				break
			}
		}
		r := min(int((appended-1)/rowBytes), len(rows)-1)
		rows[r].lat = append(rows[r].lat, d)
		if (appended+int64(perStep)*e2eEntryBytes-1)/rowBytes != (appended-1)/rowBytes || appended >= stateBytes {
			// The row's last checkpoint: the part's size and how far the
			// materializer is.
			info, err := e.blob.Stat(ctx, part)
			if err != nil {
				b.Fatal(err)
			}
			rows[r].partBytes = info.Size
			snaps, err := e.node.Snapshots(ctx, e2eStream)
			if err != nil {
				b.Fatal(err)
			}
			if len(snaps) > 0 {
				rows[r].snapCkpt = snaps[len(snaps)-1].Checkpoint
			}
			rows[r].behind = e.ckpt - rows[r].snapCkpt
		}
	}
	elapsed := time.Since(start)
	stopRun()
	if runErr != nil {
		b.Fatal(runErr)
	}
	b.Logf("appended %d MiB in %v (%.1f MB/s), %d checkpoints of %.1f MiB",
		appended>>20, elapsed.Round(time.Millisecond), float64(appended)/elapsed.Seconds()/1e6, e.ckpt, float64(stepBytes)/(1<<20))
	var st materializer.Status
	if materialize {
		sts := e.m.Status()
		if len(sts) != 1 {
			b.Fatalf("materializer status: %+v", sts)
		}
		st = sts[0]
		b.Logf("materializer: %d snapshots (%d bases), %.0f MB uploaded, %d changes folded, newest snapshot of checkpoint %d of %d, %d files deleted",
			st.Snapshots, st.BaseSnapshots, float64(st.BytesUploaded)/1e6, st.ChangesFolded, st.SnapshotCheckpoint, e.ckpt, st.FilesDeleted)
		if st.LastError != "" {
			b.Logf("materializer's last error: %s", st.LastError)
		}
	}
	b.Logf("state (MiB)   checkpoints  p50 ms  p99 ms  max ms  part KB  newest snapshot (checkpoints behind)")
	for i, r := range rows {
		if len(r.lat) == 0 {
			continue
		}
		s := slices.Sorted(slices.Values(r.lat))
		b.Logf("%5d-%-5d   %11d  %6.1f  %6.1f  %6.1f  %7.1f  %d (%d)", i*100, (i+1)*100, len(s),
			ms(percentile(s, 0.5)), ms(percentile(s, 0.99)), ms(s[len(s)-1]), float64(r.partBytes)/1e3, r.snapCkpt, r.behind)
	}
	var first, last float64
	for _, bk := range buckets {
		if len(bk.lat) == 0 {
			continue
		}
		s := slices.Sorted(slices.Values(bk.lat))
		p99 := ms(percentile(s, 0.99))
		b.ReportMetric(ms(percentile(s, 0.5)), "p50-ms@"+bk.label)
		b.ReportMetric(p99, "p99-ms@"+bk.label)
		if first == 0 {
			first = p99
		}
		last = p99
	}
	if first > 0 {
		b.ReportMetric(last/first, "p99-growth")
	}
	b.ReportMetric(float64(e.ckpt), "checkpoints")
	if materialize {
		b.ReportMetric(float64(e.ckpt-st.SnapshotCheckpoint), "snapshot-lag-ckpts")
	}
}
