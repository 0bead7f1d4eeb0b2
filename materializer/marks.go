package materializer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
)

// Range marks: an owner's notes on key-group ranges of a stream, kept in
// the store's metadata keyspace next to the data they describe, so that the
// two are written by the same Pebble and recovered together after a crash
// (docs/materializer.md, "Key layout" and "Range marks"). The store does
// not interpret them; the server's read store records in them which key
// groups hold a complete checkpoint's state (server/pebblestate.go).
//
//	key:   0x00 | 0x02 | len(stream) u8 | stream | lo u16 BE
//	value: hi u16 BE | the owner's bytes
//
// A stream's marks are always replaced as a whole (SetRangeMarks: one
// Pebble batch deleting the old ones and writing the new ones), so a
// recovered store holds one complete set, never a mix of two.

// RangeMark is an owner's note on key groups KeyGroups of a stream.
type RangeMark struct {
	KeyGroups KeyGroupRange
	Value     []byte
}

func appendMarkPrefix(dst []byte, stream string) []byte {
	dst = append(dst, prefixMeta, metaRangeMark, byte(len(stream)))
	return append(dst, stream...)
}

// SetRangeMarks replaces every range mark of stream with marks (sorted by
// key group, not overlapping; nil deletes them all), in one Pebble batch.
// With durable, it returns once the marks and everything written to the
// store before them are on disk: a synced commit with the WAL, a memtable
// flush without it (Options.NoWAL). Without durable, a crash may lose them
// (and then everything written after them too: Pebble recovers a prefix).
func (s *Store) SetRangeMarks(stream string, marks []RangeMark, durable bool) error {
	if err := checkStream(stream); err != nil {
		return err
	}
	for i, m := range marks {
		if m.KeyGroups.Lo > m.KeyGroups.Hi || (i > 0 && m.KeyGroups.Lo <= marks[i-1].KeyGroups.Hi) {
			return fmt.Errorf("materializer: stream %s: range marks %v: unsorted, overlapping or empty: %w", stream, marks, ErrInvalidArgument)
		}
	}
	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()
	prefix := appendMarkPrefix(nil, stream)
	b := s.db.NewBatch()
	defer b.Close()
	if err := b.DeleteRange(prefix, prefixEnd(prefix), nil); err != nil {
		return err
	}
	for _, m := range marks {
		k := binary.BigEndian.AppendUint16(bytes.Clone(prefix), m.KeyGroups.Lo)
		v := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(m.Value)), m.KeyGroups.Hi)
		if err := b.Set(k, append(v, m.Value...), nil); err != nil {
			return err
		}
	}
	wo := s.wo
	if durable && !s.opts.NoWAL {
		wo = pebble.Sync
	}
	if err := b.Commit(wo); err != nil {
		return fmt.Errorf("materializer: stream %s: write range marks: %w", stream, err)
	}
	if durable && s.opts.NoWAL {
		if err := s.db.Flush(); err != nil {
			return fmt.Errorf("materializer: stream %s: flush range marks: %w", stream, err)
		}
	}
	return nil
}

// RangeMarks returns the range marks of every stream, each stream's sorted
// by key group. A malformed mark is ErrCorrupt.
func (s *Store) RangeMarks() (map[string][]RangeMark, error) {
	if err := s.acquire(); err != nil {
		return nil, err
	}
	defer s.closeMu.RUnlock()
	lo := []byte{prefixMeta, metaRangeMark}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: prefixEnd(lo)})
	if err != nil {
		return nil, fmt.Errorf("materializer: range marks: %w", err)
	}
	out := map[string][]RangeMark{}
	for ok := it.First(); ok; ok = it.Next() {
		k, v := it.Key(), it.Value()
		if len(k) < 3 || int(k[2]) == 0 || len(k) != 3+int(k[2])+2 || len(v) < 2 {
			return nil, errors.Join(fmt.Errorf("materializer: range mark %x: %w", k, ErrCorrupt), it.Close())
		}
		stream := string(k[3 : 3+int(k[2])])
		r := KeyGroupRange{Lo: binary.BigEndian.Uint16(k[len(k)-2:]), Hi: binary.BigEndian.Uint16(v)}
		if r.Lo > r.Hi {
			return nil, errors.Join(fmt.Errorf("materializer: range mark %x: key groups %s: %w", k, r, ErrCorrupt), it.Close())
		}
		out[stream] = append(out[stream], RangeMark{KeyGroups: r, Value: bytes.Clone(v[2:])})
	}
	if err := it.Close(); err != nil {
		return nil, fmt.Errorf("materializer: range marks: %w", err)
	}
	for stream, ms := range out {
		for i := 1; i < len(ms); i++ {
			if ms[i].KeyGroups.Lo <= ms[i-1].KeyGroups.Hi {
				return nil, fmt.Errorf("materializer: stream %s: range marks %s and %s overlap: %w", stream, ms[i-1].KeyGroups, ms[i].KeyGroups, ErrCorrupt)
			}
		}
	}
	return out, nil
}

// ResetApplied deletes the applied SQN of every log of every stream (for
// an owner whose log ids mean nothing across restarts, such as the server's
// read store). It must not run concurrently with an Apply or an import.
func (s *Store) ResetApplied() error {
	if err := s.acquire(); err != nil {
		return err
	}
	defer s.closeMu.RUnlock()
	lo := []byte{prefixMeta, metaApplied}
	if err := s.db.DeleteRange(lo, prefixEnd(lo), s.wo); err != nil {
		return fmt.Errorf("materializer: reset applied SQNs: %w", err)
	}
	s.mu.Lock()
	clear(s.logs)
	s.mu.Unlock()
	return nil
}

// RetainKeyGroups drops (Excise, as DropKeyGroups) every data key that is
// not in one of the key-group ranges keep lists per stream, of every
// stream, so the store holds those ranges only; lazily imported files
// inside what is dropped are forgotten (no hydration, no reference). Range
// marks and applied SQNs are left alone. It returns the spans dropped that
// held data.
func (s *Store) RetainKeyGroups(ctx context.Context, keep map[string][]KeyGroupRange) (dropped int, err error) {
	var spans [][2][]byte
	for stream, rs := range keep {
		for _, r := range rs {
			lo, hi, err := KeyGroupRangeBounds(stream, r.Lo, r.Hi)
			if err != nil {
				return 0, err
			}
			spans = append(spans, [2][]byte{lo, hi})
		}
	}
	slices.SortFunc(spans, func(a, b [2][]byte) int { return bytes.Compare(a[0], b[0]) })
	// The gaps between the kept spans, over the whole data keyspace.
	var gaps [][2][]byte
	at := []byte{prefixData}
	for _, sp := range spans {
		if bytes.Compare(at, sp[0]) < 0 {
			gaps = append(gaps, [2][]byte{at, sp[0]})
		}
		if bytes.Compare(sp[1], at) > 0 {
			at = sp[1]
		}
	}
	if end := []byte{prefixData + 1}; bytes.Compare(at, end) < 0 {
		gaps = append(gaps, [2][]byte{at, end})
	}
	if err := s.acquire(); err != nil {
		return 0, err
	}
	defer s.closeMu.RUnlock()
	for _, g := range gaps {
		it, err := s.db.NewIterWithContext(ctx, &pebble.IterOptions{LowerBound: g[0], UpperBound: g[1]})
		if err != nil {
			return dropped, fmt.Errorf("materializer: retain key groups: %w", err)
		}
		some := it.First()
		if err := errors.Join(it.Error(), it.Close()); err != nil {
			return dropped, fmt.Errorf("materializer: retain key groups: %w", err)
		}
		if !some {
			continue
		}
		if err := s.db.Excise(ctx, pebble.KeyRange{Start: g[0], End: g[1]}); err != nil {
			return dropped, fmt.Errorf("materializer: retain key groups: drop [%x, %x): %w", g[0], g[1], err)
		}
		s.dropPending(ctx, g[0], g[1])
		dropped++
	}
	return dropped, nil
}
