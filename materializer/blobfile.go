package materializer

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/dstl-dev/dstl/upload"
)

// blobFile is an io.WriteCloser that spools an exported SST to a local
// temporary file and uploads it create-only when closed: the blob store
// takes whole objects, and an aborted export never publishes a partial one.
type blobFile struct {
	ctx   context.Context
	store upload.BlobStore
	key   string
	f     *os.File
	size  int64
	// uploaded reports the object's size once it is stored.
	uploaded func(key string, size int64)
}

func newBlobFile(ctx context.Context, store upload.BlobStore, dir, key string, uploaded func(string, int64)) (*blobFile, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("spool %s: %w", key, err)
	}
	f, err := os.CreateTemp(dir, "upload-*.sst")
	if err != nil {
		return nil, fmt.Errorf("spool %s: %w", key, err)
	}
	return &blobFile{ctx: ctx, store: store, key: key, f: f, uploaded: uploaded}, nil
}

func (b *blobFile) Write(p []byte) (int, error) {
	n, err := b.f.Write(p)
	b.size += int64(n)
	return n, err
}

// Close uploads the spooled file and removes it.
func (b *blobFile) Close() error {
	defer b.discard()
	if _, err := b.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("upload %s: %w", b.key, err)
	}
	if err := b.store.PutIfAbsent(b.ctx, b.key, b.f, b.size); err != nil {
		return fmt.Errorf("upload %s: %w", b.key, err)
	}
	if b.uploaded != nil {
		b.uploaded(b.key, b.size)
	}
	return nil
}

// Abort drops the spooled file without uploading it.
func (b *blobFile) Abort() error {
	b.discard()
	return nil
}

func (b *blobFile) discard() {
	name := b.f.Name()
	_ = b.f.Close()
	_ = os.Remove(name)
}

// blobOpener returns an open function for ImportRange that reads the
// manifest's files from the blob store (ranged reads; sizes from the
// manifest).
func blobOpener(ctx context.Context, store upload.BlobStore, m SnapshotManifest) func(name string) (io.ReaderAt, error) {
	sizes := map[string]int64{}
	for _, r := range m.Runs {
		for _, f := range r.Files {
			sizes[f.Name] = f.Size
		}
	}
	return func(name string) (io.ReaderAt, error) {
		size, ok := sizes[name]
		if !ok {
			return nil, fmt.Errorf("file %s is not in the manifest: %w", name, ErrCorrupt)
		}
		return upload.ReaderAt(ctx, store, name, size), nil
	}
}
