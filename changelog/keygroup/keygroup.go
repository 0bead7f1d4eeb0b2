// Package keygroup maps keys to key groups. It is a leaf package on purpose:
// the server and the Go SDK import this one function, so that a key lands in
// the same key group whoever computes it.
//
// The mapping is part of dstl's on-disk contract and never changes:
//
//	keyGroup(key, n) = xxh64(key, seed 0) mod n
//
// where xxh64 is XXH64 (https://xxhash.com) over the raw key bytes, read as an
// unsigned 64-bit integer. The state name is not hashed: every state of a key
// lives in the same key group, so a key group is a self-contained unit of
// rescaling. Clients in other languages reproduce it with any XXH64
// implementation; TestVectors pins the values.
package keygroup

import (
	"errors"
	"fmt"

	"github.com/cespare/xxhash/v2"
)

const (
	// Default is the number of key groups of a stream created without one.
	Default = 128
	// Max is the largest number of key groups a stream may have. Key groups
	// are stored as uint16 and numbered 0..Max-1.
	Max = 32768
)

// ErrInvalidCount: a key-group count outside 1..Max.
var ErrInvalidCount = errors.New("invalid key-group count")

// ValidateCount checks a stream's key-group count.
func ValidateCount(n int) error {
	if n < 1 || n > Max {
		return fmt.Errorf("%d key groups: must be 1..%d: %w", n, Max, ErrInvalidCount)
	}
	return nil
}

// Of returns the key group of key in a stream with n key groups. n must be
// valid (see ValidateCount); Of panics on n == 0 like a division by zero.
func Of(key []byte, n int) uint16 {
	return uint16(xxhash.Sum64(key) % uint64(n))
}

// OfString is Of for a string key, without copying it.
func OfString(key string, n int) uint16 {
	return uint16(xxhash.Sum64String(key) % uint64(n))
}

// Range is an inclusive range of key groups [Lo, Hi].
type Range struct {
	Lo, Hi uint16
}

// ErrInvalidRange: a range that is empty or outside the stream.
var ErrInvalidRange = errors.New("invalid key-group range")

// Full returns the range of every key group of a stream with n key groups.
func Full(n int) Range { return Range{Lo: 0, Hi: uint16(n - 1)} }

// Validate checks that r is non-empty and inside a stream of n key groups.
func (r Range) Validate(n int) error {
	if r.Lo > r.Hi || int(r.Hi) >= n {
		return fmt.Errorf("key groups %s in a stream of %d: %w", r, n, ErrInvalidRange)
	}
	return nil
}

// Contains reports whether g is in r.
func (r Range) Contains(g uint16) bool { return r.Lo <= g && g <= r.Hi }

// Overlaps reports whether r and o share a key group.
func (r Range) Overlaps(o Range) bool { return r.Lo <= o.Hi && o.Lo <= r.Hi }

// Covers reports whether every key group of o is in r.
func (r Range) Covers(o Range) bool { return r.Lo <= o.Lo && o.Hi <= r.Hi }

func (r Range) String() string { return fmt.Sprintf("%d..%d", r.Lo, r.Hi) }
