package feed

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// foldLog is the one log id a feed store folds everything under: its own
// SQNs (seq) number what it applied, whatever logs the changes came from.
const foldLog = "cdc-feed"

// The overlay holds the values of recently changed or read keys: changed
// ones until they are applied to Pebble (dirty), then as a cache of the
// state, bounded by Config.CacheBytes. Before-images of hot keys are then
// a map lookup, not a Pebble read.
const (
	// feedMemTableSize: each feed has a store; Pebble's default (32 MiB,
	// and two of them while one flushes) would dominate a node serving
	// many subscriptions.
	feedMemTableSize  = 8 << 20
	defaultCacheBytes = 64 << 20
	// overlayDirtyBytes: dirty entries are applied to Pebble when they
	// reach this.
	overlayDirtyBytes = 16 << 20
)

// state is the folded state of a feed's key groups at one checkpoint plus
// the changes applied since (in the overlay until flushed to Pebble): where
// before-images and the rows of a CLEAR come from.
type state struct {
	cfg        *Config
	stream     string
	r          keygroup.Range
	dir        string
	store      *materializer.Store
	seq        uint64
	overlay    map[string]*overlayEntry
	ovBytes    int
	dirtyBytes int
	dirty      []*overlayEntry
	keyBuf     []byte
}

type overlayEntry struct {
	kg      uint16
	state   string
	key     []byte
	value   []byte
	deleted bool
	dirty   bool
}

func (e *overlayEntry) size() int { return 2*len(e.key) + len(e.state) + cap(e.value) + 96 }

func openState(cfg *Config, stream string, r keygroup.Range) (*state, error) {
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("cdc: feed dir: %w", err)
	}
	dir, err := os.MkdirTemp(cfg.Dir, "feed-")
	if err != nil {
		return nil, fmt.Errorf("cdc: feed dir: %w", err)
	}
	store, err := materializer.Open(dir, materializer.Options{
		Logger: materializer.SlogLogger(cfg.Logger.With("component", "pebble")), Remote: cfg.Node.BlobStore(),
		RefOwner: cfg.Node.ID() + "-cdc", CacheSize: cfg.CacheSize, MemTableSize: feedMemTableSize,
		// The store is this feed's alone and removed when it ends.
		NoWAL: true,
	})
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("cdc: feed store: %w", err)
	}
	return &state{cfg: cfg, stream: stream, r: r, dir: dir, store: store, overlay: map[string]*overlayEntry{}}, nil
}

func (s *state) close() error {
	err := s.store.Close()
	if rerr := os.RemoveAll(s.dir); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}

// restore folds the state of the feed's key groups at complete checkpoint
// cp (0: empty) into the (new, empty) store: its snapshot bases imported
// lazily, then the changelog after them.
func (s *state) restore(ctx context.Context, cp uint64) error {
	if cp == 0 {
		return nil
	}
	node := s.cfg.Node
	pl, err := node.PlanRestore(ctx, s.stream, cp, s.r)
	if err != nil {
		return err
	}
	for _, b := range pl.Bases {
		if err := s.store.ImportSnapshot(ctx, node.BlobStore(), b.Snapshot, b.Ranges, materializer.ImportOptions{SkipApplied: true, Lazy: true}); err != nil {
			return fmt.Errorf("stream %s: restore checkpoint %d: %w", s.stream, cp, err)
		}
	}
	var (
		batch []segments.Change
		arena []byte
	)
	flush := func() error {
		err := s.store.Apply(s.stream, foldLog, batch)
		batch, arena = batch[:0], arena[:0]
		return err
	}
	for c, err := range node.ReplayPlan(ctx, pl) {
		if err != nil {
			return err
		}
		s.seq++
		c.SQN, c.LogID = s.seq, ""
		arena = append(arena, c.Key...)
		c.Key = arena[len(arena)-len(c.Key) : len(arena) : len(arena)]
		arena = append(arena, c.Value...)
		c.Value = arena[len(arena)-len(c.Value) : len(arena) : len(arena)]
		batch = append(batch, c)
		if len(batch) >= 4096 || len(arena) >= 4<<20 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if len(batch) > 0 {
		return flush()
	}
	return nil
}

// overlayKey is key group | len(state) | state | key: the data key's order
// without the stream prefix.
func (s *state) overlayKey(kg uint16, st string, key []byte) []byte {
	b := binary.BigEndian.AppendUint16(s.keyBuf[:0], kg)
	b = binary.BigEndian.AppendUint16(b, uint16(len(st)))
	b = append(b, st...)
	s.keyBuf = append(b, key...)
	return s.keyBuf
}

// get returns the key's current value (after the changes applied so far).
// The value is valid until the next set or flush.
func (s *state) get(kg uint16, st string, key []byte) ([]byte, bool, error) {
	k := s.overlayKey(kg, st, key)
	if e, ok := s.overlay[string(k)]; ok {
		return e.value, !e.deleted, nil
	}
	v, ok, err := s.store.Get(s.stream, kg, st, key)
	if err != nil {
		return nil, false, err
	}
	// Cached: the key is likely to change again (its set below reuses the
	// entry).
	e := &overlayEntry{kg: kg, state: st, key: append([]byte(nil), key...), value: v, deleted: !ok}
	s.overlay[string(k)] = e
	s.ovBytes += e.size()
	if s.ovBytes >= s.cfg.CacheBytes {
		// Reads alone (a retract feed's deletes of missing keys) must not
		// grow the cache past its bound either.
		s.trim(e)
	}
	return e.value, ok, nil
}

// trim evicts clean entries (never keep, which the caller holds) until the
// cache is at half its bound or only dirty entries are left.
func (s *state) trim(keep *overlayEntry) {
	for k, e := range s.overlay { // map order: a random eviction
		if s.ovBytes < s.cfg.CacheBytes/2 {
			return
		}
		if e.dirty || e == keep {
			continue
		}
		s.ovBytes -= e.size()
		delete(s.overlay, k)
	}
}

// set records the key's new value (deleted: removed).
func (s *state) set(ctx context.Context, kg uint16, st string, key, value []byte, deleted bool) error {
	k := s.overlayKey(kg, st, key)
	e, ok := s.overlay[string(k)]
	if !ok {
		e = &overlayEntry{kg: kg, state: st, key: append([]byte(nil), key...)}
		s.overlay[string(k)] = e
	} else {
		s.ovBytes -= e.size()
	}
	e.value = append(e.value[:0], value...)
	e.deleted = deleted
	s.ovBytes += e.size()
	if !e.dirty {
		e.dirty = true
		s.dirty = append(s.dirty, e)
	}
	s.dirtyBytes += len(key) + len(value) + 32
	if s.dirtyBytes >= min(overlayDirtyBytes, s.cfg.CacheBytes/4) || s.ovBytes >= s.cfg.CacheBytes {
		return s.flush(ctx)
	}
	return nil
}

// flush applies the dirty entries to Pebble, and trims the cache of clean
// ones to half its bound once it is full.
func (s *state) flush(ctx context.Context) error {
	if len(s.dirty) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		batch := make([]segments.Change, 0, len(s.dirty))
		for _, e := range s.dirty {
			s.seq++
			c := segments.Change{SQN: s.seq, KeyGroup: e.kg, State: e.state, Op: segments.OpPut, Key: e.key, Value: e.value}
			if e.deleted {
				c.Op, c.Value = segments.OpDelete, nil
			}
			batch = append(batch, c)
			e.dirty = false
		}
		if err := s.store.Apply(s.stream, foldLog, batch); err != nil {
			return err
		}
		clear(s.dirty)
		s.dirty, s.dirtyBytes = s.dirty[:0], 0
	}
	if s.ovBytes >= s.cfg.CacheBytes {
		s.trim(nil)
	}
	return nil
}

// clearState removes every key of (kg, st), calling removed for each in key
// order first (key and value valid during the call only).
func (s *state) clearState(ctx context.Context, kg uint16, st string, ts int64, removed func(key, value []byte) error) error {
	if err := s.flush(ctx); err != nil {
		return err
	}
	// Cached values of the state are about to be wrong (all flushed now).
	for k, e := range s.overlay {
		if e.kg == kg && e.state == st {
			s.ovBytes -= e.size()
			delete(s.overlay, k)
		}
	}
	for e, err := range s.store.Scan(ctx, s.stream, keygroup.Range{Lo: kg, Hi: kg}, st, materializer.ScanOptions{}) {
		if err != nil {
			return err
		}
		if err := removed(e.Key, e.Value); err != nil {
			return err
		}
	}
	s.seq++
	return s.store.Apply(s.stream, foldLog, []segments.Change{{SQN: s.seq, KeyGroup: kg, State: st, Op: segments.OpClear, TimestampMs: ts}})
}

// fold applies one change without events (materialize).
func (s *state) fold(ctx context.Context, c segments.Change) error {
	switch c.Op {
	case segments.OpPut:
		return s.set(ctx, c.KeyGroup, c.State, c.Key, c.Value, false)
	case segments.OpDelete:
		return s.set(ctx, c.KeyGroup, c.State, c.Key, nil, true)
	case segments.OpMerge:
		old, ok, err := s.get(c.KeyGroup, c.State, c.Key)
		if err != nil {
			return err
		}
		v := c.Value
		if ok {
			v = append(slices.Clip(old), c.Value...)
		}
		return s.set(ctx, c.KeyGroup, c.State, c.Key, v, false)
	case segments.OpClear:
		return s.clearState(ctx, c.KeyGroup, c.State, c.TimestampMs, func(_, _ []byte) error { return nil })
	}
	return fmt.Errorf("cdc: change SQN %d of log %s: unknown op %v", c.SQN, c.LogID, c.Op)
}

// isLost reports whether err means a position's data is gone from the blob
// store (truncated, forgotten, collected): the feed cannot replay it.
//
// Collected includes a segment the plan of a checkpoint lists that is no
// longer there (upload.ErrNotFound): garbage collection deletes the
// segments below a log's truncation point once no retained checkpoint (or
// registered subscription) needs them, while the journal may still list
// the older checkpoints whose parts name them. Their plans look fine
// (those parts predate the truncation) until the replay reads them.
func isLost(err error) bool {
	return errors.Is(err, changelog.ErrLogTruncated) || errors.Is(err, changelog.ErrCheckpointNotRestorable) ||
		errors.Is(err, changelog.ErrCheckpointNotFound) || errors.Is(err, changelog.ErrSnapshotFilesMissing) ||
		errors.Is(err, upload.ErrNotFound)
}
