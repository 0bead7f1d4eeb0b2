package server

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/cdc/feed"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/upload"
)

// errInvalid marks request validation failures of the server itself.
var errInvalid = errors.New("invalid request")

// toConnect maps an error of the changelog (or the server) to the connect
// code a client can act on; the message keeps the wrapped context, which
// names what was wrong.
func toConnect(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	return connect.NewError(codeOf(err), err)
}

func codeOf(err error) connect.Code {
	switch {
	// CDC first: a resnapshot error wraps the cause (a checkpoint not
	// found, a truncated log) that would map to another code.
	case errors.Is(err, feed.ErrMustResnapshot):
		return connect.CodeFailedPrecondition
	case errors.Is(err, feed.ErrTokenFuture):
		return connect.CodeOutOfRange
	case errors.Is(err, cdc.ErrBadToken), errors.Is(err, feed.ErrTokenMismatch), errors.Is(err, feed.ErrInvalidRequest):
		return connect.CodeInvalidArgument
	case errors.Is(err, upload.ErrBackpressure):
		return connect.CodeResourceExhausted
	case errors.Is(err, context.Canceled):
		return connect.CodeCanceled
	case errors.Is(err, context.DeadlineExceeded):
		return connect.CodeDeadlineExceeded
	case errors.Is(err, errInvalid),
		errors.Is(err, changelog.ErrInvalidChange),
		errors.Is(err, changelog.ErrInvalidStreamName),
		errors.Is(err, changelog.ErrInvalidSubscriptionName),
		errors.Is(err, cdc.ErrBadToken),
		errors.Is(err, keygroup.ErrInvalidCount),
		errors.Is(err, keygroup.ErrInvalidRange):
		return connect.CodeInvalidArgument
	case errors.Is(err, changelog.ErrStreamNotFound),
		errors.Is(err, changelog.ErrCheckpointNotFound),
		errors.Is(err, changelog.ErrWriterNotFound),
		errors.Is(err, changelog.ErrSubscriptionNotFound),
		errors.Is(err, errWriterUnknown):
		return connect.CodeNotFound
	case errors.Is(err, changelog.ErrStreamExists),
		errors.Is(err, changelog.ErrSubscriptionExists):
		return connect.CodeAlreadyExists
	case errors.Is(err, ErrFoldBehind):
		// The fold is catching up: a retry may succeed.
		return connect.CodeUnavailable
	case errors.Is(err, materializer.ErrClosed):
		// The node is shutting down.
		return connect.CodeUnavailable
	case errors.Is(err, ErrReadViewBroken):
		// Until a writer opens the key groups again.
		return connect.CodeFailedPrecondition
	case errors.Is(err, changelog.ErrFenced),
		errors.Is(err, changelog.ErrCheckpointTooOld),
		errors.Is(err, changelog.ErrCheckpointConflict),
		errors.Is(err, changelog.ErrOrphanedKeyGroups),
		errors.Is(err, changelog.ErrStreamBusy),
		errors.Is(err, changelog.ErrLogTruncated),
		errors.Is(err, changelog.ErrCheckpointNotRestorable),
		errors.Is(err, changelog.ErrSubscriptionExpired),
		errors.Is(err, changelog.ErrClosed),
		errors.Is(err, changelog.ErrClosing),
		errors.Is(err, errNoWriters):
		return connect.CodeFailedPrecondition
	case errors.Is(err, changelog.ErrUnsupportedDurability):
		return connect.CodeUnimplemented
	case upload.IsTransient(err), errors.Is(err, upload.ErrSchedulerStopped),
		// A lazily imported snapshot file could not be read from the blob
		// store (after retries): no data was returned; retry later.
		errors.Is(err, materializer.ErrUnavailable):
		return connect.CodeUnavailable
	}
	return connect.CodeInternal
}
