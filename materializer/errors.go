package materializer

import "errors"

// Errors returned by the materializer, always wrapped with context (the
// stream, log, key or file concerned); test with errors.Is.
var (
	// ErrInvalidArgument: a malformed argument (empty or oversized stream
	// name, bad key-group range, unknown op, ...).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrOutOfOrder: the changes of one Apply call are not in strictly
	// increasing SQN order, or belong to another log.
	ErrOutOfOrder = errors.New("changes out of SQN order")
	// ErrCorrupt: a stored key, value, snapshot file or manifest failed
	// validation (size, checksum, bounds).
	ErrCorrupt = errors.New("corrupt materializer data")
	// ErrRangeNotEmpty: Import into a key-group range that already holds
	// data.
	ErrRangeNotEmpty = errors.New("key-group range not empty")
	// ErrAppliedConflict: Import of a snapshot whose applied SQN of a log
	// differs from the one this store already has for it.
	ErrAppliedConflict = errors.New("applied SQN conflict")
	// ErrLeaseLapsed: a round could not keep its lease renewed long enough
	// to publish; its files may be collected, so it published nothing.
	ErrLeaseLapsed = errors.New("round lease lapsed: the round's files are no longer protected from collection")
	// ErrClosed: the store is closed.
	ErrClosed = errors.New("materializer store closed")
)

// Errors of lazily imported snapshot files (see Store.ImportSnapshot with
// ImportOptions.Lazy).
var (
	// ErrUnavailable: a read of a snapshot file from the blob store failed
	// after retries. The read returned no data; it may succeed later (the
	// server maps it to UNAVAILABLE).
	ErrUnavailable = errors.New("snapshot file unavailable on the blob store")
	// ErrSnapshotFileGone: a snapshot file a lazily imported range still
	// reads is missing from the blob store (it was collected while the store
	// held no live reference to it); the range must be imported again.
	ErrSnapshotFileGone = errors.New("snapshot file missing from the blob store")
)
