package changelog

import (
	"context"
	"errors"
	"fmt"
	"path"
	"strconv"
	"strings"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// Typed errors of the changelog. Callers test with errors.Is; messages name
// the stream, writer or key group concerned.
var (
	ErrInvalidStreamName = errors.New("invalid stream name")
	ErrStreamNotFound    = errors.New("stream not found")
	ErrStreamExists      = errors.New("stream already exists")
	// ErrFenced: a newer epoch opened for an overlapping key-group range;
	// this writer can never make a change visible again.
	ErrFenced = errors.New("writer fenced by a newer epoch")
	// ErrCheckpointTooOld: a checkpoint id not above the newest complete one.
	ErrCheckpointTooOld = errors.New("checkpoint id not above the newest complete checkpoint")
	// ErrOrphanedKeyGroups: a checkpoint cannot complete because key groups
	// that hold state have no open writer (a partially overlapping epoch
	// fenced their owner); open writers for them first.
	ErrOrphanedKeyGroups = errors.New("key groups without an open writer")
	// ErrCheckpointConflict: this writer already recorded a different part
	// for that checkpoint id (an earlier attempt that did not complete);
	// checkpoint under a new id.
	ErrCheckpointConflict = errors.New("checkpoint part already recorded differently")
	// ErrCheckpointNotFound: no complete checkpoint with that id.
	ErrCheckpointNotFound = errors.New("checkpoint not found")
)

// StreamConfig is a stream's immutable definition, stored create-only at
// catalog/<name>.
type StreamConfig struct {
	Name        string `json:"name"`
	KeyGroups   int    `json:"key_groups"`
	CreatedAtMs int64  `json:"created_at_ms"`
	// Incarnation is a random id of this creation of the name: every
	// journal entry carries it, so that a node holding a stale view of a
	// stream that was deleted and created again can never write into (or
	// read as its own) the new stream's journal.
	Incarnation string `json:"incarnation,omitempty"`
}

// MaxStreamNameLen bounds stream names; they appear in blob keys.
const MaxStreamNameLen = 128

// ValidateStreamName accepts 1..128 characters of [A-Za-z0-9._-], not
// starting with '.' or '-', so that a name is always one safe path element.
func ValidateStreamName(name string) error {
	if len(name) == 0 || len(name) > MaxStreamNameLen {
		return fmt.Errorf("stream name %q: must be 1..%d characters: %w", name, MaxStreamNameLen, ErrInvalidStreamName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' ||
			(i > 0 && (c == '.' || c == '-'))
		if !ok {
			return fmt.Errorf("stream name %q: character %q at %d: want [A-Za-z0-9._-], not leading '.' or '-': %w", name, c, i, ErrInvalidStreamName)
		}
	}
	return nil
}

// Validate checks a stream definition.
func (c StreamConfig) Validate() error {
	if err := ValidateStreamName(c.Name); err != nil {
		return err
	}
	if err := keygroup.ValidateCount(c.KeyGroups); err != nil {
		return fmt.Errorf("stream %s: %w", c.Name, err)
	}
	return nil
}

// Blob-store keys of a stream. Numbers are zero-padded to 20 digits so that
// lexicographic listing order is numeric order.
//
// Every per-stream object lives under streams/<name>/<incarnation>/: a
// stream deleted and created again numbers its journal entries, epochs and
// checkpoint ids from 1 again, so only the incarnation tells its objects
// from a dead incarnation's that a late writer (another node with a stale
// view) stores after the delete. The catalog entry (catalog/<name>) names
// the current incarnation; DeleteStream and CreateStream's leftover check
// work on streams/<name>/ (every incarnation).

// streamNS names the key space of one incarnation of a stream.
type streamNS struct{ name, incarnation string }

// ns returns the key space of the stream c defines.
func (c StreamConfig) ns() streamNS { return streamNS{name: c.Name, incarnation: c.Incarnation} }

// streamNamePrefix holds every incarnation of a name.
func streamNamePrefix(name string) string { return path.Join("streams", name) + "/" }

// streamPrefix holds one incarnation's objects. A definition stored before
// incarnations existed has none: its objects stay where they were.
func streamPrefix(ns streamNS) string {
	if ns.incarnation == "" {
		return streamNamePrefix(ns.name)
	}
	return streamNamePrefix(ns.name) + ns.incarnation + "/"
}

func journalPrefix(ns streamNS) string { return streamPrefix(ns) + "journal/" }

// listNumbered returns the numbers that name the objects directly under
// prefix (parts by epoch, retention marks by checkpoint id), in order.
// Keys that are not a number are ignored.
func listNumbered(ctx context.Context, store upload.BlobStore, prefix string) ([]uint64, error) {
	var out []uint64
	for o, err := range upload.Walk(ctx, store, prefix, "") {
		if err != nil {
			return nil, err
		}
		if n, err := strconv.ParseUint(strings.TrimPrefix(o.Key, prefix), 10, 64); err == nil {
			out = append(out, n)
		}
	}
	return out, nil
}

func journalKey(ns streamNS, seq uint64) string {
	return fmt.Sprintf("%s%020d", journalPrefix(ns), seq)
}
