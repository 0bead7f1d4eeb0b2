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
	Files      int // files found under the stream's snapshot prefix
	Referenced int // of which a published snapshot references
	Young      int // unreferenced, but within the grace period
	Leased     int // unreferenced, but their round's lease is live
	// RefHeld: unreferenced by records, but a live reference of a lazily
	// opened store (sst-refs) lists them.
	RefHeld      int
	Deleted      int   // deleted
	DeletedBytes int64 // their size
	// LeasesDeleted counts expired round leases and store references
	// deleted.
	LeasesDeleted int
}

// CollectFiles deletes the stream's snapshot files that no published
// snapshot references. The changelog's garbage collection deletes the
// snapshot records no retained checkpoint, live epoch or pending part
// restores from (keeping the newest); this deletes their files.
//
// Invariant (brief invariant 5): a file is deleted only once two listings
// found it unreferenced, far enough apart:
//
//   - a file some earlier listing found referenced (released by a deleted
//     record) after ReleasedGrace: only a delta that checked its base's
//     record before that record was deleted, and publishes within
//     ReleasedGrace of the check, can still reference it;
//   - a file never seen referenced (an upload in flight, or garbage of a
//     failed round) after GCGrace, counted from both its upload and its
//     first unreferenced sighting;
//   - never a file of a round with a live lease (see roundLease), whatever
//     its age: a round uploads for as long as it needs. Its sightings
//     start over when the lease ends, so a file of a round that ended
//     unpublished still gets the full GCGrace;
//   - never a file a live reference of a lazily opened store lists (see
//     liveRefs): the store still reads it from the blob store. Its
//     sightings start over too when the reference ends.
//
// Files are listed before the leases and references, and those before
// the records: a round stores its lease before its first file and
// publishes only while the lease is live, so a listed file whose lease was
// gone at the lease listing belongs to a round that published before (its
// record is read next) or never will; a store confirms its reference
// before it ingests a file, while the file's record is still a root (the
// opener's pin or its writer's base), so a file a store reads is kept by
// its record or, from before the record can go, by the reference. A file uploaded after the records were read is not
// listed. Sightings persist next to the store.
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
	if ss.sightings == nil {
		if ss.sightings, err = loadSightings(ss); err != nil {
			return FileGCStats{}, err
		}
	}
	var objs []upload.ObjectInfo
	for o, err := range upload.Walk(ctx, m.blob, changelog.SnapshotFilePrefix(stream, ss.incarnation), "") {
		if err != nil {
			return FileGCStats{}, fmt.Errorf("stream %s: list snapshot files: %w", stream, err)
		}
		objs = append(objs, o)
	}
	now := m.cfg.Clock.Now()
	live, expired, err := m.liveRounds(ctx, stream, ss.incarnation, now)
	if err != nil {
		return FileGCStats{}, err
	}
	held, expiredRefs, err := m.liveRefs(ctx, stream, ss.incarnation, now)
	if err != nil {
		return FileGCStats{}, err
	}
	expired = append(expired, expiredRefs...)
	refs, err := m.referencedFiles(ctx, stream)
	if err != nil {
		return FileGCStats{}, err
	}
	st := FileGCStats{Files: len(objs)}
	listed := make(map[string]bool, len(objs))
	var errs []error
	for _, o := range objs {
		listed[o.Key] = true
		if refs[o.Key] {
			st.Referenced++
			ss.sightings[o.Key] = sighting{Released: true}
			continue
		}
		if held[o.Key] {
			st.RefHeld++
			delete(ss.sightings, o.Key)
			continue
		}
		if round, ok := roundOfFile(stream, ss.incarnation, o.Key); ok && live[round] {
			st.Leased++
			delete(ss.sightings, o.Key)
			continue
		}
		sg, ok := ss.sightings[o.Key]
		if !ok || sg.Unreferenced.IsZero() {
			sg.Unreferenced = now
			ss.sightings[o.Key] = sg
		}
		young := now.Sub(sg.Unreferenced) < m.cfg.ReleasedGrace
		if !sg.Released {
			young = now.Sub(o.ModTime) < m.cfg.GCGrace || now.Sub(sg.Unreferenced) < m.cfg.GCGrace
		}
		if young {
			st.Young++
			continue
		}
		if err := m.blob.Delete(ctx, o.Key); err != nil {
			errs = append(errs, fmt.Errorf("stream %s: delete snapshot file %s: %w", stream, o.Key, err))
			continue
		}
		delete(ss.sightings, o.Key)
		st.Deleted++
		st.DeletedBytes += o.Size
	}
	for _, o := range expired {
		if err := m.blob.Delete(ctx, o.Key); err != nil {
			errs = append(errs, fmt.Errorf("stream %s: delete expired lease %s: %w", stream, o.Key, err))
			continue
		}
		st.LeasesDeleted++
	}
	for key := range ss.sightings {
		if !listed[key] {
			delete(ss.sightings, key)
		}
	}
	ss.status.FilesDeleted += int64(st.Deleted)
	ss.publishStatus()
	if err := saveSightings(ss); err != nil {
		errs = append(errs, err)
	}
	return st, errors.Join(errs...)
}

// sighting is what CollectFiles remembers of a file: whether a listing
// found it referenced, and when one first found it unreferenced since.
type sighting struct {
	Released     bool      `json:"released,omitempty"`
	Unreferenced time.Time `json:"unreferenced,omitzero"`
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
		man, err := DecodeManifest(s)
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

// The sightings survive restarts (a `dstl materialize --once` run per cron
// tick still collects): they are kept in <store dir>.gc.json.
func sightingsPath(ss *streamState) string { return ss.dir + ".gc.json" }

func loadSightings(ss *streamState) (map[string]sighting, error) {
	seen := map[string]sighting{}
	data, err := os.ReadFile(sightingsPath(ss))
	if errors.Is(err, os.ErrNotExist) {
		return seen, nil
	}
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", ss.name, err)
	}
	if err := json.Unmarshal(data, &seen); err != nil {
		// A torn file only delays collection: start over.
		return map[string]sighting{}, nil
	}
	return seen, nil
}

func saveSightings(ss *streamState) error {
	data, err := json.Marshal(ss.sightings)
	if err != nil {
		return err
	}
	tmp := sightingsPath(ss) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("stream %s: %w", ss.name, err)
	}
	if err := os.Rename(tmp, sightingsPath(ss)); err != nil {
		return fmt.Errorf("stream %s: %w", ss.name, err)
	}
	return nil
}
