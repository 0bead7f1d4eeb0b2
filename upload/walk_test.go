package upload_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/file"
)

// Walk crosses page boundaries, honours prefix and startAfter, stops when
// the consumer does, and reports a listing error.
func TestWalk(t *testing.T) {
	ctx := context.Background()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for i := range 2500 {
		key := fmt.Sprintf("a/%05d", i)
		if err := store.PutIfAbsent(ctx, key, bytes.NewReader(nil), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := store.PutIfAbsent(ctx, "b/other", bytes.NewReader(nil), 0); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for o, err := range upload.Walk(ctx, store, "a/", "a/00499") {
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, o.Key)
	}
	if len(keys) != 2000 || keys[0] != "a/00500" || keys[1999] != "a/02499" {
		t.Fatalf("walked %d keys, %q..%q; want 2000, a/00500..a/02499", len(keys), keys[0], keys[len(keys)-1])
	}
	n := 0
	for range upload.Walk(ctx, store, "", "") {
		if n++; n == 3 {
			break
		}
	}
	broken := faulty.Wrap(store, faulty.Options{Seed: 1, PerOp: map[faulty.Op]faulty.Faults{faulty.OpList: {Transient: 1}}})
	for _, err := range upload.Walk(ctx, broken, "a/", "") {
		if !errors.Is(err, upload.ErrTransient) {
			t.Fatalf("walk over a failing listing: %v, want ErrTransient", err)
		}
	}
}
