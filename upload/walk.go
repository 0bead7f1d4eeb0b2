package upload

import (
	"context"
	"iter"
)

// Walk yields every object whose key starts with prefix and sorts after
// startAfter, in key order, listing page by page (1000 keys a call). It
// stops at the first error, which it yields.
func Walk(ctx context.Context, store BlobStore, prefix, startAfter string) iter.Seq2[ObjectInfo, error] {
	return func(yield func(ObjectInfo, error) bool) {
		for {
			page, err := store.List(ctx, prefix, startAfter, 1000)
			if err != nil {
				yield(ObjectInfo{}, err)
				return
			}
			for _, o := range page.Objects {
				if !yield(o, nil) {
					return
				}
			}
			if page.Next == "" {
				return
			}
			startAfter = page.Next
		}
	}
}
