package dstl

import (
	"bytes"
	"context"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// maxReadsPerAppend is the node's bound on the reads one Append carries
// (server.MaxReadsPerAppend); more wait for the next batch, or read alone.
const maxReadsPerAppend = 64

// readAfter is a Writer read that must flush buffered changes first: it
// travels with the batch that flushes them (AppendRequest.reads), so a
// remote read costs one round trip instead of an Append and a Get.
type readAfter struct {
	req    *dstlv1.ReadAfterAppend
	target uint64 // served by the batch after which sent >= target
	done   chan readAnswer
}

// readAnswer is a readAfter's outcome. Not served (served false, err nil):
// the changes were flushed, but the read must be made with Get.
type readAnswer struct {
	value  []byte
	found  bool
	served bool
	err    error
}

// readWithFlush flushes every change added so far and reads key with the
// batch that does it.
func (w *Writer) readWithFlush(ctx context.Context, state string, key []byte, kg int) (readAnswer, error) {
	r := &readAfter{
		req:  &dstlv1.ReadAfterAppend{State: state, Key: bytes.Clone(key), KeyGroup: uint32(kg)},
		done: make(chan readAnswer, 1),
	}
	w.mu.Lock()
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return readAnswer{}, err
	}
	r.target = w.added
	if w.sent >= r.target {
		w.mu.Unlock()
		return readAnswer{}, nil // flushed meanwhile: read alone
	}
	w.reads = append(w.reads, r)
	w.flushTo = max(w.flushTo, r.target)
	w.mu.Unlock()
	w.wake()
	select {
	case a := <-r.done:
		return a, a.err
	case <-ctx.Done():
		return readAnswer{}, ctx.Err()
	}
}

// takeReadsLocked removes the reads a batch after which sent = upTo
// serves (at most maxReadsPerAppend); the caller holds w.mu.
func (w *Writer) takeReadsLocked(upTo uint64) []*readAfter {
	var out []*readAfter
	keep := w.reads[:0]
	for _, r := range w.reads {
		if r.target <= upTo && len(out) < maxReadsPerAppend {
			out = append(out, r)
		} else {
			keep = append(keep, r)
		}
	}
	clear(w.reads[len(keep):])
	w.reads = keep
	return out
}

// settleReadsLocked answers "not served" to the reads whose changes are
// all acknowledged without them (a batch in flight when they were added
// covered them): no batch will carry them. The caller holds w.mu.
func (w *Writer) settleReadsLocked() {
	keep := w.reads[:0]
	for _, r := range w.reads {
		if r.target <= w.sent {
			r.done <- readAnswer{}
		} else {
			keep = append(keep, r)
		}
	}
	clear(w.reads[len(keep):])
	w.reads = keep
}

// answerReads delivers a batch's answers: results (one per read, or none
// if the node did not serve them) or the batch's error.
func answerReads(reads []*readAfter, results []*dstlv1.ReadResult, err error) {
	for i, r := range reads {
		switch {
		case err != nil:
			r.done <- readAnswer{err: err}
		case len(results) == len(reads):
			r.done <- readAnswer{value: results[i].GetValue(), found: results[i].GetFound(), served: true}
		default:
			r.done <- readAnswer{}
		}
	}
}
