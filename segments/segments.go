// Package segments implements the changelog segment format: one immutable,
// checksummed, compressed object holding blocks of changes from one or many
// logs, with an index that lets a reader fetch only the blocks of given logs,
// SQN ranges and key groups.
//
// An object is block* · index · trailer. The byte-level format is specified
// in docs/formats.md ("Segment format (v1)"); this package is its reference
// implementation. Every byte of an object is covered by a CRC32C or by strict
// validation, so corruption surfaces as an error naming the object and offset
// (wrapping ErrCorrupt, ErrTruncated, ErrBadMagic or ErrUnknownVersion),
// never as data.
package segments

import "fmt"

// Format limits. Readers enforce them too, so that no length read from an
// object can make them allocate more than the limits (and, for compressed
// payloads, more than maxRatio times the stored bytes).
const (
	// MaxKeyGroup is the largest key group (key groups are 0..MaxKeyGroup).
	MaxKeyGroup = 32767
	// MaxLogIDLen and MaxStateLen bound LogID and State names in bytes.
	MaxLogIDLen = 1024
	MaxStateLen = 1024
	// MaxBlockRawSize bounds the raw (uncompressed) payload of one block, so
	// one change can be at most a little less than this.
	MaxBlockRawSize = 64 << 20
	// DefaultBlockSize is the raw payload size at which the writer cuts a block.
	DefaultBlockSize = 256 << 10
)

// Op is the kind of a change. The zero Op is invalid so that a zero Change
// can never be encoded by accident.
type Op uint8

const (
	OpPut    Op = 1 // set Key to Value
	OpDelete Op = 2 // delete Key
	OpMerge  Op = 3 // merge-style append of Value to Key
	OpClear  Op = 4 // clear the whole State of the KeyGroup (Key is usually empty)
	opMax       = OpClear
)

func (o Op) valid() bool { return o >= OpPut && o <= opMax }

func (o Op) String() string {
	switch o {
	case OpPut:
		return "put"
	case OpDelete:
		return "delete"
	case OpMerge:
		return "merge"
	case OpClear:
		return "clear"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Change is one state mutation of one log.
//
// Changes yielded by a Reader or BlockDecoder have Key and Value aliasing an
// internal buffer that is only valid until the iteration advances (or the
// decoder decodes its next block); call Clone to keep them. LogID and State
// are ordinary strings and stay valid. An empty Key or Value decodes as nil.
type Change struct {
	LogID       string // opaque id chosen by the changelog layer, 1..MaxLogIDLen bytes
	SQN         uint64 // ≥ 1, strictly increasing per log
	KeyGroup    uint16 // 0..MaxKeyGroup
	State       string // state name, ≤ MaxStateLen bytes
	Op          Op
	Key, Value  []byte
	TimestampMs int64
}

// Clone returns a copy of c whose Key and Value do not alias any buffer.
func (c Change) Clone() Change {
	// One allocation for both slices; nil stays nil (no aliasing either way).
	if len(c.Key)+len(c.Value) == 0 {
		c.Key, c.Value = nil, nil
		return c
	}
	buf := make([]byte, 0, len(c.Key)+len(c.Value))
	if c.Key != nil {
		buf = append(buf, c.Key...)
		c.Key = buf[:len(c.Key):len(c.Key)]
	}
	if c.Value != nil {
		start := len(buf)
		buf = append(buf, c.Value...)
		c.Value = buf[start:len(buf):len(buf)]
	}
	return c
}

// KeyGroupRun is an inclusive range [Lo, Hi] of key groups.
type KeyGroupRun struct{ Lo, Hi uint16 }

// BlockInfo describes one block: what the index holds for it.
type BlockInfo struct {
	LogID             string
	FirstSQN, LastSQN uint64
	Count             uint64        // number of changes
	KeyGroups         []KeyGroupRun // sorted, disjoint, non-adjacent runs of the key groups present
	Offset, Length    uint64        // byte range of the whole block (header + payload) in the object
}

// Summary is what Writer.Close reports: the block list (exactly what the
// index holds) and the object size, so the changelog layer can record
// "segment + blocks per log".
type Summary struct {
	Blocks  []BlockInfo
	Changes uint64 // total number of changes
	Size    int64  // object size in bytes
}

// Query selects changes. A block is fetched only if its log, SQN range and
// key-group runs intersect the query.
type Query struct {
	// LogID selects one log; "" selects every log (yielded in object order,
	// each log in SQN order).
	LogID string
	// AfterSQN is an exclusive lower bound; UpToSQN an inclusive upper
	// bound, 0 meaning unbounded.
	AfterSQN, UpToSQN uint64
	// KeyGroupLo..KeyGroupHi (inclusive) select key groups. The pair (0, 0)
	// selects all key groups unless KeyGroupsSet is true, so that the single
	// key group 0 can still be asked for. Lo > Hi is an error.
	KeyGroupLo, KeyGroupHi uint16
	KeyGroupsSet           bool
}

func (q Query) kgRange() (lo, hi uint16) {
	if !q.KeyGroupsSet && q.KeyGroupLo == 0 && q.KeyGroupHi == 0 {
		return 0, MaxKeyGroup
	}
	return q.KeyGroupLo, q.KeyGroupHi
}

func (q Query) upTo() uint64 {
	if q.UpToSQN == 0 {
		return ^uint64(0)
	}
	return q.UpToSQN
}

// matchesBlock reports whether block b may hold changes selected by q.
func (q Query) matchesBlock(b *BlockInfo) bool {
	if q.LogID != "" && b.LogID != q.LogID {
		return false
	}
	if b.LastSQN <= q.AfterSQN || b.FirstSQN > q.upTo() {
		return false
	}
	lo, hi := q.kgRange()
	for _, r := range b.KeyGroups {
		if r.Lo <= hi && lo <= r.Hi {
			return true
		}
	}
	return false
}

// coversBlock reports whether every change of block b is selected.
func (q Query) coversBlock(b *BlockInfo) bool {
	lo, hi := q.kgRange()
	return b.FirstSQN > q.AfterSQN && b.LastSQN <= q.upTo() &&
		len(b.KeyGroups) > 0 && b.KeyGroups[0].Lo >= lo && b.KeyGroups[len(b.KeyGroups)-1].Hi <= hi
}

// matches reports whether change c (of a block that matchesBlock) is selected.
func (q Query) matches(c *Change) bool {
	lo, hi := q.kgRange()
	return c.SQN > q.AfterSQN && c.SQN <= q.upTo() && c.KeyGroup >= lo && c.KeyGroup <= hi
}
