package locallog

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/dstl-dev/dstl/segments"
)

// The committed seed corpus is under testdata/fuzz/FuzzRecover; regenerate
// it with `go test ./changelog/locallog -run TestWriteFuzzCorpus -gen-corpus`.
var genCorpus = flag.Bool("gen-corpus", false, "rewrite the seed corpus under testdata/fuzz")

// fuzzSeeds are WAL files numbered 1: valid ones for every codec, with
// metadata, marks and forgets, plus torn and garbage tails.
func fuzzSeeds(tb testing.TB) [][]byte {
	var out [][]byte
	for _, codec := range []segments.Codec{segments.CodecNone, segments.CodecS2, segments.CodecZstd} {
		dir := tb.TempDir()
		l, _, err := Open(Options{Dir: dir, NoSync: true, Codec: codec})
		if err != nil {
			tb.Fatal(err)
		}
		must := func(err error) {
			if err != nil {
				tb.Fatal(err)
			}
		}
		must(l.SetMeta(tb.Context(), "a", []byte("meta-a")))
		must(l.Append(tb.Context(), "a", batchOf("a", 1, 3, 30)))
		must(l.Append(tb.Context(), "b", batchOf("b", 1, 2, 0)))
		l.MarkUploaded("a", 2)
		l.Forget("b")
		must(l.Append(tb.Context(), "a", batchOf("a", 4, 2, 30)))
		must(l.Close())
		data, err := os.ReadFile(walName{1}.path(dir))
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, data)
	}
	full := out[1]
	out = append(out,
		nil,
		full[:len(full)-3], // torn last record
		slices.Concat(full, []byte("garbage!!!")), // garbage tail
		slices.Concat(full, make([]byte, 32)),     // zero tail
	)
	return out
}

// FuzzRecover feeds arbitrary bytes to recovery as the last WAL file (file
// number 1). It must not panic, and must either keep a prefix (a re-scan of
// which is clean and folds to the same state) or fail with ErrCorrupt. The
// scan runs in memory for speed; Open's file handling around it (truncating
// the torn tail) is covered by TestTornTail and TestGarbageTail.
func FuzzRecover(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := newState(true)
		_, good, err := s.scanFile("fuzz.wal", 1, data, true)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not wrapping ErrCorrupt: %v", err)
			}
			return
		}
		if good < 0 || good > int64(len(data)) {
			t.Fatalf("kept %d of %d bytes", good, len(data))
		}
		for id, l := range s.logs {
			prev := l.uploaded
			for _, c := range l.changes {
				if c.LogID != id || c.SQN <= prev {
					t.Fatalf("log %q: change of %q SQN %d after %d", id, c.LogID, c.SQN, prev)
				}
				prev = c.SQN
			}
		}
		// The kept prefix is clean and means the same.
		again := newState(true)
		if _, g, err := again.scanFile("fuzz.wal", 1, data[:good], true); err != nil || g != good {
			t.Fatalf("re-scan of the kept %d bytes: kept %d, %v", good, g, err)
		}
		if len(again.logs) != len(s.logs) {
			t.Fatalf("re-scan: %d logs, first scan %d", len(again.logs), len(s.logs))
		}
		for id, l := range s.logs {
			a := again.logs[id]
			if a == nil || a.uploaded != l.uploaded || !bytes.Equal(a.meta, l.meta) || !slices.Equal(sqns(a.changes), sqns(l.changes)) {
				t.Fatalf("re-scan: log %q differs", id)
			}
		}
	})
}

func TestWriteFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzRecover")
	if !*genCorpus {
		if ents, err := os.ReadDir(dir); err != nil || len(ents) == 0 {
			t.Errorf("no seed corpus in %s (run with -gen-corpus)", dir)
		}
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, s := range fuzzSeeds(t) {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
