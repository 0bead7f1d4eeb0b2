package segments

import (
	"errors"
	"fmt"
	"io"
	"iter"
	"sync"
)

// decodeState is the per-iteration scratch of Changes, pooled so that
// replaying many segments does not allocate per segment or per block.
type decodeState struct{ d BlockDecoder }

// maxPooledBuf keeps one giant block from pinning its buffers in the pool.
const maxPooledBuf = 4 << 20

var decodeStates = sync.Pool{New: func() any { return new(decodeState) }}

func (s *decodeState) put() {
	if cap(s.d.fetched) > maxPooledBuf || cap(s.d.raw) > maxPooledBuf {
		return
	}
	clear(s.d.changes[:cap(s.d.changes)]) // drop references into the buffers
	decodeStates.Put(s)
}

// tailRead is how much Open reads from the end of an object in its first
// read: the trailer and, usually, the whole index, in one range request.
const tailRead = 64 << 10

// Reader reads a segment object through an io.ReaderAt (a file, or ranged
// GETs on a blob store). Open verifies the trailer and index; blocks are
// fetched and verified only when iterated. A Reader is safe for concurrent
// use if its io.ReaderAt is; each iteration uses its own buffers.
type Reader struct {
	r      io.ReaderAt
	size   int64
	name   string
	blocks []BlockInfo
}

// Open reads and verifies the trailer and the index of the object named
// name (used in errors) of the given size.
func Open(r io.ReaderAt, size int64, name string) (*Reader, error) {
	if size < TrailerSize {
		return nil, objErr(name, "trailer", 0, fmt.Errorf("object of %d bytes: %w", size, ErrTruncated))
	}
	tailLen := min(size, tailRead)
	tailOff := size - tailLen
	tail := make([]byte, tailLen)
	if err := readFull(r, tail, tailOff); err != nil {
		return nil, objErr(name, "trailer", uint64(tailOff), err)
	}
	tOff := uint64(size - TrailerSize)
	t, err := decodeTrailer(tail[tailLen-TrailerSize:])
	if err != nil {
		return nil, objErr(name, "trailer", tOff, err)
	}
	if t.indexOff > tOff || uint64(t.indexLen) != tOff-t.indexOff {
		return nil, objErr(name, "trailer", tOff, corruptf("index [%d,+%d) does not end at the trailer", t.indexOff, t.indexLen))
	}
	var index []byte
	if t.indexOff >= uint64(tailOff) {
		index = tail[t.indexOff-uint64(tailOff) : tailLen-TrailerSize]
	} else {
		// Large index: one more read, sized by a length that is already
		// bounded by the object size.
		index = make([]byte, t.indexLen)
		if err := readFull(r, index, int64(t.indexOff)); err != nil {
			return nil, objErr(name, "index", t.indexOff, err)
		}
	}
	if crc(index) != t.indexCRC {
		return nil, objErr(name, "index", t.indexOff, corruptf("checksum mismatch"))
	}
	blocks, err := DecodeIndex(index, t.indexOff)
	if err != nil {
		return nil, objErr(name, "index", t.indexOff, err)
	}
	if uint64(len(blocks)) != uint64(t.blocks) {
		return nil, objErr(name, "index", t.indexOff, corruptf("%d entries, trailer says %d blocks", len(blocks), t.blocks))
	}
	return &Reader{r: r, size: size, name: name, blocks: blocks}, nil
}

// readFull reads len(b) bytes at off; a short object is ErrTruncated.
func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("read %d of %d bytes: %w", n, len(b), ErrTruncated)
	}
	return fmt.Errorf("read: %w", err)
}

// Name returns the object name given to Open.
func (r *Reader) Name() string { return r.name }

// Size returns the object size given to Open.
func (r *Reader) Size() int64 { return r.size }

// Blocks returns the index entries, in object order. Callers must not
// modify them.
func (r *Reader) Blocks() []BlockInfo { return r.blocks }

// ReadBlock fetches (one ReadAt), verifies and decodes block i (an index
// into Blocks) using d's buffers. The changes are valid until d's next use.
func (r *Reader) ReadBlock(i int, d *BlockDecoder) ([]Change, error) {
	b := &r.blocks[i]
	// The length is bounded by the object size (the index tiles it).
	d.fetched = growTo(d.fetched[:0], int(b.Length))
	if err := readFull(r.r, d.fetched, int64(b.Offset)); err != nil {
		return nil, objErr(r.name, "block", b.Offset, err)
	}
	info, cs, err := d.Decode(d.fetched)
	if err != nil {
		return nil, objErr(r.name, "block", b.Offset, err)
	}
	// Every header field must equal the index entry (both are checksummed
	// separately; a mismatch means one of them is wrong).
	if info.LogID != b.LogID || info.FirstSQN != b.FirstSQN || info.LastSQN != b.LastSQN ||
		info.Count != b.Count || info.Length != b.Length || !equalRuns(info.KeyGroups, b.KeyGroups) {
		return nil, objErr(r.name, "block", b.Offset, corruptf("block header does not match index entry %d", i))
	}
	return cs, nil
}

// Changes yields the changes selected by q: it reads only the blocks whose
// log, SQN range and key-group runs intersect q, and yields each log's
// changes in SQN order (logs in object order when q.LogID is ""). Each
// block is verified completely before any of its changes is yielded.
//
// The yielded Key and Value alias an internal buffer valid only until the
// next iteration step (and never after the loop ends); use Change.Clone to
// keep them. After an error is
// yielded the sequence ends.
func (r *Reader) Changes(q Query) iter.Seq2[Change, error] {
	return func(yield func(Change, error) bool) {
		if lo, hi := q.kgRange(); lo > hi || hi > MaxKeyGroup {
			yield(Change{}, fmt.Errorf("segment %s: key groups [%d,%d]: %w", r.name, q.KeyGroupLo, q.KeyGroupHi, ErrInvalidQuery))
			return
		}
		st := decodeStates.Get().(*decodeState)
		defer st.put()
		for i := range r.blocks {
			b := &r.blocks[i]
			if !q.matchesBlock(b) {
				continue
			}
			cs, err := r.ReadBlock(i, &st.d)
			if err != nil {
				yield(Change{}, err)
				return
			}
			if q.coversBlock(b) { // common for full replays: skip per-change filtering
				for j := range cs {
					if !yield(cs[j], nil) {
						return
					}
				}
				continue
			}
			for j := range cs {
				if q.matches(&cs[j]) && !yield(cs[j], nil) {
					return
				}
			}
		}
	}
}

// All yields every change of the segment in object order (for tools such as
// `dstl segment cat`), with the same aliasing rules as Changes.
func (r *Reader) All() iter.Seq2[Change, error] { return r.Changes(Query{}) }
