package segments

import (
	"fmt"
	"io"
	"slices"
)

// WriterOptions configure a Writer. The zero value is ready to use.
type WriterOptions struct {
	// Codec compresses block payloads; CodecDefault means CodecZstd.
	Codec Codec
	// BlockSize is the raw payload size at which a block is cut;
	// 0 means DefaultBlockSize. It is capped at MaxBlockRawSize.
	BlockSize int
}

// Writer streams one segment object to an io.Writer. Memory is bounded by
// one block (raw and compressed) plus the index entries. Changes must be
// added grouped by log: a change of another log, or a full block, cuts the
// current block and writes it out. A Writer is not safe for concurrent use.
type Writer struct {
	w      io.Writer
	codec  Codec
	target int
	err    error // sticky: an I/O error or Close ends the writer
	off    uint64

	// Current log. curLast is the last SQN added for it, in any block.
	curLog  string
	curLast uint64
	lastSQN map[string]uint64 // other logs already in this segment

	// Current block.
	count      uint64
	first      uint64
	raw        []byte
	kgs        kgSet
	states     []string
	stateIdx   map[string]int
	stateBytes int
	prevKG     uint16
	prevState  int
	prevTS     int64

	blocks  []BlockInfo
	changes uint64
	hdr     []byte
	stored  []byte
}

// NewWriter returns a Writer that writes a segment to w.
func NewWriter(w io.Writer, opts WriterOptions) *Writer {
	codec := opts.Codec
	if codec == CodecDefault {
		codec = CodecZstd
	}
	target := opts.BlockSize
	if target <= 0 {
		target = DefaultBlockSize
	}
	wr := &Writer{
		w:        w,
		codec:    codec,
		target:   min(target, MaxBlockRawSize),
		lastSQN:  make(map[string]uint64),
		stateIdx: make(map[string]int),
	}
	if codec != CodecNone && codec != CodecZstd && codec != CodecS2 {
		wr.err = fmt.Errorf("segments: unknown codec %d", codec)
	}
	wr.kgs.reset()
	return wr
}

// Reset discards any state and makes w write a new segment to dst with the
// same options, keeping its buffers: an uploader that writes one segment
// per interval reuses one Writer. The Summary of the previous segment stays
// valid.
func (w *Writer) Reset(dst io.Writer) {
	w.w, w.err, w.off = dst, nil, 0
	if w.codec != CodecNone && w.codec != CodecZstd && w.codec != CodecS2 {
		w.err = fmt.Errorf("segments: unknown codec %d", w.codec)
	}
	w.curLog, w.curLast = "", 0
	clear(w.lastSQN)
	w.count, w.raw = 0, w.raw[:0]
	w.kgs.reset()
	w.states = w.states[:0]
	clear(w.stateIdx)
	w.stateBytes = 0
	w.blocks, w.changes = nil, 0 // the old slice belongs to the old Summary
}

// maxChangeOverhead bounds the encoded size of a change beyond its key and
// value: tag, SQN delta, key group, state index, timestamp, two lengths.
const maxChangeOverhead = 1 + 6*maxVarintLen

// Add appends one change. Invalid changes are rejected with an error
// wrapping ErrInvalidChange and leave the writer usable; I/O errors are
// sticky. Add does not retain c.Key or c.Value after it returns.
func (w *Writer) Add(c Change) error {
	if w.err != nil {
		return w.err
	}
	sameLog := c.LogID == w.curLog && w.curLog != ""
	prev := w.curLast
	if !sameLog {
		if len(c.LogID) == 0 || len(c.LogID) > MaxLogIDLen {
			return invalidf("log id length %d not in 1..%d", len(c.LogID), MaxLogIDLen)
		}
		prev = w.lastSQN[c.LogID]
	}
	switch {
	case c.SQN <= prev:
		return invalidf("log %q: SQN %d not above previous %d", c.LogID, c.SQN, prev)
	case c.KeyGroup > MaxKeyGroup:
		return invalidf("log %q SQN %d: key group %d above %d", c.LogID, c.SQN, c.KeyGroup, MaxKeyGroup)
	case !c.Op.valid():
		return invalidf("log %q SQN %d: unknown op %d", c.LogID, c.SQN, c.Op)
	case len(c.State) > MaxStateLen:
		return invalidf("log %q SQN %d: state name length %d above %d", c.LogID, c.SQN, len(c.State), MaxStateLen)
	}
	need := maxChangeOverhead + len(c.Key) + len(c.Value)
	if need > MaxBlockRawSize {
		return invalidf("log %q SQN %d: change of %d bytes exceeds the block limit %d", c.LogID, c.SQN, need, MaxBlockRawSize)
	}

	// Cut the block if this change cannot join it.
	if w.count > 0 && (!sameLog || len(w.raw)+w.stateBytes >= w.target || len(w.raw)+need > MaxBlockRawSize) {
		if err := w.flush(); err != nil {
			return err
		}
	}
	if !sameLog {
		if w.curLog != "" {
			w.lastSQN[w.curLog] = w.curLast
		}
		w.curLog = c.LogID
	}

	// State index: the common case is the same state as the previous change.
	st := -1
	if w.count > 0 && c.State == w.states[w.prevState] {
		st = w.prevState
	} else if i, ok := w.stateIdx[c.State]; ok {
		st = i
	} else {
		if len(w.states) == maxStatesPerBlock {
			if err := w.flush(); err != nil {
				return err
			}
		}
		st = len(w.states)
		w.states = append(w.states, c.State)
		w.stateIdx[c.State] = st
		w.stateBytes += len(c.State) + 2
	}

	// Encode: grow once, then write every field in place.
	raw := slices.Grow(w.raw, need)
	b := raw[:cap(raw)]
	i := len(raw)
	tagAt := i
	i++
	tag := byte(c.Op)
	if w.count == 0 {
		w.first = c.SQN
		w.prevTS = 0
		tag |= tagSQNNext
	} else if c.SQN == w.curLast+1 {
		tag |= tagSQNNext
	} else {
		i = putUvarint(b, i, c.SQN-w.curLast)
	}
	if w.count > 0 && c.KeyGroup == w.prevKG {
		tag |= tagSameKG
	} else {
		i = putUvarint(b, i, uint64(c.KeyGroup))
		w.kgs.add(c.KeyGroup)
		w.prevKG = c.KeyGroup
	}
	if w.count > 0 && st == w.prevState {
		tag |= tagSameState
	} else {
		i = putUvarint(b, i, uint64(st))
		w.prevState = st
	}
	d := c.TimestampMs - w.prevTS // wraps; the reader wraps back
	i = putUvarint(b, i, uint64(d<<1)^uint64(d>>63))
	w.prevTS = c.TimestampMs
	i = putUvarint(b, i, uint64(len(c.Key)))
	i += copy(b[i:], c.Key)
	if len(c.Value) > 0 {
		tag |= tagHasValue
		i = putUvarint(b, i, uint64(len(c.Value)))
		i += copy(b[i:], c.Value)
	}
	b[tagAt] = tag
	w.raw = b[:i]
	w.count++
	w.curLast = c.SQN
	return nil
}

// flush compresses and writes the current block.
func (w *Writer) flush() error {
	if w.count == 0 {
		return nil
	}
	if uint64(len(w.blocks)) >= 1<<32-1 {
		w.err = fmt.Errorf("segments: too many blocks in one segment")
		return w.err
	}
	codec, stored := CodecNone, w.raw
	if w.codec != CodecNone {
		var ok bool
		if w.stored, ok = compress(w.codec, w.stored[:0], w.raw); ok {
			codec, stored = w.codec, w.stored
		}
	}
	h := blockHeader{
		info: BlockInfo{
			LogID:     w.curLog,
			FirstSQN:  w.first,
			LastSQN:   w.curLast,
			Count:     w.count,
			KeyGroups: w.kgs.appendRuns(nil), // retained by the index
			Offset:    w.off,
		},
		codec:      codec,
		rawLen:     uint64(len(w.raw)),
		storedLen:  uint64(len(stored)),
		payloadCRC: crc(stored),
	}
	w.hdr = appendBlockHeader(w.hdr[:0], &h, w.states)
	if err := w.write(w.hdr); err != nil {
		return err
	}
	if err := w.write(stored); err != nil {
		return err
	}
	h.info.Length = uint64(len(w.hdr) + len(stored))
	w.blocks = append(w.blocks, h.info)
	w.off += h.info.Length
	w.changes += w.count

	w.count = 0
	w.raw = w.raw[:0]
	w.kgs.reset()
	w.states = w.states[:0]
	clear(w.stateIdx)
	w.stateBytes = 0
	return nil
}

func (w *Writer) write(b []byte) error {
	if _, err := w.w.Write(b); err != nil {
		w.err = fmt.Errorf("segments: write: %w", err)
		return w.err
	}
	return nil
}

// Close writes the last block, the index and the trailer. It does not close
// the underlying io.Writer. The Summary lists exactly the index entries.
func (w *Writer) Close() (Summary, error) {
	if w.err != nil {
		return Summary{}, w.err
	}
	if err := w.flush(); err != nil {
		return Summary{}, err
	}
	index := appendIndex(w.hdr[:0], w.blocks)
	if uint64(len(index)) > 1<<32-1 {
		w.err = fmt.Errorf("segments: index of %d bytes too large", len(index))
		return Summary{}, w.err
	}
	t := trailer{
		indexOff: w.off,
		indexLen: uint32(len(index)),
		indexCRC: crc(index),
		blocks:   uint32(len(w.blocks)),
		version:  Version,
	}
	index = appendTrailer(index, &t)
	if err := w.write(index); err != nil {
		return Summary{}, err
	}
	w.err = ErrClosed
	return Summary{Blocks: w.blocks, Changes: w.changes, Size: int64(w.off) + int64(len(index))}, nil
}
