package changelog

import (
	"errors"
	"fmt"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
)

// Op is the kind of a change (put, delete, merge-style append, clear).
type Op = segments.Op

// The ops a change can carry.
const (
	OpPut    = segments.OpPut
	OpDelete = segments.OpDelete
	OpMerge  = segments.OpMerge
	OpClear  = segments.OpClear
)

// Change is one state mutation as a writer appends it. The writer assigns
// its SQN and log. Key and Value are copied by Append: callers may reuse
// their buffers as soon as it returns.
type Change struct {
	KeyGroup    uint16
	State       string
	Op          Op
	Key, Value  []byte
	TimestampMs int64
}

// Durability is how durable an append is when it returns.
type Durability int

const (
	// Buffered: in memory only; the next persist makes it durable (the
	// semantics of Flink's changelog). Lost if the node crashes first.
	Buffered Durability = iota
	// Local: fsynced in the node's local log (group commit); survives a
	// process crash, uploaded after restart.
	Local
	// Replicated: copied to other nodes before acknowledgement. Comes with
	// the cluster; refused until then.
	Replicated
)

func (d Durability) String() string {
	switch d {
	case Buffered:
		return "buffered"
	case Local:
		return "local"
	case Replicated:
		return "replicated"
	}
	return fmt.Sprintf("durability(%d)", int(d))
}

// ParseDurability reads "buffered", "local" or "replicated".
func ParseDurability(s string) (Durability, error) {
	for _, d := range []Durability{Buffered, Local, Replicated} {
		if d.String() == s {
			return d, nil
		}
	}
	return 0, fmt.Errorf("durability %q: want buffered, local or replicated: %w", s, ErrInvalidChange)
}

// Limits bound what one change, or one request, may carry.
type Limits struct {
	MaxKeySize   int // default 64 KiB
	MaxValueSize int // default 16 MiB
	MaxStateName int // default 1 KiB (the segment format's bound)
	// MaxCheckpointIDStep bounds how far above the newest complete
	// checkpoint a Checkpoint id may be (default 1<<20): one request with
	// id 2^64-1 would otherwise leave the stream no id to checkpoint with.
	MaxCheckpointIDStep uint64
}

// DefaultLimits are the limits of a node that sets none.
var DefaultLimits = Limits{MaxKeySize: 64 << 10, MaxValueSize: 16 << 20, MaxStateName: segments.MaxStateLen, MaxCheckpointIDStep: 1 << 20}

func (l Limits) withDefaults() Limits {
	if l.MaxKeySize <= 0 {
		l.MaxKeySize = DefaultLimits.MaxKeySize
	}
	if l.MaxValueSize <= 0 {
		l.MaxValueSize = DefaultLimits.MaxValueSize
	}
	if l.MaxStateName <= 0 || l.MaxStateName > segments.MaxStateLen {
		l.MaxStateName = DefaultLimits.MaxStateName
	}
	if l.MaxCheckpointIDStep == 0 {
		l.MaxCheckpointIDStep = DefaultLimits.MaxCheckpointIDStep
	}
	// A change must fit one segment block whatever the limits say.
	if l.MaxValueSize > segments.MaxBlockRawSize-l.MaxKeySize-l.MaxStateName-64 {
		l.MaxValueSize = segments.MaxBlockRawSize - l.MaxKeySize - l.MaxStateName - 64
	}
	return l
}

// Errors for bad input; all wrap ErrInvalidChange so an API can map them
// to one "invalid argument" code, while callers can still tell them apart.
var (
	ErrInvalidChange      = errors.New("invalid change")
	ErrKeyGroupOutOfRange = fmt.Errorf("key group outside the writer's range: %w", ErrInvalidChange)
	ErrKeyTooLarge        = fmt.Errorf("key too large: %w", ErrInvalidChange)
	ErrValueTooLarge      = fmt.Errorf("value too large: %w", ErrInvalidChange)
	ErrUnknownOp          = fmt.Errorf("unknown op: %w", ErrInvalidChange)
	// ErrCheckpointIDOutOfRange: a checkpoint id more than
	// Limits.MaxCheckpointIDStep above the newest complete checkpoint.
	ErrCheckpointIDOutOfRange = fmt.Errorf("checkpoint id out of range: %w", ErrInvalidChange)
	ErrUnsupportedDurability  = errors.New("durability level not supported")
)

// validate checks one change of a batch against the writer's range and the
// limits. i is its index in the batch, for the message.
func (c *Change) validate(i int, r keygroup.Range, l Limits) error {
	switch {
	case !r.Contains(c.KeyGroup):
		return fmt.Errorf("change %d: key group %d not in %s: %w", i, c.KeyGroup, r, ErrKeyGroupOutOfRange)
	case len(c.Key) > l.MaxKeySize:
		return fmt.Errorf("change %d: key of %d bytes, limit %d: %w", i, len(c.Key), l.MaxKeySize, ErrKeyTooLarge)
	case len(c.Value) > l.MaxValueSize:
		return fmt.Errorf("change %d: value of %d bytes, limit %d: %w", i, len(c.Value), l.MaxValueSize, ErrValueTooLarge)
	case len(c.State) > l.MaxStateName:
		return fmt.Errorf("change %d: state name of %d bytes, limit %d: %w", i, len(c.State), l.MaxStateName, ErrInvalidChange)
	case c.Op < OpPut || c.Op > OpClear:
		return fmt.Errorf("change %d: %v: %w", i, c.Op, ErrUnknownOp)
	}
	return nil
}
