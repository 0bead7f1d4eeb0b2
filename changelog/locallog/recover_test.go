package locallog

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/dstl-dev/dstl/segments"
)

// writeRecords appends `records` records of 3 changes each to log "a" (one
// Append each, so one record each) and returns the directory, closed.
func writeRecords(t *testing.T, records int) string {
	dir := t.TempDir()
	l, _ := mustOpen(t, Options{Dir: dir, NoSync: true})
	if err := l.SetMeta(t.Context(), "a", []byte("meta")); err != nil {
		t.Fatal(err)
	}
	for r := range records {
		mustAppend(t, l, "a", batchOf("a", uint64(3*r+1), 3, 40))
	}
	mustClose(t, l)
	return dir
}

// TestTornTail cuts the last record at every byte offset: recovery keeps
// exactly the records before it and truncates the file there.
func TestTornTail(t *testing.T) {
	src := writeRecords(t, 4)
	files := walFiles(t, src)
	if len(files) != 1 {
		t.Fatalf("%d files", len(files))
	}
	data, _ := os.ReadFile(files[0])
	offs := recordOffsets(t, files[0]) // snapshot, meta, 4 appends, end
	lastStart := offs[len(offs)-2]
	for cut := lastStart; cut < len(data); cut++ {
		dir := t.TempDir()
		path := filepath.Join(dir, filepath.Base(files[0]))
		if err := os.WriteFile(path, data[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		l, rec, err := Open(Options{Dir: dir, NoSync: true})
		if err != nil {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		checkLog(t, rec, "a", 1, 9, 40)
		if string(rec.Logs["a"].Meta) != "meta" {
			t.Fatalf("cut at %d: meta %q", cut, rec.Logs["a"].Meta)
		}
		if rec.TruncatedBytes != int64(cut-lastStart) || (cut > lastStart && rec.TruncatedFile != path) {
			t.Fatalf("cut at %d: truncated %d bytes of %q, want %d", cut, rec.TruncatedBytes, rec.TruncatedFile, cut-lastStart)
		}
		mustClose(t, l)
		if fi, err := os.Stat(path); err != nil || fi.Size() != int64(lastStart) {
			t.Fatalf("cut at %d: file not truncated to %d: %v %v", cut, lastStart, fi.Size(), err)
		}
		// The truncated log reopens cleanly, and new appends continue it.
		l, rec = mustOpen(t, Options{Dir: dir, NoSync: true})
		checkLog(t, rec, "a", 1, 9, 40)
		mustClose(t, l)
	}
}

// TestGarbageTail: garbage or zeros after the last record are a torn tail.
func TestGarbageTail(t *testing.T) {
	src := writeRecords(t, 3)
	path := walFiles(t, src)[0]
	data, _ := os.ReadFile(path)
	tails := map[string][]byte{
		"zeros":   make([]byte, 4096),
		"garbage": bytes.Repeat([]byte("garbage!"), 100),
		"one":     {0xff},
		// A valid-looking header promising more than there is.
		"header": data[recordOffsets(t, path)[1]:][:frameHeaderLen],
	}
	for name, tail := range tails {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(path)), slices.Concat(data, tail), 0o644); err != nil {
			t.Fatal(err)
		}
		l, rec, err := Open(Options{Dir: dir, NoSync: true})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		checkLog(t, rec, "a", 1, 9, 40)
		if rec.TruncatedBytes != int64(len(tail)) {
			t.Fatalf("%s: truncated %d, want %d", name, rec.TruncatedBytes, len(tail))
		}
		mustClose(t, l)
	}
}

// TestCorruptMiddle flips every byte of a record that is followed by valid
// records: always ErrCorrupt naming the file and the record's offset. The
// same damage in the last record is a torn tail.
func TestCorruptMiddle(t *testing.T) {
	src := writeRecords(t, 4)
	path := walFiles(t, src)[0]
	data, _ := os.ReadFile(path)
	offs := recordOffsets(t, path)
	mid := 3 // the second append: followed by two more records
	for i := offs[mid]; i < offs[mid+1]; i++ {
		dir := t.TempDir()
		bad := slices.Clone(data)
		bad[i] ^= 0x55
		target := filepath.Join(dir, filepath.Base(path))
		if err := os.WriteFile(target, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err := Open(Options{Dir: dir, NoSync: true})
		requireCorrupt(t, err, target, fmt.Sprintf("offset %d", offs[mid]))
	}
	// The same flip in the last record: a torn tail, the rest recovered.
	last := len(offs) - 2
	for i := offs[last]; i < offs[last+1]; i += 7 {
		dir := t.TempDir()
		bad := slices.Clone(data)
		bad[i] ^= 0x55
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(path)), bad, 0o644); err != nil {
			t.Fatal(err)
		}
		l, rec, err := Open(Options{Dir: dir, NoSync: true})
		if err != nil {
			t.Fatalf("flip at %d of the last record: %v", i, err)
		}
		checkLog(t, rec, "a", 1, 9, 40)
		mustClose(t, l)
	}
}

// TestCorruptEarlierFile: a bad tail in a file that is not the last is
// corruption, not a torn write.
func TestCorruptEarlierFile(t *testing.T) {
	dir := writeRecords(t, 3)
	l, _ := mustOpen(t, Options{Dir: dir, NoSync: true}) // adds a second file
	mustAppend(t, l, "a", batchOf("a", 10, 1, 40))
	mustClose(t, l)
	files := walFiles(t, dir)
	if len(files) != 2 {
		t.Fatalf("%d files", len(files))
	}
	data, _ := os.ReadFile(files[0])
	if err := os.WriteFile(files[0], data[:len(data)-5], 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err := Open(Options{Dir: dir, NoSync: true})
	requireCorrupt(t, err, files[0], "not the last")
}

// handFile builds a WAL file record by record.
type handFile struct {
	num  uint64
	data []byte
}

func (h *handFile) record(t *testing.T, ents []entry, changes []segments.Change) {
	out, start := beginRecord(h.data, h.num, len(ents))
	for i := range ents {
		out = appendEntry(out, &ents[i])
	}
	if len(changes) > 0 {
		s := &sink{b: out}
		w := segments.NewWriter(s, segments.WriterOptions{Codec: segments.CodecNone})
		for _, c := range changes {
			if err := w.Add(c); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := w.Close(); err != nil {
			t.Fatal(err)
		}
		out = s.b
	}
	h.data = finishRecord(out, start)
}

func (h *handFile) open(t *testing.T) (*Recovered, error) {
	dir := t.TempDir()
	if err := os.WriteFile(walName{h.num}.path(dir), h.data, 0o644); err != nil {
		t.Fatal(err)
	}
	l, rec, err := Open(Options{Dir: dir, NoSync: true})
	if err == nil {
		mustClose(t, l)
	}
	return rec, err
}

// TestRecoverDuplicates: the same SQN written twice is recovered once (the
// first copy); an SQN that goes back to one never written is corruption.
func TestRecoverDuplicates(t *testing.T) {
	h := &handFile{num: 1}
	h.record(t, []entry{{kind: entrySnapshot}}, nil)
	h.record(t, nil, batchOf("a", 1, 5, 10))
	second := batchOf("a", 3, 5, 10) // 3..7; 3..5 are copies
	for i := range second[:3] {
		second[i].Value = []byte("second")
	}
	h.record(t, nil, second)
	rec, err := h.open(t)
	if err != nil {
		t.Fatal(err)
	}
	checkLog(t, rec, "a", 1, 7, 10)

	h = &handFile{num: 1}
	h.record(t, []entry{{kind: entrySnapshot}}, nil)
	gap := batchOf("a", 1, 5, 10)
	gap = append(gap[:2], gap[3:]...) // 1, 2, 4, 5
	h.record(t, nil, gap)
	h.record(t, nil, batchOf("a", 3, 1, 10))
	h.record(t, nil, batchOf("a", 6, 1, 10))
	_, err = h.open(t)
	requireCorrupt(t, err, "SQN 3")
}

// TestRecoverFold: entries fold in order; a snapshot drops logs it does not
// list; a record from another file number is not this file's.
func TestRecoverFold(t *testing.T) {
	h := &handFile{num: 7}
	h.record(t, []entry{{kind: entrySnapshot, logs: []snapLog{{logID: "x", uploaded: 2, meta: []byte("mx")}}}}, nil)
	h.record(t, []entry{{kind: entryMeta, logID: "a", meta: []byte("ma")}}, slices.Concat(batchOf("a", 1, 4, 10), batchOf("x", 1, 4, 10), batchOf("gone", 1, 2, 10)))
	h.record(t, []entry{{kind: entryUploaded, logID: "a", sqn: 2}, {kind: entryForget, logID: "gone"}}, nil)
	h.record(t, []entry{{kind: entrySnapshot, logs: []snapLog{
		{logID: "a", uploaded: 1, meta: []byte("ma2")}, {logID: "x", uploaded: 3, meta: []byte("mx")},
	}}}, batchOf("b", 1, 2, 10))
	rec, err := h.open(t)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Logs) != 3 || rec.Logs["gone"] != nil {
		t.Fatalf("logs %v", rec.Logs)
	}
	checkLog(t, rec, "a", 3, 4, 10)
	checkLog(t, rec, "x", 4, 4, 10)
	checkLog(t, rec, "b", 1, 2, 10)
	if a := rec.Logs["a"]; string(a.Meta) != "ma2" || a.Uploaded != 2 {
		t.Fatalf("a: meta %q uploaded %d", a.Meta, a.Uploaded)
	}
	if x := rec.Logs["x"]; string(x.Meta) != "mx" || x.Uploaded != 3 {
		t.Fatalf("x: meta %q uploaded %d", x.Meta, x.Uploaded)
	}

	// The same bytes named as file 6 (not the last): every record belongs
	// to file 7, so the file is corrupt.
	dir := t.TempDir()
	if err := os.WriteFile(walName{6}.path(dir), h.data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(walName{7}.path(dir), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = Open(Options{Dir: dir, NoSync: true})
	requireCorrupt(t, err, walName{6}.path(dir), "record of file 7")

	// A file whose first record is not a snapshot lost its head.
	h = &handFile{num: 1}
	h.record(t, nil, batchOf("a", 1, 1, 10))
	_, err = h.open(t)
	requireCorrupt(t, err, "no snapshot")
}
