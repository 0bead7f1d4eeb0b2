package segments

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"
)

// Benchmark workload: 8 logs (each owning 16 of 128 key groups) of 2,500
// consecutive changes; 70 % puts of ~100 B values, 20 % deletes, 10 % puts
// of 1 KiB values; zipf-skewed keys "user:NNNNNN" (key group = hash of the
// key); four state names, skewed; timestamps rising 0–1 ms per change.
// Values are word soup from a small vocabulary with numbers, roughly as
// compressible as JSON-ish state.
//
// b.SetBytes counts logical change bytes: len(Key)+len(Value)+len(State)
// + 19 (SQN 8, timestamp 8, key group 2, op 1), i.e. what a naive
// fixed-width record would take. "ratio" is logical bytes / object bytes.

const (
	benchLogs   = 8
	benchPerLog = 2500
)

var benchVocab = []string{"order", "item", "price", "qty", "status", "shipped", "pending", "user", "session",
	"click", "view", "cart", "total", "currency", "EUR", "USD", "true", "false", "null", "id", "ts", "region",
	"eu-west", "us-east", "sku", "discount", "count", "sum", "avg", "window", "late", "ok"}

func benchValue(rng *rand.Rand, n int) []byte {
	v := make([]byte, 0, n+16)
	v = append(v, '{')
	for len(v) < n {
		v = append(v, '"')
		v = append(v, benchVocab[rng.IntN(len(benchVocab))]...)
		v = append(v, '"', ':')
		if rng.IntN(2) == 0 {
			v = fmt.Appendf(v, "%d,", rng.IntN(100000))
		} else {
			v = append(v, '"')
			v = append(v, benchVocab[rng.IntN(len(benchVocab))]...)
			v = append(v, '"', ',')
		}
	}
	v = append(v[:n-1], '}')
	return v
}

func benchWorkload() (cs []Change, logical int64) {
	rng := rand.New(rand.NewPCG(42, 42))
	zipf := rand.NewZipf(rng, 1.1, 1, 999_999)
	states := []string{"counts", "counts", "counts", "sessions", "sessions", "joins", "dedup"}
	ts := int64(1_700_000_000_000)
	for l := range benchLogs {
		logID := fmt.Sprintf("orders/e%07d", l)
		for i := range benchPerLog {
			key := fmt.Appendf(nil, "user:%06d", zipf.Uint64())
			var h uint32
			for _, c := range key { // stable FNV-1a, so the workload is deterministic
				h = (h ^ uint32(c)) * 16777619
			}
			c := Change{
				LogID:       logID,
				SQN:         uint64(1_000_000 + i),
				KeyGroup:    uint16(l*16) + uint16(h%16),
				State:       states[rng.IntN(len(states))],
				Key:         key,
				TimestampMs: ts,
			}
			ts += int64(rng.IntN(2))
			switch p := rng.IntN(100); {
			case p < 70:
				c.Op, c.Value = OpPut, benchValue(rng, 80+rng.IntN(41))
			case p < 90:
				c.Op = OpDelete
			default:
				c.Op, c.Value = OpPut, benchValue(rng, 1024)
			}
			cs = append(cs, c)
			logical += int64(len(c.Key) + len(c.Value) + len(c.State) + 19)
		}
	}
	return cs, logical
}

func benchEncode(b *testing.B, codec Codec) {
	cs, logical := benchWorkload()
	var buf bytes.Buffer
	var size int64
	b.SetBytes(logical)
	b.ReportAllocs()
	w := NewWriter(&buf, WriterOptions{Codec: codec})
	b.ResetTimer()
	for b.Loop() {
		buf.Reset()
		w.Reset(&buf) // an uploader reuses one Writer per interval
		for _, c := range cs {
			if err := w.Add(c); err != nil {
				b.Fatal(err)
			}
		}
		sum, err := w.Close()
		if err != nil {
			b.Fatal(err)
		}
		size = sum.Size
	}
	b.ReportMetric(float64(len(cs))*float64(b.N)/b.Elapsed().Seconds(), "changes/s")
	b.ReportMetric(float64(logical)/float64(size), "ratio")
}

func benchDecode(b *testing.B, codec Codec) {
	cs, logical := benchWorkload()
	var buf bytes.Buffer
	w := NewWriter(&buf, WriterOptions{Codec: codec})
	for _, c := range cs {
		if err := w.Add(c); err != nil {
			b.Fatal(err)
		}
	}
	sum, err := w.Close()
	if err != nil {
		b.Fatal(err)
	}
	data := buf.Bytes()
	br := bytes.NewReader(data)
	b.SetBytes(logical)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		r, err := Open(br, int64(len(data)), "bench")
		if err != nil {
			b.Fatal(err)
		}
		n, sz := 0, 0
		for c, err := range r.All() {
			if err != nil {
				b.Fatal(err)
			}
			n++
			sz += len(c.Key) + len(c.Value)
		}
		if n != len(cs) || sz == 0 {
			b.Fatalf("decoded %d changes", n)
		}
	}
	b.ReportMetric(float64(len(cs))*float64(b.N)/b.Elapsed().Seconds(), "changes/s")
	b.ReportMetric(float64(logical)/float64(sum.Size), "ratio")
}

func BenchmarkEncodeZstd(b *testing.B) { benchEncode(b, CodecZstd) }
func BenchmarkEncodeS2(b *testing.B)   { benchEncode(b, CodecS2) }
func BenchmarkEncodeNone(b *testing.B) { benchEncode(b, CodecNone) }
func BenchmarkDecodeZstd(b *testing.B) { benchDecode(b, CodecZstd) }
func BenchmarkDecodeS2(b *testing.B)   { benchDecode(b, CodecS2) }
func BenchmarkDecodeNone(b *testing.B) { benchDecode(b, CodecNone) }
