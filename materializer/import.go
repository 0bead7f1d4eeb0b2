package materializer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// ImportOptions tune ImportRange.
type ImportOptions struct {
	// SkipApplied imports only the data: the manifest's applied SQNs are
	// neither checked against the store's nor written.
	SkipApplied bool
	// Incarnation, if set, is the stream incarnation the caller restores:
	// ImportSnapshot refuses a snapshot of any other (ErrForeignSnapshot).
	// A lazy ImportRange needs it (it names the store's references).
	Incarnation string
	// Lazy ingests the files by reference (Pebble external files read from
	// Options.Remote, which must be set) instead of copying them first:
	// the import reads nothing from the blob store and the range serves
	// reads at once; the store's hydrator then makes the files local in
	// the background (see Store.Hydration). File names must be blob keys.
	Lazy bool
}

// Import restores a snapshot chain into this store over the manifest's
// whole range: ImportRange(ctx, m, m.KeyGroups, open, ImportOptions{}).
func (s *Store) Import(ctx context.Context, m SnapshotManifest, open func(name string) (io.ReaderAt, error)) error {
	return s.ImportRange(ctx, m, m.KeyGroups, open, ImportOptions{})
}

// ImportRange restores key groups r (inside m.KeyGroups) of a snapshot
// chain into this store (eager restore). r must hold no data here
// (ErrRangeNotEmpty); nothing outside r is touched, so the store may hold
// other key groups and streams. Every file the range needs is first copied
// into the staging area through open, its size and CRC32C verified against
// the manifest (ErrCorrupt naming the file): a file whose key groups lie
// inside r is ingested as is, a file overlapping r partly is rewritten
// locally with its keys and range deletions clipped to r, a file outside r
// is not fetched. Only then are the runs ingested in order, one db.Ingest
// per run (so a later run's keys get a higher sequence number and shadow
// the earlier runs'), the last one together with an SST of the manifest's
// applied SQNs (unless opts.SkipApplied). A log the store already has an
// applied SQN for must be at the manifest's SQN (ErrAppliedConflict).
//
// Crash contract: one run's ingest is atomic, the chain's is not. A crash
// between two ingests leaves the first runs' data in r and no applied SQNs
// of the manifest, a state that matches no snapshot: callers restore into
// an emptied range (DropKeyGroups) or directory and redo the import. An
// ingest error after the first run excises r again (best effort). If
// open's ReaderAt is an io.Closer it is closed.
func (s *Store) ImportRange(ctx context.Context, m SnapshotManifest, r KeyGroupRange, open func(name string) (io.ReaderAt, error), opts ImportOptions) error {
	if err := m.validate(); err != nil {
		return err
	}
	fail := func(err error) error {
		return fmt.Errorf("materializer: import %s key groups %s of a snapshot of %s: %w", m.Stream, r, m.KeyGroups, err)
	}
	if r.Lo > r.Hi || !m.KeyGroups.Covers(r) {
		return fail(fmt.Errorf("range outside the snapshot's: %w", ErrInvalidArgument))
	}
	lo, hi, _ := KeyGroupRangeBounds(m.Stream, r.Lo, r.Hi)
	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()

	// Hold the locks of the manifest's logs (in order) so no Apply of them
	// runs between the checks and the ingest.
	var (
		logIDs            []string
		states            []*logState
		metaKeys, metaVal [][]byte
	)
	if !opts.SkipApplied {
		for id := range m.Applied {
			logIDs = append(logIDs, id)
		}
		slices.Sort(logIDs)
		states = make([]*logState, len(logIDs))
		keys := make([][]byte, len(logIDs))
		for i, id := range logIDs {
			keys[i] = appendAppliedKey(nil, m.Stream, id)
			states[i] = s.logState(keys[i])
			states[i].mu.Lock()
			defer states[i].mu.Unlock()
		}
		for i, ls := range states {
			if err := s.load(ls, keys[i]); err != nil {
				return fail(err)
			}
			want := m.Applied[logIDs[i]]
			switch ls.applied {
			case want:
			case 0:
				metaKeys = append(metaKeys, keys[i])
				metaVal = append(metaVal, encodeSQN(want))
			default:
				return fail(fmt.Errorf("log %s: store applied through %d, snapshot through %d: %w", logIDs[i], ls.applied, want, ErrAppliedConflict))
			}
		}
	}

	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return fail(err)
	}
	nonEmpty := it.First()
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return fail(err)
	}
	if nonEmpty {
		return fail(ErrRangeNotEmpty)
	}

	if opts.Lazy {
		if err := s.ingestLazy(ctx, m, r, lo, hi, opts.Incarnation, metaKeys, metaVal); err != nil {
			return fail(err)
		}
		for i, ls := range states {
			ls.applied = m.Applied[logIDs[i]]
		}
		return nil
	}

	// A directory of its own, so concurrent imports do not collide; Pebble
	// links or copies what it ingests, so it all goes afterwards.
	dir := s.fs.PathJoin(s.stagingDir, fmt.Sprintf("import-%016x", rand.Uint64()))
	if err := s.fs.MkdirAll(dir, 0o755); err != nil {
		return fail(err)
	}
	defer func() { _ = s.fs.RemoveAll(dir) }()
	var ingests [][]string // per run with files for r
	n := 0
	path := func() string {
		n++
		return s.fs.PathJoin(dir, fmt.Sprintf("%06d.sst", n))
	}
	for _, run := range m.Runs {
		var paths []string
		for _, f := range run.Files {
			if !f.KeyGroups.Overlaps(r) {
				continue
			}
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
			p := path()
			if err := s.stage(p, f, open); err != nil {
				return fail(err)
			}
			if !r.Covers(f.KeyGroups) {
				clipped := path()
				ok, err := s.clip(ctx, p, clipped, lo, hi)
				if err != nil {
					return fail(fmt.Errorf("clip %s to key groups %s: %w", f.Name, r, err))
				}
				_ = s.fs.Remove(p)
				if !ok {
					continue // nothing of r in it
				}
				p = clipped
			}
			paths = append(paths, p)
		}
		if len(paths) > 0 {
			ingests = append(ingests, paths)
		}
	}
	if len(metaKeys) > 0 {
		p := s.fs.PathJoin(dir, "applied.sst")
		if err := s.writeLocalSST(p, metaKeys, metaVal); err != nil {
			return fail(err)
		}
		if len(ingests) == 0 {
			ingests = append(ingests, nil)
		}
		ingests[len(ingests)-1] = append(ingests[len(ingests)-1], p)
	}
	// Once the first run is in, finish the chain even if ctx is cancelled:
	// stopping halfway would leave a state that matches no snapshot.
	ictx := context.WithoutCancel(ctx)
	for i, paths := range ingests {
		if err := s.db.Ingest(ictx, paths); err != nil {
			err = fmt.Errorf("ingest run %d of %d: %w", i+1, len(ingests), err)
			if i > 0 {
				if xerr := s.db.Excise(ictx, pebble.KeyRange{Start: lo, End: hi}); xerr != nil {
					err = fmt.Errorf("%w; undo of the runs ingested: %w", err, xerr)
				}
			}
			return fail(err)
		}
	}
	for i, ls := range states {
		ls.applied = m.Applied[logIDs[i]]
	}
	return nil
}

// stage copies one snapshot file to path, verifying its size and checksum.
func (s *Store) stage(path string, f SnapshotFile, open func(string) (io.ReaderAt, error)) error {
	ra, err := open(f.Name)
	if err != nil {
		return fmt.Errorf("open %s: %w", f.Name, err)
	}
	if c, ok := ra.(io.Closer); ok {
		defer c.Close()
	}
	out, err := s.fs.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return fmt.Errorf("stage %s: %w", f.Name, err)
	}
	h := crc32.New(castagnoli)
	// Read one byte past the size so a longer file is noticed. Hash before
	// writing: Pebble's MemFS scribbles over written buffers in invariants
	// builds (-race).
	n, err := io.Copy(io.MultiWriter(h, out), io.NewSectionReader(ra, 0, f.Size+1))
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("stage %s: %w", f.Name, err)
	}
	if n != f.Size {
		return fmt.Errorf("snapshot file %s: %d bytes, manifest says %d: %w", f.Name, n, f.Size, ErrCorrupt)
	}
	if sum := h.Sum32(); sum != f.CRC32C {
		return fmt.Errorf("snapshot file %s: CRC32C %08x, manifest says %08x: %w", f.Name, sum, f.CRC32C, ErrCorrupt)
	}
	return nil
}

// clip writes the point keys and range deletions of the SST at src that
// lie in [lo, hi), truncated to it, into a new SST at dst; ok is false (and
// dst absent) if there are none. Exported SSTs hold only Sets, point
// tombstones and range deletions, all at sequence number 0; anything else
// is ErrCorrupt.
func (s *Store) clip(ctx context.Context, src, dst string, lo, hi []byte) (ok bool, err error) {
	f, err := s.fs.Open(src)
	if err != nil {
		return false, err
	}
	readable, err := sstable.NewSimpleReadable(f)
	if err != nil {
		_ = f.Close()
		return false, err
	}
	rd, err := sstable.NewReader(ctx, readable, sstable.ReaderOptions{})
	if err != nil {
		_ = readable.Close()
		return false, fmt.Errorf("read: %w", err)
	}
	defer rd.Close() // closes readable

	out, err := s.fs.Create(dst, vfs.WriteCategoryUnspecified)
	if err != nil {
		return false, err
	}
	w := sstable.NewWriter(objstorageprovider.NewFileWritable(out), sstable.WriterOptions{TableFormat: s.db.TableFormat()})
	entries := 0
	err = func() error {
		points, err := rd.NewIter(sstable.NoTransforms, lo, hi, sstable.AssertNoBlobHandles)
		if err != nil {
			return err
		}
		defer points.Close()
		// Internal iterators leave the lower bound to the caller: SeekGE, not First.
		for kv := points.SeekGE(lo, 0); kv != nil; kv = points.Next() {
			if kv.SeqNum() != 0 {
				return fmt.Errorf("key %x at sequence number %d: %w", kv.K.UserKey, kv.SeqNum(), ErrCorrupt)
			}
			switch kv.Kind() {
			case sstable.InternalKeyKindSet:
				v, _, err := kv.Value(nil)
				if err == nil {
					err = w.Set(kv.K.UserKey, v)
				}
				if err != nil {
					return err
				}
			case sstable.InternalKeyKindDelete:
				if err := w.Delete(kv.K.UserKey); err != nil {
					return err
				}
			default:
				return fmt.Errorf("key %x of kind %s: %w", kv.K.UserKey, kv.Kind(), ErrCorrupt)
			}
			entries++
		}
		if err := points.Error(); err != nil {
			return err
		}
		dels, err := rd.NewRawRangeDelIter(ctx, sstable.NoFragmentTransforms, sstable.NoReadEnv)
		if err != nil || dels == nil {
			return err
		}
		defer dels.Close()
		span, err := dels.SeekGE(lo)
		for ; span != nil && err == nil; span, err = dels.Next() {
			start, end := span.Start, span.End
			if bytes.Compare(start, hi) >= 0 {
				break
			}
			if bytes.Compare(start, lo) < 0 {
				start = lo
			}
			if bytes.Compare(end, hi) > 0 {
				end = hi
			}
			if bytes.Compare(start, end) >= 0 {
				continue
			}
			for _, k := range span.Keys {
				if k.SeqNum() != 0 || k.Kind() != sstable.InternalKeyKindRangeDelete {
					return fmt.Errorf("span %x..%x of kind %s at %d: %w", start, end, k.Kind(), k.SeqNum(), ErrCorrupt)
				}
			}
			if err := w.DeleteRange(start, end); err != nil {
				return err
			}
			entries++
		}
		return err
	}()
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err == nil && entries == 0 {
		err = s.fs.Remove(dst)
	}
	return err == nil && entries > 0, err
}

// writeLocalSST writes sorted keys and values into a new SST at path.
func (s *Store) writeLocalSST(path string, keys, vals [][]byte) error {
	f, err := s.fs.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	w := sstable.NewWriter(objstorageprovider.NewFileWritable(f), sstable.WriterOptions{TableFormat: s.db.TableFormat()})
	for i := range keys {
		if err := w.Set(keys[i], vals[i]); err != nil {
			_ = w.Close()
			return err
		}
	}
	return w.Close()
}
