package locallog

import (
	"os"
	"slices"
	"testing"
)

// TestMarksDeleteObsoleteFiles: marks are lazy; once a durable record
// carries them, files whose changes are all uploaded are deleted (never the
// active one), and what they held that is still needed (metadata, marks)
// survives in the snapshots of later files.
func TestMarksDeleteObsoleteFiles(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, NoSync: true, FileSize: 2048}
	l, _ := mustOpen(t, opts)
	for _, log := range []string{"a", "b"} {
		if err := l.SetMeta(t.Context(), log, []byte("meta-"+log)); err != nil {
			t.Fatal(err)
		}
	}
	for r := range 30 {
		mustAppend(t, l, "a", batchOf("a", uint64(3*r+1), 3, 40))
		mustAppend(t, l, "b", batchOf("b", uint64(3*r+1), 3, 40))
	}
	before := walFiles(t, dir)
	if len(before) < 5 {
		t.Fatalf("only %d files: no rotation", len(before))
	}

	l.MarkUploaded("a", 90)
	l.MarkUploaded("b", 30)
	l.MarkUploaded("b", 45) // coalesced with the previous mark
	l.MarkUploaded("b", 40) // marks never go back
	l.MarkUploaded("unknown", 1)
	if got := walFiles(t, dir); !slices.Equal(got, before) {
		t.Fatalf("files changed before the marks were durable: %v -> %v", before, got)
	}
	// A copy taken now (the marks only in memory) recovers everything.
	_, rec := mustOpenCopy(t, dir)
	checkLog(t, rec, "a", 1, 90, 40)
	checkLog(t, rec, "b", 1, 90, 40)

	// The next record carries the marks; Close waits for the deletions.
	mustAppend(t, l, "c", batchOf("c", 1, 1, 40))
	mustClose(t, l)
	st := l.Stats()
	after := walFiles(t, dir)
	if len(after) >= len(before) || st.Deleted == 0 || int(st.Files) != len(after) {
		t.Fatalf("%d files before, %d after, stats %+v: nothing deleted", len(before), len(after), st)
	}
	if after[0] == before[0] {
		t.Fatalf("first file %s, all uploaded, not deleted", before[0])
	}
	for _, p := range after {
		if !slices.Contains(before, p) && p != after[len(after)-1] {
			t.Fatalf("unexpected file %s", p)
		}
	}

	l, rec = mustOpen(t, opts)
	checkLog(t, rec, "a", 91, 90, 40)
	checkLog(t, rec, "b", 46, 90, 40)
	checkLog(t, rec, "c", 1, 1, 40)
	for _, log := range []string{"a", "b"} {
		if got := rec.Logs[log]; string(got.Meta) != "meta-"+log {
			t.Fatalf("log %s: meta %q lost with its file", log, got.Meta)
		}
	}
	if rec.Logs["a"].Uploaded != 90 || rec.Logs["b"].Uploaded != 45 || rec.Logs["unknown"] != nil {
		t.Fatalf("marks: a %d, b %d, unknown %v", rec.Logs["a"].Uploaded, rec.Logs["b"].Uploaded, rec.Logs["unknown"])
	}

	// Forget b, re-create a: b's files go, a starts again from its new SQNs.
	l.Forget("b")
	l.Forget("a")
	mustAppend(t, l, "a", batchOf("a", 1, 2, 40))
	l.MarkUploaded("c", 1)
	mustClose(t, l) // writes the pending mark
	l, rec = mustOpen(t, opts)
	defer mustClose(t, l)
	if rec.Logs["b"] != nil || len(rec.Logs) != 2 {
		t.Fatalf("logs after Forget: %v", rec.Logs)
	}
	checkLog(t, rec, "a", 1, 2, 40)
	checkLog(t, rec, "c", 2, 1, 40)
	if m := rec.Logs["a"].Meta; m != nil {
		t.Fatalf("re-created log kept the old meta %q", m)
	}
	// Only a's two changes are not uploaded: one file besides the new one.
	if files := walFiles(t, dir); len(files) > 3 {
		t.Fatalf("%d files left: %v", len(files), files)
	}
}

// TestForgetOrdering: a Forget queued after an Append of the same log goes
// into a later record, so the Append is not resurrected; a SetMeta after a
// Forget starts a new log.
func TestForgetOrdering(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, Options{Dir: dir, NoSync: true})
	mustAppend(t, l, "a", batchOf("a", 1, 3, 10))
	l.Forget("a")
	if err := l.SetMeta(t.Context(), "a", []byte("new")); err != nil {
		t.Fatal(err)
	}
	mustClose(t, l)
	l, rec := mustOpen(t, Options{Dir: dir, NoSync: true})
	defer mustClose(t, l)
	if a := rec.Logs["a"]; a == nil || len(a.Changes) != 0 || string(a.Meta) != "new" {
		t.Fatalf("a: %+v", a)
	}
}

func mustOpenCopy(t *testing.T, dir string) (*Log, *Recovered) {
	t.Helper()
	cp := copyDir(t, dir)
	l, rec := mustOpen(t, Options{Dir: cp, NoSync: true})
	mustClose(t, l)
	if _, err := os.Stat(cp); err != nil {
		t.Fatal(err)
	}
	return l, rec
}

// TestTakeCutsBeforeForget: a batch never holds an Append of a log and a
// later Forget of it (the entries would apply first and keep the Append).
func TestTakeCutsBeforeForget(t *testing.T) {
	l, _ := mustOpen(t, Options{Dir: t.TempDir(), NoSync: true})
	defer mustClose(t, l)
	l.mu.Lock()
	defer l.mu.Unlock()
	saved := l.queue
	l.queue = []*item{
		{kind: itemForget, logID: "a"},
		{kind: itemAppend, logID: "a"},
		{kind: itemMeta, logID: "b"},
		{kind: itemForget, logID: "a"},
		{kind: itemAppend, logID: "c"},
	}
	want := slices.Clone(l.queue) // take shifts the queue in place
	b1 := l.c.take()
	b2 := l.c.take()
	if !slices.Equal(b1.items, want[:3]) || !slices.Equal(b2.items, want[3:]) || len(l.queue) != 0 {
		t.Fatalf("batches %v / %v, want a cut before the second forget", b1.items, b2.items)
	}
	l.queue = saved
}
