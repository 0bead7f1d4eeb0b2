package locallog

import (
	"slices"
	"sort"

	"github.com/dstl-dev/dstl/segments"
)

// state is what the records of the local log say, folded in order. The same
// fold runs in recovery (over the records on disk) and in the committer
// (over each record once it is durable), so the committer's view of which
// files are obsolete is exactly what a recovery would conclude.
//
// Fold rules, per record: the entries in order, then the changes.
//   - meta: the log's metadata is replaced.
//   - uploaded: the log's mark rises (never falls); changes ≤ it are dropped.
//   - forget: the log, and its share of every file, is dropped.
//   - snapshot: the complete set of live logs. A log it does not list was
//     forgotten before it was written, so it is dropped like a forget; the
//     listed ones take its metadata and raise their marks.
type state struct {
	logs  map[string]*logState
	files []*fileState // oldest first; the last is the active (or last read) file

	keepChanges bool   // recovery: collect the changes
	arena       []byte // recovery: backing store for recovered keys and values
}

type logState struct {
	meta     []byte
	uploaded uint64
	// last is the highest SQN ever seen for the log (written, recovered or
	// marked uploaded): the committer skips re-appended changes at or below
	// it, and recovery treats them as duplicates.
	last    uint64
	changes []segments.Change // recovery only: SQN > uploaded, increasing
}

// fileState is one WAL file and, for deletion, the highest SQN per log it
// holds. A file is obsolete once every log in maxSQN is uploaded up to that
// SQN; forgotten logs are removed from the map.
type fileState struct {
	num    uint64
	path   string
	size   int64
	maxSQN map[string]uint64
}

func newState(keepChanges bool) *state {
	return &state{logs: make(map[string]*logState), keepChanges: keepChanges}
}

func (s *state) log(id string) *logState {
	l := s.logs[id]
	if l == nil {
		l = &logState{}
		s.logs[id] = l
	}
	return l
}

func (s *state) forget(id string) {
	delete(s.logs, id)
	for _, f := range s.files {
		delete(f.maxSQN, id)
	}
}

func (l *logState) markUploaded(sqn uint64) {
	if sqn <= l.uploaded {
		return
	}
	l.uploaded = sqn
	l.last = max(l.last, sqn)
	// Changes are in SQN order: drop the uploaded prefix.
	i := sort.Search(len(l.changes), func(i int) bool { return l.changes[i].SQN > sqn })
	l.changes = l.changes[i:]
}

// applyEntry folds one entry. It reports whether the entry may have made a
// file obsolete.
func (s *state) applyEntry(e *entry) (obsoletes bool) {
	switch e.kind {
	case entryMeta:
		s.log(e.logID).meta = cloneMeta(e.meta)
	case entryUploaded:
		s.log(e.logID).markUploaded(e.sqn)
		return true
	case entryForget:
		s.forget(e.logID)
		return true
	case entrySnapshot:
		listed := make(map[string]struct{}, len(e.logs))
		for i := range e.logs {
			listed[e.logs[i].logID] = struct{}{}
		}
		for id := range s.logs {
			if _, ok := listed[id]; !ok {
				s.forget(id)
			}
		}
		for i := range e.logs {
			l := s.log(e.logs[i].logID)
			l.meta = cloneMeta(e.logs[i].meta)
			l.markUploaded(e.logs[i].uploaded)
		}
		return true
	}
	return false
}

// noteWritten records that the active file holds changes of log id up to
// last (the committer's side of addChange).
func (s *state) noteWritten(id string, last uint64) {
	l := s.log(id)
	l.last = max(l.last, last)
	f := s.files[len(s.files)-1]
	f.maxSQN[id] = max(f.maxSQN[id], last)
}

// addChange folds one recovered change of the last file in s.files. The
// first copy of an SQN wins; an SQN at or below one already seen that is
// neither uploaded nor a copy means the log went backwards: corruption.
func (s *state) addChange(c *segments.Change) error {
	l := s.log(c.LogID)
	f := s.files[len(s.files)-1]
	f.maxSQN[c.LogID] = max(f.maxSQN[c.LogID], c.SQN)
	if c.SQN <= l.uploaded {
		return nil
	}
	if c.SQN <= l.last {
		if _, found := slices.BinarySearchFunc(l.changes, c.SQN, func(x segments.Change, sqn uint64) int {
			switch {
			case x.SQN < sqn:
				return -1
			case x.SQN > sqn:
				return 1
			}
			return 0
		}); found {
			return nil
		}
		return corruptf("log %q: SQN %d after SQN %d and not a copy of an earlier change", c.LogID, c.SQN, l.last)
	}
	l.last = c.SQN
	if s.keepChanges {
		l.changes = append(l.changes, s.clone(c))
	}
	return nil
}

// arenaChunk: recovered keys and values are copied into chunks of this size
// (larger ones get their own allocation), one allocation per chunk rather
// than per change.
const arenaChunk = 1 << 20

func (s *state) clone(c *segments.Change) segments.Change {
	out := *c
	n := len(c.Key) + len(c.Value)
	if n == 0 {
		out.Key, out.Value = nil, nil
		return out
	}
	if n > arenaChunk/8 {
		return c.Clone()
	}
	if cap(s.arena)-len(s.arena) < n {
		s.arena = make([]byte, 0, arenaChunk)
	}
	start := len(s.arena)
	s.arena = append(s.arena, c.Key...)
	s.arena = append(s.arena, c.Value...)
	out.Key, out.Value = nil, nil
	if len(c.Key) > 0 {
		out.Key = s.arena[start : start+len(c.Key) : start+len(c.Key)]
	}
	if len(c.Value) > 0 {
		v := start + len(c.Key)
		out.Value = s.arena[v : v+len(c.Value) : v+len(c.Value)]
	}
	return out
}

// obsolete reports whether every change in f is uploaded or forgotten.
func (s *state) obsolete(f *fileState) bool {
	for id, max := range f.maxSQN {
		if l := s.logs[id]; l != nil && l.uploaded < max {
			return false
		}
	}
	return true
}

// snapshot returns the entry that lists every live log.
func (s *state) snapshot() entry {
	e := entry{kind: entrySnapshot, logs: make([]snapLog, 0, len(s.logs))}
	for id, l := range s.logs {
		e.logs = append(e.logs, snapLog{logID: id, uploaded: l.uploaded, meta: l.meta})
	}
	// Deterministic bytes for the same state (tests, debugging).
	slices.SortFunc(e.logs, func(a, b snapLog) int {
		switch {
		case a.logID < b.logID:
			return -1
		case a.logID > b.logID:
			return 1
		}
		return 0
	})
	return e
}

func cloneMeta(m []byte) []byte {
	if len(m) == 0 {
		return nil
	}
	return slices.Clone(m)
}
