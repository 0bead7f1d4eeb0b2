package materializer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/cockroachdb/pebble/v2"

	"github.com/dstl-dev/dstl/segments"
)

// changedEntryOverhead approximates a ChangedSet entry's memory beyond its
// key bytes: the map slot, the string header and allocation rounding.
const changedEntryOverhead = 64

// ChangedSet records which data keys of one stream changed (put, merge,
// delete) and which (key group, state) were cleared since the previous
// snapshot: what ExportChanged writes into a delta run. Extra entries are
// harmless (they are exported with their current value), missing ones are
// not, so a ChangedSet must see every change folded into the store between
// the two snapshots. It is not safe for concurrent use: the caller
// serializes Add, ExportChanged and Reset with its Apply calls (see
// ExportChanged).
type ChangedSet struct {
	stream  string
	keys    map[string]struct{} // data keys
	cleared map[string]struct{} // state prefixes
	mem     int64
	buf     []byte
}

// NewChangedSet returns an empty set for a stream.
func NewChangedSet(stream string) *ChangedSet {
	return &ChangedSet{stream: stream, keys: map[string]struct{}{}, cleared: map[string]struct{}{}}
}

// Stream returns the stream the set records.
func (cs *ChangedSet) Stream() string { return cs.stream }

// Add records a change (only its op, key group, state and key matter). A
// put, merge or delete of a key in a state already cleared is not recorded:
// the clear's scan of the state covers it.
func (cs *ChangedSet) Add(c segments.Change) error {
	var err error
	switch c.Op {
	case segments.OpPut, segments.OpMerge, segments.OpDelete, segments.OpClear:
		cs.buf, err = AppendDataKey(cs.buf[:0], cs.stream, c.KeyGroup, c.State, nil)
	default:
		err = fmt.Errorf("op %v: %w", c.Op, ErrInvalidArgument)
	}
	if err != nil {
		return fmt.Errorf("materializer: changed set of %s: SQN %d: %w", cs.stream, c.SQN, err)
	}
	if _, ok := cs.cleared[string(cs.buf)]; ok {
		return nil
	}
	if c.Op == segments.OpClear {
		cs.cleared[string(cs.buf)] = struct{}{}
		cs.mem += int64(len(cs.buf)) + changedEntryOverhead
		return nil
	}
	cs.buf = append(cs.buf, c.Key...)
	if _, ok := cs.keys[string(cs.buf)]; !ok {
		cs.keys[string(cs.buf)] = struct{}{}
		cs.mem += int64(len(cs.buf)) + changedEntryOverhead
	}
	return nil
}

// Len returns the number of entries: keys plus cleared states.
func (cs *ChangedSet) Len() int { return len(cs.keys) + len(cs.cleared) }

// MemBytes approximates the set's memory, so that a caller can fall back to
// a full Export (and Reset) when deltas stop paying.
func (cs *ChangedSet) MemBytes() int64 { return cs.mem }

// Reset empties the set.
func (cs *ChangedSet) Reset() {
	clear(cs.keys)
	clear(cs.cleared)
	cs.mem = 0
}

// sortedIn returns the entries of set inside [lo, hi), sorted.
func sortedIn(set map[string]struct{}, lo, hi []byte) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		if k >= string(lo) && k < string(hi) {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// ExportChanged writes a delta run of key groups r of a stream: what
// changed since the previous snapshot according to cs, read from one
// consistent Pebble snapshot, which also gives the manifest's applied SQNs.
// For every state cleared inside r it writes a range deletion over the
// state plus a Set of every key the state holds now; for every other
// changed key inside r a Set of its value, or a point tombstone if it has
// none. Entries of cs outside r are ignored. Files are named, cut, closed
// and aborted as by Export; the manifest has one delta run, without files
// if nothing inside r changed. Compose it with Append.
//
// The delta is correct only if cs holds every key changed between the
// previous snapshot and this one: call ExportChanged and then cs.Reset with
// no Apply of the stream in between (e.g. from the goroutine that applies),
// since the Pebble snapshot is taken when ExportChanged starts. cs is not
// modified.
//
// An ingested SST gets one sequence number for all its keys, and a range
// deletion hides only keys with a lower sequence number: the range
// deletion hides the earlier runs' keys of the state, not the Sets next to
// it in the same file (TestDeltaRangeDelSameFile).
func (s *Store) ExportChanged(ctx context.Context, stream string, r KeyGroupRange, cs *ChangedSet, create func(name string) (io.WriteCloser, error)) (SnapshotManifest, error) {
	lo, hi, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
	if err != nil {
		return SnapshotManifest{}, err
	}
	fail := func(err error) (SnapshotManifest, error) {
		return SnapshotManifest{}, fmt.Errorf("materializer: export changes of %s key groups %s: %w", stream, r, err)
	}
	if cs == nil || cs.stream != stream {
		return fail(fmt.Errorf("changed set of another stream: %w", ErrInvalidArgument))
	}
	if err := s.acquire(); err != nil {
		return SnapshotManifest{}, err
	}
	defer s.closeMu.RUnlock()

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

	d := deltaWriter{runWriter: s.newRunWriter(create, true)}
	defer d.abort() // no-op once the run is complete
	prefixes := sortedIn(cs.cleared, lo, hi)
	keys := sortedIn(cs.keys, lo, hi)
	for i, j, n := 0, 0, 0; i < len(prefixes) || j < len(keys); n++ {
		if n%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
		}
		if j < len(keys) && (i == len(prefixes) || keys[j] < prefixes[i]) {
			k := []byte(keys[j])
			j++
			dk, err := DecodeDataKey(k)
			if err != nil {
				return fail(err)
			}
			if it.SeekGE(k) && bytes.Equal(it.Key(), k) {
				v, err := it.ValueAndErr()
				if err == nil {
					err = d.set(k, v, dk.KeyGroup)
				}
				if err != nil {
					return fail(err)
				}
			} else if err := it.Error(); err != nil {
				return fail(err)
			} else if err := d.del(k, dk.KeyGroup); err != nil {
				return fail(err)
			}
			continue
		}
		p := []byte(prefixes[i])
		i++
		end := prefixEnd(p)
		for j < len(keys) && keys[j] < string(end) {
			j++ // covered by the state's scan
		}
		dk, err := DecodeDataKey(p)
		if err != nil {
			return fail(err)
		}
		if err := d.clearState(it, p, end, dk.KeyGroup); err != nil {
			return fail(err)
		}
	}
	if d.cur != nil {
		if err := d.finish(d.end); err != nil {
			return fail(err)
		}
	}
	return newManifest(stream, r, applied, s.db.TableFormat().String(), d.run), nil
}

// deltaWriter writes a delta run: tight file bounds, and range deletions
// split where a file is cut inside a cleared state.
type deltaWriter struct {
	*runWriter
	end []byte // exclusive end of what the current file holds
}

// next makes the current file ready for an entry at k of key group kg,
// cutting the full file first.
func (d *deltaWriter) next(k []byte, kg uint16) error {
	if d.full(kg) {
		if err := d.finish(d.end); err != nil {
			return err
		}
	}
	if d.cur == nil {
		return d.open(k, k, kg)
	}
	return nil
}

func (d *deltaWriter) set(k, v []byte, kg uint16) error {
	if err := d.next(k, kg); err != nil {
		return err
	}
	d.end = append(append(d.end[:0], k...), 0)
	return d.runWriter.set(k, v, kg)
}

func (d *deltaWriter) del(k []byte, kg uint16) error {
	if err := d.next(k, kg); err != nil {
		return err
	}
	d.end = append(append(d.end[:0], k...), 0)
	return d.runWriter.del(k, kg)
}

// clearState writes a range deletion over [p, end) and a Set of every key
// under p now. A file cut inside the state ends the range deletion at the
// cut, and the next file continues it, so files stay disjoint.
func (d *deltaWriter) clearState(it *pebble.Iterator, p, end []byte, kg uint16) error {
	if err := d.next(p, kg); err != nil {
		return err
	}
	start := p
	for ok := it.SeekGE(p); ok && bytes.Compare(it.Key(), end) < 0; ok = it.Next() {
		k := it.Key()
		if d.full(kg) {
			if bytes.Compare(start, k) < 0 {
				if err := d.deleteRange(start, k, kg); err != nil {
					return err
				}
				d.end = append(d.end[:0], k...)
			}
			start = bytes.Clone(k)
		}
		v, err := it.ValueAndErr()
		if err != nil {
			return err
		}
		if err := d.set(k, v, kg); err != nil {
			return err
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	if err := d.deleteRange(start, end, kg); err != nil {
		return err
	}
	d.end = append(d.end[:0], end...)
	return nil
}

// View is a consistent point-in-time view of a store (a Pebble snapshot).
// Close it when done: it pins the versions it sees.
type View struct {
	snap *pebble.Snapshot
	s    *Store
}

// View returns a view of the store as of now.
func (s *Store) View() (*View, error) {
	if err := s.acquire(); err != nil {
		return nil, err
	}
	defer s.closeMu.RUnlock()
	return &View{snap: s.db.NewSnapshot(), s: s}, nil
}

// Close releases the view.
func (v *View) Close() error { return v.snap.Close() }

// ObsoleteBytes returns the bytes (key + value, uncompressed) the view
// holds under the set's changed keys and cleared states: what a delta of
// the set makes dead in the runs before it, when v is the state those
// runs hold.
func (cs *ChangedSet) ObsoleteBytes(ctx context.Context, v *View) (int64, error) {
	if err := v.s.acquire(); err != nil {
		return 0, err
	}
	defer v.s.closeMu.RUnlock()
	lo, hi, err := StreamBounds(cs.stream)
	if err != nil {
		return 0, err
	}
	it, err := v.snap.NewIterWithContext(ctx, &pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return 0, err
	}
	// Sorted, so the seeks walk the view forward instead of jumping.
	var total int64
	for _, p := range sortedIn(cs.cleared, lo, hi) {
		end := prefixEnd([]byte(p))
		for ok := it.SeekGE([]byte(p)); ok && bytes.Compare(it.Key(), end) < 0; ok = it.Next() {
			v, err := it.ValueAndErr()
			if err != nil {
				return 0, errors.Join(err, it.Close())
			}
			total += int64(len(it.Key())) + int64(len(v))
		}
	}
	n := 0
	for _, k := range sortedIn(cs.keys, lo, hi) {
		if n++; n%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return 0, errors.Join(err, it.Close())
			}
		}
		if it.SeekGE([]byte(k)) && it.Key() != nil && string(it.Key()) == k {
			v, err := it.ValueAndErr()
			if err != nil {
				return 0, errors.Join(err, it.Close())
			}
			total += int64(len(k)) + int64(len(v))
		}
	}
	return total, errors.Join(it.Error(), it.Close())
}
