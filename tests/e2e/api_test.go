package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// TestAPIProtocols drives one node with the generated clients over each
// protocol (Connect, gRPC, gRPC-Web on h2c): streams, a writer, appends of
// every op and durability, persist, checkpoints, reads, and typed errors.
func TestAPIProtocols(t *testing.T) {
	t.Parallel()
	n := startNode(t, "node", nodeConfig{dataDir: t.TempDir()})
	for _, protocol := range protocols {
		t.Run(protocol, func(t *testing.T) {
			c := n.clients(protocol)
			stream := "api-" + protocol
			createStream(t, c, stream)
			ctx := ctxT(t)

			_, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: stream}))
			wantCode(t, "CreateStream of an existing name", err, connect.CodeAlreadyExists)
			_, err = c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "-bad/name"}))
			wantCode(t, "CreateStream with a bad name", err, connect.CodeInvalidArgument)
			_, err = c.streams.GetStream(ctx, connect.NewRequest(&dstlv1.GetStreamRequest{Name: "no-such-" + protocol}))
			wantCode(t, "GetStream of an unknown stream", err, connect.CodeNotFound)
			_, err = c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "no-such-" + protocol}))
			wantCode(t, "OpenWriter of an unknown stream", err, connect.CodeNotFound)
			// Nothing was written: nothing to checkpoint, and no error.
			if cc, err := c.checkpoints.CreateCheckpoint(ctx, connect.NewRequest(&dstlv1.CreateCheckpointRequest{Stream: stream})); err != nil || !cc.Msg.GetUpToDate() || cc.Msg.GetCheckpoint() != nil {
				t.Errorf("CreateCheckpoint of a stream without changes: %v %v, want up_to_date and no checkpoint", cc, err)
			}

			w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: stream})
			id := w.GetWriterId()
			m := model{}
			var last uint64
			batches := []struct {
				d       dstlv1.Durability
				changes []*dstlv1.Change
			}{
				{dstlv1.Durability_DURABILITY_UNSPECIFIED, puts("a", "k", "1", 50)},
				{dstlv1.Durability_DURABILITY_BUFFERED, []*dstlv1.Change{
					change(dstlv1.Op_OP_DELETE, "a", "k-001", ""),
					change(dstlv1.Op_OP_MERGE, "b", "log", "x"),
					change(dstlv1.Op_OP_MERGE, "b", "log", "y"),
				}},
				{dstlv1.Durability_DURABILITY_LOCAL, append(puts("a", "k", "2", 10), put("c", "k-005", "only c"))},
			}
			for _, b := range batches {
				last = appendBatch(t, c, id, b.d, last, b.changes)
				for _, ch := range b.changes {
					m.apply(ch)
				}
			}
			// A clear of state "a" in the key group of k-000 (only that key
			// group; state "c" keeps its key there).
			clr := change(dstlv1.Op_OP_CLEAR, "a", "k-000", "")
			clr.Key = nil
			last = appendBatch(t, c, id, dstlv1.Durability_DURABILITY_BUFFERED, last, []*dstlv1.Change{clr})
			m.apply(clr)
			checkModel(t, "scan", scanAll(t, c, stream, 9), m)
			checkGets(t, c, stream, m, stateKey{"a", "k-001"}, stateKey{"a", "missing"})

			// Bad appends are refused whole and harm nothing.
			bad := []struct {
				what    string
				changes []*dstlv1.Change
				code    connect.Code
			}{
				{"a key group outside the writer's range", []*dstlv1.Change{put("a", "x", "1"), {KeyGroup: testKeyGroups, State: "a", Op: dstlv1.Op_OP_PUT, Key: []byte("x")}}, connect.CodeInvalidArgument},
				{"an unknown op", []*dstlv1.Change{{KeyGroup: 0, State: "a", Op: dstlv1.Op(99), Key: []byte("x")}}, connect.CodeInvalidArgument},
				{"an oversized key", []*dstlv1.Change{{KeyGroup: 0, State: "a", Op: dstlv1.Op_OP_PUT, Key: bytes.Repeat([]byte("k"), 65<<10)}}, connect.CodeInvalidArgument},
			}
			for _, b := range bad {
				_, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: b.changes}))
				wantCode(t, "Append with "+b.what, err, b.code)
			}
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: puts("a", "r", "1", 1), Durability: dstlv1.Durability_DURABILITY_REPLICATED}))
			wantCode(t, "Append with DURABILITY_REPLICATED on one node", err, connect.CodeUnimplemented)
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: stream + "/999", Changes: puts("a", "r", "1", 1)}))
			wantCode(t, "Append to an unknown writer", err, connect.CodeNotFound)
			last = appendBatch(t, c, id, dstlv1.Durability_DURABILITY_LOCAL, last, []*dstlv1.Change{put("a", "after-bad", "ok")})
			m.apply(put("a", "after-bad", "ok"))

			if up := persist(t, c, id); up != last {
				t.Errorf("Persist: up to %d, want %d", up, last)
			}
			checkpoint(t, c, id, 1, "meta-"+protocol)
			_, err = c.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: id, CheckpointId: 1, Metadata: []byte("other")}))
			if err != nil && connect.CodeOf(err) != connect.CodeFailedPrecondition {
				t.Errorf("Checkpoint 1 again: %v, want success (idempotent retry) or failed_precondition", err)
			}
			cc, err := c.checkpoints.CreateCheckpoint(ctx, connect.NewRequest(&dstlv1.CreateCheckpointRequest{Stream: stream, Metadata: []byte("cli")}))
			if err != nil {
				t.Fatalf("CreateCheckpoint: %v", err)
			}
			if !cc.Msg.GetComplete() || cc.Msg.GetCheckpoint().GetId() != 2 {
				t.Errorf("CreateCheckpoint: %v, want complete checkpoint 2", cc.Msg)
			}
			list, err := c.checkpoints.ListCheckpoints(ctx, connect.NewRequest(&dstlv1.ListCheckpointsRequest{Stream: stream, IncludeParts: true}))
			if err != nil {
				t.Fatalf("ListCheckpoints: %v", err)
			}
			if cps := list.Msg.GetCheckpoints(); len(cps) != 2 || cps[0].GetId() != 1 || cps[1].GetId() != 2 ||
				len(cps[0].GetParts()) != 1 || cps[0].GetParts()[0].GetUpToSqn() != last {
				t.Errorf("ListCheckpoints: %v, want checkpoints 1 and 2, 1 covering SQN %d", cps, last)
			}
			if _, err := c.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: id})); err != nil {
				t.Fatalf("CloseWriter: %v", err)
			}
			_, err = c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: puts("a", "r", "1", 1)}))
			if code := connect.CodeOf(err); code != connect.CodeFailedPrecondition && code != connect.CodeNotFound {
				t.Errorf("Append to a closed writer: %v, want failed_precondition or not_found", err)
			}
			// The closed writer's state is served from its final part.
			checkModel(t, "scan after close", scanAll(t, c, stream, 0), m)
		})
	}

	t.Run("http1-connect-json", func(t *testing.T) {
		// Connect unary over HTTP/1.1 with JSON, as curl does.
		body := `{"name":"api-connect"}`
		resp, err := http.Post(n.URL+"/dstl.v1.StreamService/GetStream", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var got struct {
			Stream struct {
				Name      string `json:"name"`
				KeyGroups int    `json:"keyGroups"`
			} `json:"stream"`
		}
		if resp.StatusCode != 200 || json.Unmarshal(b, &got) != nil || got.Stream.Name != "api-connect" || got.Stream.KeyGroups != testKeyGroups {
			t.Errorf("GetStream over HTTP/1.1: %s %s", resp.Status, b)
		}
		resp2, err := http.Post(n.URL+"/dstl.v1.StreamService/GetStream", "application/json", strings.NewReader(`{"name":"nope"}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp2.Body.Close()
		b, _ = io.ReadAll(resp2.Body)
		if resp2.StatusCode != http.StatusNotFound || !strings.Contains(string(b), `"code":"not_found"`) {
			t.Errorf("GetStream of an unknown stream over HTTP/1.1: %s %s", resp2.Status, b)
		}
	})

	t.Run("health-and-metrics", func(t *testing.T) {
		for _, path := range []string{"/healthz", "/readyz"} {
			resp, err := http.Get(n.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("GET %s: %s", path, resp.Status)
			}
		}
		resp, err := http.Get(n.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, metric := range []string{
			`dstl_server_appended_changes_total{durability="local"}`,
			`dstl_server_appended_changes_total{durability="buffered"}`,
			"dstl_server_persist_seconds_count",
			"dstl_server_checkpoint_seconds_count",
			"dstl_server_requests_total{",
			"dstl_upload_",
			"go_goroutines",
		} {
			if !strings.Contains(string(b), metric) {
				t.Errorf("/metrics has no %s", metric)
			}
		}
		if t.Failed() {
			t.Logf("/metrics:\n%s", firstLines(string(b), 60))
		}
	})
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = append(lines[:n], fmt.Sprintf("… (%d bytes)", len(s)))
	}
	return strings.Join(lines, "\n")
}
