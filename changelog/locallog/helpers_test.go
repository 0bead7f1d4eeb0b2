package locallog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/dstl-dev/dstl/segments"
)

// value is the deterministic value of (log, sqn), so any recovered change
// can be checked byte for byte.
func value(log string, sqn uint64, n int) []byte {
	v := make([]byte, n)
	s := fmt.Sprintf("%s/%d/", log, sqn)
	for i := range v {
		v[i] = s[i%len(s)]
	}
	return v
}

// batchOf returns count changes of log from SQN first on, with values of n bytes.
func batchOf(log string, first uint64, count, n int) []segments.Change {
	out := make([]segments.Change, count)
	for i := range out {
		sqn := first + uint64(i)
		out[i] = segments.Change{
			LogID: log, SQN: sqn, KeyGroup: uint16(sqn % 128), State: "st", Op: segments.OpPut,
			Key: fmt.Appendf(nil, "k%d", sqn), Value: value(log, sqn, n), TimestampMs: int64(sqn),
		}
	}
	return out
}

func mustOpen(t testing.TB, opts Options) (*Log, *Recovered) {
	t.Helper()
	l, rec, err := Open(opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l, rec
}

func mustClose(t testing.TB, l *Log) {
	t.Helper()
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func mustAppend(t testing.TB, l *Log, log string, cs []segments.Change) {
	t.Helper()
	if err := l.Append(context.Background(), log, cs); err != nil {
		t.Fatalf("Append %s: %v", log, err)
	}
}

// checkLog requires that rec holds exactly SQNs from..to of log, in order,
// with the values batchOf gives them (n-byte values).
func checkLog(t testing.TB, rec *Recovered, log string, from, to uint64, n int) {
	t.Helper()
	rl := rec.Logs[log]
	if rl == nil {
		if from > to {
			return
		}
		t.Fatalf("log %s not recovered", log)
	}
	if want := int(to - from + 1); from > to && len(rl.Changes) != 0 || from <= to && len(rl.Changes) != want {
		t.Fatalf("log %s: %d changes recovered, want SQN %d..%d", log, len(rl.Changes), from, to)
	}
	for i, c := range rl.Changes {
		sqn := from + uint64(i)
		if c.SQN != sqn || c.LogID != log || !bytes.Equal(c.Value, value(log, sqn, n)) ||
			string(c.Key) != fmt.Sprintf("k%d", sqn) || c.TimestampMs != int64(sqn) || c.State != "st" {
			t.Fatalf("log %s change %d: got SQN %d key %q value %q, want SQN %d", log, i, c.SQN, c.Key, c.Value, sqn)
		}
	}
}

func walFiles(t testing.TB, dir string) []string {
	t.Helper()
	names, err := listWAL(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range names {
		out = append(out, n.path(dir))
	}
	return out
}

// recordOffsets returns the offset of every record in a WAL file, and its end.
func recordOffsets(t testing.TB, path string) []int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	num := uint64(0)
	fmt.Sscanf(filepath.Base(path), "%d.wal", &num)
	var offs []int
	for off := 0; off < len(data); {
		_, n, err := readFrame(data[off:], num)
		if err != nil {
			t.Fatalf("%s at %d: %v", path, off, err)
		}
		offs = append(offs, off)
		off += n
	}
	return append(offs, len(data))
}

// copyDir copies the WAL files (only) of src into a new temporary directory.
func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, p := range walFiles(t, src) {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, filepath.Base(p)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func requireCorrupt(t testing.TB, err error, wantIn ...string) {
	t.Helper()
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("got %v, want ErrCorrupt", err)
	}
	for _, s := range wantIn {
		if !bytes.Contains([]byte(err.Error()), []byte(s)) {
			t.Fatalf("error %q does not name %q", err, s)
		}
	}
}

func sqns(cs []segments.Change) []uint64 {
	out := make([]uint64, len(cs))
	for i := range cs {
		out[i] = cs[i].SQN
	}
	return slices.Clip(out)
}
