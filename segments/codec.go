package segments

import (
	"fmt"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// Codec is the compression of a block payload. The values are the on-disk
// codec byte; 0 is invalid on disk and means "default" (zstd) in options.
type Codec uint8

const (
	CodecDefault Codec = 0 // WriterOptions only: CodecZstd
	CodecNone    Codec = 1
	CodecZstd    Codec = 2 // zstd.SpeedFastest
	CodecS2      Codec = 3
)

func (c Codec) String() string {
	switch c {
	case CodecNone:
		return "none"
	case CodecZstd:
		return "zstd"
	case CodecS2:
		return "s2"
	case CodecDefault:
		return "default"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// maxRatio bounds raw/stored for compressed payloads. The writer stores a
// block uncompressed rather than exceed it, so a reader never allocates more
// than maxRatio times the bytes it actually holds, whatever a header claims.
const maxRatio = 256

// codecSet holds the process-wide zstd encoder and decoder. They are
// expensive to build (tables, goroutines) and their EncodeAll/DecodeAll are
// safe for concurrent use, so one lazily built set serves every Writer and
// Reader; building them per writer or per block would dominate small
// segments. sync.OnceValue keeps programs that never touch segments from
// paying for them.
type codecSet struct {
	zenc *zstd.Encoder
	zdec *zstd.Decoder
}

var codecs = sync.OnceValue(func() *codecSet {
	enc, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderCRC(false), // the stored bytes carry our own CRC32C
		zstd.WithZeroFrames(true),
	)
	if err != nil {
		panic("segments: zstd encoder: " + err.Error()) // options are constant
	}
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(MaxBlockRawSize),
		zstd.WithDecodeAllCapLimit(true), // never decode past the length the header promised
	)
	if err != nil {
		panic("segments: zstd decoder: " + err.Error())
	}
	return &codecSet{zenc: enc, zdec: dec}
})

// compress appends the compressed form of raw to dst. ok is false when the
// block must be stored uncompressed instead (no gain, or ratio above maxRatio).
func compress(c Codec, dst, raw []byte) (out []byte, ok bool) {
	start := len(dst)
	switch c {
	case CodecZstd:
		dst = codecs().zenc.EncodeAll(raw, dst)
	case CodecS2:
		n := s2.MaxEncodedLen(len(raw))
		if n < 0 {
			return dst, false
		}
		dst = growTo(dst, start+n)
		enc := s2.Encode(dst[start:start+n], raw) // note: s2.Encode(dst, src)
		dst = dst[:start+len(enc)]
	default:
		return dst, false
	}
	stored := len(dst) - start
	if stored >= len(raw) || len(raw) > stored*maxRatio {
		return dst[:start], false
	}
	return dst, true
}

// decompress decodes stored, which must yield exactly rawLen bytes, into
// *buf (grown as needed and kept for reuse). rawLen has already been bounded
// by the caller.
func decompress(c Codec, buf *[]byte, stored []byte, rawLen int) ([]byte, error) {
	*buf = growTo((*buf)[:0], rawLen)
	dst := *buf
	switch c {
	case CodecZstd:
		var h zstd.Header
		// Small frames carry no content size; the cap limit below still
		// stops the decoder at rawLen.
		if err := h.Decode(stored); err != nil || (h.HasFCS && h.FrameContentSize != uint64(rawLen)) {
			return nil, corruptf("zstd frame header does not match raw length %d", rawLen)
		}
		out, err := codecs().zdec.DecodeAll(stored, dst[:0:rawLen])
		if err != nil {
			return nil, corruptf("zstd: %v", err)
		}
		dst = out
	case CodecS2:
		n, err := s2.DecodedLen(stored)
		if err != nil || n != rawLen {
			return nil, corruptf("s2 length does not match raw length %d", rawLen)
		}
		out, err := s2.Decode(dst[:rawLen], stored)
		if err != nil {
			return nil, corruptf("s2: %v", err)
		}
		dst = out
	default:
		return nil, corruptf("unknown codec %d", c)
	}
	if len(dst) != rawLen {
		return nil, corruptf("decompressed %d bytes, header says %d", len(dst), rawLen)
	}
	return dst, nil
}

// growTo returns b with length n, reusing its array when large enough.
func growTo(b []byte, n int) []byte {
	if cap(b) >= n {
		return b[:n]
	}
	nb := make([]byte, n, max(n, 2*cap(b)))
	copy(nb, b)
	return nb
}
