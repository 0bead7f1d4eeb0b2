package e2e

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"

	dstl "github.com/dstl-dev/dstl/sdk/go"
)

// TestSDK drives a node with the Go SDK: typed value, map and list states
// on a Local-durability writer, a checkpoint with metadata; then the node is
// SIGKILLed and restarted, the writer resumes its epoch with every
// acknowledged change, and a writer reopened from the checkpoint gets its
// metadata and state back.
func TestSDK(t *testing.T) {
	t.Parallel()
	dataDir := t.TempDir()
	n := startNode(t, "node", nodeConfig{dataDir: dataDir, args: []string{"--upload-interval", "1h"}})
	ctx := ctxT(t)
	c, err := dstl.Dial(ctx, n.URL, dstl.WithDurability(dstl.Local))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	const stream = "sdk"
	if _, err := c.EnsureStream(ctx, stream, testKeyGroups); err != nil {
		t.Fatalf("EnsureStream: %v", err)
	}
	if _, err := c.CreateStream(ctx, stream, testKeyGroups); !errors.Is(err, dstl.ErrAlreadyExists) {
		t.Errorf("CreateStream of an existing stream: %v, want ErrAlreadyExists", err)
	}
	w, err := c.OpenWriter(ctx, stream, dstl.WriterOptions{})
	if err != nil {
		t.Fatalf("OpenWriter: %v", err)
	}
	type profile struct {
		Name  string
		Score int
	}
	profiles := dstl.NewValueState(w, "profile", dstl.JSON[profile]())
	tags := dstl.NewMapState(w, "tags", dstl.String(), dstl.JSON[int]())
	events := dstl.NewListState(w, "events", dstl.String())

	for i := range 20 {
		user := fmt.Sprintf("user-%02d", i)
		if err := profiles.Set(ctx, user, profile{Name: user, Score: i}); err != nil {
			t.Fatalf("Set: %v", err)
		}
		if err := tags.Put(ctx, user, "a", i); err != nil {
			t.Fatalf("Put: %v", err)
		}
		if err := tags.Put(ctx, user, "b", 2*i); err != nil {
			t.Fatalf("Put: %v", err)
		}
		if err := events.Append(ctx, user, "created"); err != nil {
			t.Fatalf("Append: %v", err)
		}
	}
	if complete, err := w.Checkpoint(ctx, 1, []byte("offset=20")); err != nil || !complete {
		t.Fatalf("Checkpoint 1: complete %v, %v", complete, err)
	}
	// After the checkpoint, Local appends only (not persisted, not
	// checkpointed): they must survive the kill through the local log.
	if err := profiles.Set(ctx, "user-00", profile{Name: "user-00", Score: 100}); err != nil {
		t.Fatal(err)
	}
	if err := tags.Delete(ctx, "user-01", "a"); err != nil {
		t.Fatal(err)
	}
	if err := events.Append(ctx, "user-02", "renamed"); err != nil {
		t.Fatal(err)
	}
	if err := profiles.Delete(ctx, "user-03"); err != nil {
		t.Fatal(err)
	}
	acked, err := w.Flush(ctx)
	if err != nil {
		t.Fatalf("Flush: %v", err)
	}
	// Read-your-writes through the writer, and the same from the client.
	if p, ok, err := profiles.Get(ctx, "user-00"); err != nil || !ok || p.Score != 100 {
		t.Errorf("profiles.Get(user-00) = %v %v %v", p, ok, err)
	}
	if v, ok, err := c.Get(ctx, stream, "profile", []byte("user-05")); err != nil || !ok || string(v) != `{"Name":"user-05","Score":5}` {
		t.Errorf("Client.Get(profile, user-05) = %q %v %v", v, ok, err)
	}

	n.Kill()
	w.Abort() // the process that owned it is gone
	n2 := startNode(t, "node-restarted", nodeConfig{dataDir: dataDir})
	c2, err := dstl.Dial(ctx, n2.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	w2, err := c2.OpenWriter(ctx, stream, dstl.WriterOptions{ResumeEpoch: w.Epoch(), Durability: dstl.Local})
	if err != nil {
		t.Fatalf("resume epoch %d: %v", w.Epoch(), err)
	}
	if w2.ID() != w.ID() || w2.LastSQN() < acked {
		t.Fatalf("resumed writer %s: last SQN %d, want %s with ≥ %d", w2.ID(), w2.LastSQN(), w.ID(), acked)
	}
	profiles2 := dstl.NewValueState(w2, "profile", dstl.JSON[profile]())
	tags2 := dstl.NewMapState(w2, "tags", dstl.String(), dstl.JSON[int]())
	events2 := dstl.NewListState(w2, "events", dstl.String())
	if p, ok, err := profiles2.Get(ctx, "user-00"); err != nil || !ok || p.Score != 100 {
		t.Errorf("after restart: profile user-00 = %v %v %v, want score 100", p, ok, err)
	}
	if _, ok, err := profiles2.Get(ctx, "user-03"); err != nil || ok {
		t.Errorf("after restart: profile user-03 found=%v (%v), want deleted", ok, err)
	}
	if m, err := tags2.Entries(ctx, "user-01"); err != nil || !maps.Equal(m, map[string]int{"b": 2}) {
		t.Errorf("after restart: tags of user-01 = %v %v, want map[b:2]", m, err)
	}
	if l, err := events2.Get(ctx, "user-02"); err != nil || !slices.Equal(l, []string{"created", "renamed"}) {
		t.Errorf("after restart: events of user-02 = %v %v", l, err)
	}
	if m, err := tags2.Entries(ctx, "user-19"); err != nil || !maps.Equal(m, map[string]int{"a": 19, "b": 38}) {
		t.Errorf("after restart: tags of user-19 = %v %v", m, err)
	}
	if err := w2.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}

	// Reopen from checkpoint 1: its metadata and its state, without the
	// changes appended after it.
	w3, err := c2.OpenWriter(ctx, stream, dstl.WriterOptions{FromCheckpoint: 1})
	if err != nil {
		t.Fatalf("OpenWriter from checkpoint 1: %v", err)
	}
	defer w3.Close(ctx)
	if md := w3.RestoredMetadata(); len(md) != 1 || string(md[0]) != "offset=20" {
		t.Errorf("RestoredMetadata = %q, want [offset=20]", md)
	}
	profiles3 := dstl.NewValueState(w3, "profile", dstl.JSON[profile]())
	if p, ok, err := profiles3.Get(ctx, "user-00"); err != nil || !ok || p.Score != 0 {
		t.Errorf("from checkpoint 1: profile user-00 = %v %v %v, want score 0", p, ok, err)
	}
	if p, ok, err := profiles3.Get(ctx, "user-03"); err != nil || !ok || p.Score != 3 {
		t.Errorf("from checkpoint 1: profile user-03 = %v %v %v, want score 3", p, ok, err)
	}
	count := 0
	for kv, err := range c2.Scan(ctx, stream, dstl.ScanOptions{State: "profile", PageSize: 7}) {
		if err != nil {
			t.Fatalf("Scan: %v", err)
		}
		_ = kv
		count++
	}
	if count != 20 {
		t.Errorf("Scan of profile from checkpoint 1: %d keys, want 20", count)
	}
	var cps []dstl.Checkpoint
	for cp, err2 := range c2.Checkpoints(ctx, stream, dstl.CheckpointListOptions{Parts: true}) {
		if err = err2; err != nil {
			break
		}
		cps = append(cps, cp)
	}
	if err != nil || len(cps) < 1 || cps[0].ID != 1 || string(cps[0].Parts[0].Metadata) != "offset=20" {
		t.Errorf("Checkpoints = %+v, %v", cps, err)
	}
}
