package materializer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/upload"
)

// A lazily opened Store reads snapshot files from the blob store until it
// has hydrated them, possibly long after the records that listed them were
// deleted (a newer snapshot superseded them). Its references make those
// files roots of CollectFiles, on the blob store so that any node's
// collection sees them:
//
//	streams/<s>/<inc>/sst-refs/<owner>-<nonce>.<seq>.<ttl ms>
//
// with a JSON body {"ttl_ms", "created_at", "files": [blob keys]}. They
// are leases (roundLease, the machinery of the rounds' sst-leases): the
// store stores seq+1 every ttl/3 with the files it still reads and deletes
// the older ones; a reference counts while its ModTime is younger than its
// ttl, so a dead store's references stop protecting anything after ttl,
// and CollectFiles deletes them.

// maxRefBody bounds the body of a reference CollectFiles reads (a
// reference lists at most a snapshot's files: thousands of keys).
const maxRefBody = 64 << 20

// liveRefs returns the files listed by the stream's live references, and
// the expired references (to delete). A live reference whose body cannot
// be read or decoded fails the collection (its files are unknown, so
// nothing may be deleted); one deleted meanwhile is ignored.
func (m *Materializer) liveRefs(ctx context.Context, stream, inc string, now time.Time) (files map[string]bool, expired []upload.ObjectInfo, err error) {
	files = map[string]bool{}
	prefix := changelog.SnapshotRefPrefix(stream, inc)
	for o, err := range upload.Walk(ctx, m.blob, prefix, "") {
		if err != nil {
			return nil, nil, fmt.Errorf("stream %s: list store references: %w", stream, err)
		}
		_, ttl, ok := parseLeaseKeyUnder(prefix, o.Key)
		if !ok {
			continue // not a reference this code writes: leave it alone
		}
		if now.Sub(o.ModTime) >= ttl {
			expired = append(expired, o)
			continue
		}
		names, err := readRef(ctx, m.blob, o.Key)
		if errors.Is(err, upload.ErrNotFound) {
			continue // released meanwhile
		}
		if err != nil {
			return nil, nil, fmt.Errorf("stream %s: %w", stream, err)
		}
		for _, n := range names {
			files[n] = true
		}
	}
	return files, expired, nil
}

func readRef(ctx context.Context, blob upload.BlobStore, key string) ([]string, error) {
	rc, err := blob.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(rc, maxRefBody+1))
	if cerr := rc.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("read store reference %s: %w", key, err)
	}
	files, err := decodeRefBody(data)
	if err != nil {
		return nil, fmt.Errorf("store reference %s: %w", key, err)
	}
	return files, nil
}

// decodeRefBody returns the files a reference's body lists.
func decodeRefBody(data []byte) ([]string, error) {
	if len(data) > maxRefBody {
		return nil, fmt.Errorf("body over %d bytes: %w", maxRefBody, ErrCorrupt)
	}
	var b leaseBody
	if err := json.Unmarshal(data, &b); err != nil {
		return nil, fmt.Errorf("body: %v: %w", err, ErrCorrupt)
	}
	if b.TTLMs <= 0 {
		return nil, fmt.Errorf("body: ttl %d ms: %w", b.TTLMs, ErrCorrupt)
	}
	for _, f := range b.Files {
		if f == "" {
			return nil, fmt.Errorf("body: empty file name: %w", ErrCorrupt)
		}
	}
	return b.Files, nil
}
