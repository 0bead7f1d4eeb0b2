package gossip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"
)

// Meta is what a node tells the others about itself, gossiped with its
// membership.
type Meta struct {
	// RPC is the URL of the node's API (http://host:port or
	// https://host:port), what clients and other nodes dial.
	RPC string
	// Zone is the node's failure domain (an availability zone, a rack);
	// empty if unknown.
	Zone string
	// Load is a small figure of how busy the node is (for now: whatever
	// the node publishes with UpdateMeta; 0 by default).
	Load uint64
}

// MaxMetaSize is the largest encoded metadata: memberlist's limit for node
// metadata.
const MaxMetaSize = 512

// metaVersion is the version byte of the encoding below.
const metaVersion = 1

// ErrMeta: metadata that does not encode (too large, not UTF-8) or does
// not decode.
var ErrMeta = errors.New("invalid member metadata")

// wireMeta is what a node gossips about itself: its Meta plus what the
// Cluster adds.
type wireMeta struct {
	Meta
	// Incarnation: see Member.Incarnation.
	Incarnation uint64
	// Leaving is set by Leave before memberlist's leave: memberlist v0.7.0
	// passes the same (stale) state to its leave callback for a node that
	// left and one that died, so this flag is how the others tell them
	// apart.
	Leaving bool
}

// flagLeaving is bit 0 of the flags field.
const flagLeaving = 1

// encodeMeta encodes a member's metadata:
//
//	version   1 byte, 1
//	rpc       uvarint length + UTF-8 bytes
//	zone      uvarint length + UTF-8 bytes
//	load      uvarint
//	incarn.   uvarint (the process's incarnation, see Member.Incarnation)
//	flags     uvarint (bit 0: leaving; other bits: 0, ignored)
//
// at most MaxMetaSize bytes in all. A later version appends fields and
// raises the version byte: decoders of version 1 read the fields they know
// and ignore what follows, so versions can mix in one cluster.
func encodeMeta(w wireMeta) ([]byte, error) {
	m := w.Meta
	for _, f := range []struct{ name, v string }{{"rpc", m.RPC}, {"zone", m.Zone}} {
		if !utf8.ValidString(f.v) {
			return nil, fmt.Errorf("%s %q is not UTF-8: %w", f.name, f.v, ErrMeta)
		}
	}
	b := make([]byte, 0, 1+len(m.RPC)+len(m.Zone)+4*binary.MaxVarintLen64)
	b = append(b, metaVersion)
	b = binary.AppendUvarint(b, uint64(len(m.RPC)))
	b = append(b, m.RPC...)
	b = binary.AppendUvarint(b, uint64(len(m.Zone)))
	b = append(b, m.Zone...)
	b = binary.AppendUvarint(b, m.Load)
	b = binary.AppendUvarint(b, w.Incarnation)
	var flags uint64
	if w.Leaving {
		flags |= flagLeaving
	}
	b = binary.AppendUvarint(b, flags)
	if len(b) > MaxMetaSize {
		return nil, fmt.Errorf("metadata of %d bytes (rpc %d, zone %d), limit %d: %w", len(b), len(m.RPC), len(m.Zone), MaxMetaSize, ErrMeta)
	}
	return b, nil
}

// decodeMeta decodes what encodeMeta wrote, from any node version ≥ 1. It
// never panics: every malformed input is an error wrapping ErrMeta.
func decodeMeta(b []byte) (w wireMeta, err error) {
	if len(b) == 0 {
		return wireMeta{}, fmt.Errorf("empty metadata: %w", ErrMeta)
	}
	if len(b) > MaxMetaSize {
		return wireMeta{}, fmt.Errorf("metadata of %d bytes, limit %d: %w", len(b), MaxMetaSize, ErrMeta)
	}
	if b[0] == 0 {
		return wireMeta{}, fmt.Errorf("metadata version 0: %w", ErrMeta)
	}
	r := metaReader{b: b[1:]}
	w.RPC = r.string("rpc")
	w.Zone = r.string("zone")
	w.Load = r.uvarint("load")
	w.Incarnation = r.uvarint("incarnation")
	w.Leaving = r.uvarint("flags")&flagLeaving != 0
	if r.err != nil {
		return wireMeta{}, r.err
	}
	if b[0] == metaVersion && len(r.b) != 0 {
		return wireMeta{}, fmt.Errorf("%d bytes after the metadata of version 1: %w", len(r.b), ErrMeta)
	}
	return w, nil
}

// metaReader reads fields; the first error sticks.
type metaReader struct {
	b   []byte
	err error
}

func (r *metaReader) uvarint(field string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = fmt.Errorf("metadata field %s: bad varint: %w", field, ErrMeta)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *metaReader) string(field string) string {
	n := r.uvarint(field + " length")
	if r.err != nil {
		return ""
	}
	if n > uint64(len(r.b)) {
		r.err = fmt.Errorf("metadata field %s: %d bytes, %d left: %w", field, n, len(r.b), ErrMeta)
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	if !utf8.ValidString(s) {
		r.err = fmt.Errorf("metadata field %s is not UTF-8: %w", field, ErrMeta)
		return ""
	}
	return s
}
