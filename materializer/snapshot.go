package materializer

import (
	"bytes"
	"context"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"maps"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// SnapshotManifest describes a snapshot of one key-group range of a stream
// as a chain of runs (a small LSM of exported SSTs): the first run is a
// full export (base), each later run holds only what changed since the
// previous snapshot (delta). Restoring ingests the runs in order, each with
// its own sequence number, so a later run shadows the earlier ones.
type SnapshotManifest struct {
	Stream    string        `json:"stream"`
	KeyGroups KeyGroupRange `json:"key_groups"`
	// Applied is the applied SQN of each log of the stream folded into the
	// store at the (newest) snapshot: the chain holds exactly the effect of
	// these logs' changes up to these SQNs (for the range's key groups).
	Applied map[string]uint64 `json:"applied"`
	// TableFormat is Pebble's SST format the files were written in.
	TableFormat string `json:"table_format"`
	// Runs are ingested in order; Runs[0] is the base run, the others are
	// delta runs.
	Runs  []Run `json:"runs"`
	Keys  int64 `json:"keys"`  // sum of the runs' Keys
	Bytes int64 `json:"bytes"` // sum of the runs' Bytes
}

// Run is one layer of a snapshot chain, ingested with one db.Ingest.
//
// A base run (Delta false) holds every key of the range; its files
// partition the range's KeyGroupRangeBounds (file i covers [Start, End),
// Files[i].End == Files[i+1].Start, the first Start and the last End are
// the range's bounds); a range with no keys has no files.
//
// A delta run holds, for each key changed since the previous snapshot, its
// value (Set) or a point tombstone (Delete), and for each (key group,
// state) cleared since then a range deletion over the state plus a Set of
// every key the state holds now. Its files are sorted and disjoint, each
// [Start, End) tight around its keys and inside the range's bounds; they do
// not cover the range.
type Run struct {
	Delta bool           `json:"delta"`
	Files []SnapshotFile `json:"files"`
	Keys  int64          `json:"keys"`  // sum of the files' Keys
	Bytes int64          `json:"bytes"` // sum of the files' sizes
	// Obsolete estimates the bytes of earlier runs a delta run makes dead
	// (the previous state's keys and values it overwrites, deletes or
	// clears; uncompressed): the materializer cuts a new base when the
	// chain's obsolete bytes grow past a share of the base, not merely
	// its delta bytes, so growth by new keys does not rewrite the state.
	Obsolete int64 `json:"obsolete,omitempty"`
}

// SnapshotFile is one exported SST.
type SnapshotFile struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	CRC32C uint32 `json:"crc32c"` // of the whole file, Castagnoli
	// Keys counts the file's point entries (Sets and, in a delta, point
	// tombstones); range deletions are not counted.
	Keys int64 `json:"keys"`
	// KeyGroups holds the key groups of the file's keys and range
	// deletions (smallest..largest): a file whose KeyGroups lie inside an
	// import's range can be ingested as is.
	KeyGroups KeyGroupRange `json:"key_groups"`
	// Smallest and Largest are the first and last key written: a point key
	// or the start of a range deletion.
	Smallest []byte `json:"smallest"`
	Largest  []byte `json:"largest"`
	// Start and End are the file's ingest bounds [Start, End): in a base
	// run loose and contiguous between files, in a delta run tight.
	Start []byte `json:"start"`
	End   []byte `json:"end"`
}

// Export writes the state of key groups r of a stream, read from one
// consistent Pebble snapshot, into SST files created through create (names
// "000001.sst", "000002.sst", …, unique within the export), cut at
// Options.TargetFileSize at key-group boundaries (inside a key group only
// past twice the target). Keys are written in order with sequence number 0,
// so the files can be ingested (Import) or referenced remotely
// (IngestExternalFiles). The manifest has exactly one run, a base run.
//
// Each WriteCloser is closed once its file is complete; if Export fails, a
// file being written is aborted (its WriteCloser's Abort() error method is
// called if it has one, otherwise it is closed) and the files written so far
// are garbage that nothing references: only a manifest makes files part of
// a snapshot.
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
	it, err := snap.NewIterWithContext(ctx, &pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return fail(err)
	}
	defer it.Close()

	w := s.newRunWriter(create, false)
	defer w.abort() // no-op once the run is complete
	for ok := it.First(); ok; ok = it.Next() {
		if w.run.Keys%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
		}
		k := it.Key()
		dk, err := DecodeDataKey(k)
		if err != nil {
			return fail(err)
		}
		if w.full(dk.KeyGroup) {
			// Base files are contiguous: this file ends where the next
			// one starts.
			if err := w.finish(k); err != nil {
				return fail(err)
			}
		}
		if w.cur == nil {
			start := lo
			if n := len(w.run.Files); n > 0 {
				start = w.run.Files[n-1].End
			}
			if err := w.open(start, k, dk.KeyGroup); err != nil {
				return fail(err)
			}
		}
		v, err := it.ValueAndErr()
		if err != nil {
			return fail(err)
		}
		if err := w.set(k, v, dk.KeyGroup); err != nil {
			return fail(err)
		}
	}
	if err := it.Error(); err != nil {
		return fail(err)
	}
	if w.cur != nil {
		if err := w.finish(hi); err != nil {
			return fail(err)
		}
	}
	return newManifest(stream, r, applied, s.db.TableFormat().String(), w.run), nil
}

func newManifest(stream string, r KeyGroupRange, applied map[string]uint64, format string, run Run) SnapshotManifest {
	return SnapshotManifest{
		Stream:      stream,
		KeyGroups:   r,
		Applied:     applied,
		TableFormat: format,
		Runs:        []Run{run},
		Keys:        run.Keys,
		Bytes:       run.Bytes,
	}
}

// runWriter writes one run's files: it creates, cuts, finishes and
// aborts them, and accumulates their metadata; Export and ExportChanged
// decide what goes in.
type runWriter struct {
	s      *Store
	create func(string) (io.WriteCloser, error)
	target uint64
	run    Run
	cur    *exportFile
	lastKG uint16
}

func (s *Store) newRunWriter(create func(string) (io.WriteCloser, error), delta bool) *runWriter {
	return &runWriter{
		s:      s,
		create: create,
		target: uint64(s.opts.TargetFileSize),
		run:    Run{Delta: delta, Files: []SnapshotFile{}},
	}
}

// full reports whether the current file should be cut before an entry of
// key group kg: at the target size on a key-group boundary, so files
// usually hold whole key groups, or past twice the target anyway.
func (w *runWriter) full(kg uint16) bool {
	if w.cur == nil || w.cur.entries == 0 {
		return false
	}
	size := w.cur.sst.Raw().EstimatedSize()
	return size >= 2*w.target || (size >= w.target && kg != w.lastKG)
}

// open starts a new file with ingest start bound start whose first entry is
// first, of key group kg.
func (w *runWriter) open(start, first []byte, kg uint16) error {
	name := fmt.Sprintf("%06d.sst", len(w.run.Files)+1)
	wc, err := w.create(name)
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	out := &hashingWriter{w: wc, h: crc32.New(castagnoli)}
	w.cur = &exportFile{
		meta: SnapshotFile{
			Name:      name,
			KeyGroups: KeyGroupRange{Lo: kg, Hi: kg},
			Smallest:  bytes.Clone(first),
			Start:     bytes.Clone(start),
		},
		out: out,
		sst: sstable.NewWriter(objstorageprovider.NewRemoteWritable(out), sstable.WriterOptions{
			TableFormat: w.s.db.TableFormat(),
			Compression: w.s.opts.exportCompression(),
		}),
	}
	return nil
}

// written records an entry starting at key k of key group kg.
func (w *runWriter) written(k []byte, kg uint16) {
	w.cur.entries++
	w.cur.meta.KeyGroups.Hi = kg
	w.cur.meta.Largest = append(w.cur.meta.Largest[:0], k...)
	w.lastKG = kg
}

func (w *runWriter) set(k, v []byte, kg uint16) error {
	if err := w.cur.sst.Set(k, v); err != nil {
		return fmt.Errorf("write %s: %w", w.cur.meta.Name, err)
	}
	w.cur.meta.Keys++
	w.written(k, kg)
	return nil
}

func (w *runWriter) del(k []byte, kg uint16) error {
	if err := w.cur.sst.Delete(k); err != nil {
		return fmt.Errorf("write %s: %w", w.cur.meta.Name, err)
	}
	w.cur.meta.Keys++
	w.written(k, kg)
	return nil
}

// deleteRange writes a range deletion; spans must be disjoint and come in
// order, but may start before point keys already written.
func (w *runWriter) deleteRange(start, end []byte, kg uint16) error {
	if err := w.cur.sst.DeleteRange(start, end); err != nil {
		return fmt.Errorf("write %s: %w", w.cur.meta.Name, err)
	}
	if bytes.Compare(start, w.cur.meta.Largest) > 0 {
		w.written(start, kg)
	} else {
		w.cur.entries++
	}
	return nil
}

// finish completes the current file with exclusive ingest bound end and
// adds it to the run.
func (w *runWriter) finish(end []byte) error {
	f := w.cur
	w.cur = nil
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
	w.run.Files = append(w.run.Files, f.meta)
	w.run.Keys += f.meta.Keys
	w.run.Bytes += f.meta.Size
	return nil
}

// abort abandons the file being written, if any.
func (w *runWriter) abort() {
	if w.cur != nil {
		_ = w.cur.sst.Close() // closes only the hashingWriter, not the caller's writer
		w.cur.out.abort()
		w.cur = nil
	}
}

// exportFile is one SST being written: the sstable writer writes through
// a checksumming counter into the caller's WriteCloser.
type exportFile struct {
	meta    SnapshotFile
	sst     *sstable.Writer
	out     *hashingWriter
	entries int // points and range deletions written
}

// hashingWriter counts and checksums what the sstable writer writes. Its
// Close does not close the caller's writer: the run writer does that itself
// once the table is complete, so that a failed table is aborted rather than
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

// Append returns the manifest of the chain m followed by the delta runs of
// delta (an ExportChanged of the same stream and range taken after m's
// newest snapshot), with delta's applied SQNs. Delta runs without files are
// dropped (only the applied SQNs move). File names must be unique in the
// chain: rename the files to their blob keys (RenameFiles) before
// composing. Errors wrap ErrInvalidArgument (the two do not compose) or
// ErrCorrupt (one of them is invalid).
func (m SnapshotManifest) Append(delta SnapshotManifest) (SnapshotManifest, error) {
	bad := func(format string, args ...any) (SnapshotManifest, error) {
		return SnapshotManifest{}, fmt.Errorf("materializer: append to snapshot of %s key groups %s: %s: %w", m.Stream, m.KeyGroups, fmt.Sprintf(format, args...), ErrInvalidArgument)
	}
	if err := m.validate(); err != nil {
		return SnapshotManifest{}, err
	}
	switch {
	case delta.Stream != m.Stream || delta.KeyGroups != m.KeyGroups:
		return bad("delta is of %s key groups %s", delta.Stream, delta.KeyGroups)
	case delta.TableFormat != m.TableFormat:
		return bad("delta's table format %s, chain's %s", delta.TableFormat, m.TableFormat)
	case len(delta.Runs) == 0:
		return bad("delta has no runs")
	}
	for i, run := range delta.Runs {
		if !run.Delta {
			return bad("delta's run %d is a base run", i)
		}
	}
	for log, sqn := range m.Applied {
		if d, ok := delta.Applied[log]; !ok || d < sqn {
			return bad("log %s: delta applied through %d, chain through %d", log, d, sqn)
		}
	}
	out := m
	out.Applied = maps.Clone(delta.Applied)
	out.Runs = make([]Run, 0, len(m.Runs)+len(delta.Runs))
	for i, run := range append(slices.Clip(m.Runs), delta.Runs...) {
		if i >= len(m.Runs) && len(run.Files) == 0 {
			continue
		}
		run.Files = slices.Clone(run.Files)
		out.Runs = append(out.Runs, run)
	}
	out.Keys, out.Bytes = 0, 0
	for _, run := range out.Runs {
		out.Keys += run.Keys
		out.Bytes += run.Bytes
	}
	// Validating the result checks the delta's runs (bounds, unique names)
	// in the context of the chain.
	if err := out.validate(); err != nil {
		return bad("%v", err)
	}
	return out, nil
}

// RenameFiles returns a copy of m whose files are named rename(name), e.g.
// their blob keys, so that the names stay unique when runs of several
// exports are composed (Append) and open can find them.
func (m SnapshotManifest) RenameFiles(rename func(name string) string) SnapshotManifest {
	out := m
	out.Applied = maps.Clone(m.Applied)
	out.Runs = make([]Run, len(m.Runs))
	for i, run := range m.Runs {
		run.Files = slices.Clone(run.Files)
		for j := range run.Files {
			run.Files[j].Name = rename(run.Files[j].Name)
		}
		out.Runs[i] = run
	}
	return out
}

// validate checks a manifest's shape before anything is read: the runs'
// kinds, the files' bounds inside the range (partitioning it in the base
// run, sorted and disjoint in a delta run), their key groups, unique names,
// and the totals.
func (m *SnapshotManifest) validate() error {
	lo, hi, err := KeyGroupRangeBounds(m.Stream, m.KeyGroups.Lo, m.KeyGroups.Hi)
	if err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("manifest of %s key groups %s: %s: %w", m.Stream, m.KeyGroups, fmt.Sprintf(format, args...), ErrCorrupt)
	}
	if len(m.Runs) == 0 {
		return bad("no runs")
	}
	names := make(map[string]bool)
	var keys, size int64
	for ri, run := range m.Runs {
		if run.Delta != (ri > 0) {
			return bad("run %d: only the first run may be, and must be, a base run", ri)
		}
		var runKeys, runSize int64
		prev := lo
		for i, f := range run.Files {
			// Bounds of the key groups the file claims to hold.
			kgLo, kgHi, err := KeyGroupRangeBounds(m.Stream, f.KeyGroups.Lo, f.KeyGroups.Hi)
			switch {
			case f.Name == "" || f.Size <= 0 || f.Keys < 0:
				return bad("run %d file %d: no name or size", ri, i)
			case names[f.Name]:
				return bad("file %s: listed twice", f.Name)
			case err != nil || !m.KeyGroups.Covers(f.KeyGroups):
				return bad("file %s: key groups %s outside the range", f.Name, f.KeyGroups)
			case bytes.Compare(f.Start, f.End) >= 0 || bytes.Compare(f.Start, lo) < 0 || bytes.Compare(f.End, hi) > 0:
				return bad("file %s: bounds %x..%x outside the range", f.Name, f.Start, f.End)
			case !run.Delta && !bytes.Equal(f.Start, prev):
				return bad("file %s: starts at %x, want %x", f.Name, f.Start, prev)
			case run.Delta && bytes.Compare(f.Start, prev) < 0:
				return bad("file %s: starts at %x, before the previous file's end %x", f.Name, f.Start, prev)
			case run.Delta && (bytes.Compare(f.Start, kgLo) < 0 || bytes.Compare(f.End, kgHi) > 0):
				return bad("file %s: bounds %x..%x outside its key groups %s", f.Name, f.Start, f.End, f.KeyGroups)
			case bytes.Compare(f.Smallest, f.Start) < 0 || bytes.Compare(f.Largest, f.End) >= 0 || bytes.Compare(f.Smallest, f.Largest) > 0:
				return bad("file %s: keys %x..%x outside its bounds", f.Name, f.Smallest, f.Largest)
			case bytes.Compare(f.Smallest, kgLo) < 0 || bytes.Compare(f.Largest, kgHi) >= 0:
				return bad("file %s: keys %x..%x outside its key groups %s", f.Name, f.Smallest, f.Largest, f.KeyGroups)
			}
			names[f.Name] = true
			prev = f.End
			runKeys += f.Keys
			runSize += f.Size
		}
		if !run.Delta && len(run.Files) > 0 && !bytes.Equal(prev, hi) {
			return bad("base files end at %x, want %x", prev, hi)
		}
		if runKeys != run.Keys || runSize != run.Bytes {
			return bad("run %d: totals %d keys %d bytes, files sum to %d keys %d bytes", ri, run.Keys, run.Bytes, runKeys, runSize)
		}
		keys += runKeys
		size += runSize
	}
	if keys != m.Keys || size != m.Bytes {
		return bad("totals %d keys %d bytes, runs sum to %d keys %d bytes", m.Keys, m.Bytes, keys, size)
	}
	for logID := range m.Applied {
		if logID == "" {
			return bad("empty log id")
		}
	}
	return nil
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
	// Lazily imported files inside the range are read no more: nothing to
	// hydrate, nothing to reference.
	s.dropPending(ctx, lo, hi)
	return nil
}
