// Package feed produces the events of a CDC subscription from the blob
// store: the committed changes of a stream, checkpoint after checkpoint,
// as row-level events with before-images, each at a reproducible position
// (cdc.Token).
//
// A feed folds the changes it delivers into a Pebble store of its own (the
// state of its key groups at the last delivered checkpoint), restored
// lazily from the stream's snapshots: that fold is where MERGE and CLEAR are
// expanded and where before-images come from. See docs/cdc.md.
//
// Invariant (determinism): the events of a checkpoint are a function of
// the blob store's content alone (the state at the previous checkpoint, the
// changes between, or the two states), in one defined order, so a feed on
// any node that starts from a token reproduces exactly the events after it.
package feed

import (
	"errors"
	"log/slog"
	"time"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

var (
	// ErrTokenMismatch: a token issued for another stream (or incarnation),
	// other key groups, or another form.
	ErrTokenMismatch = errors.New("cdc: token does not match the subscription")
	// ErrTokenFuture: a token naming a checkpoint that is not complete.
	ErrTokenFuture = errors.New("cdc: token from the future")
	// ErrMustResnapshot: the position cannot be replayed any more (its
	// changelog was truncated or its checkpoint forgotten), and the
	// subscription asked not to be resnapshotted silently.
	ErrMustResnapshot = errors.New("cdc: position no longer replayable, subscription must resnapshot")
	// ErrInvalidRequest: a malformed request.
	ErrInvalidRequest = errors.New("cdc: invalid request")
)

// Kind is what an event says about its key.
type Kind uint8

const (
	KindPut          Kind = 1 // upsert: the key holds Value
	KindDelete       Kind = 2 // the key was removed (retract: Value is the removed value)
	KindInsert       Kind = 3 // +I
	KindUpdateBefore Kind = 4 // -U: Value is the value before
	KindUpdateAfter  Kind = 5 // +U: Value is the value after
)

// Start is where a feed without a token begins.
type Start uint8

const (
	StartEarliest Start = iota // every change from the empty state (a snapshot if truncated)
	StartSnapshot              // a scan of the newest complete checkpoint, then follow
	StartLatest                // after the newest complete checkpoint
)

// Event is one row-level change. Key and Value are owned by the Batch.
type Event struct {
	Kind        Kind
	KeyGroup    uint16
	State       string
	Key, Value  []byte
	Ordinal     uint64
	TimestampMs int64
}

// Batch is one message of a feed.
type Batch struct {
	Events     []Event
	Checkpoint uint64
	// Complete: every event of Checkpoint has been delivered with this batch.
	Complete bool
	// Base is the token of the batch's checkpoint with ordinal 0; an event's
	// token is Base.WithOrdinal(event.Ordinal).
	Base cdc.Token
	// Token resumes after this batch.
	Token    cdc.Token
	Snapshot bool
	Reset    bool
	Newest   uint64
	// Bytes is the size of the events' keys and values.
	Bytes int
}

// Request is what a subscriber asks for.
type Request struct {
	Stream string
	// From resumes after a token; nil starts as Start says.
	From  *cdc.Token
	Start Start
	// KeyGroups: nil means every key group of the stream.
	KeyGroups *keygroup.Range
	State     string
	KeyPrefix []byte
	Form      cdc.Form
	// MaxEvents per batch (default 4096).
	MaxEvents int
	// NoFollow ends the feed once every complete checkpoint is delivered.
	NoFollow bool
	// NoAutoSnapshot: a position that cannot be replayed is ErrMustResnapshot
	// instead of a snapshot of the newest checkpoint (registered
	// subscriptions).
	NoAutoSnapshot bool
}

// Config is what every feed of a node shares.
type Config struct {
	Node *changelog.Node
	// Dir holds the feeds' stores (one subdirectory each, removed when the
	// feed ends).
	Dir string
	// PollInterval is how often a caught-up feed looks for a new complete
	// checkpoint on the blob store (default 200ms). A checkpoint completed
	// on this node wakes feeds at once through Notify.
	PollInterval time.Duration
	// Notify, if set, returns a channel closed at the next checkpoint
	// completion on this node (a hint; polling covers the rest).
	Notify func() <-chan struct{}
	// CacheSize is each feed store's Pebble block cache (default 8 MiB).
	CacheSize int64
	// CacheBytes bounds each feed's in-memory cache of changed and read
	// values (default 64 MiB): before-images of hot keys without a Pebble
	// read.
	CacheBytes int
	Logger     *slog.Logger
}

const (
	defaultMaxEvents    = 4096
	maxMaxEvents        = 65536
	defaultPollInterval = 200 * time.Millisecond
	defaultCacheSize    = 8 << 20
	// batchBytes ends a batch early once its keys and values reach it.
	batchBytes = 4 << 20
)
