package segments

import (
	"encoding/binary"
	"fmt"
)

// Version is the segment format version this package writes and the newest
// it reads. Readers accept 1..Version; anything else is ErrUnknownVersion.
const Version = 1

// Magic ends every segment object.
const Magic = "DSTLSEGM"

// TrailerSize is the fixed size of the v1 trailer. Its last 12 bytes
// (version, magic) keep their place in every version, so any reader can
// tell a newer object from a corrupt one.
const TrailerSize = 40

// Trailer layout (little-endian):
//
//	0  u64 index offset      20 u32 flags (0 in v1)
//	8  u32 index length      24 u32 CRC32C of bytes [0,24) ‖ [28,40)
//	12 u32 index CRC32C      28 u32 version
//	16 u32 block count       32 [8] magic "DSTLSEGM"
type trailer struct {
	indexOff uint64
	indexLen uint32
	indexCRC uint32
	blocks   uint32
	version  uint32
}

func trailerCRC(b []byte) uint32 {
	c := crc(b[:24])
	return crc32Update(c, b[28:40])
}

func appendTrailer(dst []byte, t *trailer) []byte {
	start := len(dst)
	dst = binary.LittleEndian.AppendUint64(dst, t.indexOff)
	dst = appendU32(dst, t.indexLen)
	dst = appendU32(dst, t.indexCRC)
	dst = appendU32(dst, t.blocks)
	dst = appendU32(dst, 0) // flags
	dst = appendU32(dst, 0) // CRC, patched below
	dst = appendU32(dst, t.version)
	dst = append(dst, Magic...)
	binary.LittleEndian.PutUint32(dst[start+24:], trailerCRC(dst[start:]))
	return dst
}

// decodeTrailer checks, in this order, magic, version, CRC and flags, so
// that an object from a newer writer reports ErrUnknownVersion rather than
// a checksum error. b must be the last TrailerSize bytes of the object.
func decodeTrailer(b []byte) (trailer, error) {
	if len(b) < TrailerSize {
		return trailer{}, ErrTruncated
	}
	if string(b[32:40]) != Magic {
		return trailer{}, ErrBadMagic
	}
	t := trailer{
		indexOff: binary.LittleEndian.Uint64(b[0:]),
		indexLen: binary.LittleEndian.Uint32(b[8:]),
		indexCRC: binary.LittleEndian.Uint32(b[12:]),
		blocks:   binary.LittleEndian.Uint32(b[16:]),
		version:  binary.LittleEndian.Uint32(b[28:]),
	}
	if t.version == 0 || t.version > Version {
		return trailer{}, fmt.Errorf("version %d (this reader supports 1..%d): %w", t.version, Version, ErrUnknownVersion)
	}
	if trailerCRC(b) != binary.LittleEndian.Uint32(b[24:]) {
		return trailer{}, corruptf("trailer checksum mismatch")
	}
	if flags := binary.LittleEndian.Uint32(b[20:]); flags != 0 {
		return trailer{}, corruptf("reserved trailer flags %#x set", flags)
	}
	return t, nil
}
