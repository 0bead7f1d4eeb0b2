// Package cdc holds the vocabulary of change data capture that the server,
// the SDK and the CLI share: event forms and kinds, and the resume token.
// The feed that produces events lives in cdc/feed.
package cdc

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// ErrBadToken: a token that is not one dstl issued (truncated, corrupt, of
// an unknown version). Wrapped with the reason.
var ErrBadToken = errors.New("cdc: invalid token")

// Form is how a subscription reports changes.
type Form uint8

const (
	// FormUpsert: PUT with the key's new value, or DELETE.
	FormUpsert Form = 1
	// FormRetract: +I, -U/+U (before- and after-image), -D (before-image).
	FormRetract Form = 2
)

func (f Form) String() string {
	switch f {
	case FormUpsert:
		return "upsert"
	case FormRetract:
		return "retract"
	}
	return fmt.Sprintf("form(%d)", uint8(f))
}

// Token is a position in a subscription's events: everything up to and
// including it was delivered. It names the stream incarnation, the key
// groups and the form it was issued for, because an ordinal counts the
// events of exactly those.
//
// Positions (Invariant: a position is reproducible on any node sharing the
// blob store, because the events of a checkpoint are a deterministic
// function of the blob store's content):
//   - boundary: Checkpoint == 0; every event up to checkpoint After is
//     delivered (After 0: nothing, the empty state).
//   - inside a delta: the state at After is delivered, and the first
//     Ordinal events of checkpoint Checkpoint's changes since After.
//   - inside a snapshot (Snapshot set): the first Ordinal rows of the scan of
//     checkpoint Checkpoint in key order (After unused).
type Token struct {
	Stream      string
	Incarnation string
	KeyGroups   keygroup.Range
	Form        Form
	Snapshot    bool
	After       uint64
	Checkpoint  uint64
	Ordinal     uint64
}

const (
	tokenVersion  = 1
	flagSnapshot  = 1
	maxTokenBytes = 4096
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Encode returns the token's opaque bytes: a version, the fields, and a
// CRC32C of them.
func (t Token) Encode() []byte {
	b := make([]byte, 0, 32+len(t.Stream)+len(t.Incarnation))
	b = append(b, tokenVersion)
	b = binary.AppendUvarint(b, uint64(len(t.Stream)))
	b = append(b, t.Stream...)
	b = binary.AppendUvarint(b, uint64(len(t.Incarnation)))
	b = append(b, t.Incarnation...)
	b = binary.AppendUvarint(b, uint64(t.KeyGroups.Lo))
	b = binary.AppendUvarint(b, uint64(t.KeyGroups.Hi))
	var flags byte
	if t.Snapshot {
		flags |= flagSnapshot
	}
	b = append(b, byte(t.Form), flags)
	b = binary.AppendUvarint(b, t.After)
	b = binary.AppendUvarint(b, t.Checkpoint)
	b = binary.AppendUvarint(b, t.Ordinal)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// String is the token in URL-safe base64 (what the CLI prints and takes).
func (t Token) String() string { return base64.RawURLEncoding.EncodeToString(t.Encode()) }

// WithOrdinal returns the token of the event at ordinal o of the same
// checkpoint.
func (t Token) WithOrdinal(o uint64) Token {
	t.Ordinal = o
	return t
}

// Boundary reports whether the token is at a checkpoint boundary.
func (t Token) Boundary() bool { return t.Checkpoint == 0 }

// ParseToken parses the text form (String).
func ParseToken(s string) (Token, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return Token{}, fmt.Errorf("%w: not base64url: %v", ErrBadToken, err)
	}
	return DecodeToken(b)
}

// DecodeToken decodes Encode's bytes, verifying the checksum and every
// field's bounds. It never panics.
func DecodeToken(b []byte) (Token, error) {
	if len(b) > maxTokenBytes {
		return Token{}, fmt.Errorf("%w: %d bytes", ErrBadToken, len(b))
	}
	if len(b) < 5 {
		return Token{}, fmt.Errorf("%w: %d bytes is too short", ErrBadToken, len(b))
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return Token{}, fmt.Errorf("%w: checksum mismatch (corrupt or edited)", ErrBadToken)
	}
	if body[0] != tokenVersion {
		return Token{}, fmt.Errorf("%w: version %d (this node reads %d)", ErrBadToken, body[0], tokenVersion)
	}
	d := decoder{b: body[1:]}
	var t Token
	t.Stream = d.str()
	t.Incarnation = d.str()
	lo, hi := d.uvarint(), d.uvarint()
	form, flags := d.byte(), d.byte()
	t.After = d.uvarint()
	t.Checkpoint = d.uvarint()
	t.Ordinal = d.uvarint()
	if d.err != nil {
		return Token{}, fmt.Errorf("%w: %v", ErrBadToken, d.err)
	}
	if len(d.b) != 0 {
		return Token{}, fmt.Errorf("%w: %d trailing bytes", ErrBadToken, len(d.b))
	}
	if lo > hi || hi >= keygroup.Max {
		return Token{}, fmt.Errorf("%w: key groups %d..%d", ErrBadToken, lo, hi)
	}
	t.KeyGroups = keygroup.Range{Lo: uint16(lo), Hi: uint16(hi)}
	t.Form = Form(form)
	if t.Form != FormUpsert && t.Form != FormRetract {
		return Token{}, fmt.Errorf("%w: form %d", ErrBadToken, form)
	}
	if flags&^flagSnapshot != 0 {
		return Token{}, fmt.Errorf("%w: flags %#x", ErrBadToken, flags)
	}
	t.Snapshot = flags&flagSnapshot != 0
	if t.Stream == "" || t.Incarnation == "" {
		return Token{}, fmt.Errorf("%w: no stream", ErrBadToken)
	}
	if t.Snapshot && t.Checkpoint == 0 {
		return Token{}, fmt.Errorf("%w: snapshot position without a checkpoint", ErrBadToken)
	}
	if !t.Snapshot && t.Checkpoint != 0 && t.Checkpoint <= t.After {
		return Token{}, fmt.Errorf("%w: checkpoint %d is not after %d", ErrBadToken, t.Checkpoint, t.After)
	}
	if t.Checkpoint == 0 && t.Ordinal != 0 {
		return Token{}, fmt.Errorf("%w: ordinal at a boundary", ErrBadToken)
	}
	return t, nil
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errors.New("truncated number")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.err = errors.New("truncated")
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) str() string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.b)) || n > 1024 {
		d.err = fmt.Errorf("string of %d bytes", n)
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}
