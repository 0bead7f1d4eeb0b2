package crash

import (
	"bytes"
	"fmt"
	"sort"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
)

// The workload is a pure function of (SQN, round): the parent can tell from a
// replayed change alone whether it is the one the child appended with that
// SQN, and in which run. The round is in the value so that a change lost in a
// crash and re-appended under the same SQN by a later run is told apart from
// a stale copy of the lost one coming back.
const (
	keyGroups = 16
	stateName = "s"
	numKeys   = 50
)

func changeFor(sqn uint64, round int) changelog.Change {
	key := fmt.Sprintf("k%d", sqn%numKeys)
	c := changelog.Change{
		KeyGroup: keygroup.OfString(key, keyGroups),
		State:    stateName,
		Op:       changelog.OpPut,
		Key:      []byte(key),
		Value:    fmt.Appendf(nil, "v%d.r%d", sqn, round),
	}
	switch {
	case sqn%11 == 0:
		c.Op, c.Value = changelog.OpDelete, nil
	case sqn%7 == 0:
		// Merge-style appends make the restored state sensitive to a change
		// applied twice or out of order, not only to a missing one.
		c.Op, c.Value = changelog.OpMerge, fmt.Appendf(nil, "+%d.r%d", sqn, round)
	}
	return c
}

func batchFor(first uint64, n, round int) []changelog.Change {
	b := make([]changelog.Change, n)
	for i := range b {
		b[i] = changeFor(first+uint64(i), round)
	}
	return b
}

// sameChange reports whether a replayed or restored change is the one want.
func sameChange(got segments.Change, want changelog.Change) bool {
	return got.KeyGroup == want.KeyGroup && got.State == want.State && got.Op == want.Op &&
		bytes.Equal(got.Key, want.Key) && bytes.Equal(got.Value, want.Value)
}

func describe(c segments.Change) string {
	return fmt.Sprintf("sqn=%d kg=%d op=%v key=%q value=%q", c.SQN, c.KeyGroup, c.Op, c.Key, c.Value)
}

// state is a restored key/value state, keyed "<kg>/<state>/<key>".
type state map[string]string

func (m state) apply(kg uint16, st string, op changelog.Op, key, value []byte) {
	k := fmt.Sprintf("%d/%s/%s", kg, st, key)
	switch op {
	case changelog.OpPut:
		m[k] = string(value)
	case changelog.OpDelete:
		delete(m, k)
	case changelog.OpMerge:
		m[k] += string(value)
	case changelog.OpClear:
		prefix := fmt.Sprintf("%d/%s/", kg, st)
		for key := range m {
			if len(key) >= len(prefix) && key[:len(prefix)] == prefix {
				delete(m, key)
			}
		}
	}
}

// diff describes how got differs from want (at most a few keys), or "".
func (m state) diff(want state) string {
	var out []string
	for k, v := range want {
		if g, ok := m[k]; !ok {
			out = append(out, fmt.Sprintf("missing %s=%q", k, v))
		} else if g != v {
			out = append(out, fmt.Sprintf("%s=%q, want %q", k, g, v))
		}
	}
	for k, v := range m {
		if _, ok := want[k]; !ok {
			out = append(out, fmt.Sprintf("unexpected %s=%q", k, v))
		}
	}
	if len(out) == 0 {
		return ""
	}
	sort.Strings(out)
	if len(out) > 5 {
		out = append(out[:5], fmt.Sprintf("… (%d differences)", len(out)))
	}
	return fmt.Sprint(out)
}

// history is what the parent learned from the children's acknowledgements.
type history struct {
	stream string
	epoch  uint64 // 0 until a child printed START
	// starts are the rounds whose child reached START (opened or resumed its
	// writer), with the writer's LastSQN right after recovery.
	starts []start
	// maxDurable is the highest SQN acknowledged durable (local append,
	// persist, checkpoint) and where that acknowledgement came from.
	maxDurable    uint64
	maxDurableWhy string
	// maxTried bounds every SQN that may exist: the last SQN of every append
	// a child announced before calling Append, and every recovered LastSQN.
	maxTried uint64
	// checkpoints maps each acknowledged checkpoint id to the SQN it covers.
	checkpoints map[uint64]uint64
	// truncAcked is the highest acknowledged truncation point, truncTried
	// the highest one a child asked for (acknowledged or not).
	truncAcked, truncTried uint64

	// Counters for the log.
	acks       map[string]int
	kills      int
	earlyKills int
	torn       int
	prevLines  []string // the previous run's output, for messages
}

type start struct {
	round int
	last  uint64
}

func newHistory(stream string) *history {
	return &history{stream: stream, checkpoints: map[uint64]uint64{}, acks: map[string]int{}}
}

// roundOf returns the run whose append of sqn must be the surviving one: the
// last run that started below sqn (every later run recovered sqn, so did not
// append it again).
func (h *history) roundOf(sqn uint64) int {
	r := 0
	for _, s := range h.starts {
		if s.last < sqn {
			r = s.round
		}
	}
	return r
}

// expected returns the change with SQN sqn as it must survive.
func (h *history) expected(sqn uint64) changelog.Change {
	return changeFor(sqn, h.roundOf(sqn))
}

// stateOf folds the expected changes from..upTo.
func (h *history) stateOf(from, upTo uint64) state {
	m := state{}
	for s := max(from, 1); s <= upTo; s++ {
		c := h.expected(s)
		m.apply(c.KeyGroup, c.State, c.Op, c.Key, c.Value)
	}
	return m
}

func (h *history) durable(sqn uint64, why string) {
	if sqn > h.maxDurable {
		h.maxDurable, h.maxDurableWhy = sqn, why
	}
}
