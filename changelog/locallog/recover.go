package locallog

import (
	"bytes"
	"fmt"
	"os"

	"github.com/dstl-dev/dstl/segments"
)

// Recovered is what Open found in the directory.
type Recovered struct {
	// Logs maps logID → what survived: its metadata (latest) and its
	// changes with SQN > the latest uploaded mark, in SQN order,
	// de-duplicated. Every log that was not forgotten is listed, even with
	// no changes left.
	Logs map[string]*RecoveredLog
	// Files and Records count what was read.
	Files, Records int
	// TruncatedBytes were cut from the tail of TruncatedFile (the last
	// file): a record torn by a crash, never acknowledged.
	TruncatedBytes int64
	TruncatedFile  string
}

// RecoveredLog is one log's surviving state.
type RecoveredLog struct {
	Meta     []byte
	Uploaded uint64
	Changes  []segments.Change // SQN > Uploaded, increasing; Key/Value are owned by the caller
}

// scanFile folds the records of one WAL file into s and returns the length
// of its valid prefix.
//
// A record that fails its framing is a torn write only if it is at the tail
// of the last file: a crash can tear only the record being written, and
// nothing is written after it (the committer writes one record at a time and
// a new file only after the previous one is synced). So a bad record in an
// earlier file, or one followed by any valid record of this file, is
// corruption of acknowledged data and an error, never a silent truncation.
// Decoding errors after the framing checked out are corruption too.
func (s *state) scanFile(name string, num uint64, data []byte, last bool) (records int, good int64, err error) {
	s.files = append(s.files, &fileState{num: num, path: name, maxSQN: make(map[string]uint64)})
	off := 0
	for off < len(data) {
		body, n, ferr := readFrame(data[off:], num)
		if ferr != nil {
			if !last {
				return records, 0, at(name, int64(off), corruptf("%v, in a file that is not the last", ferr))
			}
			if p := findRecord(data, off+1, num); p >= 0 {
				return records, 0, at(name, int64(off), corruptf("%v, followed by a valid record at offset %d", ferr, p))
			}
			break
		}
		if err := s.applyRecord(name, int64(off), body, records == 0); err != nil {
			return records, 0, err
		}
		records++
		off += n
	}
	s.files[len(s.files)-1].size = int64(off)
	return records, int64(off), nil
}

func (s *state) applyRecord(name string, off int64, body []byte, first bool) error {
	entries, seg, err := decodePayload(body)
	if err != nil {
		return at(name, off, err)
	}
	// Every file starts with a snapshot (see newFile): without it the file
	// lost its head, and the state of logs in deleted files with it.
	if first && (len(entries) == 0 || entries[0].kind != entrySnapshot) {
		return at(name, off, corruptf("first record of the file holds no snapshot"))
	}
	for i := range entries {
		s.applyEntry(&entries[i])
	}
	if seg == nil {
		return nil
	}
	r, err := segments.Open(bytes.NewReader(seg), int64(len(seg)), fmt.Sprintf("%s@%d", name, off))
	if err != nil {
		return at(name, off, fmt.Errorf("%w: %w", ErrCorrupt, err))
	}
	for c, err := range r.All() {
		if err != nil {
			return at(name, off, fmt.Errorf("%w: %w", ErrCorrupt, err))
		}
		if err := s.addChange(&c); err != nil {
			return at(name, off, err)
		}
	}
	return nil
}

// findRecord returns the offset of the first valid record of file num at or
// after from, or -1. Only used on the error path: a cheap length-CRC check
// rejects almost every offset.
func findRecord(data []byte, from int, num uint64) int {
	for p := from; p+frameHeaderLen+minPayload <= len(data); p++ {
		if _, _, err := readFrame(data[p:], num); err == nil {
			return p
		}
	}
	return -1
}

// recoverDir reads every WAL file in order, truncating a torn tail of the
// last one (durably unless noSync), and returns the folded state.
func recoverDir(dir string, files []walName, noSync bool) (*state, *Recovered, error) {
	s := newState(true)
	rec := &Recovered{Files: len(files)}
	for i, fn := range files {
		path := fn.path(dir)
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("locallog: read %s: %w", path, err)
		}
		n, good, err := s.scanFile(path, fn.num, data, i == len(files)-1)
		rec.Records += n
		if err != nil {
			return nil, nil, err
		}
		if good < int64(len(data)) {
			if err := truncate(path, good, noSync); err != nil {
				return nil, nil, err
			}
			rec.TruncatedBytes, rec.TruncatedFile = int64(len(data))-good, path
		}
	}
	rec.Logs = make(map[string]*RecoveredLog, len(s.logs))
	for id, l := range s.logs {
		rec.Logs[id] = &RecoveredLog{Meta: l.meta, Uploaded: l.uploaded, Changes: l.changes}
		l.changes = nil // the committer's state keeps no changes
	}
	s.keepChanges, s.arena = false, nil
	return s, rec, nil
}

func truncate(path string, size int64, noSync bool) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("locallog: truncate torn tail: %w", err)
	}
	err = f.Truncate(size)
	if err == nil && !noSync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("locallog: truncate torn tail of %s at %d: %w", path, size, err)
	}
	return nil
}
