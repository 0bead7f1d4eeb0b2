// Package blobstore holds cross-package tests of the blob stores.
package blobstore

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/dstl-dev/dstl/upload/file"
)

// TestFileStorePutRacesDeleteOfLastObject: a put into a directory must not
// fail because a concurrent Delete of the directory's last object removes
// the (then empty) directory and its empty parents. Regression test: publish
// used to retry only its link, not its mkdirs, so a parent vanishing between
// mkdirs' check and its Mkdir failed the put with "no such file or
// directory", which the upload scheduler treats as permanent (in dstl: GC
// deleting a node's last segments while the node uploads its next one; the
// crash test's truncation profile hit it).
func TestFileStorePutRacesDeleteOfLastObject(t *testing.T) {
	ctx := context.Background()
	s, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const rounds = 400
	data := []byte("x")
	var wg sync.WaitGroup
	errs := make(chan error, 2*rounds)
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range rounds {
				// Two levels of directories, both emptied by every Delete.
				key := fmt.Sprintf("segments/node/%d-%06d.seg", g, i)
				if err := s.PutIfAbsent(ctx, key, bytes.NewReader(data), int64(len(data))); err != nil {
					errs <- err
					continue
				}
				if err := s.Delete(ctx, key); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	n := 0
	for err := range errs {
		if n < 3 {
			t.Errorf("put/delete: %v", err)
		}
		n++
	}
	if n > 0 {
		t.Errorf("%d of %d puts or deletes failed", n, 2*rounds)
	}
}
