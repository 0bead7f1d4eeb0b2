package materializer

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/upload"
)

// Lazy import: the files of a snapshot are ingested as Pebble external
// files (virtual SSTs over objects on the blob store, read through
// blobStorage), so an import reads 0 bytes and the range serves reads at
// once; the store's hydrator then makes them local in the background (see
// hydrate.go). docs/materializer.md ("Lazy import") has the whole picture.
//
// What the store keeps for it:
//
//   - DSTL-LAZY.json in Pebble's directory (so it goes with the DB when the
//     DB is wiped): the external files not hydrated yet (lazyFile). It is
//     written before the files are ingested, so after a crash it names at
//     least every file Pebble still reads remotely; on open, entries whose
//     span holds no external table any more are dropped (hydrated, or
//     excised by DropKeyGroups).
//   - DSTL-CREATOR: the creator ID Pebble requires before it uses remote
//     objects (persisted by Pebble too; it must never change).
//   - one reference holder per (stream, incarnation) with pending files: a
//     lease under changelog.SnapshotRefPrefix whose body lists the files
//     (storeRef). It is confirmed on the blob store before the first ingest
//     that needs it, renewed while the store lives, and deleted when the
//     stream's files are all local or the store closes.

const (
	lazyStateName   = "DSTL-LAZY.json"
	creatorFileName = "DSTL-CREATOR"
	lazyStateFormat = 1
)

// lazyFile is one external file of a lazy import: a manifest file clipped
// to the imported range.
type lazyFile struct {
	Stream      string `json:"stream"`
	Incarnation string `json:"incarnation"`
	Name        string `json:"name"`
	Size        int64  `json:"size"`
	CRC32C      uint32 `json:"crc32c"`
	// Start and End are the ingest bounds, [Start, End).
	Start []byte `json:"start"`
	End   []byte `json:"end"`
	// Part, if > 0, marks a file only partly inside the imported range
	// (less than clipShare of its key groups): about Part of its Size
	// bytes lie in [Start, End). The hydrator rewrites such a file's
	// blocks inside the bounds instead of fetching it whole (see
	// hydrate.go). 0: the file is (nearly) all inside, hydrated whole and
	// verified against its CRC32C (also every entry of format 1 written
	// before Part existed).
	Part int64 `json:"part,omitempty"`
	// ingesting: recorded, but its ingest has not returned yet; the
	// hydrator leaves it alone (it would find no external table there yet
	// and call it local).
	ingesting bool
}

type lazyStateFile struct {
	Version int        `json:"version"`
	Files   []lazyFile `json:"files"`
}

// decodeLazyState parses DSTL-LAZY.json. Anything malformed is ErrCorrupt.
func decodeLazyState(data []byte) ([]lazyFile, error) {
	var st lazyStateFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("%s: %v: %w", lazyStateName, err, ErrCorrupt)
	}
	if dec.More() {
		return nil, fmt.Errorf("%s: trailing data: %w", lazyStateName, ErrCorrupt)
	}
	if st.Version != lazyStateFormat {
		return nil, fmt.Errorf("%s: format %d, want %d: %w", lazyStateName, st.Version, lazyStateFormat, ErrCorrupt)
	}
	for i, f := range st.Files {
		switch {
		case f.Stream == "" || f.Incarnation == "" || f.Name == "":
			return nil, fmt.Errorf("%s: file %d: empty stream, incarnation or name: %w", lazyStateName, i, ErrCorrupt)
		case f.Size <= 0:
			return nil, fmt.Errorf("%s: file %s: size %d: %w", lazyStateName, f.Name, f.Size, ErrCorrupt)
		case bytes.Compare(f.Start, f.End) >= 0:
			return nil, fmt.Errorf("%s: file %s: empty bounds: %w", lazyStateName, f.Name, ErrCorrupt)
		case f.Part < 0 || f.Part > f.Size:
			return nil, fmt.Errorf("%s: file %s: part %d of %d bytes: %w", lazyStateName, f.Name, f.Part, f.Size, ErrCorrupt)
		}
	}
	return st.Files, nil
}

// bytes is what hydrating f makes local: the whole file, or about the part
// of a clipped one inside its bounds.
func (f lazyFile) bytes() int64 {
	if f.Part > 0 {
		return f.Part
	}
	return f.Size
}

// clipShare: a file with less than this share of its key groups inside
// the imported range is hydrated clipped (only its blocks in range, each
// checked by Pebble's block checksum) rather than fetched whole (the whole
// file checked against the manifest's CRC32C): fetching it whole would
// read more than 1/clipShare of what the range needs.
const clipShare = 0.9

// clippedPart estimates the bytes of a file of size bytes with key groups
// fkg that lie in r (keys are spread over key groups by a hash, so evenly
// enough), or 0 if the file is to be hydrated whole.
func clippedPart(size int64, fkg, r KeyGroupRange) int64 {
	if r.Covers(fkg) {
		return 0
	}
	n := int64(fkg.Hi) - int64(fkg.Lo) + 1
	in := int64(min(fkg.Hi, r.Hi)) - int64(max(fkg.Lo, r.Lo)) + 1
	if in <= 0 || float64(in) >= clipShare*float64(n) {
		return 0
	}
	return max(1, size*in/n)
}

func encodeLazyState(files []lazyFile) ([]byte, error) {
	return json.Marshal(lazyStateFile{Version: lazyStateFormat, Files: files})
}

// HydrationStatus is the hydration progress of one stream in a store:
// bytes of lazily imported snapshot files made local out of the total
// imported lazily since the store opened (files pending at open count in
// the total).
type HydrationStatus struct {
	Stream      string `json:"stream"`
	Incarnation string `json:"incarnation"`
	TotalBytes  int64  `json:"total_bytes"`
	LocalBytes  int64  `json:"local_bytes"`
	TotalFiles  int    `json:"total_files"`
	LocalFiles  int    `json:"local_files"`
	// RemoteReadBytes: bytes of the stream's files read from the blob store
	// by the hydrator (whole files, verified).
	RemoteReadBytes int64 `json:"remote_read_bytes"`
	// LastError is the newest hydration or reference-refresh failure
	// (cleared by the next success); hydration retries with a backoff.
	LastError string `json:"last_error,omitempty"`
}

// Done reports whether every lazily imported file is local.
func (h HydrationStatus) Done() bool { return h.LocalFiles == h.TotalFiles }

// lazyTracker is the lazy-import state of a Store.
type lazyTracker struct {
	mu       sync.Mutex
	pending  []lazyFile
	progress map[string]*HydrationStatus // by streamKey
	refs     map[string]*storeRef        // by streamKey
	// dirty: pending changed since the state file was written.
	dirty bool

	// The hydrator goroutine, owned by the Store (stopped by Close).
	wake   chan struct{}
	stop   context.CancelFunc
	done   chan struct{}
	paused bool // tests: hold hydration until resumed
	// noRefs disables the references (tests only: shows GC needs them).
	noRefs bool
}

func streamKey(stream, inc string) string { return stream + "\x00" + inc }

// storeRef is the reference holder of one (stream, incarnation).
type storeRef struct {
	lease *roundLease
	mu    sync.Mutex
	files map[string]int // name → pending entries
	// lastErr: the newest failed renewal, cleared by the next success. Its
	// own lock, not s.lazy.mu: the renewals run on the lease's goroutine,
	// which release waits for while s.lazy.mu is held.
	lastErr error
}

func (r *storeRef) setErr(err error) {
	r.mu.Lock()
	r.lastErr = err
	r.mu.Unlock()
}

func (r *storeRef) err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastErr
}

func (r *storeRef) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.files))
	for n := range r.files {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// openLazy configures what a store with Options.Remote needs after Pebble
// opened: the creator ID, the pending files (those still remote), their
// references (confirmed before Open returns, so nothing the store reads
// is unprotected) and the hydrator.
func (s *Store) openLazy() error {
	id, err := s.creatorID()
	if err != nil {
		return err
	}
	if err := s.db.SetCreatorID(id); err != nil {
		return fmt.Errorf("set creator id: %w", err)
	}
	s.lazy.progress = map[string]*HydrationStatus{}
	s.lazy.refs = map[string]*storeRef{}
	s.lazy.wake = make(chan struct{}, 1)
	files, err := s.readLazyState()
	if err != nil {
		return err
	}
	remote, err := s.externalSpans()
	if err != nil {
		return err
	}
	var keep []lazyFile
	for _, f := range files {
		if overlapsAny(remote, f.Start, f.End) {
			keep = append(keep, f)
		}
	}
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	s.lazy.dirty = len(keep) != len(files)
	if err := s.addPendingLocked(context.Background(), keep); err != nil {
		return err
	}
	if err := s.saveLazyLocked(); err != nil {
		return err
	}
	ctx, stop := context.WithCancel(context.Background())
	s.lazy.stop = stop
	s.lazy.done = make(chan struct{})
	go s.hydrate(ctx)
	return nil
}

// creatorID returns the store's Pebble creator ID, made once at random.
func (s *Store) creatorID() (uint64, error) {
	path := s.fs.PathJoin(s.dbDir, creatorFileName)
	if f, err := s.fs.Open(path); err == nil {
		data, rerr := io.ReadAll(f)
		_ = f.Close()
		if rerr == nil && len(data) == 8 {
			if id := binary.BigEndian.Uint64(data); id != 0 {
				return id, nil
			}
		}
		return 0, fmt.Errorf("%s: malformed: %w", path, ErrCorrupt)
	}
	var b [8]byte
	var id uint64
	for id == 0 {
		_, _ = rand.Read(b[:])
		id = binary.BigEndian.Uint64(b[:])
	}
	binary.BigEndian.PutUint64(b[:], id)
	if err := writeFileAtomic(s.fs, path, b[:]); err != nil {
		return 0, err
	}
	return id, nil
}

func (s *Store) readLazyState() ([]lazyFile, error) {
	f, err := s.fs.Open(s.fs.PathJoin(s.dbDir, lazyStateName))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read %s: %w", lazyStateName, err)
	}
	data, err := io.ReadAll(f)
	_ = f.Close()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", lazyStateName, err)
	}
	return decodeLazyState(data)
}

// saveLazyLocked writes the pending files if they changed; s.lazy.mu is
// held.
func (s *Store) saveLazyLocked() error {
	if !s.lazy.dirty {
		return nil
	}
	data, err := encodeLazyState(s.lazy.pending)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(s.fs, s.fs.PathJoin(s.dbDir, lazyStateName), data); err != nil {
		return err
	}
	s.lazy.dirty = false
	return nil
}

// writeFileAtomic writes path through a temporary file and a rename, and
// syncs the directory: a crash leaves the old or the new contents.
func writeFileAtomic(fs vfs.FS, path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := fs.Create(tmp, vfs.WriteCategoryUnspecified)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fs.Rename(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return syncDir(fs, fs.PathDir(path))
}

// addPendingLocked records files as pending and makes sure their streams'
// references list them, confirmed on the blob store, before it returns;
// s.lazy.mu is held.
func (s *Store) addPendingLocked(ctx context.Context, files []lazyFile) error {
	byRef := map[string][]lazyFile{}
	for _, f := range files {
		k := streamKey(f.Stream, f.Incarnation)
		byRef[k] = append(byRef[k], f)
	}
	keys := make([]string, 0, len(byRef))
	for k := range byRef {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fs := byRef[k]
		p := s.lazy.progress[k]
		if p == nil {
			p = &HydrationStatus{Stream: fs[0].Stream, Incarnation: fs[0].Incarnation}
			s.lazy.progress[k] = p
		}
		for _, f := range fs {
			p.TotalBytes += f.bytes()
			p.TotalFiles++
			s.remote.setSize(f.Name, f.Size)
			// A new table of the object may need bytes a running rewrite
			// of another clipped entry skips (hydrate.go: skipPastRange).
			s.remote.clearSkip(f.Name)
		}
		if s.lazy.noRefs {
			continue
		}
		ref := s.lazy.refs[k]
		fresh := ref == nil
		if fresh {
			ref = &storeRef{files: map[string]int{}}
		}
		ref.mu.Lock()
		for _, f := range fs {
			ref.files[f.Name]++
		}
		ref.mu.Unlock()
		var err error
		if fresh {
			ref.lease, err = s.newRef(ctx, fs[0].Stream, fs[0].Incarnation, ref)
			if err == nil {
				s.lazy.refs[k] = ref
			}
		} else {
			err = ref.lease.renewNow(ctx)
		}
		if err != nil {
			ref.mu.Lock()
			for _, f := range fs {
				if ref.files[f.Name]--; ref.files[f.Name] <= 0 {
					delete(ref.files, f.Name)
				}
			}
			ref.mu.Unlock()
			p.TotalBytes -= sumSize(fs)
			p.TotalFiles -= len(fs)
			return fmt.Errorf("stream %s: reference its snapshot files: %w", fs[0].Stream, err)
		}
	}
	s.lazy.pending = append(s.lazy.pending, files...)
	if len(files) > 0 {
		s.lazy.dirty = true
	}
	return nil
}

func sumSize(fs []lazyFile) int64 {
	var n int64
	for _, f := range fs {
		n += f.bytes()
	}
	return n
}

// newRef stores a stream's first reference (confirmed) and starts its
// renewals.
func (s *Store) newRef(ctx context.Context, stream, inc string, ref *storeRef) (*roundLease, error) {
	var nonce [6]byte
	_, _ = rand.Read(nonce[:])
	holder := s.opts.RefOwner + "-" + hex.EncodeToString(nonce[:])
	l := &roundLease{
		blob:   s.opts.Remote,
		clock:  s.opts.Clock,
		ttl:    s.opts.RefLease,
		base:   changelog.SnapshotRefPrefix(stream, inc) + holder + ".",
		files:  ref.list,
		failed: ref.setErr,
		renewed: func() {
			ref.setErr(nil)
		},
	}
	// The renewals belong to the store, not to the import that made the
	// reference: they run until the files are local or the store closes.
	if err := l.start(context.WithoutCancel(ctx)); err != nil {
		return nil, err
	}
	return l, nil
}

// Hydration returns the hydration progress of every stream lazily
// imported into the store since it opened, sorted by stream.
func (s *Store) Hydration() []HydrationStatus {
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	out := make([]HydrationStatus, 0, len(s.lazy.progress))
	for k, p := range s.lazy.progress {
		h := *p
		if ref := s.lazy.refs[k]; ref != nil && h.LastError == "" {
			if err := ref.err(); err != nil {
				h.LastError = "reference renewal: " + err.Error()
			}
		}
		out = append(out, h)
	}
	slices.SortFunc(out, func(a, b HydrationStatus) int {
		return cmp.Or(cmp.Compare(a.Stream, b.Stream), cmp.Compare(a.Incarnation, b.Incarnation))
	})
	return out
}

// PendingGone returns the streams with a lazily imported file, not local
// yet, that the blob store no longer has (a store closed for longer than
// the garbage collection's graces holds no reference: a newer snapshot
// may have got the file collected). Their ranges could only fail reads
// (ErrSnapshotFileGone) until imported again, so the owner drops them.
func (s *Store) PendingGone(ctx context.Context) (map[string]bool, error) {
	gone := map[string]bool{}
	if s.remote == nil {
		return gone, nil
	}
	s.lazy.mu.Lock()
	files := slices.Clone(s.lazy.pending)
	s.lazy.mu.Unlock()
	seen := map[string]bool{}
	for _, f := range files {
		if seen[f.Name] || gone[f.Stream] {
			continue
		}
		seen[f.Name] = true
		_, err := s.opts.Remote.Stat(ctx, f.Name)
		switch {
		case errors.Is(err, upload.ErrNotFound):
			gone[f.Stream] = true
		case err != nil:
			return nil, fmt.Errorf("snapshot file %s: %w", f.Name, err)
		}
	}
	return gone, nil
}

// RemoteReadBytes returns the bytes Pebble read from the blob store
// through lazily imported files (block reads before hydration), not
// counting the hydrator's own whole-file fetches.
func (s *Store) RemoteReadBytes() int64 {
	if s.remote == nil {
		return 0
	}
	return s.remote.RemoteBytes()
}

// WaitHydrated waits until every lazily imported file is local (or ctx
// ends).
func (s *Store) WaitHydrated(ctx context.Context) error {
	for {
		s.lazy.mu.Lock()
		n := len(s.lazy.pending)
		s.lazy.mu.Unlock()
		if n == 0 {
			return nil
		}
		if err := clock.Sleep(ctx, clock.Real{}, 5*time.Millisecond); err != nil {
			return err
		}
	}
}

// ingestLazy ingests the files of m that overlap r as external files
// clipped to [lo, hi), one IngestExternalFiles per run in order (a later
// run shadows the earlier ones: each call gets a higher sequence number),
// then writes the applied SQNs (metaKeys) in one batch. The files are
// recorded as pending and referenced on the blob store before the first
// ingest.
//
// Crash contract: as ImportRange's. A crash between two runs, or between
// the last run and the applied SQNs, leaves data of r without the
// manifest's applied SQNs, a state that matches no snapshot and that the
// callers recognise and redo.
func (s *Store) ingestLazy(ctx context.Context, m SnapshotManifest, r KeyGroupRange, lo, hi []byte, inc string, metaKeys, metaVal [][]byte) error {
	if s.remote == nil {
		return fmt.Errorf("lazy import needs Options.Remote: %w", ErrInvalidArgument)
	}
	if inc == "" {
		return fmt.Errorf("lazy import needs the stream incarnation (ImportOptions.Incarnation): %w", ErrInvalidArgument)
	}
	var (
		runs  [][]pebble.ExternalFile
		added []lazyFile
	)
	for _, run := range m.Runs {
		var files []pebble.ExternalFile
		for _, f := range run.Files {
			if !f.KeyGroups.Overlaps(r) {
				continue
			}
			// Keys outside r are never visible: the virtual table's bounds
			// are the file's ingest bounds cut to the range.
			start, end := f.Start, f.End
			if bytes.Compare(start, lo) < 0 {
				start = lo
			}
			if bytes.Compare(end, hi) > 0 {
				end = hi
			}
			if bytes.Compare(start, end) >= 0 {
				continue
			}
			start, end = bytes.Clone(start), bytes.Clone(end)
			files = append(files, pebble.ExternalFile{
				Locator:     blobLocator,
				ObjName:     f.Name,
				Size:        uint64(f.Size),
				StartKey:    start,
				EndKey:      end,
				HasPointKey: true, // range deletions count as point keys
			})
			added = append(added, lazyFile{Stream: m.Stream, Incarnation: inc, Name: f.Name, Size: f.Size, CRC32C: f.CRC32C, Start: start, End: end,
				Part: clippedPart(f.Size, f.KeyGroups, r), ingesting: true})
		}
		if len(files) > 0 {
			runs = append(runs, files)
		}
	}
	// Invariant (brief invariant 5): the store's reference to every file
	// is confirmed on the blob store before Pebble may read the file.
	s.lazy.mu.Lock()
	err := s.addPendingLocked(ctx, added)
	if err == nil {
		err = s.saveLazyLocked()
	}
	s.lazy.mu.Unlock()
	if err != nil {
		return err
	}
	// Whatever the outcome, the hydrator may look at the files afterwards:
	// it finds what Pebble holds (nothing, after a failed ingest).
	defer func() {
		s.lazy.mu.Lock()
		for _, f := range added {
			for i := range s.lazy.pending {
				if p := &s.lazy.pending[i]; p.ingesting && p.Name == f.Name && bytes.Equal(p.Start, f.Start) && bytes.Equal(p.End, f.End) {
					p.ingesting = false
					break
				}
			}
		}
		s.lazy.mu.Unlock()
		s.wakeHydrator()
	}()
	ictx := context.WithoutCancel(ctx)
	for i, files := range runs {
		if _, err := s.db.IngestExternalFiles(ictx, files); err != nil {
			err = fmt.Errorf("ingest run %d of %d by reference: %w", i+1, len(runs), err)
			if i > 0 {
				if xerr := s.db.Excise(ictx, pebble.KeyRange{Start: lo, End: hi}); xerr != nil {
					err = fmt.Errorf("%w; undo of the runs ingested: %w", err, xerr)
				}
			}
			return err
		}
	}
	if len(metaKeys) > 0 {
		b := s.db.NewBatch()
		defer b.Close()
		for i := range metaKeys {
			if err := b.Set(metaKeys[i], metaVal[i], nil); err != nil {
				return err
			}
		}
		if err := b.Commit(s.wo); err != nil {
			return fmt.Errorf("write applied SQNs: %w", err)
		}
	}
	return nil
}

// externalSpans returns the key spans [smallest, largest] of the tables
// that are still external (read from the blob store).
func (s *Store) externalSpans() ([][2][]byte, error) {
	levels, err := s.db.SSTables()
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	var out [][2][]byte
	for _, l := range levels {
		for _, t := range l {
			if t.BackingType == pebble.BackingTypeExternal {
				out = append(out, [2][]byte{t.Smallest.UserKey, t.Largest.UserKey})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return bytes.Compare(out[i][0], out[j][0]) < 0 })
	return out, nil
}

// overlapsAny: some span [a, b] (inclusive) meets [start, end).
func overlapsAny(spans [][2][]byte, start, end []byte) bool {
	for _, sp := range spans {
		if bytes.Compare(sp[0], end) < 0 && bytes.Compare(sp[1], start) >= 0 {
			return true
		}
	}
	return false
}
