// Package envelope seals small metadata records (stream definitions, journal
// entries, checkpoint parts, manifests) into checksummed byte strings, so
// that every byte dstl reads back from the blob store is verified
// (invariant 6) while the payload stays human-readable JSON.
//
// Format, all integers little-endian:
//
//	magic    4 bytes  "DSTE"
//	version  1 byte   1
//	kindLen  1 byte   length of kind, 1..64
//	kind     kindLen  ASCII record kind, e.g. "journal-entry"
//	bodyLen  4 bytes  length of body, ≤ MaxBody
//	body     bodyLen  JSON
//	crc      4 bytes  CRC32C (Castagnoli) of every preceding byte
//
// A reader rejects any other version, a kind it did not ask for, trailing
// bytes, and a checksum mismatch. Evolution happens inside the JSON body
// (new optional fields); a change to the framing bumps the version.
package envelope

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
)

const (
	magic   = "DSTE"
	version = 1
	// MaxBody bounds a record's body; records are small metadata.
	MaxBody = 64 << 20
	// headerLen is magic + version + kindLen; the kind and bodyLen follow.
	headerLen = len(magic) + 2
)

var (
	// ErrCorrupt: the bytes are not a valid envelope (checksum, framing).
	ErrCorrupt = errors.New("corrupt record")
	// ErrUnknownVersion: an envelope version this build does not read.
	ErrUnknownVersion = errors.New("unknown record version")
	// ErrWrongKind: a valid envelope of another record kind.
	ErrWrongKind = errors.New("wrong record kind")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Seal encodes v as JSON and frames it as a record of the given kind.
func Seal(kind string, v any) ([]byte, error) {
	if len(kind) == 0 || len(kind) > 64 {
		return nil, fmt.Errorf("seal %q: kind must be 1..64 bytes", kind)
	}
	body, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("seal %s: %w", kind, err)
	}
	if len(body) > MaxBody {
		return nil, fmt.Errorf("seal %s: body of %d bytes exceeds %d", kind, len(body), MaxBody)
	}
	return frame(kind, body), nil
}

// frame lays out an envelope around an already encoded body.
func frame(kind string, body []byte) []byte {
	out := make([]byte, 0, headerLen+len(kind)+4+len(body)+4)
	out = append(out, magic...)
	out = append(out, version, byte(len(kind)))
	out = append(out, kind...)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(body)))
	out = append(out, body...)
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli))
}

// Open verifies data as a record of the given kind and decodes its body into
// v. name identifies the object in errors.
func Open(name string, data []byte, kind string, v any) error {
	gotKind, body, err := Unseal(name, data)
	if err != nil {
		return err
	}
	if gotKind != kind {
		return fmt.Errorf("record %s: kind %q, want %q: %w", name, gotKind, kind, ErrWrongKind)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("record %s: decode %s body: %v: %w", name, kind, err, ErrCorrupt)
	}
	return nil
}

// Unseal verifies data and returns its kind and JSON body (aliasing data).
func Unseal(name string, data []byte) (kind string, body []byte, err error) {
	corrupt := func(off int, what string) error {
		return fmt.Errorf("record %s: offset %d: %s: %w", name, off, what, ErrCorrupt)
	}
	if len(data) < headerLen+1+4+4 {
		return "", nil, corrupt(0, fmt.Sprintf("%d bytes is too short", len(data)))
	}
	if string(data[:len(magic)]) != magic {
		return "", nil, corrupt(0, "bad magic")
	}
	// The checksum is verified before any field is trusted, so a flipped
	// version byte reads as corruption, not as an unknown version.
	end := len(data) - 4
	if got, want := crc32.Checksum(data[:end], castagnoli), binary.LittleEndian.Uint32(data[end:]); got != want {
		return "", nil, corrupt(end, fmt.Sprintf("checksum %08x, want %08x", got, want))
	}
	if v := data[len(magic)]; v != version {
		return "", nil, fmt.Errorf("record %s: offset %d: version %d: %w", name, len(magic), v, ErrUnknownVersion)
	}
	kindLen := int(data[len(magic)+1])
	off := headerLen
	if kindLen == 0 || off+kindLen+4 > end {
		return "", nil, corrupt(off-1, fmt.Sprintf("kind length %d", kindLen))
	}
	kind = string(data[off : off+kindLen])
	off += kindLen
	bodyLen := int64(binary.LittleEndian.Uint32(data[off:]))
	off += 4
	if bodyLen > MaxBody || int64(off)+bodyLen != int64(end) {
		return "", nil, corrupt(off-4, fmt.Sprintf("body length %d does not fit %d bytes", bodyLen, len(data)))
	}
	return kind, data[off:end], nil
}
