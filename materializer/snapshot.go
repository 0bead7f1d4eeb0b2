package materializer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// SnapshotManifest describes an exported snapshot of one key-group range of
// a stream: the SST files holding its state and the applied SQN of every
// log of the stream at the moment of the snapshot. The files partition the
// range's key space: file i covers [Start, End), Files[i].End ==
// Files[i+1].Start, the first Start and the last End are the range's
// KeyGroupRangeBounds. A range with no keys has no files.
type SnapshotManifest struct {
	Stream    string        `json:"stream"`
	KeyGroups KeyGroupRange `json:"key_groups"`
	// Applied is the applied SQN of each log of the stream folded into the
	// store at the snapshot: the snapshot holds exactly the effect of these
	// logs' changes up to these SQNs (for the range's key groups).
	Applied map[string]uint64 `json:"applied"`
	// TableFormat is Pebble's SST format the files were written in.
	TableFormat string         `json:"table_format"`
	Files       []SnapshotFile `json:"files"`
	Keys        int64          `json:"keys"`
	Bytes       int64          `json:"bytes"` // sum of the files' sizes
}

// SnapshotFile is one exported SST.
type SnapshotFile struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	CRC32C uint32 `json:"crc32c"` // of the whole file, Castagnoli
	Keys   int64  `json:"keys"`
	// KeyGroups holds the key groups of the file's keys (smallest..largest).
	KeyGroups KeyGroupRange `json:"key_groups"`
	// Smallest and Largest are the first and last data keys in the file.
	Smallest []byte `json:"smallest"`
	Largest  []byte `json:"largest"`
	// Start and End are the file's ingest bounds [Start, End): loose,
	// contiguous between files (for IngestExternalFiles).
	Start []byte `json:"start"`
	End   []byte `json:"end"`
}

// Export writes the state of key groups r of a stream, read from one
// consistent Pebble snapshot, into SST files created through create (names
// "000001.sst", "000002.sst", …, unique within the export), cut at
// Options.TargetFileSize at key-group boundaries (inside a key group only
// past twice the target). Keys are written in order with sequence number 0,
// so the files can be ingested (Import) or referenced remotely
// (IngestExternalFiles). Each WriteCloser is closed once its file is
// complete; if Export fails, a file being written is aborted (its
// WriteCloser's Abort() error method is called if it has one, otherwise it
// is closed) and the files written so far are garbage that nothing
// references: only the returned manifest makes files part of a snapshot.
func (s *Store) Export(ctx context.Context, stream string, r KeyGroupRange, create func(name string) (io.WriteCloser, error)) (SnapshotManifest, error) {
	lo, hi, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
	if err != nil {
		return SnapshotManifest{}, err
	}
	if err := s.acquire(); err != nil {
		return SnapshotManifest{}, err
	}
	defer s.closeMu.RUnlock()
	fail := func(err error) (SnapshotManifest, error) {
		return SnapshotManifest{}, fmt.Errorf("materializer: export %s key groups %s: %w", stream, r, err)
	}

	snap := s.db.NewSnapshot()
	defer snap.Close()
	applied, err := readApplied(snap, stream)
	if err != nil {
		return fail(err)
	}
	m := SnapshotManifest{
		Stream:      stream,
		KeyGroups:   r,
		Applied:     applied,
		TableFormat: s.db.TableFormat().String(),
		Files:       []SnapshotFile{},
	}
	it, err := snap.NewIterWithContext(ctx, &pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return fail(err)
	}
	defer it.Close()

	target := uint64(s.opts.TargetFileSize)
	var (
		cur    *exportFile
		lastKG uint16
	)
	abort := func(err error) (SnapshotManifest, error) {
		if cur != nil {
			cur.abort()
		}
		return fail(err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		if m.Keys%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return abort(err)
			}
		}
		k := it.Key()
		dk, err := DecodeDataKey(k)
		if err != nil {
			return abort(err)
		}
		if cur != nil {
			size := cur.sst.Raw().EstimatedSize()
			if size >= 2*target || (size >= target && dk.KeyGroup != lastKG) {
				if err := cur.finish(k); err != nil {
					cur = nil
					return abort(err)
				}
				m.Files = append(m.Files, cur.meta)
				cur = nil
			}
		}
		if cur == nil {
			start := lo
			if n := len(m.Files); n > 0 {
				start = m.Files[n-1].End
			}
			cur, err = s.newExportFile(fmt.Sprintf("%06d.sst", len(m.Files)+1), create, start, k, dk.KeyGroup)
			if err != nil {
				return fail(err)
			}
		}
		v, err := it.ValueAndErr()
		if err != nil {
			return abort(err)
		}
		if err := cur.sst.Set(k, v); err != nil {
			return abort(fmt.Errorf("write %s: %w", cur.meta.Name, err))
		}
		cur.meta.Keys++
		cur.meta.KeyGroups.Hi = dk.KeyGroup
		cur.meta.Largest = append(cur.meta.Largest[:0], k...)
		lastKG = dk.KeyGroup
		m.Keys++
	}
	if err := it.Error(); err != nil {
		return abort(err)
	}
	if cur != nil {
		if err := cur.finish(hi); err != nil {
			return fail(err)
		}
		m.Files = append(m.Files, cur.meta)
	}
	for _, f := range m.Files {
		m.Bytes += f.Size
	}
	return m, nil
}

// exportFile is one SST being written: the sstable writer writes through
// a checksumming counter into the caller's WriteCloser.
type exportFile struct {
	meta SnapshotFile
	sst  *sstable.Writer
	out  *hashingWriter
}

func (s *Store) newExportFile(name string, create func(string) (io.WriteCloser, error), start, first []byte, kg uint16) (*exportFile, error) {
	wc, err := create(name)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	out := &hashingWriter{w: wc, h: crc32.New(castagnoli)}
	f := &exportFile{
		meta: SnapshotFile{
			Name:      name,
			KeyGroups: KeyGroupRange{Lo: kg, Hi: kg},
			Smallest:  bytes.Clone(first),
			Start:     bytes.Clone(start),
		},
		out: out,
		sst: sstable.NewWriter(objstorageprovider.NewRemoteWritable(out), sstable.WriterOptions{
			TableFormat: s.db.TableFormat(),
			Compression: s.opts.exportCompression(),
		}),
	}
	return f, nil
}

// finish completes the file; end is its exclusive ingest bound.
func (f *exportFile) finish(end []byte) error {
	if err := f.sst.Close(); err != nil {
		f.out.abort()
		return fmt.Errorf("finish %s: %w", f.meta.Name, err)
	}
	if err := f.out.w.Close(); err != nil {
		return fmt.Errorf("close %s: %w", f.meta.Name, err)
	}
	f.meta.Size = f.out.n
	f.meta.CRC32C = f.out.h.Sum32()
	f.meta.End = bytes.Clone(end)
	return nil
}

func (f *exportFile) abort() {
	_ = f.sst.Close() // closes only the hashingWriter, not the caller's writer
	f.out.abort()
}

// hashingWriter counts and checksums what the sstable writer writes. Its
// Close does not close the caller's writer: Export does that itself once the
// table is complete, so that a failed table is aborted rather than
// published.
type hashingWriter struct {
	w       io.WriteCloser
	h       hash.Hash32
	n       int64
	aborted bool
}

func (w *hashingWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	n, err := w.w.Write(p)
	w.n += int64(n)
	return n, err
}

func (w *hashingWriter) Close() error { return nil }

func (w *hashingWriter) abort() {
	if w.aborted {
		return
	}
	w.aborted = true
	if a, ok := w.w.(interface{ Abort() error }); ok {
		_ = a.Abort()
		return
	}
	_ = w.w.Close()
}

func (o Options) exportCompression() *sstable.CompressionProfile {
	if o.ExportCompression != nil {
		return o.ExportCompression
	}
	return sstable.ZstdCompression
}

// validate checks a manifest's shape before anything is read.
func (m *SnapshotManifest) validate() error {
	lo, hi, err := KeyGroupRangeBounds(m.Stream, m.KeyGroups.Lo, m.KeyGroups.Hi)
	if err != nil {
		return err
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("manifest of %s key groups %s: %s: %w", m.Stream, m.KeyGroups, fmt.Sprintf(format, args...), ErrCorrupt)
	}
	prev := lo
	for i, f := range m.Files {
		switch {
		case f.Name == "" || f.Size <= 0:
			return bad("file %d: no name or size", i)
		case !bytes.Equal(f.Start, prev):
			return bad("file %s: starts at %x, want %x", f.Name, f.Start, prev)
		case bytes.Compare(f.Start, f.End) >= 0 || bytes.Compare(f.End, hi) > 0:
			return bad("file %s: bounds %x..%x outside the range", f.Name, f.Start, f.End)
		case bytes.Compare(f.Smallest, f.Start) < 0 || bytes.Compare(f.Largest, f.End) >= 0 || bytes.Compare(f.Smallest, f.Largest) > 0:
			return bad("file %s: keys %x..%x outside its bounds", f.Name, f.Smallest, f.Largest)
		}
		prev = f.End
	}
	if len(m.Files) > 0 && !bytes.Equal(prev, hi) {
		return bad("files end at %x, want %x", prev, hi)
	}
	for logID := range m.Applied {
		if logID == "" {
			return bad("empty log id")
		}
	}
	return nil
}

// Import restores an exported snapshot into this store (eager restore):
// each file is copied into the staging area through open (size and CRC32C
// verified against the manifest), and the files plus one small SST of the
// manifest's applied SQNs are ingested with ONE db.Ingest call, which Pebble
// applies atomically: after a crash either the whole snapshot with its
// applied SQNs is in the store, or none of it.
//
// The range must be empty in this store (DropKeyGroups first to replace
// it), and a log the store already has an applied SQN for must be at the
// manifest's SQN (ErrAppliedConflict otherwise). If open's ReaderAt is an
// io.Closer it is closed.
func (s *Store) Import(ctx context.Context, m SnapshotManifest, open func(name string) (io.ReaderAt, error)) error {
	if err := m.validate(); err != nil {
		return err
	}
	fail := func(err error) error {
		return fmt.Errorf("materializer: import %s key groups %s: %w", m.Stream, m.KeyGroups, err)
	}
	lo, hi, _ := KeyGroupRangeBounds(m.Stream, m.KeyGroups.Lo, m.KeyGroups.Hi)
	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()

	// Hold the locks of the manifest's logs (in order) so no Apply of them
	// runs between the checks and the ingest.
	logIDs := make([]string, 0, len(m.Applied))
	for id := range m.Applied {
		logIDs = append(logIDs, id)
	}
	slices.Sort(logIDs)
	states := make([]*logState, len(logIDs))
	keys := make([][]byte, len(logIDs))
	for i, id := range logIDs {
		keys[i] = appendAppliedKey(nil, m.Stream, id)
		states[i] = s.logState(keys[i])
		states[i].mu.Lock()
		defer states[i].mu.Unlock()
	}
	var metaKeys, metaVals [][]byte
	for i, ls := range states {
		if err := s.load(ls, keys[i]); err != nil {
			return fail(err)
		}
		want := m.Applied[logIDs[i]]
		switch ls.applied {
		case want:
		case 0:
			metaKeys = append(metaKeys, keys[i])
			metaVals = append(metaVals, encodeSQN(want))
		default:
			return fail(fmt.Errorf("log %s: store applied through %d, snapshot through %d: %w", logIDs[i], ls.applied, want, ErrAppliedConflict))
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

	var paths []string
	defer func() {
		for _, p := range paths {
			_ = s.fs.Remove(p) // Pebble linked or copied what it ingested
		}
	}()
	for _, f := range m.Files {
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		p := s.fs.PathJoin(s.stagingDir, fmt.Sprintf("%s-%06d.sst", "import", len(paths)))
		paths = append(paths, p)
		if err := s.stage(p, f, open); err != nil {
			return fail(err)
		}
	}
	if len(metaKeys) > 0 {
		p := s.fs.PathJoin(s.stagingDir, "import-applied.sst")
		paths = append(paths, p)
		if err := s.writeLocalSST(p, metaKeys, metaVals); err != nil {
			return fail(err)
		}
	}
	if len(paths) == 0 {
		return nil
	}
	if err := s.db.Ingest(ctx, paths); err != nil {
		return fail(fmt.Errorf("ingest: %w", err))
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
	// Read one byte past the size so a longer file is noticed.
	n, err := io.Copy(io.MultiWriter(out, h), io.NewSectionReader(ra, 0, f.Size+1))
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

// DropKeyGroups removes every key of key groups r of a stream at once with
// Pebble's Excise (SSTs straddling the range become virtual SSTs; no
// tombstones, no rewrite), e.g. when rescaling hands the range to another
// owner, or before importing a newer snapshot of it. Applied SQNs are kept.
// Excise also removes the range from open Pebble snapshots, so do not drop
// a range while exporting it.
func (s *Store) DropKeyGroups(ctx context.Context, stream string, r KeyGroupRange) error {
	lo, hi, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
	if err != nil {
		return err
	}
	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()
	if err := s.db.Excise(ctx, pebble.KeyRange{Start: lo, End: hi}); err != nil {
		return fmt.Errorf("materializer: drop %s key groups %s: %w", stream, r, err)
	}
	return nil
}
