package changelog

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/envelope"
)

// FuzzDecodeSnapshot: any bytes decode to a snapshot record of the stream
// and checkpoint asked for whose files are the stream's, or to an error
// wrapping one of envelope's sentinels; never a panic. A record without an
// incarnation decodes (GC must be able to delete it) but is never owned.
func FuzzDecodeSnapshot(f *testing.F) {
	files := []SnapshotFileRef{{Key: SnapshotFilePrefix("s") + "00000000000000000007-0a0b0c0d-000001.sst", Size: 10}}
	valid := Snapshot{Stream: "s", Incarnation: "0123456789abcdef01234567", Checkpoint: 7, Logs: map[string]uint64{"s/1": 5, "s/2": 0}, CreatedAt: time.Unix(1, 0).UTC(), Bytes: 10, NewBytes: 4, Files: files, Manifest: []byte(`{"runs":[]}`)}
	seal := func(v any, kind string) []byte {
		data, err := envelope.Seal(kind, v)
		if err != nil {
			f.Fatal(err)
		}
		return data
	}
	data := seal(valid, snapshotKind)
	f.Add(data)
	f.Add(data[:len(data)/2])
	f.Add(seal(Snapshot{Stream: "t", Checkpoint: 7}, snapshotKind))
	legacy := valid
	legacy.Incarnation, legacy.Files = "", nil
	f.Add(seal(legacy, snapshotKind))
	outside := valid
	outside.Files = []SnapshotFileRef{{Key: "streams/t/sst/x", Size: 1}}
	f.Add(seal(outside, snapshotKind))
	twice := valid
	twice.Files = append(files, files...)
	f.Add(seal(twice, snapshotKind))
	negative := valid
	negative.Files = []SnapshotFileRef{{Key: files[0].Key, Size: -1}}
	f.Add(seal(negative, snapshotKind))
	f.Add(seal(Part{Stream: "s"}, partKind))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := decodeSnapshot("s", 7, data)
		if err != nil {
			if !errors.Is(err, envelope.ErrCorrupt) && !errors.Is(err, envelope.ErrUnknownVersion) && !errors.Is(err, envelope.ErrWrongKind) {
				t.Fatalf("error %v wraps no envelope sentinel", err)
			}
			return
		}
		if s.Stream != "s" || s.Checkpoint != 7 || s.Key() != snapshotKey("s", 7) {
			t.Fatalf("decoded %+v for stream s checkpoint 7", s)
		}
		seen := map[string]bool{}
		for _, f := range s.Files {
			if !strings.HasPrefix(f.Key, SnapshotFilePrefix("s")) || f.Size < 0 || seen[f.Key] {
				t.Fatalf("decoded a record with file %+v", f)
			}
			seen[f.Key] = true
		}
		if s.Incarnation == "" && s.ownedBy("") {
			t.Fatal("a record without an incarnation is owned")
		}
	})
}
