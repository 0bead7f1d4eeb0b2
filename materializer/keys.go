package materializer

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Key layout (docs/materializer.md, "Key layout", is the byte-level
// specification; this file is its implementation).
//
// Data keys:
//
//	0x01 | len(stream) u8 | stream | key group u16 BE | len(state) u16 BE | state | user key
//
// Metadata keys (applied SQN of a log; value: SQN u64 BE):
//
//	0x00 | 0x01 | len(stream) u8 | stream | log id
//
// Range marks (an owner's note on key groups lo..hi of a stream, see
// marks.go; value: hi u16 BE | the owner's bytes):
//
//	0x00 | 0x02 | len(stream) u8 | stream | lo u16 BE
//
// Every field before the user key is either fixed-size or length-prefixed,
// so a key decodes unambiguously and every one of these is a key prefix:
// a stream, a (stream, key group), a (stream, key group, state), and
// (stream, key group, state, user-key prefix). Because the key group is a
// fixed-width big-endian integer right after the stream, the key groups
// lo..hi of a stream are ONE contiguous key range [start(lo), start(hi+1)).
const (
	prefixMeta byte = 0x00
	prefixData byte = 0x01

	metaApplied   byte = 0x01
	metaRangeMark byte = 0x02

	// MaxStreamLen bounds a stream name in bytes (its length is one byte).
	MaxStreamLen = 255
	// MaxStateLen bounds a state name in bytes (its length is two bytes).
	MaxStateLen = 65535
)

// DataKey is a decoded data key.
type DataKey struct {
	Stream   string
	KeyGroup uint16
	State    string
	Key      []byte // aliases the decoded buffer
}

func checkStream(stream string) error {
	if len(stream) == 0 || len(stream) > MaxStreamLen {
		return fmt.Errorf("stream name of %d bytes, want 1..%d: %w", len(stream), MaxStreamLen, ErrInvalidArgument)
	}
	return nil
}

func checkState(state string) error {
	if len(state) > MaxStateLen {
		return fmt.Errorf("state name of %d bytes, limit %d: %w", len(state), MaxStateLen, ErrInvalidArgument)
	}
	return nil
}

// appendStreamPrefix appends 0x01 | len(stream) | stream. The caller has
// checked the stream.
func appendStreamPrefix(dst []byte, stream string) []byte {
	dst = append(dst, prefixData, byte(len(stream)))
	return append(dst, stream...)
}

// appendStatePrefix appends the prefix of every key of (stream, kg, state).
func appendStatePrefix(dst []byte, stream string, kg uint16, state string) []byte {
	dst = appendStreamPrefix(dst, stream)
	dst = binary.BigEndian.AppendUint16(dst, kg)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(state)))
	return append(dst, state...)
}

// AppendDataKey appends the data key of (stream, kg, state, key) to dst.
func AppendDataKey(dst []byte, stream string, kg uint16, state string, key []byte) ([]byte, error) {
	if err := checkStream(stream); err != nil {
		return dst, err
	}
	if err := checkState(state); err != nil {
		return dst, err
	}
	return append(appendStatePrefix(dst, stream, kg, state), key...), nil
}

// StatePrefix returns the prefix shared by every key of (stream, kg, state)
// and nothing else.
func StatePrefix(stream string, kg uint16, state string) ([]byte, error) {
	return AppendDataKey(nil, stream, kg, state, nil)
}

// StateBounds returns [start, end) holding exactly the keys of (stream, kg,
// state) whose user key starts with keyPrefix.
func StateBounds(stream string, kg uint16, state string, keyPrefix []byte) (start, end []byte, err error) {
	start, err = AppendDataKey(nil, stream, kg, state, keyPrefix)
	if err != nil {
		return nil, nil, err
	}
	return start, prefixEnd(start), nil
}

// StreamBounds returns [start, end) holding exactly the data keys of a
// stream.
func StreamBounds(stream string) (start, end []byte, err error) {
	if err := checkStream(stream); err != nil {
		return nil, nil, err
	}
	start = appendStreamPrefix(nil, stream)
	return start, prefixEnd(start), nil
}

// KeyGroupRangeBounds returns [start, end) holding exactly the data keys of
// key groups lo..hi (inclusive) of a stream: one contiguous key range.
func KeyGroupRangeBounds(stream string, lo, hi uint16) (start, end []byte, err error) {
	if err := checkStream(stream); err != nil {
		return nil, nil, err
	}
	if lo > hi {
		return nil, nil, fmt.Errorf("key groups %d..%d: %w", lo, hi, ErrInvalidArgument)
	}
	p := appendStreamPrefix(nil, stream)
	start = binary.BigEndian.AppendUint16(bytes.Clone(p), lo)
	if hi == 0xFFFF {
		return start, prefixEnd(p), nil
	}
	end = binary.BigEndian.AppendUint16(p, hi+1)
	return start, end, nil
}

// DecodeDataKey splits a data key into its fields. Key aliases k.
func DecodeDataKey(k []byte) (DataKey, error) {
	bad := func(what string) (DataKey, error) {
		return DataKey{}, fmt.Errorf("data key %x: %s: %w", k, what, ErrCorrupt)
	}
	if len(k) < 2 || k[0] != prefixData {
		return bad("not a data key")
	}
	n := int(k[1])
	if n == 0 {
		return bad("empty stream")
	}
	rest := k[2:]
	if len(rest) < n+4 {
		return bad("truncated")
	}
	stream := string(rest[:n])
	rest = rest[n:]
	kg := binary.BigEndian.Uint16(rest)
	m := int(binary.BigEndian.Uint16(rest[2:]))
	rest = rest[4:]
	if len(rest) < m {
		return bad("truncated state")
	}
	return DataKey{Stream: stream, KeyGroup: kg, State: string(rest[:m]), Key: rest[m:]}, nil
}

// AppliedKey returns the metadata key holding the applied SQN of a log of a
// stream.
func AppliedKey(stream, logID string) ([]byte, error) {
	if err := checkStream(stream); err != nil {
		return nil, err
	}
	if logID == "" {
		return nil, fmt.Errorf("empty log id: %w", ErrInvalidArgument)
	}
	return appendAppliedKey(nil, stream, logID), nil
}

func appendAppliedKey(dst []byte, stream, logID string) []byte {
	dst = append(dst, prefixMeta, metaApplied, byte(len(stream)))
	dst = append(dst, stream...)
	return append(dst, logID...)
}

// AppliedBounds returns [start, end) holding the applied-SQN keys of every
// log of a stream.
func AppliedBounds(stream string) (start, end []byte, err error) {
	if err := checkStream(stream); err != nil {
		return nil, nil, err
	}
	start = appendAppliedKey(nil, stream, "")
	return start, prefixEnd(start), nil
}

// DecodeAppliedKey returns the stream and log id of an applied-SQN key.
func DecodeAppliedKey(k []byte) (stream, logID string, err error) {
	if len(k) < 3 || k[0] != prefixMeta || k[1] != metaApplied {
		return "", "", fmt.Errorf("metadata key %x: not an applied-SQN key: %w", k, ErrCorrupt)
	}
	n := int(k[2])
	if n == 0 || len(k) < 3+n+1 {
		return "", "", fmt.Errorf("metadata key %x: bad stream or empty log id: %w", k, ErrCorrupt)
	}
	return string(k[3 : 3+n]), string(k[3+n:]), nil
}

func encodeSQN(sqn uint64) []byte { return binary.BigEndian.AppendUint64(nil, sqn) }

func decodeSQN(key, v []byte) (uint64, error) {
	if len(v) != 8 {
		return 0, fmt.Errorf("applied SQN at %x: %d bytes, want 8: %w", key, len(v), ErrCorrupt)
	}
	return binary.BigEndian.Uint64(v), nil
}

// prefixEnd returns the smallest key greater than every key starting with
// p, or nil if there is none (p is all 0xFF).
func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] != 0xFF {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}
