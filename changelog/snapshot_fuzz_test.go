package changelog

import (
	"errors"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/envelope"
)

// FuzzDecodeSnapshot: any bytes decode to a snapshot record of the stream
// and checkpoint asked for, or to an error wrapping one of envelope's
// sentinels; never a panic.
func FuzzDecodeSnapshot(f *testing.F) {
	valid := Snapshot{Stream: "s", Checkpoint: 7, Logs: map[string]uint64{"s/1": 5, "s/2": 0}, CreatedAt: time.Unix(1, 0).UTC(), Bytes: 10, NewBytes: 4, Manifest: []byte(`{"runs":[]}`)}
	data, err := envelope.Seal(snapshotKind, valid)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	f.Add(data[:len(data)/2])
	other, _ := envelope.Seal(snapshotKind, Snapshot{Stream: "t", Checkpoint: 7})
	f.Add(other)
	wrongKind, _ := envelope.Seal(partKind, Part{Stream: "s"})
	f.Add(wrongKind)
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
	})
}
