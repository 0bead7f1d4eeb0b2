package segments

import (
	"encoding/binary"
	"fmt"
)

// Block layout (docs/formats.md, "Block"):
//
//	hlen u32 · header body (hlen bytes) · header CRC32C u32 · stored payload
//
// The header CRC covers hlen and the body; the payload CRC (in the body)
// covers the stored bytes. Only then is the payload decompressed and parsed.

const (
	blockFixed   = 8       // hlen + header CRC
	maxHeaderLen = 8 << 20 // bounds the header; the writer cuts blocks long before
	// maxStatesPerBlock keeps the state table (and so the header) small.
	maxStatesPerBlock = 4096
)

// Change tag byte: the op and flags that let the common case skip fields.
const (
	tagOpMask     = 0x07
	tagSQNNext    = 0x08 // SQN = previous + 1; no SQN delta field
	tagSameKG     = 0x10 // same key group as the previous change; no field
	tagSameState  = 0x20 // same state as the previous change; no field
	tagHasValue   = 0x40 // value length + bytes follow (absent = empty value)
	tagReserved   = 0x80 // must be 0 in v1
	tagFirstFlags = tagSameKG | tagSameState
)

// blockHeader is the decoded header of one block.
type blockHeader struct {
	info       BlockInfo // Offset is left 0; Length = header + stored bytes
	codec      Codec
	rawLen     uint64
	storedLen  uint64
	payloadCRC uint32
	headerLen  int // hlen + 8
}

// appendBlockHeader appends a complete header (hlen, body, CRC).
func appendBlockHeader(dst []byte, h *blockHeader, states []string) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0) // hlen, patched below
	dst = append(dst, 0, byte(h.codec))
	dst = appendUvarint(dst, uint64(len(h.info.LogID)))
	dst = append(dst, h.info.LogID...)
	dst = appendUvarint(dst, h.info.FirstSQN)
	dst = appendUvarint(dst, h.info.LastSQN-h.info.FirstSQN)
	dst = appendUvarint(dst, h.info.Count)
	dst = appendRunsWire(dst, h.info.KeyGroups)
	dst = appendUvarint(dst, uint64(len(states)))
	for _, s := range states {
		dst = appendUvarint(dst, uint64(len(s)))
		dst = append(dst, s...)
	}
	dst = appendUvarint(dst, h.rawLen)
	dst = appendUvarint(dst, h.storedLen)
	dst = appendU32(dst, h.payloadCRC)
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(dst)-start-4))
	return appendU32(dst, crc(dst[start:]))
}

// BlockDecoder decodes blocks, reusing its buffers between calls so that
// steady-state decoding does not allocate. The zero value is ready to use;
// it is not safe for concurrent use.
type BlockDecoder struct {
	fetched  []byte // block bytes read by Reader.ReadBlock
	raw      []byte // decompressed payload
	changes  []Change
	runs     []KeyGroupRun
	seenRuns []KeyGroupRun
	states   []string // interned across blocks: the same names rarely change
	stTmp    []string
	seen     kgSet
	logID    string
	hdr      blockHeader
}

// DecodeBlock decodes one complete block (exactly its bytes: header and
// stored payload) and returns its description and changes. It is a pure
// function for fuzzing and for readers that fetched block bytes themselves;
// the changes' Key and Value alias block or a fresh buffer.
func DecodeBlock(block []byte) (BlockInfo, []Change, error) {
	var d BlockDecoder
	info, cs, err := d.Decode(block)
	info.KeyGroups = append([]KeyGroupRun(nil), info.KeyGroups...)
	return info, cs, err
}

// Decode is DecodeBlock with buffer reuse: the returned slice, the KeyGroups
// of the BlockInfo and the Key/Value bytes are valid until the next Decode.
// The whole block is verified before anything is returned, so a caller
// never sees part of a corrupt block. Errors wrap ErrCorrupt or ErrTruncated
// and give the offset within the block.
func (d *BlockDecoder) Decode(block []byte) (BlockInfo, []Change, error) {
	h := &d.hdr
	if err := d.parseHeader(block, h); err != nil {
		return BlockInfo{}, nil, err
	}
	stored := block[h.headerLen:]
	if uint64(len(stored)) < h.storedLen {
		return BlockInfo{}, nil, blockErr(h.headerLen, "payload", ErrTruncated)
	}
	if uint64(len(stored)) > h.storedLen {
		return BlockInfo{}, nil, blockErr(h.headerLen, "payload", corruptf("%d bytes after the payload", uint64(len(stored))-h.storedLen))
	}
	if crc(stored) != h.payloadCRC {
		return BlockInfo{}, nil, blockErr(h.headerLen, "payload", corruptf("checksum mismatch"))
	}
	raw := stored
	if h.codec != CodecNone {
		var err error
		if raw, err = decompress(h.codec, &d.raw, stored, int(h.rawLen)); err != nil {
			return BlockInfo{}, nil, blockErr(h.headerLen, "payload", err)
		}
	}
	cs, err := d.parseChanges(raw, h)
	if err != nil {
		return BlockInfo{}, nil, blockErr(h.headerLen, "payload", err)
	}
	return h.info, cs, nil
}

// blockErr locates an error inside a block; the Reader adds the object
// name and the block's offset in the object.
func blockErr(off int, what string, err error) error {
	return fmt.Errorf("%s at block offset %d: %w", what, off, err)
}

// parseHeader verifies the header CRC, then parses the body strictly.
func (d *BlockDecoder) parseHeader(block []byte, h *blockHeader) error {
	if len(block) < blockFixed {
		return blockErr(0, "block header", ErrTruncated)
	}
	hlen := uint64(binary.LittleEndian.Uint32(block))
	if hlen > maxHeaderLen {
		return blockErr(0, "block header", corruptf("header length %d too large", hlen))
	}
	if hlen+blockFixed > uint64(len(block)) {
		return blockErr(0, "block header", ErrTruncated)
	}
	body := block[4 : 4+hlen]
	if crc(block[:4+hlen]) != binary.LittleEndian.Uint32(block[4+hlen:]) {
		return blockErr(0, "block header", corruptf("checksum mismatch"))
	}
	r := reader{b: body}
	flags, codec := r.u8(), Codec(r.u8())
	logID := r.lenBytes(MaxLogIDLen)
	first := r.uvarint()
	span := r.uvarint()
	count := r.uvarint()
	d.runs = readRuns(&r, d.runs[:0])
	nStates := r.uvarint()
	if !r.ok() || nStates == 0 || nStates > maxStatesPerBlock || nStates > uint64(r.left()) {
		return blockErr(4, "block header", corruptf("malformed header"))
	}
	d.stTmp = d.stTmp[:0]
	for i := range int(nStates) {
		name := r.lenBytes(MaxStateLen)
		if !r.ok() {
			break
		}
		// Intern: reuse the string of the previous block when it matches.
		if i < len(d.states) && d.states[i] == string(name) {
			d.stTmp = append(d.stTmp, d.states[i])
		} else {
			d.stTmp = append(d.stTmp, string(name))
		}
	}
	d.states, d.stTmp = d.stTmp, d.states
	h.rawLen = r.uvarint()
	h.storedLen = r.uvarint()
	h.payloadCRC = r.u32()
	switch {
	case !r.done():
		return blockErr(4, "block header", corruptf("malformed header"))
	case flags != 0:
		return blockErr(4, "block header", corruptf("reserved flags %#x set", flags))
	case len(logID) == 0:
		return blockErr(4, "block header", corruptf("empty log id"))
	case first == 0 || first+span < first:
		return blockErr(4, "block header", corruptf("bad SQN range"))
	case count == 0 || count-1 > span:
		return blockErr(4, "block header", corruptf("change count %d does not fit SQN span", count))
	case h.rawLen == 0 || h.rawLen > MaxBlockRawSize:
		return blockErr(4, "block header", corruptf("raw length %d out of range", h.rawLen))
	}
	switch codec {
	case CodecNone:
		if h.storedLen != h.rawLen {
			return blockErr(4, "block header", corruptf("uncompressed block with stored %d != raw %d", h.storedLen, h.rawLen))
		}
	case CodecZstd, CodecS2:
		// The writer only compresses when it gains and stays under maxRatio;
		// this bounds the allocation by the stored bytes actually present.
		if h.storedLen >= h.rawLen || h.rawLen > h.storedLen*maxRatio {
			return blockErr(4, "block header", corruptf("raw length %d impossible for stored length %d", h.rawLen, h.storedLen))
		}
	default:
		return blockErr(4, "block header", corruptf("unknown codec %d", codec))
	}
	if d.logID != string(logID) {
		d.logID = string(logID)
	}
	h.codec = codec
	h.headerLen = int(hlen) + blockFixed
	h.info = BlockInfo{
		LogID:     d.logID,
		FirstSQN:  first,
		LastSQN:   first + span,
		Count:     count,
		KeyGroups: d.runs,
		Length:    uint64(h.headerLen) + h.storedLen,
	}
	return nil
}

// parseChanges decodes the raw payload into d.changes and checks it against
// the header: count, first and last SQN, the exact key-group runs.
func (d *BlockDecoder) parseChanges(raw []byte, h *blockHeader) ([]Change, error) {
	cs := d.changes[:0]
	states := d.states
	logID := h.info.LogID
	d.seen.reset()
	var (
		sqn   = h.info.FirstSQN - 1
		last  = h.info.LastSQN
		ts    int64
		kg    uint16
		state string
		i     int
		n     = len(raw)
	)
	for i < n {
		tag := raw[i]
		i++
		op := Op(tag & tagOpMask)
		if tag&tagReserved != 0 || !op.valid() || (len(cs) == 0 && tag&tagFirstFlags != 0) {
			return nil, corruptf("bad change tag %#x at payload offset %d", tag, i-1)
		}
		if tag&tagSQNNext != 0 {
			sqn++
		} else {
			var v uint64
			if v, i = uvarintAt(raw, i); i < 0 || v == 0 || sqn+v < sqn {
				return nil, corruptf("bad SQN delta in change %d", len(cs))
			}
			sqn += v
		}
		if sqn > last {
			return nil, corruptf("SQN %d beyond block range", sqn)
		}
		if tag&tagSameKG == 0 {
			var v uint64
			if v, i = uvarintAt(raw, i); i < 0 || v > MaxKeyGroup {
				return nil, corruptf("bad key group in change %d", len(cs))
			}
			kg = uint16(v)
			d.seen.add(kg)
		}
		if tag&tagSameState == 0 {
			var v uint64
			if v, i = uvarintAt(raw, i); i < 0 || v >= uint64(len(states)) {
				return nil, corruptf("bad state index in change %d", len(cs))
			}
			state = states[v]
		}
		var zz uint64
		if zz, i = uvarintAt(raw, i); i < 0 {
			return nil, corruptf("bad timestamp in change %d", len(cs))
		}
		ts += int64(zz>>1) ^ -int64(zz&1) // zigzag, wrapping like the writer
		var kl uint64
		if kl, i = uvarintAt(raw, i); i < 0 || kl > uint64(n-i) {
			return nil, corruptf("bad key length in change %d", len(cs))
		}
		var key, val []byte
		if kl > 0 {
			key = raw[i : i+int(kl) : i+int(kl)]
			i += int(kl)
		}
		if tag&tagHasValue != 0 {
			var vl uint64
			if vl, i = uvarintAt(raw, i); i < 0 || vl == 0 || vl > uint64(n-i) {
				return nil, corruptf("bad value length in change %d", len(cs))
			}
			val = raw[i : i+int(vl) : i+int(vl)]
			i += int(vl)
		}
		cs = append(cs, Change{LogID: logID, SQN: sqn, KeyGroup: kg, State: state, Op: op, Key: key, Value: val, TimestampMs: ts})
	}
	d.changes = cs[:0]
	if uint64(len(cs)) != h.info.Count || len(cs) == 0 || sqn != last || cs[0].SQN != h.info.FirstSQN {
		return nil, corruptf("payload does not match header (count %d, last SQN %d)", len(cs), sqn)
	}
	d.seenRuns = d.seen.appendRuns(d.seenRuns[:0])
	if !equalRuns(d.seenRuns, h.info.KeyGroups) {
		return nil, corruptf("key groups do not match header runs")
	}
	return cs, nil
}

// uvarintAt decodes a uvarint at b[i:], returning the new position or -1.
func uvarintAt(b []byte, i int) (uint64, int) {
	if i < len(b) && b[i] < 0x80 {
		return uint64(b[i]), i + 1
	}
	if i >= len(b) {
		return 0, -1
	}
	v, n := binary.Uvarint(b[i:])
	if n <= 0 {
		return 0, -1
	}
	return v, i + n
}
