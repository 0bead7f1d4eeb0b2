package server

import (
	"context"
	"testing"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// TestAppendReads: reads carried by an Append see its batch; bad reads
// (too many, a key group outside the stream) are INVALID_ARGUMENT and
// nothing of the request is appended; AppendStream refuses reads.
func TestAppendReads(t *testing.T) {
	ctx := context.Background()
	c := startServer(t)
	if _, err := c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "r", KeyGroups: 4})); err != nil {
		t.Fatal(err)
	}
	ow, err := c.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "r"}))
	if err != nil {
		t.Fatal(err)
	}
	id := ow.Msg.GetWriterId()
	merge := &dstlv1.Change{KeyGroup: 1, State: "l", Op: dstlv1.Op_OP_MERGE, Key: []byte("k"), Value: []byte("a")}
	read := &dstlv1.ReadAfterAppend{State: "l", Key: []byte("k"), KeyGroup: 1}
	absent := &dstlv1.ReadAfterAppend{State: "l", Key: []byte("nope"), KeyGroup: 2}
	res, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{merge, merge}, Reads: []*dstlv1.ReadAfterAppend{read, absent}}))
	if err != nil {
		t.Fatal(err)
	}
	if r := res.Msg.GetReads(); len(r) != 2 || !r[0].GetFound() || string(r[0].GetValue()) != "aa" || r[1].GetFound() {
		t.Fatalf("reads after the append: %v, want [aa, absent]", r)
	}

	tooMany := make([]*dstlv1.ReadAfterAppend, MaxReadsPerAppend+1)
	for i := range tooMany {
		tooMany[i] = read
	}
	for name, reads := range map[string][]*dstlv1.ReadAfterAppend{
		"too many reads":             tooMany,
		"a key group outside stream": {{State: "l", Key: []byte("k"), KeyGroup: 4}},
	} {
		_, err := c.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{merge}, Reads: reads}))
		if connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
	}
	st := c.writers.AppendStream(ctx)
	if err := st.Send(&dstlv1.AppendRequest{WriterId: id, Changes: []*dstlv1.Change{merge}, Reads: []*dstlv1.ReadAfterAppend{read}}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CloseAndReceive(); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("AppendStream with reads: %v, want INVALID_ARGUMENT", err)
	}
	// Nothing of the refused requests was appended.
	kg := uint32(1)
	got, err := c.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: "r", State: "l", Key: []byte("k"), KeyGroup: &kg}))
	if err != nil || string(got.Msg.GetValue()) != "aa" {
		t.Fatalf("after the refused appends: %q %v, want aa", got.Msg.GetValue(), err)
	}
}
