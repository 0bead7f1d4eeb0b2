package materializer

import (
	"bytes"
	"context"
	"fmt"
	"hash/crc32"
	"hash/fnv"
	"io"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/dstl-dev/dstl/internal/clock"
)

// The hydrator makes lazily imported files local, one file at a time, in
// the order they were imported. For a file F it
//
//  1. asks Pebble whether an external table still lies in F's span (after
//     a restart, or an excise, there may be none: then F is done);
//  2. collects the pending files overlapping or touching F's span (F
//     included: Pebble's download of a span also takes the table ending
//     where it starts). Those (nearly) all inside their range (Part 0) are
//     fetched whole from the blob store into the staging area, at most
//     Options.HydrateBandwidth bytes/s, and checked against the manifest's
//     size and CRC32C (ErrCorrupt naming the file otherwise): from then on
//     the remote adapter serves Pebble's reads of them from that verified
//     copy. Those only partly inside (Part > 0, a rescale's clipped files)
//     are not fetched: fetching a file whole for a few of its key groups
//     would read the rest for nothing;
//  3. calls db.Download over F's span. With only whole files, via the
//     backing file (ViaBackingFileDownload: Pebble copies the external
//     tables' blocks into local tables and swaps them in with the same
//     sequence numbers, so the runs' shadowing order is unchanged), reading
//     only verified bytes and nothing from the blob store. With a clipped
//     file, as a rewrite (Pebble iterates each external table within its
//     bounds and writes a local table, same sequence numbers): a clipped
//     file's blocks in range are read from the blob store, each checked by
//     Pebble against its block checksum, the whole files' from their
//     verified copies. The rewrite reads 8 MiB ahead; the adapter hands it
//     zeros instead of fetching the part of a clipped file after its last
//     block in range (skipPastRange), so it reads about the bytes in range;
//  4. marks F local, drops the copies no pending file needs, and writes
//     DSTL-LAZY.json; when a stream has no pending file left its
//     reference is deleted.
//
// What is verified when: a whole file, its CRC32C over every byte before
// Pebble copies any of it; a clipped file, each block Pebble reads (data,
// index, filter, properties, range deletions) by the checksum in its
// trailer, as for any read of a lazily imported file, but no whole-file
// checksum (its bytes out of range are never read). The footer carries a
// CRC of its own in the table formats the store writes (Pebblev6 and newer,
// FormatNewest).
//
// A failure (blob store down, file missing, corrupt) is recorded in the
// stream's HydrationStatus.LastError and retried after a backoff (1 s
// doubling to 30 s), moving on to the other files meanwhile. The hydrator
// is owned by the Store: Close stops it (and Download, which must never
// run on a closed DB) before closing Pebble; a reopened store starts it
// again for what is still remote.
const (
	hydrateChunk      = 4 << 20
	hydrateBackoffMin = time.Second
	hydrateBackoffMax = 30 * time.Second
)

func (s *Store) wakeHydrator() {
	select {
	case s.lazy.wake <- struct{}{}:
	default:
	}
}

func (s *Store) hydrate(ctx context.Context) {
	defer close(s.lazy.done)
	lim := &rateLimiter{bw: s.opts.HydrateBandwidth}
	local := map[string]string{} // name → verified copy, owned by this goroutine
	defer func() {
		for name, path := range local {
			s.remote.dropLocal(name)
			_ = s.fs.Remove(path)
		}
	}()
	backoff := hydrateBackoffMin
	for {
		s.pruneLocal(local)
		f, ok := s.nextPending()
		if !ok {
			select {
			case <-ctx.Done():
				return
			case <-s.lazy.wake:
			}
			continue
		}
		err := s.hydrateFile(ctx, lim, local, f)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = hydrateBackoffMin
			continue
		}
		s.hydrationFailed(f, err)
		if clock.Sleep(ctx, clock.Real{}, backoff) != nil {
			return
		}
		backoff = min(2*backoff, hydrateBackoffMax)
	}
}

func (s *Store) nextPending() (lazyFile, bool) {
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	if s.lazy.paused {
		return lazyFile{}, false
	}
	for _, f := range s.lazy.pending {
		if !f.ingesting {
			return f, true
		}
	}
	return lazyFile{}, false
}

// hydrationFailed records err and moves f to the back of the queue, so one
// failing file does not hold up the others.
func (s *Store) hydrationFailed(f lazyFile, err error) {
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	if p := s.lazy.progress[streamKey(f.Stream, f.Incarnation)]; p != nil {
		p.LastError = err.Error()
	}
	if i := s.pendingIndexLocked(f); i >= 0 {
		s.lazy.pending = append(append(s.lazy.pending[:i:i], s.lazy.pending[i+1:]...), f)
	}
}

func (s *Store) pendingIndexLocked(f lazyFile) int {
	for i, g := range s.lazy.pending {
		if g.Name == f.Name && g.Stream == f.Stream && g.Incarnation == f.Incarnation && bytes.Equal(g.Start, f.Start) && bytes.Equal(g.End, f.End) {
			return i
		}
	}
	return -1
}

func (s *Store) hydrateFile(ctx context.Context, lim *rateLimiter, local map[string]string, f lazyFile) error {
	if err := s.acquire(); err != nil {
		return err
	}
	spans, err := s.externalSpans()
	s.closeMu.RUnlock()
	if err != nil {
		return err
	}
	if overlapsAny(spans, f.Start, f.End) {
		s.lazy.mu.Lock()
		// Files that merely touch F's span count: Pebble's download of a
		// span [a, b) also copies the table that starts at b (measured:
		// without them every other file of a base run was read remotely
		// by the download, unverified and unbounded).
		var need []lazyFile
		for _, g := range s.lazy.pending {
			if bytes.Compare(g.Start, f.End) <= 0 && bytes.Compare(f.Start, g.End) <= 0 {
				need = append(need, g)
			}
		}
		s.lazy.mu.Unlock()
		// A clipped file among them (F itself, or a neighbour the download
		// takes along) is rewritten, not copied: a copy would read its
		// whole backing object from the blob store, the part outside the
		// range included. The rewrite reads the other files of the span
		// from their verified copies all the same.
		via := true
		var part int64
		for _, g := range need {
			if g.Part > 0 {
				via = false
				part += g.Part
			}
		}
		for _, g := range need {
			if _, ok := local[g.Name]; ok || g.Part > 0 {
				continue
			}
			path, err := s.fetch(ctx, lim, g)
			if err != nil {
				return err
			}
			if err := s.remote.addLocal(g.Name, path); err != nil {
				_ = s.fs.Remove(path)
				return err
			}
			local[g.Name] = path
		}
		// The rewrite reads the clipped files' blocks through Pebble, not
		// through fetch: pace it by their estimated size all the same.
		if err := lim.wait(ctx, part); err != nil {
			return err
		}
		if !via {
			skipped := map[string]bool{}
			defer func() {
				for name := range skipped {
					s.remote.clearSkip(name)
				}
			}()
			for _, g := range need {
				if g.Part == 0 || skipped[g.Name] {
					continue
				}
				if err := s.skipPastRange(ctx, g.Name); err != nil {
					return fmt.Errorf("hydrate %s: %w", g.Name, err)
				}
				skipped[g.Name] = true
			}
		}
		if err := s.acquire(); err != nil {
			return err
		}
		err := s.db.Download(ctx, []pebble.DownloadSpan{{StartKey: f.Start, EndKey: f.End, ViaBackingFileDownload: via}})
		s.closeMu.RUnlock()
		if err != nil {
			return fmt.Errorf("hydrate %s: download: %w", f.Name, err)
		}
	}
	s.markLocal(ctx, f, local)
	return nil
}

// skipMargin: bytes past the last data block a clipped table can reach
// that are still read for real, should Pebble look a little further than
// its bounds.
const skipMargin = 64 << 10

// skipPastRange tells the remote adapter which bytes of the object name no
// table of it still read remotely needs (blobStorage.setSkip): those
// after the last data block of every pending entry of the object (the
// block holding the first index separator at or past its End) and before
// the meta blocks. Nothing is skipped if some entry of the object is
// hydrated whole, or if the pending entries changed meanwhile (an import;
// addPendingLocked clears any skip before it ingests).
func (s *Store) skipPastRange(ctx context.Context, name string) error {
	entries := func() []lazyFile {
		var out []lazyFile
		for _, g := range s.lazy.pending {
			if g.Name == name {
				out = append(out, g)
			}
		}
		return out
	}
	s.lazy.mu.Lock()
	es := entries()
	s.lazy.mu.Unlock()
	if len(es) == 0 {
		return nil
	}
	for _, g := range es {
		if g.Part == 0 {
			return nil
		}
	}
	size := es[0].Size
	rd, err := sstable.NewReader(ctx, remoteTable{&remoteReader{b: s.remote, name: name, size: size}}, sstable.ReaderOptions{})
	if err != nil {
		return fmt.Errorf("read table: %w", err)
	}
	defer rd.Close()
	// Values kept apart from their keys (value blocks, written after the
	// data blocks) would be reached from blocks in range: skip nothing
	// then. Our exports write none (each key once, at sequence number 0).
	props, err := rd.ReadPropertiesBlock(ctx, nil)
	if err != nil {
		return fmt.Errorf("read properties: %w", err)
	}
	if props.NumValueBlocks > 0 || props.ValueBlocksSize > 0 {
		return nil
	}
	// The data blocks run from offset 0; the meta blocks follow them.
	meta, err := rd.EstimateDiskUsage(nil, []byte{0xff}, sstable.NoReadEnv)
	if err != nil {
		return fmt.Errorf("read index: %w", err)
	}
	var last uint64
	for _, g := range es {
		n, err := rd.EstimateDiskUsage(nil, g.End, sstable.NoReadEnv)
		if err != nil {
			return fmt.Errorf("read index: %w", err)
		}
		last = max(last, n)
	}
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	if now := entries(); !slices.EqualFunc(now, es, func(a, b lazyFile) bool { return a.Part > 0 && bytes.Equal(a.End, b.End) }) {
		return nil
	}
	s.remote.setSkip(name, int64(last)+skipMargin, int64(meta))
	return nil
}

// dropPending forgets the pending files whose span lies inside [lo, hi)
// (just excised): they leave the progress totals and the references.
func (s *Store) dropPending(ctx context.Context, lo, hi []byte) {
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	keep := s.lazy.pending[:0:0]
	for _, f := range s.lazy.pending {
		if f.ingesting || bytes.Compare(f.Start, lo) < 0 || bytes.Compare(f.End, hi) > 0 {
			keep = append(keep, f)
			continue
		}
		k := streamKey(f.Stream, f.Incarnation)
		if p := s.lazy.progress[k]; p != nil {
			p.TotalBytes -= f.bytes()
			p.TotalFiles--
		}
		s.unrefLocked(ctx, k, f.Name)
		s.lazy.dirty = true
	}
	s.lazy.pending = keep
	if err := s.saveLazyLocked(); err != nil {
		for _, p := range s.lazy.progress {
			p.LastError = err.Error()
		}
	}
}

// unrefLocked drops one pending entry of name from the stream's reference,
// deleting the reference once it lists nothing; s.lazy.mu is held (so no
// import adds files to a reference being deleted: the next import of the
// stream makes a new one).
func (s *Store) unrefLocked(ctx context.Context, k, name string) {
	ref := s.lazy.refs[k]
	if ref == nil {
		return
	}
	ref.mu.Lock()
	if ref.files[name]--; ref.files[name] <= 0 {
		delete(ref.files, name)
	}
	empty := len(ref.files) == 0
	ref.mu.Unlock()
	if empty {
		ref.lease.release(ctx)
		delete(s.lazy.refs, k)
	}
}

// pruneLocal drops the hydrator's copies of files no longer pending (their
// range was dropped).
func (s *Store) pruneLocal(local map[string]string) {
	s.lazy.mu.Lock()
	pending := make(map[string]bool, len(s.lazy.pending))
	for _, f := range s.lazy.pending {
		pending[f.Name] = true
	}
	s.lazy.mu.Unlock()
	for name, path := range local {
		if !pending[name] {
			delete(local, name)
			s.remote.dropLocal(name)
			_ = s.fs.Remove(path)
		}
	}
}

// markLocal records that f is local, drops copies nothing pending needs
// and the stream's reference once it has no pending file.
func (s *Store) markLocal(ctx context.Context, f lazyFile, local map[string]string) {
	s.lazy.mu.Lock()
	defer s.lazy.mu.Unlock()
	i := s.pendingIndexLocked(f)
	if i < 0 {
		return
	}
	s.lazy.pending = append(s.lazy.pending[:i:i], s.lazy.pending[i+1:]...)
	s.lazy.dirty = true
	k := streamKey(f.Stream, f.Incarnation)
	if p := s.lazy.progress[k]; p != nil {
		p.LocalBytes += f.bytes()
		p.LocalFiles++
		p.LastError = ""
	}
	stillNeeded := false
	for _, g := range s.lazy.pending {
		if g.Name == f.Name {
			stillNeeded = true
			break
		}
	}
	if !stillNeeded {
		if path, ok := local[f.Name]; ok {
			delete(local, f.Name)
			s.remote.dropLocal(f.Name)
			_ = s.fs.Remove(path)
		}
	}
	s.unrefLocked(ctx, k, f.Name)
	if err := s.saveLazyLocked(); err != nil {
		// Not lost: the next save writes it, and a restart that finds the
		// old list only re-checks files that are local already.
		if p := s.lazy.progress[k]; p != nil {
			p.LastError = err.Error()
		}
	}
}

// fetch copies f whole from the blob store into the staging area, at most
// at the bandwidth bound, and verifies its size and CRC32C.
func (s *Store) fetch(ctx context.Context, lim *rateLimiter, f lazyFile) (string, error) {
	h := fnv.New64a()
	_, _ = io.WriteString(h, f.Name)
	path := s.fs.PathJoin(s.stagingDir, fmt.Sprintf("hydrate-%016x.sst", h.Sum64()))
	out, err := s.fs.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return "", fmt.Errorf("hydrate %s: %w", f.Name, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = s.fs.Remove(path)
		}
	}()
	crc := crc32.New(castagnoli)
	buf := make([]byte, min(int64(hydrateChunk), f.Size))
	k := streamKey(f.Stream, f.Incarnation)
	for off := int64(0); off < f.Size; {
		n := min(int64(len(buf)), f.Size-off)
		if err := lim.wait(ctx, n); err != nil {
			_ = out.Close()
			return "", err
		}
		err := s.remote.retry(ctx, f.Name, func(ctx context.Context) error {
			rc, err := s.remote.blob.GetRange(ctx, f.Name, off, n)
			if err != nil {
				return err
			}
			_, err = io.ReadFull(rc, buf[:n])
			if cerr := rc.Close(); err == nil {
				err = cerr
			}
			return err
		})
		if err == nil {
			// Hash before writing: MemFS may scribble over written buffers
			// in invariants builds.
			_, _ = crc.Write(buf[:n])
			_, err = out.Write(buf[:n])
		}
		if err != nil {
			_ = out.Close()
			return "", fmt.Errorf("hydrate %s: %w", f.Name, err)
		}
		off += n
		s.lazy.mu.Lock()
		if p := s.lazy.progress[k]; p != nil {
			p.RemoteReadBytes += n
		}
		s.lazy.mu.Unlock()
	}
	if err := out.Close(); err != nil {
		return "", fmt.Errorf("hydrate %s: %w", f.Name, err)
	}
	// The object must be exactly the manifest's: one more byte means a
	// different object.
	if info, err := s.remote.blob.Stat(ctx, f.Name); err != nil {
		return "", fmt.Errorf("hydrate %s: %w", f.Name, err)
	} else if info.Size != f.Size {
		return "", fmt.Errorf("snapshot file %s: %d bytes, manifest says %d: %w", f.Name, info.Size, f.Size, ErrCorrupt)
	}
	if sum := crc.Sum32(); sum != f.CRC32C {
		return "", fmt.Errorf("snapshot file %s: CRC32C %08x, manifest says %08x: %w", f.Name, sum, f.CRC32C, ErrCorrupt)
	}
	ok = true
	return path, nil
}

// rateLimiter paces the hydrator's reads to bw bytes/s on average (bw ≤ 0:
// unbounded). Used by the hydrator goroutine only.
type rateLimiter struct {
	bw   int64
	next time.Time
}

func (r *rateLimiter) wait(ctx context.Context, n int64) error {
	if r.bw <= 0 {
		return ctx.Err()
	}
	// Wait until the budget of the previous reads is paid, then charge
	// this one: the read overlaps the accrual, so a slow store is not
	// slowed further, and over any stretch the average stays ≤ bw.
	now := time.Now()
	if d := r.next.Sub(now); d > 0 {
		if err := sleepCtx(ctx, d); err != nil {
			return err
		}
		now = r.next
	}
	r.next = now.Add(time.Duration(float64(n) / float64(r.bw) * float64(time.Second)))
	return ctx.Err()
}
