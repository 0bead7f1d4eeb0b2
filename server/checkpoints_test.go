package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"testing"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// A name that is not UTF-8, from a client that does not validate (not the
// Go SDK), is INVALID_ARGUMENT like every other bad name.
func TestInvalidUTF8OverTheWire(t *testing.T) {
	c := startServer(t)
	name := []byte("s\xff\xfe")
	body := append([]byte{0x0a, byte(len(name))}, name...) // field 1 (name / stream / writer_id)
	for _, proc := range []string{
		dstlv1connect.StreamServiceCreateStreamProcedure, dstlv1connect.StreamServiceGetStreamProcedure,
		dstlv1connect.WriterServiceOpenWriterProcedure, dstlv1connect.WriterServiceAppendProcedure,
		dstlv1connect.CheckpointServiceListCheckpointsProcedure, dstlv1connect.StateServiceScanProcedure,
	} {
		req, err := http.NewRequest(http.MethodPost, c.url+proc, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/proto")
		res, err := c.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(res.Body)
		res.Body.Close()
		var e struct{ Code string }
		_ = json.Unmarshal(msg, &e)
		if res.StatusCode != http.StatusBadRequest || e.Code != "invalid_argument" {
			t.Errorf("%s with a name that is not UTF-8: HTTP %d %s, want 400 invalid_argument", proc, res.StatusCode, msg)
		}
	}
}

func openAppend(t *testing.T, c *testClients, stream string) string {
	t.Helper()
	ctx := context.Background()
	ow, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: stream}))
	if err != nil {
		t.Fatal(err)
	}
	id := ow.Msg.GetWriterId()
	if _, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{put(0, "k", "v")}})); err != nil {
		t.Fatal(err)
	}
	return id
}

// ListCheckpoints pages oldest or newest first, with parts only when asked,
// and never repeats or skips a checkpoint.
func TestListCheckpointsPages(t *testing.T) {
	ctx := context.Background()
	c := startServer(t)
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 1})); err != nil {
		t.Fatal(err)
	}
	id := openAppend(t, c, "s")
	const n = 12
	for cp := uint64(1); cp <= n; cp++ {
		if _, err := c.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: id, CheckpointId: cp})); err != nil {
			t.Fatal(err)
		}
	}
	list := func(req *dstlv1.ListCheckpointsRequest) (ids []uint64, pages int) {
		t.Helper()
		for {
			res, err := c.checkpoint.ListCheckpoints(ctx, connect.NewRequest(req))
			if err != nil {
				t.Fatal(err)
			}
			pages++
			for _, cp := range res.Msg.GetCheckpoints() {
				if cp.GetPartCount() != 1 || (len(cp.GetParts()) == 1) != req.GetIncludeParts() {
					t.Fatalf("checkpoint %d: %d parts listed, part_count %d, include_parts %v", cp.GetId(), len(cp.GetParts()), cp.GetPartCount(), req.GetIncludeParts())
				}
				ids = append(ids, cp.GetId())
			}
			if req.PageToken = res.Msg.GetNextPageToken(); req.PageToken == "" {
				return ids, pages
			}
		}
	}
	ids, pages := list(&dstlv1.ListCheckpointsRequest{Stream: "s", PageSize: 5})
	if len(ids) != n || ids[0] != 1 || ids[n-1] != n || pages != 3 {
		t.Fatalf("oldest first, pages of 5: %v in %d pages", ids, pages)
	}
	ids, pages = list(&dstlv1.ListCheckpointsRequest{Stream: "s", PageSize: 4, NewestFirst: true, IncludeParts: true})
	if len(ids) != n || ids[0] != n || ids[n-1] != 1 || pages != 3 {
		t.Fatalf("newest first, pages of 4: %v in %d pages", ids, pages)
	}
	for i := 1; i < n; i++ {
		if ids[i] != ids[i-1]-1 {
			t.Fatalf("newest first: %v", ids)
		}
	}
	if ids, pages = list(&dstlv1.ListCheckpointsRequest{Stream: "s"}); len(ids) != n || pages != 1 {
		t.Fatalf("default page: %v in %d pages", ids, pages)
	}
	_, err := c.checkpoint.ListCheckpoints(ctx, connect.NewRequest(&dstlv1.ListCheckpointsRequest{Stream: "s", PageToken: "x"}))
	wantCode(t, "bad page token", err, connect.CodeInvalidArgument, "page_token")
	_, err = c.checkpoint.ListCheckpoints(ctx, connect.NewRequest(&dstlv1.ListCheckpointsRequest{Stream: "s", PageSize: -1}))
	wantCode(t, "negative page size", err, connect.CodeInvalidArgument, "page_size")
	// A page is bounded whatever the request asks.
	res, err := c.checkpoint.ListCheckpoints(ctx, connect.NewRequest(&dstlv1.ListCheckpointsRequest{Stream: "s", PageSize: 1 << 30, PageToken: strconv.Itoa(n)}))
	if err != nil || len(res.Msg.GetCheckpoints()) != 0 || res.Msg.GetNextPageToken() != "" {
		t.Fatalf("page after the last: %v %v", res.Msg, err)
	}
}

// CreateCheckpoint on a node without open writers of the stream: nothing
// to do (up_to_date) when the newest complete checkpoint covers every
// change, FAILED_PRECONDITION when a closed epoch holds changes it does not.
func TestCreateCheckpointWithoutWriters(t *testing.T) {
	ctx := context.Background()
	c := startServer(t)
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "s", KeyGroups: 4})); err != nil {
		t.Fatal(err)
	}
	create := func() (*dstlv1.CreateCheckpointResponse, error) {
		res, err := c.checkpoint.CreateCheckpoint(ctx, connect.NewRequest(&dstlv1.CreateCheckpointRequest{Stream: "s"}))
		if err != nil {
			return nil, err
		}
		return res.Msg, nil
	}
	// A stream that never had a change.
	if res, err := create(); err != nil || !res.GetUpToDate() || res.GetCheckpoint() != nil {
		t.Fatalf("empty stream: %v %v, want up_to_date without a checkpoint", res, err)
	}
	// What `dstl put` does: open, append, checkpoint, close.
	id := openAppend(t, c, "s")
	if _, err := c.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: id, CheckpointId: 1})); err != nil {
		t.Fatal(err)
	}
	if _, err := c.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: id})); err != nil {
		t.Fatal(err)
	}
	res, err := create()
	if err != nil || !res.GetUpToDate() || !res.GetComplete() || res.GetCheckpoint().GetId() != 1 || len(res.GetCheckpoint().GetParts()) != 1 {
		t.Fatalf("after a checkpointed and closed writer: %v %v, want up_to_date with checkpoint 1", res, err)
	}
	// A writer that appended and closed without a checkpoint: its changes
	// are in no complete checkpoint.
	id = openAppend(t, c, "s")
	if _, err := c.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: id})); err != nil {
		t.Fatal(err)
	}
	_, err = create()
	wantCode(t, "closed epoch with uncheckpointed changes", err, connect.CodeFailedPrecondition, "after checkpoint 1")
	// A writer open on this node is checkpointed as before.
	ow, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
	if err != nil {
		t.Fatal(err)
	}
	if res, err = create(); err != nil || res.GetUpToDate() || !res.GetComplete() || res.GetCheckpoint().GetId() != 2 {
		t.Fatalf("with an open writer: %v %v, want new complete checkpoint 2", res, err)
	}
	if _, err := c.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: ow.Msg.GetWriterId()})); err != nil {
		t.Fatal(err)
	}
	if res, err = create(); err != nil || !res.GetUpToDate() || res.GetCheckpoint().GetId() != 2 {
		t.Fatalf("after closing it: %v %v, want up_to_date with checkpoint 2", res, err)
	}
}
