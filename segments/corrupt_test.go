package segments

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// smallSegment is a few logs in several blocks, ~1–3 KiB in all.
func smallSegment(t testing.TB, codec Codec) ([]byte, []Change) {
	rng := rand.New(rand.NewPCG(11, 11))
	in := genChanges(rng, genSpec{logs: 3, perLog: 20, maxValue: 40, kgHi: 20})
	data, sum := encode(t, in, WriterOptions{Codec: codec, BlockSize: 400})
	if len(sum.Blocks) < 5 || len(data) < 1024 || len(data) > 4096 {
		t.Fatalf("segment of %d bytes, %d blocks: adjust the generator", len(data), len(sum.Blocks))
	}
	return data, in
}

// checkDamaged reads a damaged object in full. It must fail with a typed
// error naming the object; it must never panic or return different data.
func checkDamaged(t *testing.T, data []byte, want []Change, what string) {
	t.Helper()
	const name = "stream-x/seg-000042"
	got, err := readAll(data, name)
	if err == nil {
		same := len(got) == len(want)
		for i := 0; same && i < len(got); i++ {
			same = sameChange(got[i], want[i])
		}
		if same {
			t.Fatalf("%s: damage not detected", what)
		}
		t.Fatalf("%s: returned different data without an error", what)
	}
	if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrUnknownVersion) {
		t.Fatalf("%s: untyped error %v", what, err)
	}
	if !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "offset") {
		t.Fatalf("%s: error does not name the object and offset: %v", what, err)
	}
	// Changes yielded before the error must be a correct prefix.
	for i := range got {
		if !sameChange(got[i], want[i]) {
			t.Fatalf("%s: change %d differs before the error %v", what, i, err)
		}
	}
}

func TestEveryByteCorruption(t *testing.T) {
	for _, codec := range allCodecs {
		t.Run(codec.String(), func(t *testing.T) {
			orig, want := smallSegment(t, codec)
			data := make([]byte, len(orig))
			for off := range orig {
				for _, x := range []byte{0x01, 0x80, 0xFF} {
					copy(data, orig)
					data[off] ^= x
					checkDamaged(t, data, want, fmt.Sprintf("offset %d xor %#x", off, x))
				}
			}
		})
	}
}

func TestEveryTruncation(t *testing.T) {
	for _, codec := range allCodecs {
		orig, want := smallSegment(t, codec)
		for n := range len(orig) {
			checkDamaged(t, orig[:n], want, fmt.Sprintf("%s: truncated to %d", codec, n))
			// An object whose reader claims the full size but serves fewer
			// bytes (a short ReaderAt) is truncated too.
			r := bytes.NewReader(orig[:n])
			seg, err := Open(r, int64(len(orig)), "short")
			if err == nil {
				for _, err = range seg.All() {
					if err != nil {
						break
					}
				}
			}
			if err == nil || !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrBadMagic) {
				t.Fatalf("%s: short reader at %d: %v", codec, n, err)
			}
		}
	}
}

// TestVersionAndMagic: a newer version is ErrUnknownVersion even though the
// rest of the trailer is valid; a foreign object is ErrBadMagic.
func TestVersionAndMagic(t *testing.T) {
	data, _ := encode(t, nil, WriterOptions{})
	tr := data[len(data)-TrailerSize:]
	for _, v := range []uint32{0, 2, 1 << 31} {
		d := bytes.Clone(data)
		tt := d[len(d)-TrailerSize:]
		tt[28], tt[29], tt[30], tt[31] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		c := trailerCRC(tt)
		tt[24], tt[25], tt[26], tt[27] = byte(c), byte(c>>8), byte(c>>16), byte(c>>24)
		if _, err := Open(bytes.NewReader(d), int64(len(d)), "seg"); !errors.Is(err, ErrUnknownVersion) {
			t.Errorf("version %d: %v", v, err)
		}
	}
	d := bytes.Clone(data)
	copy(d[len(d)-8:], "PAR1PAR1")
	if _, err := Open(bytes.NewReader(d), int64(len(d)), "seg"); !errors.Is(err, ErrBadMagic) {
		t.Errorf("bad magic: %v", err)
	}
	if _, err := decodeTrailer(tr); err != nil {
		t.Fatal(err)
	}
}
