package crash

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/materializer"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
)

// The materializer crash test's workload: one stream, two states.
//
//   - "main": matSize.keys keys loaded first (one put each, 100-byte values),
//     then overwritten, deleted and merged at random: the bulk that makes a
//     full export take time;
//   - "m": a few thousand small keys, mostly merged, sometimes put, deleted
//     or cleared a key group at a time.
//
// Merges (Pebble merge operands, concatenated) make a change folded twice,
// or out of order, visible in the value, not only a missing one.
const (
	matKeyGroups  = 64
	matMainState  = "main"
	matMergeState = "m"
	matValueLen   = 100
)

// matWorkload names the keys: index i < keys is main key "k%07d", index
// keys+j is merge-state key "m%05d".
type matWorkload struct {
	keys, mergeKeys int
	name            [][]byte
	kg              []uint16
	// mergeByKG lists the merge-state key indexes of each key group (for
	// clears).
	mergeByKG [matKeyGroups][]int32
}

func newMatWorkload(keys, mergeKeys int) *matWorkload {
	w := &matWorkload{keys: keys, mergeKeys: mergeKeys}
	w.name = make([][]byte, keys+mergeKeys)
	w.kg = make([]uint16, keys+mergeKeys)
	for i := range w.name {
		var k string
		if i < keys {
			k = fmt.Sprintf("k%07d", i)
		} else {
			k = fmt.Sprintf("m%05d", i-keys)
		}
		w.name[i] = []byte(k)
		w.kg[i] = keygroup.OfString(k, matKeyGroups)
		if i >= keys {
			w.mergeByKG[w.kg[i]] = append(w.mergeByKG[w.kg[i]], int32(i))
		}
	}
	return w
}

func (w *matWorkload) state(i int) string {
	if i < w.keys {
		return matMainState
	}
	return matMergeState
}

// index parses a key of state st back into its index (-1: not a key of
// the workload).
func (w *matWorkload) index(st string, key []byte) int {
	var prefix byte = 'k'
	lo, n := 0, w.keys
	if st == matMergeState {
		prefix, lo, n = 'm', w.keys, w.mergeKeys
	}
	if len(key) < 2 || key[0] != prefix {
		return -1
	}
	v := 0
	for _, c := range key[1:] {
		if c < '0' || c > '9' {
			return -1
		}
		v = v*10 + int(c-'0')
	}
	if v >= n || string(w.name[lo+v]) != string(key) {
		return -1
	}
	return lo + v
}

// putValue is the value a put of key i with SQN sqn writes: 100 bytes for
// the main state (its SQN, then filler that compresses about as well as
// real data), a short one for the merge state.
func (w *matWorkload) putValue(buf []byte, i int, sqn uint32) []byte {
	if i >= w.keys {
		buf = append(buf, 'p')
		buf = strconv.AppendUint(buf, uint64(sqn), 10)
		return append(buf, ';')
	}
	start := len(buf)
	buf = strconv.AppendUint(buf, uint64(i), 10)
	buf = append(buf, '@')
	buf = strconv.AppendUint(buf, uint64(sqn), 10)
	buf = append(buf, ':')
	x := uint64(sqn)*0x9e3779b97f4a7c15 ^ uint64(i)
	for len(buf)-start < matValueLen {
		// splitmix64: 12 letters of 5 bits from each step.
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		z ^= z >> 31
		for k := 0; k < 12 && len(buf)-start < matValueLen; k++ {
			buf = append(buf, "abcdefghijklmnopqrstuvwxyz012345"[z&31])
			z >>= 5
		}
	}
	return buf
}

func mergeOperand(buf []byte, sqn uint32) []byte {
	buf = append(buf, '+')
	buf = strconv.AppendUint(buf, uint64(sqn), 10)
	return append(buf, ';')
}

// matOp is one generated change: op on key index i (for a clear: of key
// group kg of the merge state).
type matOp struct {
	op changelog.Op
	i  int32
	kg uint16
}

// churn returns n random changes (and at most one clear).
func (w *matWorkload) churn(rng *rand.Rand, n int) []matOp {
	ops := make([]matOp, 0, n)
	for range n {
		main := int32(rng.IntN(w.keys))
		merge := int32(w.keys + rng.IntN(w.mergeKeys))
		var o matOp
		switch x := rng.IntN(100); {
		case x < 55:
			o = matOp{op: changelog.OpPut, i: main}
		case x < 65:
			o = matOp{op: changelog.OpDelete, i: main}
		case x < 75:
			o = matOp{op: changelog.OpMerge, i: main}
		case x < 92:
			o = matOp{op: changelog.OpMerge, i: merge}
		case x < 98:
			o = matOp{op: changelog.OpPut, i: merge}
		default:
			o = matOp{op: changelog.OpDelete, i: merge}
		}
		o.kg = w.kg[o.i]
		ops = append(ops, o)
	}
	if rng.IntN(2) == 0 {
		// One clear of a key group of the merge state, somewhere inside.
		kg := uint16(rng.IntN(matKeyGroups))
		at := rng.IntN(len(ops) + 1)
		ops = slices.Insert(ops, at, matOp{op: changelog.OpClear, i: -1, kg: kg})
	}
	return ops
}

// changes turns ops into changes, given the SQN the first will get.
func (w *matWorkload) changes(ops []matOp, first uint64) []changelog.Change {
	out := make([]changelog.Change, len(ops))
	for j, o := range ops {
		sqn := uint32(first) + uint32(j)
		c := changelog.Change{KeyGroup: o.kg, Op: o.op}
		if o.op == changelog.OpClear {
			c.State = matMergeState
		} else {
			c.State, c.Key = w.state(int(o.i)), w.name[o.i]
		}
		switch o.op {
		case changelog.OpPut:
			c.Value = w.putValue(nil, int(o.i), sqn)
		case changelog.OpMerge:
			c.Value = mergeOperand(nil, sqn)
		}
		out[j] = c
	}
	return out
}

// matModel is the expected state: per key index the SQN of its last put
// (0: none since it was deleted, or ever) and the SQNs of the merges after
// that put (or delete).
type matModel struct {
	w      *matWorkload
	sqn    uint64 // the last SQN folded in
	put    []uint32
	merges map[int32][]uint32
}

func newMatModel(w *matWorkload) *matModel {
	return &matModel{w: w, put: make([]uint32, w.keys+w.mergeKeys), merges: map[int32][]uint32{}}
}

func (m *matModel) apply(ops []matOp, first uint64) {
	for j, o := range ops {
		sqn := uint32(first) + uint32(j)
		switch o.op {
		case changelog.OpPut:
			m.put[o.i] = sqn
			delete(m.merges, o.i)
		case changelog.OpDelete:
			m.put[o.i] = 0
			delete(m.merges, o.i)
		case changelog.OpMerge:
			m.merges[o.i] = append(m.merges[o.i], sqn)
		case changelog.OpClear:
			for _, i := range m.w.mergeByKG[o.kg] {
				m.put[i] = 0
				delete(m.merges, i)
			}
		}
	}
	m.sqn = first + uint64(len(ops)) - 1
}

// clone is the model frozen at a checkpoint. The merge slices are shared:
// the live model only ever appends past a clone's length or replaces a
// slice, so a clone's view never changes.
func (m *matModel) clone() *matModel {
	return &matModel{w: m.w, sqn: m.sqn, put: slices.Clone(m.put), merges: maps.Clone(m.merges)}
}

func (m *matModel) present(i int32) bool {
	return m.put[i] != 0 || len(m.merges[i]) > 0
}

func (m *matModel) value(buf []byte, i int32) []byte {
	if m.put[i] != 0 {
		buf = m.w.putValue(buf, int(i), m.put[i])
	}
	for _, s := range m.merges[i] {
		buf = mergeOperand(buf, s)
	}
	return buf
}

// compare checks that the store holds exactly the model's state of the
// stream: every key it should, with its value, and nothing else. It
// returns a description of at most a few differences, or "".
func (m *matModel) compare(ctx context.Context, st *materializer.Store, stream string) (string, error) {
	var diffs []string
	ndiff := 0
	note := func(format string, args ...any) {
		ndiff++
		if len(diffs) < 6 {
			diffs = append(diffs, fmt.Sprintf(format, args...))
		}
	}
	seen := make([]bool, len(m.put))
	var buf []byte
	for _, name := range []string{matMainState, matMergeState} {
		for e, err := range st.Scan(ctx, stream, keygroup.Full(matKeyGroups), name, materializer.ScanOptions{}) {
			if err != nil {
				return "", err
			}
			i := m.w.index(name, e.Key)
			if i < 0 {
				note("unexpected key %s/%q (kg %d)", name, e.Key, e.KeyGroup)
				continue
			}
			seen[i] = true
			if e.KeyGroup != m.w.kg[i] {
				note("key %s/%s in key group %d, want %d", name, e.Key, e.KeyGroup, m.w.kg[i])
			}
			if !m.present(int32(i)) {
				note("key %s/%s = %.40q… exists, want absent (deleted or cleared)", name, e.Key, e.Value)
				continue
			}
			buf = m.value(buf[:0], int32(i))
			if string(e.Value) != string(buf) {
				note("key %s/%s = %q, want %q (last put SQN %d, merges %v)", name, e.Key, e.Value, buf, m.put[i], m.merges[int32(i)])
			}
		}
	}
	for i := range m.put {
		if !seen[i] && m.present(int32(i)) {
			note("key %s/%s missing, want %q (last put SQN %d, merges %v)", m.w.state(i), m.w.name[i], m.value(nil, int32(i)), m.put[i], m.merges[int32(i)])
		}
	}
	if ndiff == 0 {
		return "", nil
	}
	return fmt.Sprintf("%d differences: %s", ndiff, strings.Join(diffs, "; ")), nil
}

// matRestore restores checkpoint id of the stream into the empty store as
// a serving node would: the plan's snapshot (data only), then its replay
// steps, renumbered under a fresh log id.
func matRestore(ctx context.Context, node *changelog.Node, st *materializer.Store, stream string, pl changelog.RestorePlan) (replayed int, err error) {
	for _, b := range pl.Bases {
		if err := st.ImportSnapshot(ctx, node.BlobStore(), b.Snapshot, b.Ranges, materializer.ImportOptions{SkipApplied: true}); err != nil {
			return 0, fmt.Errorf("import snapshot of checkpoint %d: %w", b.Snapshot.Checkpoint, err)
		}
	}
	const chunk = 4096
	logID := fmt.Sprintf("restore-%d", pl.Checkpoint)
	batch := make([]segments.Change, 0, chunk)
	var sqn uint64
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		err := st.Apply(stream, logID, batch)
		batch = batch[:0]
		return err
	}
	for c, err := range node.ReplayPlan(ctx, pl) {
		if err != nil {
			return replayed, fmt.Errorf("replay: %w", err)
		}
		sqn++
		c = c.Clone() // the replay reuses Key and Value
		c.LogID, c.SQN = "", sqn
		batch = append(batch, c)
		replayed++
		if len(batch) == chunk {
			if err := flush(); err != nil {
				return replayed, err
			}
		}
	}
	return replayed, flush()
}

// planSignature identifies what a restore plan reads: blob objects are
// create-only and immutable, so two plans with the same signature restore
// the same state as long as their objects exist.
func planSignature(pl changelog.RestorePlan) string {
	h := sha256.New()
	fmt.Fprintf(h, "%d %v\n", pl.Checkpoint, pl.KeyGroups)
	for _, b := range pl.Bases {
		fmt.Fprintf(h, "snapshot %s %v\n", b.Snapshot.Key(), b.Ranges)
		h.Write(b.Snapshot.Manifest)
	}
	for _, s := range pl.Steps {
		fmt.Fprintf(h, "step %s %v %d %d\n", s.LogID, s.KeyGroups, s.After, s.UpTo)
		for _, seg := range s.Segments {
			fmt.Fprintf(h, " %s %d\n", seg.Key, seg.Size)
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// planObjects lists the objects a plan reads, with their sizes.
func planObjects(pl changelog.RestorePlan) (map[string]int64, error) {
	objs := map[string]int64{}
	for _, b := range pl.Bases {
		files, err := snapshotFiles(b.Snapshot)
		if err != nil {
			return nil, err
		}
		maps.Copy(objs, files)
	}
	for _, s := range pl.Steps {
		for _, seg := range s.Segments {
			objs[seg.Key] = seg.Size
		}
	}
	return objs, nil
}

// snapshotFiles returns the files a snapshot record references, with
// their sizes.
func snapshotFiles(s changelog.Snapshot) (map[string]int64, error) {
	man, err := materializer.DecodeManifest(s)
	if err != nil {
		return nil, err
	}
	files := map[string]int64{}
	for _, r := range man.Runs {
		for _, f := range r.Files {
			files[f.Name] = f.Size
		}
	}
	return files, nil
}

// checkObjects stats every object; it describes the missing or changed
// ones, or returns "".
func checkObjects(ctx context.Context, blob upload.BlobStore, objs map[string]int64) (string, error) {
	var bad []string
	for _, key := range slices.Sorted(maps.Keys(objs)) {
		info, err := blob.Stat(ctx, key)
		switch {
		case errors.Is(err, upload.ErrNotFound):
			bad = append(bad, key+" is gone")
		case err != nil:
			return "", err
		case info.Size != objs[key]:
			bad = append(bad, fmt.Sprintf("%s has %d bytes, want %d", key, info.Size, objs[key]))
		}
	}
	return strings.Join(bad, "; "), nil
}

// listKeys lists the keys under prefix.
func listKeys(ctx context.Context, blob upload.BlobStore, prefix string) (map[string]upload.ObjectInfo, error) {
	out := map[string]upload.ObjectInfo{}
	for o, err := range upload.Walk(ctx, blob, prefix, "") {
		if err != nil {
			return nil, err
		}
		out[o.Key] = o
	}
	return out, nil
}

// sortedDiff lists the keys of a not in b, sorted.
func sortedDiff[A, B any](a map[string]A, b map[string]B) []string {
	var out []string
	for k := range a {
		if _, ok := b[k]; !ok {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

func describePlan(pl changelog.RestorePlan) string {
	var b strings.Builder
	for i, base := range pl.Bases {
		if i > 0 {
			b.WriteString(" and ")
		}
		fmt.Fprintf(&b, "the snapshot of checkpoint %d for key groups %v", base.Snapshot.Checkpoint, base.Ranges)
	}
	if len(pl.Bases) == 0 {
		b.WriteString("no snapshot")
	}
	for _, s := range pl.Steps {
		fmt.Fprintf(&b, " + %s (%d, %d] in %d segments", s.LogID, s.After, s.UpTo, len(s.Segments))
	}
	return b.String()
}
