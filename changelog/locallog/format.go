package locallog

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/dstl-dev/dstl/segments"
)

// Record format (docs/locallog.md has it byte by byte):
//
//	frame:   u32 payload length · u32 CRC32C(length bytes) · payload
//	payload: u8 version (1) · u64 file number · uvarint entry count ·
//	         entries · segment (optional, to the CRC) · u32 CRC32C(payload before it)
//
// The length has its own CRC so that a torn or garbage length is recognised
// before it is used to skip ahead; the payload CRC covers the entries, which
// nothing else checksums, and lets recovery tell "torn" from "valid" from the
// framing alone before decoding anything. The file number stops a record
// copied from another file (or a stale file) from being taken for this one's.

const (
	frameHeaderLen = 8
	payloadVersion = 1
	// minPayload: version, file number, a one-byte entry count, CRC.
	minPayload = 1 + 8 + 1 + 4
	// maxPayload bounds a length read from disk before it is trusted.
	maxPayload = 1 << 30

	// MaxMetaLen bounds SetMeta's metadata.
	MaxMetaLen = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

type entryKind uint8

const (
	entryMeta     entryKind = 1 // logID, meta: replaces the log's metadata
	entryUploaded entryKind = 2 // logID, SQN: changes ≤ SQN are on the blob store
	entryForget   entryKind = 3 // logID: drop the log and everything about it
	entrySnapshot entryKind = 4 // every live log: the complete state, first in each file
)

// entry is one metadata entry of a record. Decoded meta aliases the record.
type entry struct {
	kind  entryKind
	logID string
	meta  []byte
	sqn   uint64
	logs  []snapLog // entrySnapshot only
}

// snapLog is one live log in a snapshot entry.
type snapLog struct {
	logID    string
	uploaded uint64
	meta     []byte
}

// beginRecord appends a frame header placeholder and the payload's fixed
// fields to b. start is where the frame begins, for finishRecord.
func beginRecord(b []byte, fileNum uint64, entries int) (out []byte, start int) {
	start = len(b)
	b = append(b, make([]byte, frameHeaderLen)...)
	b = append(b, payloadVersion)
	b = binary.LittleEndian.AppendUint64(b, fileNum)
	return binary.AppendUvarint(b, uint64(entries)), start
}

// finishRecord appends the payload CRC and fills in the frame header.
func finishRecord(b []byte, start int) []byte {
	payload := b[start+frameHeaderLen:]
	b = binary.LittleEndian.AppendUint32(b, crc(payload))
	n := len(b) - start - frameHeaderLen
	binary.LittleEndian.PutUint32(b[start:], uint32(n))
	binary.LittleEndian.PutUint32(b[start+4:], crc(b[start:start+4]))
	return b
}

func appendBytes(b, v []byte) []byte {
	return append(binary.AppendUvarint(b, uint64(len(v))), v...)
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

func appendEntry(b []byte, e *entry) []byte {
	b = append(b, byte(e.kind))
	switch e.kind {
	case entryMeta:
		b = appendString(b, e.logID)
		b = appendBytes(b, e.meta)
	case entryUploaded:
		b = appendString(b, e.logID)
		b = binary.AppendUvarint(b, e.sqn)
	case entryForget:
		b = appendString(b, e.logID)
	case entrySnapshot:
		b = binary.AppendUvarint(b, uint64(len(e.logs)))
		for i := range e.logs {
			b = appendString(b, e.logs[i].logID)
			b = binary.AppendUvarint(b, e.logs[i].uploaded)
			b = appendBytes(b, e.logs[i].meta)
		}
	}
	return b
}

// frameError is a record that fails its framing: torn, garbage, or damaged.
// Recovery decides which from where it is; see scanFile.
type frameError struct{ reason string }

func (e *frameError) Error() string { return e.reason }

// readFrame checks the record at the start of data: length and its CRC,
// bounds, payload CRC, version and file number. It returns the payload
// without its CRC and the record's total size.
func readFrame(data []byte, fileNum uint64) (payload []byte, size int, err error) {
	if len(data) < frameHeaderLen {
		return nil, 0, &frameError{fmt.Sprintf("%d bytes left, a frame header is %d", len(data), frameHeaderLen)}
	}
	if crc(data[:4]) != binary.LittleEndian.Uint32(data[4:8]) {
		return nil, 0, &frameError{"length checksum mismatch"}
	}
	n := binary.LittleEndian.Uint32(data[:4])
	if n < minPayload || n > maxPayload {
		return nil, 0, &frameError{fmt.Sprintf("payload length %d outside [%d, %d]", n, minPayload, maxPayload)}
	}
	if uint64(len(data)-frameHeaderLen) < uint64(n) {
		return nil, 0, &frameError{fmt.Sprintf("payload of %d bytes, %d left", n, len(data)-frameHeaderLen)}
	}
	p := data[frameHeaderLen : frameHeaderLen+int(n)]
	body := p[:len(p)-4]
	if crc(body) != binary.LittleEndian.Uint32(p[len(p)-4:]) {
		return nil, 0, &frameError{"payload checksum mismatch"}
	}
	if body[0] != payloadVersion {
		return nil, 0, &frameError{fmt.Sprintf("payload version %d", body[0])}
	}
	if got := binary.LittleEndian.Uint64(body[1:9]); got != fileNum {
		return nil, 0, &frameError{fmt.Sprintf("record of file %d", got)}
	}
	return body, frameHeaderLen + int(n), nil
}

// decoder reads the entries of a payload that passed readFrame. Its errors
// wrap ErrCorrupt: the bytes are what was written, so a decode failure is
// damage (or a bug), never a torn write.
type decoder struct {
	b   []byte
	off int // into b
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = corruptf("payload byte %d: "+format, append([]any{d.off}, args...)...)
	}
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b[d.off:])
	if n <= 0 {
		d.fail("bad uvarint")
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) bytes(limit int) []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(limit) || n > uint64(len(d.b)-d.off) {
		d.fail("length %d above limit %d or past the end", n, limit)
		return nil
	}
	v := d.b[d.off : d.off+int(n) : d.off+int(n)]
	d.off += int(n)
	return v
}

func (d *decoder) logID() string {
	id := d.bytes(segments.MaxLogIDLen)
	if d.err == nil && len(id) == 0 {
		d.fail("empty log id")
	}
	return string(id)
}

// decodePayload splits a payload (without CRC) into its entries and its
// segment bytes (nil when the record carries no changes).
func decodePayload(body []byte) (entries []entry, segment []byte, err error) {
	d := decoder{b: body, off: 1 + 8}
	count := d.uvarint()
	// Each entry takes at least two bytes: a count cannot promise more.
	if d.err == nil && count > uint64(len(body)-d.off)/2 {
		d.fail("%d entries in %d bytes", count, len(body)-d.off)
	}
	for i := uint64(0); i < count && d.err == nil; i++ {
		if d.off >= len(d.b) {
			d.fail("entry %d of %d past the end", i+1, count)
			break
		}
		kind := entryKind(d.b[d.off])
		d.off++
		e := entry{kind: kind}
		switch kind {
		case entryMeta:
			e.logID = d.logID()
			e.meta = d.bytes(MaxMetaLen)
		case entryUploaded:
			e.logID = d.logID()
			e.sqn = d.uvarint()
		case entryForget:
			e.logID = d.logID()
		case entrySnapshot:
			n := d.uvarint()
			if d.err == nil && n > uint64(len(body)-d.off)/3 {
				d.fail("snapshot of %d logs in %d bytes", n, len(body)-d.off)
			}
			for j := uint64(0); j < n && d.err == nil; j++ {
				var s snapLog
				s.logID = d.logID()
				s.uploaded = d.uvarint()
				s.meta = d.bytes(MaxMetaLen)
				e.logs = append(e.logs, s)
			}
		default:
			d.off--
			d.fail("unknown entry type %d", kind)
		}
		entries = append(entries, e)
	}
	if d.err != nil {
		return nil, nil, d.err
	}
	if d.off < len(body) {
		segment = body[d.off:]
	}
	return entries, segment, nil
}
