package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
)

// TestGracefulShutdownUploadsBuffered: buffered appends (never persisted)
// are on the blob store once the node exits 0 after SIGTERM. The test reads
// the segments straight from <data-dir>/blobs after the process is gone.
func TestGracefulShutdownUploadsBuffered(t *testing.T) {
	t.Parallel()
	dataDir := t.TempDir()
	// No periodic upload during the test: only the shutdown uploads.
	n := startNode(t, "node", nodeConfig{dataDir: dataDir, args: []string{"--upload-interval", "1h"}})
	c := n.clients("connect")
	const stream = "shutdown"
	createStream(t, c, stream)
	w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream})
	id := w.GetWriterId()

	// Batches of every op, all buffered; acked[sqn] is what was acknowledged.
	acked := map[uint64]*dstlv1.Change{}
	var last uint64
	for round := range 5 {
		batch := puts("s", fmt.Sprintf("r%d", round), "v", 100)
		batch = append(batch,
			change(dstlv1.Op_OP_DELETE, "s", fmt.Sprintf("r%d-000", round), ""),
			change(dstlv1.Op_OP_MERGE, "m", "list", fmt.Sprintf("+%d", round)),
		)
		if round == 4 {
			batch = append(batch, &dstlv1.Change{KeyGroup: 3, State: "s", Op: dstlv1.Op_OP_CLEAR})
		}
		first := last + 1
		last = appendBatch(t, c, id, dstlv1.Durability_DURABILITY_BUFFERED, last, batch)
		for i, ch := range batch {
			acked[first+uint64(i)] = ch
		}
	}

	blobs := filepath.Join(dataDir, "blobs")
	if before := readLog(t, blobs, id); len(before) > 0 {
		t.Logf("note: %d of the %d changes were uploaded before SIGTERM (upload interval 1h)", len(before), last)
	}
	start := time.Now()
	if code := n.Terminate(time.Minute); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0", code)
	}
	t.Logf("SIGTERM → exit 0 in %v", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(n.Log(), "everything acknowledged is uploaded") {
		t.Errorf("the node's log does not say it uploaded everything acknowledged")
	}

	got := readLog(t, blobs, id)
	for sqn := uint64(1); sqn <= last; sqn++ {
		g, ok := got[sqn]
		w := acked[sqn]
		switch {
		case !ok:
			t.Errorf("SQN %d (%v %s/%q) acknowledged but not in any segment", sqn, w.GetOp(), w.GetState(), w.GetKey())
		case g.KeyGroup != uint16(w.GetKeyGroup()) || g.State != w.GetState() || uint8(g.Op) != uint8(w.GetOp()) ||
			string(g.Key) != string(w.GetKey()) || string(g.Value) != string(w.GetValue()):
			t.Errorf("SQN %d in the segments: %v %d %s/%q=%q, acknowledged %v %d %s/%q=%q", sqn,
				g.Op, g.KeyGroup, g.State, g.Key, g.Value, w.GetOp(), w.GetKeyGroup(), w.GetState(), w.GetKey(), w.GetValue())
		case g.TimestampMs == 0:
			t.Errorf("SQN %d: no timestamp (the server stamps changes without one)", sqn)
		}
	}
	if len(got) != int(last) {
		t.Errorf("segments hold %d changes of %s, want %d", len(got), id, last)
	}
}

// readLog decodes every segment under segments/ of the file blob store at
// root and returns the changes of log logID by SQN (cloned). A change that
// appears twice must be identical.
func readLog(t *testing.T, root, logID string) map[uint64]segments.Change {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := file.Open(root)
	if err != nil {
		t.Fatalf("open blob store %s: %v", root, err)
	}
	defer store.Close()
	out := map[uint64]segments.Change{}
	objects := 0
	after := ""
	for {
		page, err := store.List(ctx, "segments/", after, 0)
		if err != nil {
			t.Fatalf("list segments/ in %s: %v", root, err)
		}
		for _, o := range page.Objects {
			objects++
			r, err := segments.Open(upload.ReaderAt(ctx, store, o.Key, o.Size), o.Size, o.Key)
			if err != nil {
				t.Fatalf("open segment %s: %v", o.Key, err)
			}
			for ch, err := range r.All() {
				if err != nil {
					t.Fatalf("read segment %s: %v", o.Key, err)
				}
				if ch.LogID != logID {
					continue
				}
				if prev, dup := out[ch.SQN]; dup {
					if string(prev.Key) != string(ch.Key) || string(prev.Value) != string(ch.Value) || prev.Op != ch.Op {
						t.Errorf("SQN %d of %s appears twice with different content (%s)", ch.SQN, logID, o.Key)
					}
					continue
				}
				out[ch.SQN] = ch.Clone()
			}
		}
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	t.Logf("%s: %d segment objects, %d changes of %s", root, objects, len(out), logID)
	return out
}

// TestSecondSignalExitsAtOnce: while a graceful shutdown waits for a blob
// store that hangs, a second SIGTERM ends the process at once.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	t.Parallel()
	proc, err := s3server.Launch(context.Background(), t.TempDir(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer proc.Stop()
	s3 := proc.NewBucket(t)
	n := startNode(t, "node", nodeConfig{
		dataDir: t.TempDir(),
		blob:    s3.URL("dstl"),
		env: []string{
			"AWS_ACCESS_KEY_ID=" + s3.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s3.SecretKey, "AWS_EC2_METADATA_DISABLED=true",
		},
		args: []string{"--upload-interval", "1h"},
	})
	c := n.clients("connect")
	createStream(t, c, "sig")
	w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: "sig"})
	appendBatch(t, c, w.GetWriterId(), dstlv1.Durability_DURABILITY_BUFFERED, 0, puts("s", "k", "v", 10))

	// Freeze the blob store: the shutdown's final upload hangs.
	if err := proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer proc.Signal(syscall.SIGCONT)
	if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-n.done:
		t.Fatalf("the node exited although its blob store hangs:\n%s", n.Log())
	case <-time.After(time.Second):
	}
	began := time.Now()
	if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-n.done:
	case <-time.After(5 * time.Second):
		t.Fatalf("a second SIGTERM did not end the node within 5s:\n%s", n.Log())
	}
	if !strings.Contains(n.Log(), "shutting down") {
		t.Fatalf("the first signal did not start a graceful shutdown:\n%s", n.Log())
	}
	t.Logf("second SIGTERM ended the node in %v", time.Since(began).Round(time.Millisecond))
}
