package locallog

import (
	"errors"
	"fmt"
)

// Sentinel errors. Recovery errors wrap ErrCorrupt together with the file
// name and the byte offset of the damaged record.
var (
	// ErrCorrupt: a WAL file holds damage that is not a torn tail, so
	// acknowledged data may be missing; Open refuses rather than drop it.
	ErrCorrupt = errors.New("corrupt local log")
	// ErrClosed: the Log was closed.
	ErrClosed = errors.New("local log closed")
	// ErrLocked: another Log (perhaps in another process) holds the directory.
	ErrLocked = errors.New("local log directory in use")
	// ErrWithdrawn: the context ended before the committer took the
	// request, so it was withdrawn and certainly not written.
	ErrWithdrawn = errors.New("request withdrawn before it was written")
	// ErrTooLarge: one Append or SetMeta exceeds the size limits.
	ErrTooLarge = errors.New("local log request too large")
)

// corruptf builds an ErrCorrupt error. Only on error paths.
func corruptf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrCorrupt)...)
}

// at names the file and offset of the structure that failed.
func at(file string, off int64, err error) error {
	return fmt.Errorf("locallog %s at offset %d: %w", file, off, err)
}
