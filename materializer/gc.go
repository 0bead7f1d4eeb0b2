package materializer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/upload"
)

// FileGCStats reports one collection of a stream's snapshot files.
type FileGCStats struct {
	Files        int   // files found under the stream's snapshot prefix
	Referenced   int   // of which a published snapshot references
	Young        int   // unreferenced, but within the grace period
	Deleted      int   // deleted
	DeletedBytes int64 // their size
}

// CollectFiles deletes the stream's snapshot files that no published
// snapshot references. The changelog's garbage collection deletes the
// snapshot records no retained checkpoint, live epoch or pending part
// restores from (keeping the newest); this deletes their files.
//
// Invariant (brief invariant 5): a file is deleted only if it is older
// than GCGrace (an export may still be uploading it) and it was already
// unreferenced in a listing at least GCGrace earlier, so a snapshot built
// on an older one (which inherits its files) and published meanwhile by
// another materializer cannot lose a file between our listing and its
// publication. The listing of files comes before the reading of the
// records, so a file uploaded after the records were read is not listed.
func (m *Materializer) CollectFiles(ctx context.Context, stream string) (FileGCStats, error) {
	ss, err := m.state(stream)
	if err != nil {
		return FileGCStats{}, err
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if _, err := m.bind(ctx, ss); err != nil {
		return FileGCStats{}, err
	}
	if ss.seenUnreferenced == nil {
		if ss.seenUnreferenced, err = loadSeen(ss); err != nil {
			return FileGCStats{}, err
		}
	}
	var objs []upload.ObjectInfo
	for o, err := range upload.Walk(ctx, m.blob, changelog.SnapshotFilePrefix(stream), "") {
		if err != nil {
			return FileGCStats{}, fmt.Errorf("stream %s: list snapshot files: %w", stream, err)
		}
		objs = append(objs, o)
	}
	refs, err := m.referencedFiles(ctx, stream)
	if err != nil {
		return FileGCStats{}, err
	}
	st := FileGCStats{Files: len(objs)}
	now := m.cfg.Clock.Now()
	listed := make(map[string]bool, len(objs))
	var errs []error
	for _, o := range objs {
		listed[o.Key] = true
		if refs[o.Key] {
			st.Referenced++
			delete(ss.seenUnreferenced, o.Key)
			continue
		}
		first, ok := ss.seenUnreferenced[o.Key]
		if !ok {
			first = now
			ss.seenUnreferenced[o.Key] = now
		}
		if now.Sub(o.ModTime) < m.cfg.GCGrace || now.Sub(first) < m.cfg.GCGrace {
			st.Young++
			continue
		}
		if err := m.blob.Delete(ctx, o.Key); err != nil {
			errs = append(errs, fmt.Errorf("stream %s: delete snapshot file %s: %w", stream, o.Key, err))
			continue
		}
		delete(ss.seenUnreferenced, o.Key)
		st.Deleted++
		st.DeletedBytes += o.Size
	}
	for key := range ss.seenUnreferenced {
		if !listed[key] {
			delete(ss.seenUnreferenced, key)
		}
	}
	ss.status.FilesDeleted += int64(st.Deleted)
	if err := saveSeen(ss); err != nil {
		errs = append(errs, err)
	}
	return st, errors.Join(errs...)
}

// referencedFiles returns the files every published snapshot of the stream
// references. A record that cannot be decoded fails the collection: its
// files are unknown, so nothing may be deleted.
func (m *Materializer) referencedFiles(ctx context.Context, stream string) (map[string]bool, error) {
	snaps, err := m.node.Snapshots(ctx, stream)
	if err != nil {
		return nil, err
	}
	refs := map[string]bool{}
	for _, s := range snaps {
		man, err := decodeManifest(s)
		if err != nil {
			return nil, fmt.Errorf("gc: %w", err)
		}
		for _, r := range man.Runs {
			for _, f := range r.Files {
				refs[f.Name] = true
			}
		}
	}
	return refs, nil
}

// The first sightings of unreferenced files survive restarts (a
// `dstl materialize --once` run per cron tick still collects): they are
// kept in <dir>.gc.json next to the stream's store.
func seenPath(ss *streamState) string { return ss.dir + ".gc.json" }

func loadSeen(ss *streamState) (map[string]time.Time, error) {
	seen := map[string]time.Time{}
	data, err := os.ReadFile(seenPath(ss))
	if errors.Is(err, os.ErrNotExist) {
		return seen, nil
	}
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", ss.name, err)
	}
	if err := json.Unmarshal(data, &seen); err != nil {
		// A torn file only delays collection: start over.
		return map[string]time.Time{}, nil
	}
	return seen, nil
}

func saveSeen(ss *streamState) error {
	data, err := json.Marshal(ss.seenUnreferenced)
	if err != nil {
		return err
	}
	tmp := seenPath(ss) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("stream %s: %w", ss.name, err)
	}
	if err := os.Rename(tmp, seenPath(ss)); err != nil {
		return fmt.Errorf("stream %s: %w", ss.name, err)
	}
	return nil
}
