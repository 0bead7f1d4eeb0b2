package segments

import (
	"encoding/binary"
	"hash/crc32"
)

// castagnoli is CRC32C, hardware accelerated on amd64 and arm64.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// maxVarintLen is the longest uvarint this format writes (a uint64).
const maxVarintLen = binary.MaxVarintLen64

// putUvarint writes v at b[i:] (which must have room) and returns the new
// position. Callers grow the buffer once per change, then write every field
// without further capacity checks.
func putUvarint(b []byte, i int, v uint64) int {
	for v >= 0x80 {
		b[i] = byte(v) | 0x80
		v >>= 7
		i++
	}
	b[i] = byte(v)
	return i + 1
}

// reader is a bounds-checked cursor over a byte slice. Every length it
// reads is checked against the bytes actually remaining before it is used,
// so no field can cause an allocation or a slice past the end. The first
// error sticks; callers check ok once after a group of reads.
type reader struct {
	b   []byte
	i   int
	bad bool
}

func (r *reader) ok() bool   { return !r.bad }
func (r *reader) left() int  { return len(r.b) - r.i }
func (r *reader) fail()      { r.bad = true; r.i = len(r.b) }
func (r *reader) done() bool { return r.i == len(r.b) && !r.bad }

func (r *reader) uvarint() uint64 {
	if r.i < len(r.b) && r.b[r.i] < 0x80 {
		v := uint64(r.b[r.i])
		r.i++
		return v
	}
	v, n := binary.Uvarint(r.b[r.i:])
	if n <= 0 {
		r.fail()
		return 0
	}
	r.i += n
	return v
}

func (r *reader) u8() byte {
	if r.i >= len(r.b) {
		r.fail()
		return 0
	}
	v := r.b[r.i]
	r.i++
	return v
}

func (r *reader) u32() uint32 {
	if len(r.b)-r.i < 4 {
		r.fail()
		return 0
	}
	v := binary.LittleEndian.Uint32(r.b[r.i:])
	r.i += 4
	return v
}

// bytes returns the next n bytes (n bounded by what remains), aliasing r.b.
func (r *reader) bytes(n uint64) []byte {
	if n > uint64(len(r.b)-r.i) {
		r.fail()
		return nil
	}
	v := r.b[r.i : r.i+int(n) : r.i+int(n)]
	r.i += int(n)
	return v
}

// lenBytes reads a uvarint length ≤ limit followed by that many bytes.
func (r *reader) lenBytes(limit uint64) []byte {
	n := r.uvarint()
	if n > limit {
		r.fail()
		return nil
	}
	return r.bytes(n)
}

func appendUvarint(dst []byte, v uint64) []byte { return binary.AppendUvarint(dst, v) }

func appendU32(dst []byte, v uint32) []byte { return binary.LittleEndian.AppendUint32(dst, v) }

func crc32Update(c uint32, b []byte) uint32 { return crc32.Update(c, castagnoli, b) }
