package segments

import "math/bits"

// kgSet is a bitmap of key groups. Writers use it to compute the runs of a
// block; the block decoder uses it to check that the runs in a header are
// exactly the key groups present. Reset only clears the words touched, so
// reuse per block is cheap.
type kgSet struct {
	w      [(MaxKeyGroup + 1) / 64]uint64
	lo, hi int // word range touched; lo > hi when empty
}

func (s *kgSet) reset() {
	for i := s.lo; i <= s.hi; i++ {
		s.w[i] = 0
	}
	s.lo, s.hi = len(s.w), -1
}

func (s *kgSet) add(kg uint16) {
	wi := int(kg >> 6)
	s.w[wi] |= 1 << (kg & 63)
	s.lo = min(s.lo, wi)
	s.hi = max(s.hi, wi)
}

// appendRuns appends the sorted, disjoint, non-adjacent runs of the set.
func (s *kgSet) appendRuns(dst []KeyGroupRun) []KeyGroupRun {
	first := len(dst)
	for wi := s.lo; wi <= s.hi; wi++ {
		for w := s.w[wi]; w != 0; w &= w - 1 {
			kg := uint16(wi*64 + bits.TrailingZeros64(w))
			if last := len(dst) - 1; last >= first && dst[last].Hi+1 == kg {
				dst[last].Hi = kg
			} else {
				dst = append(dst, KeyGroupRun{kg, kg})
			}
		}
	}
	return dst
}

// validRuns checks runs are non-empty, sorted, disjoint, non-adjacent and
// within 0..MaxKeyGroup.
func validRuns(runs []KeyGroupRun) bool {
	if len(runs) == 0 {
		return false
	}
	for i, r := range runs {
		if r.Lo > r.Hi || r.Hi > MaxKeyGroup {
			return false
		}
		if i > 0 && uint32(r.Lo) <= uint32(runs[i-1].Hi)+1 {
			return false
		}
	}
	return true
}

func equalRuns(a, b []KeyGroupRun) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// appendRunsWire encodes runs: count, then absolute lo and hi per run.
func appendRunsWire(dst []byte, runs []KeyGroupRun) []byte {
	dst = appendUvarint(dst, uint64(len(runs)))
	for _, r := range runs {
		dst = appendUvarint(dst, uint64(r.Lo))
		dst = appendUvarint(dst, uint64(r.Hi))
	}
	return dst
}

// readRuns decodes and validates runs, appending to dst. Each run takes at
// least 2 bytes, which bounds the count before anything is allocated.
func readRuns(r *reader, dst []KeyGroupRun) []KeyGroupRun {
	n := r.uvarint()
	if n == 0 || n > uint64(r.left()/2) || n > MaxKeyGroup+1 {
		r.fail()
		return dst
	}
	start := len(dst)
	for range n {
		lo, hi := r.uvarint(), r.uvarint()
		if lo > MaxKeyGroup || hi > MaxKeyGroup {
			r.fail()
			return dst
		}
		dst = append(dst, KeyGroupRun{uint16(lo), uint16(hi)})
	}
	if !r.ok() || !validRuns(dst[start:]) {
		r.fail()
	}
	return dst
}
