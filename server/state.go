package server

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
)

// StateReader serves the state service: PebbleState (data in a
// materializer.Store) when the server has a StateDir, the in-memory
// LiveState otherwise.
type StateReader interface {
	Get(ctx context.Context, stream string, kg uint16, state string, key []byte) (value []byte, found bool, err error)
	// Scan returns up to q.Limit entries after q.After in (key group,
	// state, key) order, and whether more follow.
	Scan(ctx context.Context, q ScanQuery) (entries []Entry, more bool, err error)
}

// ScanQuery selects entries of one stream.
type ScanQuery struct {
	Stream    string
	State     string // "" for every state
	Prefix    []byte
	KeyGroups keygroup.Range
	Limit     int
	After     *Entry // resume after this entry; nil from the start
}

// Entry is one key's value.
type Entry struct {
	KeyGroup uint16
	State    string
	Key      []byte
	Value    []byte
}

func compareEntries(a, b *Entry) int {
	return cmp.Or(cmp.Compare(a.KeyGroup, b.KeyGroup), cmp.Compare(a.State, b.State), bytes.Compare(a.Key, b.Key))
}

// encodePageToken makes an opaque token of the last entry of a page.
func encodePageToken(e *Entry) string {
	b := binary.AppendUvarint(nil, uint64(e.KeyGroup))
	b = binary.AppendUvarint(b, uint64(len(e.State)))
	b = append(b, e.State...)
	b = append(b, e.Key...)
	return base64.RawURLEncoding.EncodeToString(b)
}

func decodePageToken(tok string) (*Entry, error) {
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return nil, fmt.Errorf("page token: %v: %w", err, errInvalid)
	}
	kg, n := binary.Uvarint(b)
	if n <= 0 || kg > keygroup.Max {
		return nil, fmt.Errorf("page token: bad key group: %w", errInvalid)
	}
	b = b[n:]
	sl, n := binary.Uvarint(b)
	if n <= 0 || sl > uint64(len(b)-n) {
		return nil, fmt.Errorf("page token: bad state: %w", errInvalid)
	}
	b = b[n:]
	return &Entry{KeyGroup: uint16(kg), State: string(b[:sl]), Key: b[sl:]}, nil
}

// entryKey identifies a key of a stream.
type entryKey struct {
	kg    uint16
	state string
	key   string
}

// kvState is one view of a stream's state: key → value.
type kvState map[entryKey][]byte

func (s kvState) apply(c *segments.Change) {
	k := entryKey{kg: c.KeyGroup, state: c.State, key: string(c.Key)}
	switch c.Op {
	case segments.OpPut:
		s[k] = bytes.Clone(c.Value)
	case segments.OpDelete:
		delete(s, k)
	case segments.OpMerge:
		s[k] = append(bytes.Clone(s[k]), c.Value...)
	case segments.OpClear:
		for o := range s {
			if o.kg == c.KeyGroup && o.state == c.State {
				delete(s, o)
			}
		}
	}
}

// LiveState serves reads from the changelog: for key groups a writer of
// this node owns (or owned until it closed), that writer's view (the
// checkpoint it started from plus every change it appended); for the other
// key groups, the newest complete checkpoint, re-read at most once per
// RefreshEvery. Everything is in memory: the read path of servers without
// a StateDir (tests); PebbleState keeps the same views in Pebble.
type LiveState struct {
	node         *changelog.Node
	refreshEvery time.Duration

	mu      sync.Mutex
	streams map[string]*streamView
}

type streamView struct {
	mu         sync.Mutex
	checkpoint uint64 // id the base was restored from
	loadedAt   time.Time
	base       kvState
	writers    []*writerView // open or closed writers of this node
}

// writerView is one writer's state, kept in SQN order: appends that finish
// out of order wait in pending until the gap before them is filled.
type writerView struct {
	id      string
	r       keygroup.Range
	closed  bool
	state   kvState
	lastSQN uint64
	pending map[uint64][]segments.Change
}

// NewLiveState returns the changelog-backed read path.
func NewLiveState(node *changelog.Node) *LiveState {
	return &LiveState{node: node, refreshEvery: time.Second, streams: map[string]*streamView{}}
}

func (l *LiveState) view(name string) *streamView {
	l.mu.Lock()
	defer l.mu.Unlock()
	v, ok := l.streams[name]
	if !ok {
		v = &streamView{}
		l.streams[name] = v
	}
	return v
}

// Forget drops a deleted stream's views.
func (l *LiveState) Forget(stream string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.streams, stream)
}

// WriterOpened builds the view of a writer just opened (or resumed): the
// state of its starting checkpoint plus what it has appended so far. Views
// of older writers of overlapping key groups are dropped.
func (l *LiveState) WriterOpened(ctx context.Context, w *changelog.Writer) error {
	r := w.KeyGroups()
	stream := streamOf(w.LogID())
	st := kvState{}
	if from := w.FromCheckpoint(); from != 0 {
		for c, err := range l.node.RestoreChanges(ctx, stream, from, r) {
			if err != nil {
				return err
			}
			st.apply(&c)
		}
	}
	last := w.LastSQN()
	if last > 0 {
		for c, err := range w.Replay(ctx, 0, last, r) {
			if err != nil {
				return err
			}
			st.apply(&c)
		}
	}
	v := l.view(stream)
	v.mu.Lock()
	defer v.mu.Unlock()
	kept := v.writers[:0]
	for _, o := range v.writers {
		if !o.r.Overlaps(r) {
			kept = append(kept, o)
		}
	}
	v.writers = append(kept, &writerView{id: w.LogID(), r: r, state: st, lastSQN: last, pending: map[uint64][]segments.Change{}})
	return nil
}

// Appended applies an acknowledged batch (SQNs first..) to its writer's view.
func (l *LiveState) Appended(stream, writerID string, first uint64, batch []changelog.Change) {
	v := l.view(stream)
	v.mu.Lock()
	defer v.mu.Unlock()
	i := slices.IndexFunc(v.writers, func(o *writerView) bool { return o.id == writerID })
	if i < 0 {
		return // replaced by a newer writer meanwhile
	}
	wv := v.writers[i]
	changes := make([]segments.Change, len(batch))
	for j, c := range batch {
		changes[j] = segments.Change{SQN: first + uint64(j), KeyGroup: c.KeyGroup, State: c.State, Op: c.Op, Key: bytes.Clone(c.Key), Value: bytes.Clone(c.Value)}
	}
	wv.pending[first] = changes
	for {
		next, ok := wv.pending[wv.lastSQN+1]
		if !ok {
			return
		}
		delete(wv.pending, wv.lastSQN+1)
		for j := range next {
			wv.state.apply(&next[j])
		}
		wv.lastSQN += uint64(len(next))
	}
}

// WriterClosed keeps a closed writer's view for its key groups until a new
// writer opens them (the newest checkpoint may predate the close).
func (l *LiveState) WriterClosed(stream, writerID string) {
	v := l.view(stream)
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, o := range v.writers {
		if o.id == writerID {
			o.closed = true
		}
	}
}

// WriterFenced drops a fenced writer's view: its changes after the
// checkpoint the new writer started from are not the stream's state.
func (l *LiveState) WriterFenced(stream, writerID string) {
	v := l.view(stream)
	v.mu.Lock()
	defer v.mu.Unlock()
	v.writers = slices.DeleteFunc(v.writers, func(o *writerView) bool { return o.id == writerID })
}

// refreshBase reloads the newest complete checkpoint if it changed; the
// caller holds v.mu.
func (l *LiveState) refreshBase(ctx context.Context, stream string, v *streamView) error {
	if time.Since(v.loadedAt) < l.refreshEvery && v.base != nil {
		return nil
	}
	cps, err := l.node.Checkpoints(ctx, stream)
	if err != nil {
		return err
	}
	v.loadedAt = time.Now()
	latest := uint64(0)
	if len(cps) > 0 {
		latest = cps[len(cps)-1].ID
	}
	if latest == v.checkpoint && v.base != nil {
		return nil
	}
	base := kvState{}
	if latest != 0 {
		cfg, err := l.node.Stream(ctx, stream)
		if err != nil {
			return err
		}
		for c, err := range l.node.RestoreChanges(ctx, stream, latest, keygroup.Full(cfg.KeyGroups)) {
			if err != nil {
				return err
			}
			base.apply(&c)
		}
	}
	v.base, v.checkpoint = base, latest
	return nil
}

// source returns the view that serves key group kg; the caller holds v.mu.
func (v *streamView) source(kg uint16) kvState {
	for _, w := range v.writers {
		if w.r.Contains(kg) {
			return w.state
		}
	}
	return v.base
}

// Get implements StateReader.
func (l *LiveState) Get(ctx context.Context, stream string, kg uint16, state string, key []byte) ([]byte, bool, error) {
	if _, err := l.node.Stream(ctx, stream); err != nil {
		return nil, false, err
	}
	v := l.view(stream)
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := l.refreshBase(ctx, stream, v); err != nil {
		return nil, false, err
	}
	val, ok := v.source(kg)[entryKey{kg: kg, state: state, key: string(key)}]
	return bytes.Clone(val), ok, nil
}

// Scan implements StateReader. It sorts the matching keys of the views on
// every call: fine for the interim in-memory read path.
func (l *LiveState) Scan(ctx context.Context, q ScanQuery) ([]Entry, bool, error) {
	if _, err := l.node.Stream(ctx, q.Stream); err != nil {
		return nil, false, err
	}
	v := l.view(q.Stream)
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := l.refreshBase(ctx, q.Stream, v); err != nil {
		return nil, false, err
	}
	var out []Entry
	collect := func(s kvState, owns func(uint16) bool) {
		for k, val := range s {
			if !q.KeyGroups.Contains(k.kg) || !owns(k.kg) || (q.State != "" && k.state != q.State) || !bytes.HasPrefix([]byte(k.key), q.Prefix) {
				continue
			}
			e := Entry{KeyGroup: k.kg, State: k.state, Key: []byte(k.key), Value: val}
			if q.After != nil && compareEntries(&e, q.After) <= 0 {
				continue
			}
			out = append(out, e)
		}
	}
	for _, w := range v.writers {
		collect(w.state, func(kg uint16) bool { return v.ownerIs(kg, w) })
	}
	collect(v.base, func(kg uint16) bool { return v.ownerIs(kg, nil) })
	slices.SortFunc(out, func(a, b Entry) int { return compareEntries(&a, &b) })
	more := len(out) > q.Limit
	if more {
		out = out[:q.Limit]
	}
	for i := range out {
		out[i].Value = bytes.Clone(out[i].Value)
	}
	return out, more, nil
}

// ownerIs reports whether w (nil: the checkpoint base) serves kg.
func (v *streamView) ownerIs(kg uint16, w *writerView) bool {
	for _, o := range v.writers {
		if o.r.Contains(kg) {
			return o == w
		}
	}
	return w == nil
}

// streamOf extracts the stream from a writer id ("<stream>/<epoch>.<incarnation
// prefix>", see changelog.ParseLogID): everything before the last '/'.
func streamOf(writerID string) string {
	for i := len(writerID) - 1; i >= 0; i-- {
		if writerID[i] == '/' {
			return writerID[:i]
		}
	}
	return writerID
}
