package server

import (
	"fmt"
	"testing"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/materializer"
)

// A read of a lazily imported snapshot file that failed after retries is
// UNAVAILABLE (retry later), never data and never INTERNAL.
func TestLazyReadUnavailable(t *testing.T) {
	err := fmt.Errorf("get s/1/st: snapshot file f: 4 attempts: %w: %w", materializer.ErrUnavailable, fmt.Errorf("boom"))
	if code := connect.CodeOf(toConnect(err)); code != connect.CodeUnavailable {
		t.Fatalf("code %v, want unavailable", code)
	}
}
