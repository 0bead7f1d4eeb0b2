package segments

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// genSpec shapes a random workload for round-trip and query tests.
type genSpec struct {
	logs        int
	perLog      int
	maxValue    int
	kgLo, kgHi  uint16
	interleave  bool // a log may reappear after other logs (SQNs continue)
	bigEvery    int  // every n-th change gets a 1 MiB+ value (0 = never)
	emptyValues bool
}

var testStates = []string{"counts", "sessions", "", "join-buffer"}

func genChanges(rng *rand.Rand, s genSpec) []Change {
	type logState struct {
		id  string
		sqn uint64
		ts  int64
	}
	logs := make([]logState, s.logs)
	for i := range logs {
		logs[i] = logState{id: fmt.Sprintf("orders/e%07d", i), sqn: rng.Uint64N(1000), ts: 1_700_000_000_000 + rng.Int64N(1000)}
	}
	var out []Change
	emit := func(l *logState, n int) {
		for range n {
			l.sqn += 1 + uint64(rng.IntN(3)/2)*rng.Uint64N(1000) // mostly +1, sometimes gaps
			if rng.IntN(10) == 0 {
				l.ts += rng.Int64N(5) - 1 // timestamps may step back a little
			} else {
				l.ts += rng.Int64N(3)
			}
			c := Change{
				LogID:       l.id,
				SQN:         l.sqn,
				KeyGroup:    s.kgLo + uint16(rng.IntN(int(s.kgHi-s.kgLo)+1)),
				State:       testStates[rng.IntN(len(testStates))],
				Op:          Op(1 + rng.IntN(4)),
				Key:         fmt.Appendf(nil, "user:%06d", rng.IntN(5000)),
				TimestampMs: l.ts,
			}
			if c.Op == OpPut || c.Op == OpMerge {
				c.Value = make([]byte, rng.IntN(s.maxValue+1))
				for i := range c.Value {
					c.Value[i] = byte('a' + rng.IntN(4))
				}
				if s.bigEvery > 0 && rng.IntN(s.bigEvery) == 0 {
					c.Value = bytes.Repeat([]byte{byte(rng.IntN(256)), 7, 9, byte(rng.IntN(256))}, (1<<20)/4+rng.IntN(1000))
				}
				if s.emptyValues && rng.IntN(4) == 0 {
					c.Value = []byte{}
				}
			}
			if c.Op == OpClear && rng.IntN(2) == 0 {
				c.Key = nil
			}
			out = append(out, c)
		}
	}
	if s.interleave {
		for range s.perLog {
			l := &logs[rng.IntN(len(logs))]
			emit(l, 1+rng.IntN(20))
		}
	} else {
		for i := range logs {
			emit(&logs[i], s.perLog)
		}
	}
	return out
}

func encode(t testing.TB, cs []Change, opts WriterOptions) ([]byte, Summary) {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf, opts)
	for _, c := range cs {
		if err := w.Add(c); err != nil {
			t.Fatalf("Add(%v %d): %v", c.LogID, c.SQN, err)
		}
	}
	sum, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sum.Size != int64(buf.Len()) {
		t.Fatalf("summary size %d, wrote %d", sum.Size, buf.Len())
	}
	return buf.Bytes(), sum
}

// readAll opens data and returns clones of every change, or the first error.
func readAll(data []byte, name string) ([]Change, error) {
	r, err := Open(bytes.NewReader(data), int64(len(data)), name)
	if err != nil {
		return nil, err
	}
	var out []Change
	for c, err := range r.All() {
		if err != nil {
			return out, err
		}
		out = append(out, c.Clone())
	}
	return out, nil
}

func sameChange(a, b Change) bool {
	return a.LogID == b.LogID && a.SQN == b.SQN && a.KeyGroup == b.KeyGroup && a.State == b.State &&
		a.Op == b.Op && bytes.Equal(a.Key, b.Key) && bytes.Equal(a.Value, b.Value) && a.TimestampMs == b.TimestampMs
}

func diffChanges(t testing.TB, got, want []Change) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d changes, want %d", len(got), len(want))
	}
	for i := range got {
		if !sameChange(got[i], want[i]) {
			t.Fatalf("change %d:\n got  %s %d kg=%d %q %v key=%q len(value)=%d ts=%d\n want %s %d kg=%d %q %v key=%q len(value)=%d ts=%d", i,
				got[i].LogID, got[i].SQN, got[i].KeyGroup, got[i].State, got[i].Op, got[i].Key, len(got[i].Value), got[i].TimestampMs,
				want[i].LogID, want[i].SQN, want[i].KeyGroup, want[i].State, want[i].Op, want[i].Key, len(want[i].Value), want[i].TimestampMs)
		}
	}
}

var allCodecs = []Codec{CodecNone, CodecZstd, CodecS2}

func TestRoundTrip(t *testing.T) {
	cases := []struct {
		name      string
		spec      genSpec
		blockSize int
	}{
		{"empty", genSpec{}, 0},
		{"single", genSpec{logs: 1, perLog: 1, maxValue: 100, kgHi: 127}, 0},
		{"one-log", genSpec{logs: 1, perLog: 2000, maxValue: 200, kgHi: 127}, 0},
		{"many-logs", genSpec{logs: 50, perLog: 40, maxValue: 300, kgLo: 100, kgHi: 300}, 0},
		{"cuts", genSpec{logs: 5, perLog: 500, maxValue: 100, kgHi: MaxKeyGroup}, 512},
		{"tiny-blocks", genSpec{logs: 3, perLog: 100, maxValue: 20, kgHi: 3}, 1},
		{"interleaved", genSpec{logs: 7, perLog: 200, maxValue: 50, kgHi: 15, interleave: true}, 4096},
		{"empty-values", genSpec{logs: 2, perLog: 300, maxValue: 3, kgHi: 0, emptyValues: true}, 0},
		{"big-values", genSpec{logs: 2, perLog: 30, maxValue: 100, kgHi: 127, bigEvery: 5}, 0},
	}
	for _, tc := range cases {
		for _, codec := range allCodecs {
			t.Run(tc.name+"/"+codec.String(), func(t *testing.T) {
				seed := uint64(len(tc.name))
				rng := rand.New(rand.NewPCG(seed, 1))
				in := []Change(nil)
				if tc.spec.logs > 0 {
					in = genChanges(rng, tc.spec)
				}
				data, sum := encode(t, in, WriterOptions{Codec: codec, BlockSize: tc.blockSize})
				got, err := readAll(data, "seg")
				if err != nil {
					t.Fatal(err)
				}
				diffChanges(t, got, in)
				r, err := Open(bytes.NewReader(data), int64(len(data)), "seg")
				if err != nil {
					t.Fatal(err)
				}
				if fmt.Sprint(r.Blocks()) != fmt.Sprint(sum.Blocks) {
					t.Fatalf("index %v\nsummary %v", r.Blocks(), sum.Blocks)
				}
				if sum.Changes != uint64(len(in)) {
					t.Fatalf("summary counts %d changes, want %d", sum.Changes, len(in))
				}
				// Blocks hold one log and cut at the target size.
				for _, b := range sum.Blocks {
					if b.Count == 0 || b.FirstSQN > b.LastSQN {
						t.Fatalf("bad block %+v", b)
					}
				}
			})
		}
	}
}

// TestQueryRandomized compares selective reads with a filter over the input.
func TestQueryRandomized(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		rng := rand.New(rand.NewPCG(seed, 2))
		spec := genSpec{logs: 1 + rng.IntN(6), perLog: 50 + rng.IntN(400), maxValue: 64, kgHi: uint16(rng.IntN(64)), interleave: rng.IntN(2) == 0}
		in := genChanges(rng, spec)
		codec := allCodecs[rng.IntN(3)]
		data, _ := encode(t, in, WriterOptions{Codec: codec, BlockSize: 64 + rng.IntN(4096)})
		cr := &countingReaderAt{r: bytes.NewReader(data)}
		r, err := Open(cr, int64(len(data)), "seg")
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for qi := range 50 {
			q := Query{}
			if rng.IntN(4) != 0 {
				q.LogID = in[rng.IntN(len(in))].LogID
			}
			if rng.IntN(2) == 0 {
				q.AfterSQN = in[rng.IntN(len(in))].SQN - uint64(rng.IntN(2))
			}
			if rng.IntN(2) == 0 {
				q.UpToSQN = in[rng.IntN(len(in))].SQN + uint64(rng.IntN(2))
			}
			if rng.IntN(2) == 0 {
				a, b := uint16(rng.IntN(int(spec.kgHi)+2)), uint16(rng.IntN(int(spec.kgHi)+2))
				q.KeyGroupLo, q.KeyGroupHi, q.KeyGroupsSet = min(a, b), max(a, b), true
			}
			var want []Change
			for _, c := range in {
				if q.LogID != "" && c.LogID != q.LogID {
					continue
				}
				lo, hi := q.kgRange()
				if c.SQN > q.AfterSQN && (q.UpToSQN == 0 || c.SQN <= q.UpToSQN) && c.KeyGroup >= lo && c.KeyGroup <= hi {
					want = append(want, c)
				}
			}
			// Within one log the input is in SQN order; across logs the
			// reader yields in object order, which is input order too.
			cr.reads = nil
			var got []Change
			for c, err := range r.Changes(q) {
				if err != nil {
					t.Fatalf("seed %d query %d %+v: %v", seed, qi, q, err)
				}
				got = append(got, c.Clone())
			}
			if len(got) != len(want) {
				t.Fatalf("seed %d query %d %+v: got %d changes, want %d", seed, qi, q, len(got), len(want))
			}
			diffChanges(t, got, want)
			// Only intersecting blocks are fetched.
			for _, off := range cr.reads {
				for _, b := range r.Blocks() {
					if b.Offset == uint64(off) && !q.matchesBlock(&b) {
						t.Fatalf("seed %d: query %+v read block %+v", seed, q, b)
					}
				}
			}
		}
	}
}

func TestQueryKeyGroupZeroAndInvalid(t *testing.T) {
	in := []Change{
		{LogID: "a", SQN: 1, KeyGroup: 0, Op: OpPut, Key: []byte("k0")},
		{LogID: "a", SQN: 2, KeyGroup: 1, Op: OpPut, Key: []byte("k1")},
	}
	data, _ := encode(t, in, WriterOptions{})
	r, err := Open(bytes.NewReader(data), int64(len(data)), "seg")
	if err != nil {
		t.Fatal(err)
	}
	count := func(q Query) (n int, err error) {
		for _, err := range r.Changes(q) {
			if err != nil {
				return n, err
			}
			n++
		}
		return n, nil
	}
	for _, tc := range []struct {
		q    Query
		want int
	}{
		{Query{}, 2},
		{Query{KeyGroupsSet: true}, 1},
		{Query{KeyGroupLo: 1, KeyGroupHi: 1}, 1},
		{Query{LogID: "b"}, 0},
		{Query{AfterSQN: 1}, 1},
		{Query{UpToSQN: 1}, 1},
	} {
		if n, err := count(tc.q); err != nil || n != tc.want {
			t.Errorf("%+v: got %d, %v; want %d", tc.q, n, err, tc.want)
		}
	}
	if _, err := count(Query{KeyGroupLo: 5, KeyGroupHi: 4}); !errors.Is(err, ErrInvalidQuery) {
		t.Errorf("Lo > Hi: %v", err)
	}
}

func TestWriterValidation(t *testing.T) {
	ok := Change{LogID: "l", SQN: 10, KeyGroup: 1, State: "s", Op: OpPut, Key: []byte("k")}
	mod := func(f func(*Change)) Change { c := ok; f(&c); return c }
	cases := []struct {
		name string
		c    Change
	}{
		{"sqn-equal", mod(func(c *Change) { c.SQN = 10 })},
		{"sqn-lower", mod(func(c *Change) { c.SQN = 3 })},
		{"sqn-zero-new-log", mod(func(c *Change) { c.LogID = "m"; c.SQN = 0 })},
		{"key-group", mod(func(c *Change) { c.SQN = 11; c.KeyGroup = MaxKeyGroup + 1 })},
		{"op-zero", mod(func(c *Change) { c.SQN = 11; c.Op = 0 })},
		{"op-unknown", mod(func(c *Change) { c.SQN = 11; c.Op = 5 })},
		{"empty-log", mod(func(c *Change) { c.LogID = "" })},
		{"long-log", mod(func(c *Change) { c.LogID = strings.Repeat("x", MaxLogIDLen+1) })},
		{"long-state", mod(func(c *Change) { c.SQN = 11; c.State = strings.Repeat("x", MaxStateLen+1) })},
		{"huge-value", mod(func(c *Change) { c.SQN = 11; c.Value = make([]byte, MaxBlockRawSize) })},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := NewWriter(&buf, WriterOptions{})
			if err := w.Add(ok); err != nil {
				t.Fatal(err)
			}
			if err := w.Add(tc.c); !errors.Is(err, ErrInvalidChange) {
				t.Fatalf("got %v, want ErrInvalidChange", err)
			}
			// The writer stays usable after a rejected change.
			next := ok
			next.SQN = 12
			if err := w.Add(next); err != nil {
				t.Fatal(err)
			}
			if _, err := w.Close(); err != nil {
				t.Fatal(err)
			}
			got, err := readAll(buf.Bytes(), "seg")
			if err != nil || len(got) != 2 {
				t.Fatalf("got %d changes, %v", len(got), err)
			}
		})
	}
	// A log that reappears later in the segment must continue its SQNs.
	var buf bytes.Buffer
	w := NewWriter(&buf, WriterOptions{})
	for _, c := range []Change{{LogID: "a", SQN: 5, Op: OpPut}, {LogID: "b", SQN: 1, Op: OpPut}} {
		if err := w.Add(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Add(Change{LogID: "a", SQN: 5, Op: OpPut}); !errors.Is(err, ErrInvalidChange) {
		t.Fatalf("reappearing log with old SQN: %v", err)
	}
	if err := w.Add(Change{LogID: "a", SQN: 6, Op: OpPut}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Add(Change{LogID: "a", SQN: 7, Op: OpPut}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Add after Close: %v", err)
	}
}

func TestClone(t *testing.T) {
	buf := []byte("keyvalue")
	c := Change{Key: buf[:3], Value: buf[3:]}
	d := c.Clone()
	buf[0], buf[3] = 'X', 'X'
	if string(d.Key) != "key" || string(d.Value) != "value" {
		t.Fatalf("clone aliases: %q %q", d.Key, d.Value)
	}
	d.Key = append(d.Key, '!') // must not overwrite Value
	if string(d.Value) != "value" {
		t.Fatalf("key append clobbered value: %q", d.Value)
	}
}

// TestKGSetRuns checks run building against a trivially correct model.
func TestKGSetRuns(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	var s kgSet
	s.reset()
	for iter := range 500 {
		var model [MaxKeyGroup + 1]bool
		n := rng.IntN(300)
		span := 1 + rng.IntN(MaxKeyGroup+1)
		base := rng.IntN(MaxKeyGroup + 2 - span)
		for range n {
			kg := uint16(base + rng.IntN(span))
			model[kg] = true
			s.add(kg)
		}
		var want []KeyGroupRun
		for kg := 0; kg <= MaxKeyGroup; kg++ {
			if !model[kg] {
				continue
			}
			if l := len(want) - 1; l >= 0 && int(want[l].Hi)+1 == kg {
				want[l].Hi++
			} else {
				want = append(want, KeyGroupRun{uint16(kg), uint16(kg)})
			}
		}
		got := s.appendRuns(nil)
		if !slices.Equal(got, want) {
			t.Fatalf("iter %d: got %v want %v", iter, got, want)
		}
		if n > 0 && !validRuns(got) {
			t.Fatalf("iter %d: invalid runs %v", iter, got)
		}
		s.reset()
	}
}

// TestIncompressibleAndExtremeRatio covers both codec fallbacks: no gain,
// and a ratio above maxRatio (a reader must never trust such a header).
func TestIncompressibleAndExtremeRatio(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	noise := make([]byte, 100_000)
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	for _, codec := range allCodecs {
		in := []Change{
			{LogID: "a", SQN: 1, Op: OpPut, Key: []byte("noise"), Value: noise},
			{LogID: "b", SQN: 1, Op: OpPut, Key: []byte("zeros"), Value: make([]byte, 4<<20)},
		}
		data, _ := encode(t, in, WriterOptions{Codec: codec})
		got, err := readAll(data, "seg")
		if err != nil {
			t.Fatal(err)
		}
		diffChanges(t, got, in)
	}
}

type countingReaderAt struct {
	r     *bytes.Reader
	reads []int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.reads = append(c.reads, off)
	return c.r.ReadAt(p, off)
}

func TestOpenReadsTailOnce(t *testing.T) {
	for _, tc := range []struct {
		logs      int
		wantReads int
	}{{3, 1}, {5000, 2}} { // 5000 blocks: the index outgrows the 64 KiB tail
		rng := rand.New(rand.NewPCG(9, 9))
		in := genChanges(rng, genSpec{logs: tc.logs, perLog: 2, maxValue: 10, kgHi: 127})
		data, _ := encode(t, in, WriterOptions{})
		cr := &countingReaderAt{r: bytes.NewReader(data)}
		r, err := Open(cr, int64(len(data)), "seg")
		if err != nil {
			t.Fatal(err)
		}
		if len(cr.reads) != tc.wantReads || len(r.Blocks()) != tc.logs {
			t.Fatalf("%d logs: %d reads, %d blocks", tc.logs, len(cr.reads), len(r.Blocks()))
		}
		got, err := readAll(data, "seg")
		if err != nil {
			t.Fatal(err)
		}
		diffChanges(t, got, in)
	}
}

func TestDecodeBlockPure(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	in := genChanges(rng, genSpec{logs: 1, perLog: 100, maxValue: 50, kgHi: 9})
	for _, codec := range allCodecs {
		data, sum := encode(t, in, WriterOptions{Codec: codec})
		b := sum.Blocks[0]
		info, cs, err := DecodeBlock(data[b.Offset : b.Offset+b.Length])
		if err != nil {
			t.Fatal(err)
		}
		info.Offset = b.Offset
		if fmt.Sprint(info) != fmt.Sprint(b) {
			t.Fatalf("info %+v, index %+v", info, b)
		}
		diffChanges(t, cs, in)
	}
}

type failWriter struct{ after int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, errors.New("disk full")
	}
	f.after--
	return len(p), nil
}

// TestWriterIOErrorSticks: after a failed write every call reports it.
func TestWriterIOErrorSticks(t *testing.T) {
	w := NewWriter(&failWriter{after: 1}, WriterOptions{BlockSize: 1})
	var err error
	for i := uint64(1); i < 10 && err == nil; i++ {
		err = w.Add(Change{LogID: "a", SQN: i, Op: OpPut, Key: []byte("k")})
	}
	if err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Add: %v", err)
	}
	if _, err := w.Close(); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Close: %v", err)
	}
	// Reset starts over on a new destination.
	var buf bytes.Buffer
	w.Reset(&buf)
	if err := w.Add(Change{LogID: "a", SQN: 1, Op: OpPut}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := readAll(buf.Bytes(), "seg"); err != nil || len(got) != 1 {
		t.Fatalf("after Reset: %d changes, %v", len(got), err)
	}
}
