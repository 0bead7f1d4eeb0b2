// Package dstl is the Go SDK of dstl, a durable changelog and snapshot
// store for keyed state.
//
// A Client talks to a node (Dial for a remote one, sdk/go/embedded for one
// inside the process). A Writer owns a key-group range of a stream; it
// batches changes on the client and sends them in order from a background
// goroutine, with bounded buffering (back-pressure). ValueState, MapState and
// ListState are typed keyed state over a Writer, with pluggable codecs
// (JSON, Proto, String, Bytes). Reads through a Writer flush it first
// (read-your-writes). Checkpoint makes the writer's state restorable with
// client metadata (e.g. a source offset) that a writer opened from the
// checkpoint gets back from RestoredMetadata.
//
// Errors are *Error values matching ErrNotFound, ErrAlreadyExists,
// ErrFenced, ErrInvalidArgument, ErrUnavailable or ErrBackpressure with
// errors.Is. See docs/sdk.md for the semantics.
package dstl
