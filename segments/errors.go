package segments

import (
	"errors"
	"fmt"
)

// Sentinel errors. Decode errors wrap one of the first four together with
// the object name and the byte offset of the damaged structure; encode-side
// validation errors wrap ErrInvalidChange.
var (
	ErrCorrupt        = errors.New("corrupt segment")
	ErrTruncated      = errors.New("truncated segment")
	ErrBadMagic       = errors.New("not a segment (bad magic)")
	ErrUnknownVersion = errors.New("unknown segment format version")
	ErrInvalidChange  = errors.New("invalid change")
	ErrInvalidQuery   = errors.New("invalid query")
	ErrClosed         = errors.New("segment writer closed")
)

// corruptf builds an ErrCorrupt error. Only used on error paths, so the fmt
// cost never reaches the hot path.
func corruptf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrCorrupt)...)
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrInvalidChange)...)
}

// objErr names the object and the byte offset of the structure that failed.
func objErr(name, what string, off uint64, err error) error {
	return fmt.Errorf("segment %s: %s at offset %d: %w", name, what, off, err)
}
