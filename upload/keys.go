package upload

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxKeyLen is the longest key a BlobStore accepts, in bytes (S3's limit).
const MaxKeyLen = 1024

// ReservedPrefix is the first key element no backend accepts: the file
// backend keeps its scratch files there.
const ReservedPrefix = ".tmp"

// ValidateKey reports whether key is a valid blob key: a non-empty, valid
// UTF-8, slash-separated relative path of at most MaxKeyLen bytes, with no
// empty, "." or ".." elements, no control characters, and not under the
// reserved top-level element ".tmp". The error wraps ErrInvalidKey.
func ValidateKey(key string) error {
	bad := func(why string) error { return fmt.Errorf("%w %q: %s", ErrInvalidKey, key, why) }
	switch {
	case key == "":
		return fmt.Errorf("%w: empty key", ErrInvalidKey)
	case len(key) > MaxKeyLen:
		return fmt.Errorf("%w: key is %d bytes, longer than %d", ErrInvalidKey, len(key), MaxKeyLen)
	case !utf8.ValidString(key):
		return bad("not valid UTF-8")
	case key[0] == '/':
		return bad("absolute")
	case key[len(key)-1] == '/':
		return bad("ends with a slash")
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x20 || c == 0x7f {
			return bad("contains a control character")
		}
	}
	for i, elem := range strings.Split(key, "/") {
		switch {
		case elem == "":
			return bad("empty path element")
		case elem == "." || elem == "..":
			return bad(`contains a "." or ".." element`)
		case i == 0 && elem == ReservedPrefix:
			return bad(`the top-level element ".tmp" is reserved`)
		}
	}
	return nil
}
