package segments

// Index layout (docs/formats.md, "Index"): a uvarint entry count, then per
// block: log id, first SQN, SQN span, change count, key-group runs, offset,
// length. Its CRC32C lives in the trailer.

// minIndexEntry is the smallest possible encoded entry (1-byte log id and
// one run); it bounds the entry count before anything is allocated.
const minIndexEntry = 1 + 1 + 1 + 1 + 1 + 1 + 2 + 1 + 1

func appendIndex(dst []byte, blocks []BlockInfo) []byte {
	dst = appendUvarint(dst, uint64(len(blocks)))
	for i := range blocks {
		b := &blocks[i]
		dst = appendUvarint(dst, uint64(len(b.LogID)))
		dst = append(dst, b.LogID...)
		dst = appendUvarint(dst, b.FirstSQN)
		dst = appendUvarint(dst, b.LastSQN-b.FirstSQN)
		dst = appendUvarint(dst, b.Count)
		dst = appendRunsWire(dst, b.KeyGroups)
		dst = appendUvarint(dst, b.Offset)
		dst = appendUvarint(dst, b.Length)
	}
	return dst
}

// DecodeIndex parses and validates an index whose blocks must exactly tile
// the object bytes [0, indexOffset). Errors wrap ErrCorrupt. It is exported
// for fuzzing and for tools; Open calls it after checking the index CRC.
func DecodeIndex(index []byte, indexOffset uint64) ([]BlockInfo, error) {
	r := reader{b: index}
	n := r.uvarint()
	if !r.ok() || n > uint64(r.left()/minIndexEntry) {
		return nil, corruptf("bad index entry count")
	}
	blocks := make([]BlockInfo, 0, n)
	// Log ids repeat across consecutive blocks of one log: share the string.
	var lastLog string
	var off uint64
	for i := range n {
		logID := r.lenBytes(MaxLogIDLen)
		first := r.uvarint()
		span := r.uvarint()
		count := r.uvarint()
		runs := readRuns(&r, nil)
		bOff := r.uvarint()
		bLen := r.uvarint()
		switch {
		case !r.ok():
			return nil, corruptf("index entry %d: malformed", i)
		case len(logID) == 0:
			return nil, corruptf("index entry %d: empty log id", i)
		case first == 0 || first+span < first:
			return nil, corruptf("index entry %d: bad SQN range", i)
		case count == 0 || count-1 > span:
			return nil, corruptf("index entry %d: change count %d does not fit SQN span", i, count)
		case bOff != off:
			return nil, corruptf("index entry %d: block offset %d, expected %d", i, bOff, off)
		case bLen < blockFixed || bLen > indexOffset-off:
			return nil, corruptf("index entry %d: block length %d out of range", i, bLen)
		}
		if string(logID) != lastLog {
			lastLog = string(logID)
		}
		blocks = append(blocks, BlockInfo{
			LogID: lastLog, FirstSQN: first, LastSQN: first + span, Count: count,
			KeyGroups: runs, Offset: bOff, Length: bLen,
		})
		off += bLen
	}
	if !r.done() {
		return nil, corruptf("%d trailing bytes after index", r.left())
	}
	if off != indexOffset {
		return nil, corruptf("blocks end at %d, index starts at %d", off, indexOffset)
	}
	// SQNs of one log increase across its blocks: the writer guarantees it
	// and Query relies on it to yield in SQN order.
	last := make(map[string]uint64)
	for i := range blocks {
		b := &blocks[i]
		if b.FirstSQN <= last[b.LogID] {
			return nil, corruptf("index entry %d: log %q SQNs not increasing", i, b.LogID)
		}
		last[b.LogID] = b.LastSQN
	}
	return blocks, nil
}
