package materializer

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload"
)

// ImportSnapshot imports the state of key-group ranges of a published
// snapshot into the store. Eager (the default): its files are read from
// blob (ranged reads; size and CRC32C verified) and ingested. With
// opts.Lazy they are ingested by reference and read from Options.Remote
// (which should be blob) on demand, then hydrated in the background. Adjacent ranges are imported
// together. Each range must be empty here (see ImportRange). A record of
// no stream incarnation, or of another than opts.Incarnation (if set), is
// refused with an error wrapping changelog.ErrForeignSnapshot: its state is
// a deleted stream's.
func (s *Store) ImportSnapshot(ctx context.Context, blob upload.BlobStore, snap changelog.Snapshot, ranges []keygroup.Range, opts ImportOptions) error {
	if snap.Incarnation == "" || (opts.Incarnation != "" && snap.Incarnation != opts.Incarnation) {
		return fmt.Errorf("snapshot %s of incarnation %q, restoring incarnation %q: %w", snap.Key(), snap.Incarnation, opts.Incarnation, changelog.ErrForeignSnapshot)
	}
	man, err := DecodeManifest(snap)
	if err != nil {
		return err
	}
	open := blobOpener(ctx, blob, man)
	if opts.Lazy {
		// The references are named after the record's incarnation.
		opts.Incarnation = snap.Incarnation
	}
	for _, r := range mergeRanges(ranges) {
		if err := s.ImportRange(ctx, man, r, open, opts); err != nil {
			return fmt.Errorf("snapshot of checkpoint %d: %w", snap.Checkpoint, err)
		}
	}
	return nil
}

// StateNames returns the names of the states that hold keys in key groups
// r of a stream, sorted. It skips from each (key group, state) prefix to
// the next, so it costs one seek per state per key group, not one step per
// key. Each key group gets an iterator of its own: Pebble's readahead of a
// remote (lazily imported) file treats forward seeks less than 1 MiB apart
// as a sequential scan, so one iterator over a small state reads nearly all
// of it from the blob store; a fresh iterator starts without readahead and
// reads about one data block per state.
func (s *Store) StateNames(ctx context.Context, stream string, r KeyGroupRange) ([]string, error) {
	if _, _, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi); err != nil {
		return nil, err
	}
	if err := s.acquire(); err != nil {
		return nil, err
	}
	defer s.closeMu.RUnlock()
	seen := map[string]bool{}
	var prefix []byte
	for kg := uint32(r.Lo); kg <= uint32(r.Hi); kg++ {
		lo, hi, _ := KeyGroupRangeBounds(stream, uint16(kg), uint16(kg))
		it, err := s.db.NewIterWithContext(ctx, &pebble.IterOptions{LowerBound: lo, UpperBound: hi})
		if err != nil {
			return nil, fmt.Errorf("materializer: stream %s: %w", stream, err)
		}
		for valid := it.First(); valid; {
			if err := ctx.Err(); err != nil {
				return nil, errors.Join(err, it.Close())
			}
			dk, err := DecodeDataKey(it.Key())
			if err != nil {
				return nil, errors.Join(fmt.Errorf("materializer: stream %s: %w", stream, err), it.Close())
			}
			seen[dk.State] = true
			prefix = appendStatePrefix(prefix[:0], stream, dk.KeyGroup, dk.State)
			valid = it.SeekGE(prefixEnd(prefix))
		}
		if err := errors.Join(it.Error(), it.Close()); err != nil {
			return nil, fmt.Errorf("materializer: stream %s: %w", stream, err)
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// mergeRanges sorts ranges and joins adjacent or overlapping ones.
func mergeRanges(rs []keygroup.Range) []keygroup.Range {
	sorted := slices.SortedFunc(slices.Values(rs), func(a, b keygroup.Range) int { return cmp.Compare(a.Lo, b.Lo) })
	out := make([]keygroup.Range, 0, len(sorted))
	for _, r := range sorted {
		if n := len(out); n > 0 && int(r.Lo) <= int(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}
