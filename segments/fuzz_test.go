package segments

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// Fuzz targets for every decoder. Seeds: f.Add with valid encodings here,
// plus the committed corpus under testdata/fuzz/ (regenerate it with
// `go test ./segments -run TestWriteFuzzCorpus -gen-corpus`).

var genCorpus = flag.Bool("gen-corpus", false, "rewrite the seed corpus under testdata/fuzz")

// seedSegments are small valid objects covering every codec, empty segments,
// many logs and block cuts.
func seedSegments(t testing.TB) [][]byte {
	var out [][]byte
	empty, _ := encode(t, nil, WriterOptions{})
	out = append(out, empty)
	for i, codec := range allCodecs {
		rng := rand.New(rand.NewPCG(uint64(i), 5))
		in := genChanges(rng, genSpec{logs: 1 + i, perLog: 8, maxValue: 30, kgHi: 5, emptyValues: true})
		data, _ := encode(t, in, WriterOptions{Codec: codec, BlockSize: 200})
		out = append(out, data)
	}
	return out
}

func seedBlocks(t testing.TB) [][]byte {
	var out [][]byte
	for _, seg := range seedSegments(t) {
		r, err := Open(bytes.NewReader(seg), int64(len(seg)), "seed")
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range r.Blocks() {
			out = append(out, seg[b.Offset:b.Offset+b.Length])
		}
	}
	return out
}

// seedIndexes returns index bytes followed by their 8-byte LE index offset.
func seedIndexes(t testing.TB) [][]byte {
	var out [][]byte
	for _, seg := range seedSegments(t) {
		tr, err := decodeTrailer(seg[len(seg)-TrailerSize:])
		if err != nil {
			t.Fatal(err)
		}
		idx := bytes.Clone(seg[tr.indexOff : tr.indexOff+uint64(tr.indexLen)])
		out = append(out, fmt.Appendf(idx, "%08x", tr.indexOff)) // offset as 8 hex digits
	}
	return out
}

func seedTrailers(t testing.TB) [][]byte {
	var out [][]byte
	for _, seg := range seedSegments(t) {
		out = append(out, seg[len(seg)-TrailerSize:])
	}
	return out
}

// splitIndexInput undoes seedIndexes' encoding (fuzzers may break it).
func splitIndexInput(in []byte) ([]byte, uint64) {
	if len(in) < 8 {
		return in, 0
	}
	var off uint64
	if _, err := fmt.Sscanf(string(in[len(in)-8:]), "%08x", &off); err != nil {
		return in[:len(in)-8], 0
	}
	return in[:len(in)-8], off
}

func typedDecodeError(err error) bool {
	return errors.Is(err, ErrCorrupt) || errors.Is(err, ErrTruncated) || errors.Is(err, ErrBadMagic) || errors.Is(err, ErrUnknownVersion)
}

func FuzzOpen(f *testing.F) {
	for _, s := range seedSegments(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkObject(t, data)
		checkObject(t, fixObjectCRCs(data))
	})
}

func checkObject(t *testing.T, data []byte) {
	{
		r, err := Open(bytes.NewReader(data), int64(len(data)), "fuzz")
		if err != nil {
			if !typedDecodeError(err) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		var all []Change
		for c, err := range r.All() {
			if err != nil {
				if !typedDecodeError(err) {
					t.Fatalf("untyped error: %v", err)
				}
				return
			}
			all = append(all, c.Clone())
		}
		// A valid object re-encodes to the same changes, and its index
		// matches what a writer would produce for them.
		var buf bytes.Buffer
		w := NewWriter(&buf, WriterOptions{Codec: CodecNone})
		for _, c := range all {
			if err := w.Add(c); err != nil {
				t.Fatalf("decoded change does not re-encode: %v", err)
			}
		}
		if _, err := w.Close(); err != nil {
			t.Fatal(err)
		}
		again, err := readAll(buf.Bytes(), "again")
		if err != nil {
			t.Fatal(err)
		}
		diffChanges(t, again, all)
		var n uint64
		for _, b := range r.Blocks() {
			n += b.Count
		}
		if n != uint64(len(all)) {
			t.Fatalf("index counts %d changes, read %d", n, len(all))
		}
	}
}

// fixBlockCRCs returns a copy of block with its payload and header CRCs
// recomputed (when the framing allows), so the fuzzer gets past the
// checksums and exercises the parsers and decompressors behind them.
func fixBlockCRCs(block []byte) []byte {
	b := bytes.Clone(block)
	if len(b) < blockFixed {
		return b
	}
	hlen := uint64(binary.LittleEndian.Uint32(b))
	if hlen < 4 || hlen+blockFixed > uint64(len(b)) {
		return b
	}
	binary.LittleEndian.PutUint32(b[hlen:], crc(b[hlen+blockFixed:]))
	binary.LittleEndian.PutUint32(b[4+hlen:], crc(b[:4+hlen]))
	return b
}

// fixObjectCRCs recomputes the trailer and index CRCs of an object.
func fixObjectCRCs(obj []byte) []byte {
	b := bytes.Clone(obj)
	if len(b) < TrailerSize {
		return b
	}
	tr := b[len(b)-TrailerSize:]
	off := binary.LittleEndian.Uint64(tr)
	n := uint64(binary.LittleEndian.Uint32(tr[8:]))
	if off <= uint64(len(b)-TrailerSize) && n <= uint64(len(b)-TrailerSize)-off {
		binary.LittleEndian.PutUint32(tr[12:], crc(b[off:off+n]))
	}
	binary.LittleEndian.PutUint32(tr[24:], trailerCRC(tr))
	return b
}

func FuzzDecodeBlock(f *testing.F) {
	for _, b := range seedBlocks(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, block []byte) {
		checkBlock(t, block)
		checkBlock(t, fixBlockCRCs(block))
	})
}

func checkBlock(t *testing.T, block []byte) {
	{
		info, cs, err := DecodeBlock(block)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if uint64(len(cs)) != info.Count || cs[0].SQN != info.FirstSQN || cs[len(cs)-1].SQN != info.LastSQN || info.Length != uint64(len(block)) {
			t.Fatalf("block %+v inconsistent with %d changes", info, len(cs))
		}
		// Re-encode as one block: same changes, same description.
		var buf bytes.Buffer
		w := NewWriter(&buf, WriterOptions{Codec: CodecNone, BlockSize: MaxBlockRawSize})
		for _, c := range cs {
			if err := w.Add(c); err != nil {
				t.Fatalf("decoded change does not re-encode: %v", err)
			}
		}
		sum, err := w.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(sum.Blocks) != 1 {
			t.Fatalf("re-encoded into %d blocks", len(sum.Blocks))
		}
		b := sum.Blocks[0]
		if b.LogID != info.LogID || b.FirstSQN != info.FirstSQN || b.LastSQN != info.LastSQN || b.Count != info.Count || !equalRuns(b.KeyGroups, info.KeyGroups) {
			t.Fatalf("re-encoded block %+v, decoded %+v", b, info)
		}
		_, cs2, err := DecodeBlock(buf.Bytes()[:b.Length])
		if err != nil {
			t.Fatal(err)
		}
		diffChanges(t, cs2, cs)
	}
}

func FuzzDecodeIndex(f *testing.F) {
	for _, s := range seedIndexes(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		index, off := splitIndexInput(in)
		blocks, err := DecodeIndex(index, off)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if got := appendIndex(nil, blocks); !bytes.Equal(got, index) && len(got) > len(index) {
			// Non-minimal varints may decode; re-encoding is then shorter,
			// never longer.
			t.Fatalf("re-encoded index is longer: %d > %d", len(got), len(index))
		}
		again, err := DecodeIndex(appendIndex(nil, blocks), off)
		if err != nil || fmt.Sprint(again) != fmt.Sprint(blocks) {
			t.Fatalf("index does not round-trip: %v", err)
		}
	})
}

func FuzzDecodeTrailer(f *testing.F) {
	for _, s := range seedTrailers(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) >= TrailerSize {
			b = bytes.Clone(b)
			if len(b)%2 == 0 { // half the time, get past the CRC
				binary.LittleEndian.PutUint32(b[24:], trailerCRC(b))
			}
		}
		tr, err := decodeTrailer(b)
		if err != nil {
			if !typedDecodeError(err) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if got := appendTrailer(nil, &tr); !bytes.Equal(got, b[:TrailerSize]) {
			t.Fatalf("trailer does not round-trip:\n got  %x\n want %x", got, b[:TrailerSize])
		}
	})
}

// TestWriteFuzzCorpus writes the committed seed corpus (Go's corpus file
// format) when run with -gen-corpus; otherwise it checks the corpus exists.
func TestWriteFuzzCorpus(t *testing.T) {
	sets := map[string][][]byte{
		"FuzzOpen":          seedSegments(t),
		"FuzzDecodeBlock":   seedBlocks(t),
		"FuzzDecodeIndex":   seedIndexes(t),
		"FuzzDecodeTrailer": seedTrailers(t),
	}
	for target, seeds := range sets {
		dir := filepath.Join("testdata", "fuzz", target)
		if !*genCorpus {
			if ents, err := os.ReadDir(dir); err != nil || len(ents) == 0 {
				t.Errorf("no seed corpus in %s (run with -gen-corpus)", dir)
			}
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
