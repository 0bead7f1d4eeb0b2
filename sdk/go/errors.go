package dstl

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"
)

// Sentinel errors. Every error the SDK returns for a failed call is an
// *Error that matches (with errors.Is) the sentinel of its code, keeps the
// server's message, and unwraps to the *connect.Error it came from.
var (
	// ErrNotFound: unknown stream, writer or checkpoint (NOT_FOUND).
	ErrNotFound = errors.New("dstl: not found")
	// ErrAlreadyExists: a stream of that name exists (ALREADY_EXISTS).
	ErrAlreadyExists = errors.New("dstl: already exists")
	// ErrFenced: the call's precondition failed (FAILED_PRECONDITION): most
	// often the writer was fenced by a newer epoch of overlapping key
	// groups; also a stale checkpoint id, a closed writer, or deleting a
	// stream that still has open writers. The message says which.
	ErrFenced = errors.New("dstl: fenced or failed precondition")
	// ErrInvalidArgument: a malformed request, a key group outside the
	// writer's range, an oversized key or value (INVALID_ARGUMENT).
	ErrInvalidArgument = errors.New("dstl: invalid argument")
	// ErrUnavailable: the node or its blob store is unreachable
	// (UNAVAILABLE); the SDK already retried.
	ErrUnavailable = errors.New("dstl: unavailable")
	// ErrBackpressure: the node's in-flight bytes stayed at their bound
	// (RESOURCE_EXHAUSTED); the SDK already retried.
	ErrBackpressure = errors.New("dstl: back-pressure")
	// ErrClosed: the Writer (or Client) was closed or aborted by this
	// process; returned without contacting the server.
	ErrClosed = errors.New("dstl: writer closed")
	// ErrBadToken: a CDC resume token that is malformed or corrupt, of
	// another stream, form or key-group range (INVALID_ARGUMENT, checked
	// by the SDK before anything is sent where it can be), or naming a
	// checkpoint that is not complete (OUT_OF_RANGE: from the future, or
	// of a recreated stream). Such an error also matches
	// ErrInvalidArgument when its code is INVALID_ARGUMENT.
	ErrBadToken = errors.New("dstl: bad resume token")
	// ErrResnapshot: a subscription's position can no longer be replayed
	// (FAILED_PRECONDITION from Subscribe): the changelog it needs is
	// gone, or a registered subscription was held back past the node's
	// retention cap. Start again from a snapshot (StartSnapshot). It also
	// matches ErrFenced, the sentinel of its code.
	ErrResnapshot = errors.New("dstl: subscription must resnapshot")
	// ErrNotOwner: OpenWriter could not reach the owner of the writer's
	// (stream, key-group range) (FAILED_PRECONDITION with a NotOwner
	// detail): the nodes kept naming other owners past MaxOwnerRedirects
	// (their membership views disagree, e.g. during a membership change;
	// retry shortly), or the client cannot follow (an in-process client).
	// Client.OpenWriter follows a NotOwner answer by itself otherwise. It
	// also matches ErrFenced, the sentinel of its code.
	ErrNotOwner = errors.New("dstl: not the owner")
)

// Error is a failed call: its RPC code and the server's message.
type Error struct {
	// Op names the call, e.g. "dstl.v1.WriterService/Append".
	Op   string
	Code connect.Code
	// Message is the server's (or transport's) message.
	Message string
	err     *connect.Error
	// also is a second sentinel the error matches, decided by the call
	// that failed (ErrBadToken, ErrResnapshot); nil if none.
	also error
}

func (e *Error) Error() string {
	return fmt.Sprintf("dstl: %s: %s: %s", e.Op, e.Code, e.Message)
}

// Unwrap returns the underlying *connect.Error.
func (e *Error) Unwrap() error { return e.err }

// Is matches the sentinel of e's code (and context.Canceled /
// context.DeadlineExceeded for CANCELED / DEADLINE_EXCEEDED).
func (e *Error) Is(target error) bool {
	if e.also != nil && target == e.also {
		return true
	}
	switch e.Code {
	case connect.CodeNotFound:
		return target == ErrNotFound
	case connect.CodeAlreadyExists:
		return target == ErrAlreadyExists
	case connect.CodeFailedPrecondition:
		return target == ErrFenced
	case connect.CodeInvalidArgument:
		return target == ErrInvalidArgument
	case connect.CodeUnavailable:
		return target == ErrUnavailable
	case connect.CodeResourceExhausted:
		return target == ErrBackpressure
	case connect.CodeCanceled:
		return target == context.Canceled
	case connect.CodeDeadlineExceeded:
		return target == context.DeadlineExceeded
	}
	return false
}

// wrapErr converts an RPC error into an *Error.
func wrapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		ce = connect.NewError(connect.CodeOf(err), err)
	}
	return &Error{Op: op, Code: ce.Code(), Message: ce.Message(), err: ce}
}

// withSentinel returns err (an *Error from wrapErr) also matching
// sentinel; other errors are returned as they are.
func withSentinel(err, sentinel error) error {
	var e *Error
	if !errors.As(err, &e) {
		return err
	}
	c := *e
	c.also = sentinel
	return &c
}

// invalid returns a client-side INVALID_ARGUMENT error.
func invalid(op, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	return &Error{Op: op, Code: connect.CodeInvalidArgument, Message: msg, err: connect.NewError(connect.CodeInvalidArgument, errors.New(msg))}
}
