package materializer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/segments"
)

// quietLogger drops Pebble's informational lines in tests.
type quietLogger struct{ t testing.TB }

func (quietLogger) Infof(string, ...any) {}
func (l quietLogger) Errorf(format string, args ...any) {
	l.t.Logf("pebble: "+format, args...)
}
func (l quietLogger) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf("pebble fatal: "+format, args...))
}

func openStore(t testing.TB, dir string, o Options) *Store {
	t.Helper()
	if o.Logger == nil {
		o.Logger = quietLogger{t}
	}
	s, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// dump returns every data key of the store (encoded) with its value.
func dump(t testing.TB, s *Store) map[string]string {
	t.Helper()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixData}, UpperBound: []byte{prefixData + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	out := make(map[string]string)
	for ok := it.First(); ok; ok = it.Next() {
		out[string(it.Key())] = string(it.Value())
	}
	if err := it.Error(); err != nil {
		t.Fatal(err)
	}
	return out
}

// model is the reference: encoded data key → value, and applied SQN per
// (stream, log).
type model struct {
	data    map[string]string
	applied map[string]uint64 // "stream\x00log"
}

func newModel() *model {
	return &model{data: map[string]string{}, applied: map[string]uint64{}}
}

func (m *model) clone() *model {
	return &model{data: maps.Clone(m.data), applied: maps.Clone(m.applied)}
}

func (m *model) apply(t testing.TB, stream, logID string, changes []segments.Change) {
	lk := stream + "\x00" + logID
	for _, c := range changes {
		if c.SQN <= m.applied[lk] {
			continue
		}
		k := string(mustKey(t, stream, c.KeyGroup, c.State, c.Key))
		switch c.Op {
		case segments.OpPut:
			m.data[k] = string(c.Value)
		case segments.OpDelete:
			delete(m.data, k)
		case segments.OpMerge:
			m.data[k] += string(c.Value)
		case segments.OpClear:
			p := string(mustKey(t, stream, c.KeyGroup, c.State, nil))
			for k := range m.data {
				if strings.HasPrefix(k, p) {
					delete(m.data, k)
				}
			}
		}
		m.applied[lk] = c.SQN
	}
}

// restrict returns the model's data of key groups r of a stream.
func (m *model) restrict(t testing.TB, stream string, r KeyGroupRange) map[string]string {
	lo, hi, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for k, v := range m.data {
		if k >= string(lo) && k < string(hi) {
			out[k] = v
		}
	}
	return out
}

func (m *model) streamApplied(stream string) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range m.applied {
		st, log, _ := strings.Cut(k, "\x00")
		if st == stream {
			out[log] = v
		}
	}
	return out
}

func diff(t testing.TB, what string, got, want map[string]string) {
	t.Helper()
	if maps.Equal(got, want) {
		return
	}
	n := 0
	for k, w := range want {
		if g, ok := got[k]; !ok || g != w {
			t.Errorf("%s: key %x = %q (present %v), want %q", what, k, g, ok, w)
			if n++; n > 5 {
				break
			}
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: unexpected key %x = %q", what, k, g)
			if n++; n > 10 {
				break
			}
		}
	}
	t.Fatalf("%s: %d keys, want %d", what, len(got), len(want))
}

// unfinished picks at random a log of logs with changes the model has not
// applied yet, and how many it has applied; ok is false once every log is
// applied.
func (m *model) unfinished(rng *rand.Rand, logs []testLog) (l testLog, applied uint64, ok bool) {
	var open []int
	for i, l := range logs {
		if m.applied[l.stream+"\x00"+l.id] < uint64(len(l.changes)) {
			open = append(open, i)
		}
	}
	if len(open) == 0 {
		return testLog{}, 0, false
	}
	l = logs[open[rng.IntN(len(open))]]
	return l, m.applied[l.stream+"\x00"+l.id], true
}

type testLog struct {
	stream, id string
	changes    []segments.Change
}

var (
	testStreams = []string{"orders", "users"}
	testStates  = []string{"a", "bb"}
)

// genLogs makes logs of random changes over a few streams, key groups,
// states and keys, so keys collide and every op meets every other.
func genLogs(rng *rand.Rand, nLogs, perLog int, keyGroups uint16) []testLog {
	logs := make([]testLog, nLogs)
	for i := range logs {
		l := &logs[i]
		l.stream = testStreams[i%len(testStreams)]
		l.id = fmt.Sprintf("%s/%d", l.stream, i+1)
		for sqn := uint64(1); sqn <= uint64(perLog); sqn++ {
			c := segments.Change{
				LogID:    l.id,
				SQN:      sqn,
				KeyGroup: uint16(rng.IntN(int(keyGroups))),
				State:    testStates[rng.IntN(len(testStates))],
				Key:      []byte("k" + strconv.Itoa(rng.IntN(12))),
			}
			switch p := rng.IntN(100); {
			case p < 45:
				c.Op = segments.OpPut
				c.Value = []byte(fmt.Sprintf("v%d.%d|", i, sqn))
			case p < 75:
				c.Op = segments.OpMerge
				c.Value = []byte(fmt.Sprintf("m%d.%d|", i, sqn))
			case p < 95:
				c.Op = segments.OpDelete
			default:
				c.Op = segments.OpClear
				c.Key = nil
			}
			l.changes = append(l.changes, c)
		}
	}
	return logs
}

func checkStore(t testing.TB, what string, s *Store, m *model, logs []testLog) {
	t.Helper()
	diff(t, what, dump(t, s), m.data)
	for _, l := range logs {
		got, err := s.AppliedSQN(l.stream, l.id)
		if err != nil {
			t.Fatal(err)
		}
		if want := m.applied[l.stream+"\x00"+l.id]; got != want {
			t.Fatalf("%s: log %s applied %d, want %d", what, l.id, got, want)
		}
	}
}

func seed(t testing.TB) uint64 {
	if v := os.Getenv("DSTL_MODEL_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	return rand.Uint64()
}

// TestModelRandomized applies random changes of several logs in random
// batch splits, replays already-applied batches, crashes (a crash clone of
// an in-memory file system: exactly what was synced, plus a random part of
// what was not) and reopens, and exports/imports random key-group ranges,
// comparing the store with a map after every step.
func TestModelRandomized(t *testing.T) {
	for round := range 4 {
		sd := seed(t)
		t.Run(fmt.Sprintf("seed=%d", sd), func(t *testing.T) {
			t.Logf("DSTL_MODEL_SEED=%d", sd)
			runModel(t, rand.New(rand.NewPCG(sd, uint64(round))), round%2 == 1)
		})
	}
}

func runModel(t *testing.T, rng *rand.Rand, syncWrites bool) {
	const keyGroups = 8
	logs := genLogs(rng, 4, 400, keyGroups)
	fs := vfs.NewCrashableMem()
	opts := Options{FS: fs, SyncWrites: syncWrites, MemTableSize: 64 << 10, TargetFileSize: 2 << 10, Logger: quietLogger{t}}
	s := openStore(t, "/m", opts)
	defer func() { s.Close() }()

	m := newModel()
	// history[i] is the model after the i-th Apply that changed something:
	// a crash must recover one of them (Pebble recovers a prefix of the
	// committed batches).
	history := []*model{m.clone()}
	crashes, exports := 0, 0
	for step := 0; ; step++ {
		l, applied, ok := m.unfinished(rng, logs)
		if !ok {
			break
		}
		// A batch from somewhat before the applied point (a replay) to a
		// bit after it; sometimes a pure replay of old changes.
		from := int(applied) - rng.IntN(4)
		if rng.IntN(8) == 0 {
			from = rng.IntN(int(applied) + 1)
		}
		from = max(from, 0)
		to := min(from+1+rng.IntN(25), len(l.changes))
		batch := l.changes[from:to]
		if err := s.Apply(l.stream, l.id, batch); err != nil {
			t.Fatalf("step %d: apply %s [%d,%d]: %v", step, l.id, from+1, to, err)
		}
		m.apply(t, l.stream, l.id, batch)
		if !maps.Equal(m.applied, history[len(history)-1].applied) {
			history = append(history, m.clone())
		}
		if step%10 == 0 {
			checkStore(t, fmt.Sprintf("step %d", step), s, m, logs)
		}

		switch p := rng.IntN(100); {
		case p < 4: // crash and reopen
			crashes++
			cfg := vfs.CrashCloneCfg{}
			if rng.IntN(2) == 0 {
				cfg = vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(100), RNG: rand.New(rand.NewPCG(rng.Uint64(), 0))}
			}
			crashed := fs.CrashClone(cfg)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			fs = crashed
			opts.FS = fs
			s = openStore(t, "/m", opts)
			// Find the history entry matching the recovered applied SQNs.
			got := map[string]uint64{}
			for _, st := range testStreams {
				a, err := s.Applied(st)
				if err != nil {
					t.Fatal(err)
				}
				for log, sqn := range a {
					got[st+"\x00"+log] = sqn
				}
			}
			i := slices.IndexFunc(history, func(h *model) bool { return maps.Equal(h.applied, got) })
			if i < 0 {
				t.Fatalf("step %d: crash recovered applied SQNs %v, which no prefix of the applies had", step, got)
			}
			if syncWrites && i != len(history)-1 {
				t.Fatalf("step %d: SyncWrites crash lost applies: recovered %v, want %v", step, got, history[len(history)-1].applied)
			}
			m = history[i].clone()
			history = history[:i+1]
			checkStore(t, fmt.Sprintf("step %d after crash", step), s, m, logs)
		case p < 10: // export a range, import it into an empty store
			exports++
			st := testStreams[rng.IntN(len(testStreams))]
			a, b := uint16(rng.IntN(keyGroups)), uint16(rng.IntN(keyGroups))
			r := KeyGroupRange{Lo: min(a, b), Hi: max(a, b)}
			checkExportImport(t, s, m, st, r)
		}
	}
	checkStore(t, "end", s, m, logs)
	// Replaying every log from the start changes nothing.
	for _, l := range logs {
		if err := s.Apply(l.stream, l.id, l.changes); err != nil {
			t.Fatal(err)
		}
	}
	checkStore(t, "after full replay", s, m, logs)
	t.Logf("%d history entries, %d crashes, %d export/imports", len(history), crashes, exports)
}

// memFiles collects exported files in memory.
type memFiles struct {
	mu    sync.Mutex
	files map[string]*bytes.Buffer
}

type memFile struct {
	*bytes.Buffer
	closed *bool
}

func (f memFile) Close() error { *f.closed = true; return nil }

func (m *memFiles) create(name string) (io.WriteCloser, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.files == nil {
		m.files = map[string]*bytes.Buffer{}
	}
	if _, ok := m.files[name]; ok {
		return nil, fmt.Errorf("file %s exists", name)
	}
	b := &bytes.Buffer{}
	m.files[name] = b
	return memFile{Buffer: b, closed: new(bool)}, nil
}

func (m *memFiles) open(name string) (io.ReaderAt, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.files[name]
	if !ok {
		return nil, fmt.Errorf("file %s: %w", name, os.ErrNotExist)
	}
	return bytes.NewReader(b.Bytes()), nil
}

func checkExportImport(t *testing.T, s *Store, m *model, stream string, r KeyGroupRange) {
	t.Helper()
	var files memFiles
	man, err := s.Export(context.Background(), stream, r, files.create)
	if err != nil {
		t.Fatalf("export %s %s: %v", stream, r, err)
	}
	if len(man.Runs[0].Files) != len(files.files) {
		t.Fatalf("manifest lists %d files, %d written", len(man.Runs[0].Files), len(files.files))
	}
	var keys int64
	for _, f := range man.Runs[0].Files {
		keys += f.Keys
		if int64(files.files[f.Name].Len()) != f.Size {
			t.Fatalf("file %s: %d bytes, manifest %d", f.Name, files.files[f.Name].Len(), f.Size)
		}
	}
	want := m.restrict(t, stream, r)
	if keys != man.Keys || man.Keys != int64(len(want)) {
		t.Fatalf("export %s %s: %d keys (files %d), model %d", stream, r, man.Keys, keys, len(want))
	}
	if !maps.Equal(man.Applied, m.streamApplied(stream)) {
		t.Fatalf("export applied %v, model %v", man.Applied, m.streamApplied(stream))
	}
	dst := openStore(t, t.TempDir(), Options{})
	defer dst.Close()
	if err := dst.Import(context.Background(), man, files.open); err != nil {
		t.Fatalf("import %s %s: %v", stream, r, err)
	}
	diff(t, fmt.Sprintf("import of %s %s", stream, r), dump(t, dst), want)
	got, err := dst.Applied(stream)
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(got, man.Applied) {
		t.Fatalf("imported applied %v, want %v", got, man.Applied)
	}
	for log, sqn := range man.Applied {
		if a, _ := dst.AppliedSQN(stream, log); a != sqn {
			t.Fatalf("imported AppliedSQN(%s) = %d, want %d", log, a, sqn)
		}
	}
}

// TestReopenDir: a store on a real directory keeps its state and applied
// SQNs across Close and Open, and a replay after reopening is a no-op.
func TestReopenDir(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(7, 7))
	logs := genLogs(rng, 2, 300, 4)
	m := newModel()
	s := openStore(t, dir, Options{})
	for _, l := range logs {
		half := l.changes[:150]
		if err := s.Apply(l.stream, l.id, half); err != nil {
			t.Fatal(err)
		}
		m.apply(t, l.stream, l.id, half)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply("orders", "x", []segments.Change{{SQN: 1, Op: segments.OpPut}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("apply after close: %v", err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	checkStore(t, "reopened", s, m, logs)
	for _, l := range logs {
		if err := s.Apply(l.stream, l.id, l.changes); err != nil {
			t.Fatal(err)
		}
		m.apply(t, l.stream, l.id, l.changes)
	}
	checkStore(t, "complete", s, m, logs)
}

func TestApplyValidation(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	put := func(sqn uint64, key string) segments.Change {
		return segments.Change{SQN: sqn, Op: segments.OpPut, State: "s", Key: []byte(key), Value: []byte("v")}
	}
	for _, tc := range []struct {
		name    string
		stream  string
		log     string
		changes []segments.Change
		want    error
	}{
		{"empty stream", "", "l", []segments.Change{put(1, "a")}, ErrInvalidArgument},
		{"empty log", "st", "", []segments.Change{put(1, "a")}, ErrInvalidArgument},
		{"sqn zero", "st", "l", []segments.Change{put(0, "a")}, ErrOutOfOrder},
		{"decreasing", "st", "l", []segments.Change{put(2, "a"), put(1, "b")}, ErrOutOfOrder},
		{"repeated", "st", "l", []segments.Change{put(2, "a"), put(2, "b")}, ErrOutOfOrder},
		{"other log", "st", "l", []segments.Change{{LogID: "m", SQN: 1, Op: segments.OpPut}}, ErrOutOfOrder},
		{"bad op", "st", "l", []segments.Change{{SQN: 1, Op: 9}}, ErrInvalidArgument},
	} {
		if err := s.Apply(tc.stream, tc.log, tc.changes); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// Nothing of the rejected batches was applied (all or nothing).
	if d := dump(t, s); len(d) != 0 {
		t.Fatalf("rejected batches left %d keys", len(d))
	}
	if err := s.ApplyThrough("st", "l", []segments.Change{put(3, "a")}, 2); !errors.Is(err, ErrOutOfOrder) {
		t.Fatalf("through below last: %v", err)
	}
	// ApplyThrough advances past changes filtered out by key group.
	if err := s.ApplyThrough("st", "l", []segments.Change{put(3, "a")}, 10); err != nil {
		t.Fatal(err)
	}
	if sqn, _ := s.AppliedSQN("st", "l"); sqn != 10 {
		t.Fatalf("applied %d, want 10", sqn)
	}
	if err := s.ApplyThrough("st", "l", nil, 12); err != nil {
		t.Fatal(err)
	}
	if sqn, _ := s.AppliedSQN("st", "l"); sqn != 12 {
		t.Fatalf("applied %d, want 12", sqn)
	}
	// A change at or below 12 is now skipped.
	if err := s.Apply("st", "l", []segments.Change{put(11, "b")}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.Get("st", 0, "s", []byte("b")); ok {
		t.Fatal("change below the applied SQN was applied")
	}
	if v, ok, err := s.Get("st", 0, "s", []byte("a")); err != nil || !ok || string(v) != "v" {
		t.Fatalf("Get = %q %v %v", v, ok, err)
	}
}

// TestMergeComposes: merges compose with each other, with puts, deletes and
// clears inside one batch and across batches.
func TestMergeComposes(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	ch := func(sqn uint64, op segments.Op, key, v string) segments.Change {
		return segments.Change{SQN: sqn, Op: op, State: "s", Key: []byte(key), Value: []byte(v)}
	}
	batches := [][]segments.Change{
		{ch(1, segments.OpMerge, "a", "1"), ch(2, segments.OpMerge, "a", "2"), ch(3, segments.OpPut, "b", "x"), ch(4, segments.OpMerge, "b", "y")},
		{ch(5, segments.OpMerge, "a", "3"), ch(6, segments.OpDelete, "b", ""), ch(7, segments.OpMerge, "b", "z")},
		{ch(8, segments.OpClear, "", ""), ch(9, segments.OpMerge, "a", "4"), ch(10, segments.OpMerge, "c", "5")},
	}
	want := []map[string]string{
		{"a": "12", "b": "xy"},
		{"a": "123", "b": "z"},
		{"a": "4", "c": "5"},
	}
	for i, b := range batches {
		if err := s.Apply("st", "l", b); err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for e, err := range s.Scan(context.Background(), "st", KeyGroupRange{}, "s", ScanOptions{}) {
			if err != nil {
				t.Fatal(err)
			}
			got[string(e.Key)] = string(e.Value)
		}
		if !maps.Equal(got, want[i]) {
			t.Fatalf("after batch %d: %v, want %v", i, got, want[i])
		}
	}
}

// TestConcurrent applies four logs (on disjoint key groups) from four
// goroutines while scans and exports read; the end state equals the model.
func TestConcurrent(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{MemTableSize: 256 << 10})
	defer s.Close()
	rng := rand.New(rand.NewPCG(11, 12))
	logs := genLogs(rng, 4, 600, 8)
	for i := range logs {
		logs[i].stream = "st"
		for j := range logs[i].changes {
			logs[i].changes[j].KeyGroup = uint16(i)*8 + logs[i].changes[j].KeyGroup
		}
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for _, l := range logs {
		wg.Go(func() {
			for from := 0; from < len(l.changes); from += 37 {
				if err := s.Apply(l.stream, l.id, l.changes[max(0, from-5):min(from+37, len(l.changes))]); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	stop := make(chan struct{})
	var readers sync.WaitGroup
	readers.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, err := range s.Scan(ctx, "st", KeyGroupRange{Lo: 0, Hi: 31}, "a", ScanOptions{Limit: 50}) {
				if err != nil {
					errs <- err
					return
				}
			}
			var files memFiles
			if _, err := s.Export(ctx, "st", KeyGroupRange{Lo: 0, Hi: 31}, files.create); err != nil {
				errs <- err
				return
			}
		}
	})
	wg.Wait()
	close(stop)
	readers.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	m := newModel()
	for _, l := range logs {
		m.apply(t, l.stream, l.id, l.changes)
	}
	checkStore(t, "concurrent", s, m, logs)
}
