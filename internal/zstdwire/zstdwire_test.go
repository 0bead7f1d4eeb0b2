package zstdwire

import (
	"bytes"
	"io"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

func compress(t testing.TB, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	c := NewCompressor()
	c.Reset(&buf)
	if _, err := c.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// The pooled compressor and decompressor are reused across messages, as
// connect does: Close after each, then Reset.
func TestRoundTripReused(t *testing.T) {
	c, d := NewCompressor(), NewDecompressor()
	for i, msg := range []string{"", "a", strings.Repeat("event ", 10000), "last"} {
		var buf bytes.Buffer
		c.Reset(&buf)
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := d.Reset(&buf); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(d)
		if err != nil || string(got) != msg {
			t.Fatalf("message %d: %d bytes, %v", i, len(got), err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// A frame that needs a window larger than maxWindow is refused, not
// allocated: a peer cannot make the decoder take much memory.
func TestDecoderRefusesLargeWindows(t *testing.T) {
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf, zstd.WithWindowSize(64<<20), zstd.WithSingleSegment(false))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(bytes.Repeat([]byte("x"), 16<<20)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	d := NewDecompressor()
	if err := d.Reset(&buf); err != nil {
		return // refused at the header
	}
	if _, err := io.Copy(io.Discard, d); err == nil {
		t.Fatal("a frame with a 64 MiB window decoded")
	}
}

// FuzzDecompress: any bytes decompress to something or fail; never a
// panic, and never more than a bounded amount of output per input here.
func FuzzDecompress(f *testing.F) {
	f.Add(compress(f, []byte("hello")))
	f.Add(compress(f, bytes.Repeat([]byte("ab"), 5000)))
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd})
	f.Add([]byte("not zstd"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := NewDecompressor()
		if err := d.Reset(bytes.NewReader(data)); err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(d, 64<<20))
		_ = d.Close()
	})
}
