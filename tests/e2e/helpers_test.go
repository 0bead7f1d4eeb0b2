package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// stateKey names one key of one state.
type stateKey struct{ state, key string }

// model is the expected state of a stream: (state, key) → value.
type model map[stateKey]string

func (m model) clone() model {
	c := make(model, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// apply folds one change into the model as the server does.
func (m model) apply(c *dstlv1.Change) {
	k := stateKey{c.GetState(), string(c.GetKey())}
	switch c.GetOp() {
	case dstlv1.Op_OP_PUT:
		m[k] = string(c.GetValue())
	case dstlv1.Op_OP_DELETE:
		delete(m, k)
	case dstlv1.Op_OP_MERGE:
		m[k] += string(c.GetValue())
	case dstlv1.Op_OP_CLEAR:
		for mk := range m {
			if mk.state == c.GetState() && int(keygroup.OfString(mk.key, testKeyGroups)) == int(c.GetKeyGroup()) {
				delete(m, mk)
			}
		}
	}
}

// testKeyGroups is the number of key groups of every stream the tests make.
const testKeyGroups = 8

// change builds a change of a stream with testKeyGroups key groups, with
// its key group computed as the server and the SDK compute it.
func change(op dstlv1.Op, state, key, value string) *dstlv1.Change {
	return &dstlv1.Change{
		KeyGroup: uint32(keygroup.OfString(key, testKeyGroups)),
		State:    state, Op: op, Key: []byte(key), Value: []byte(value),
	}
}

func put(state, key, value string) *dstlv1.Change { return change(dstlv1.Op_OP_PUT, state, key, value) }

// puts returns n puts of keys prefix-000.. with values made of tag.
func puts(state, prefix, tag string, n int) []*dstlv1.Change {
	out := make([]*dstlv1.Change, n)
	for i := range n {
		out[i] = put(state, fmt.Sprintf("%s-%03d", prefix, i), fmt.Sprintf("%s/%s-%03d/%s", state, prefix, i, tag))
	}
	return out
}

// ctxT is a context for one test step.
func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// scanAll reads every entry of a stream (all pages) with Scan.
func scanAll(t *testing.T, c *apiClients, stream string, pageSize int32) model {
	t.Helper()
	ctx := ctxT(t)
	got := model{}
	token := ""
	var last *dstlv1.KeyValue
	for pages := 0; ; pages++ {
		if pages > 10000 {
			t.Fatalf("scan %s: too many pages", stream)
		}
		resp, err := c.state.Scan(ctx, connect.NewRequest(&dstlv1.ScanRequest{Stream: stream, PageSize: pageSize, PageToken: token}))
		if err != nil {
			t.Fatalf("Scan %s (%s): %v", stream, c.protocol, err)
		}
		for _, kv := range resp.Msg.GetEntries() {
			if last != nil && !scanOrdered(last, kv) {
				t.Errorf("Scan %s: entries out of (key group, state, key) order: %v then %v", stream, last, kv)
			}
			if want := uint32(keygroup.Of(kv.GetKey(), testKeyGroups)); kv.GetKeyGroup() != want {
				t.Errorf("Scan %s: key %q in key group %d, want %d", stream, kv.GetKey(), kv.GetKeyGroup(), want)
			}
			k := stateKey{kv.GetState(), string(kv.GetKey())}
			if _, dup := got[k]; dup {
				t.Errorf("Scan %s: %v returned twice", stream, k)
			}
			got[k] = string(kv.GetValue())
			last = kv
		}
		token = resp.Msg.GetNextPageToken()
		if token == "" {
			return got
		}
	}
}

func scanOrdered(a, b *dstlv1.KeyValue) bool {
	if a.GetKeyGroup() != b.GetKeyGroup() {
		return a.GetKeyGroup() < b.GetKeyGroup()
	}
	if a.GetState() != b.GetState() {
		return a.GetState() < b.GetState()
	}
	return bytes.Compare(a.GetKey(), b.GetKey()) < 0
}

// checkModel compares a scanned state with the expected one, reporting at
// most a few differences.
func checkModel(t *testing.T, what string, got, want model) {
	t.Helper()
	var diffs []string
	for k, w := range want {
		if g, ok := got[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("missing %s/%s (want %q)", k.state, k.key, w))
		} else if g != w {
			diffs = append(diffs, fmt.Sprintf("%s/%s = %q, want %q", k.state, k.key, g, w))
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("unexpected %s/%s = %q", k.state, k.key, g))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		more := ""
		if len(diffs) > 8 {
			more = fmt.Sprintf(" … and %d more", len(diffs)-8)
			diffs = diffs[:8]
		}
		t.Errorf("%s: %d entries, want %d; %s%s", what, len(got), len(want), strings.Join(diffs, "; "), more)
	}
}

// checkGets reads every key of want with StateService.Get (the key group
// computed by the server) and a few absent keys.
func checkGets(t *testing.T, c *apiClients, stream string, want model, absent ...stateKey) {
	t.Helper()
	ctx := ctxT(t)
	for k, w := range want {
		resp, err := c.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: stream, State: k.state, Key: []byte(k.key)}))
		if err != nil {
			t.Fatalf("Get %s %s/%s: %v", stream, k.state, k.key, err)
		}
		if !resp.Msg.GetFound() || string(resp.Msg.GetValue()) != w {
			t.Errorf("Get %s %s/%s = (%q, found %v), want %q", stream, k.state, k.key, resp.Msg.GetValue(), resp.Msg.GetFound(), w)
		}
		if wantKG := uint32(keygroup.OfString(k.key, testKeyGroups)); resp.Msg.GetKeyGroup() != wantKG {
			t.Errorf("Get %s %s/%s: key group %d, want %d", stream, k.state, k.key, resp.Msg.GetKeyGroup(), wantKG)
		}
	}
	for _, k := range absent {
		resp, err := c.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: stream, State: k.state, Key: []byte(k.key)}))
		if err != nil {
			t.Fatalf("Get %s %s/%s: %v", stream, k.state, k.key, err)
		}
		if resp.Msg.GetFound() {
			t.Errorf("Get %s %s/%s = %q, want not found", stream, k.state, k.key, resp.Msg.GetValue())
		}
	}
}

// wantCode fails unless err is a connect error with the given code.
func wantCode(t *testing.T, what string, err error, code connect.Code) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded, want %v", what, code)
		return
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Errorf("%s: %v (%T), want a connect error with code %v", what, err, err, code)
		return
	}
	if ce.Code() != code {
		t.Errorf("%s: code %v (%v), want %v", what, ce.Code(), err, code)
	}
	if ce.Message() == "" {
		t.Errorf("%s: %v without a message", what, code)
	}
}

// createStream creates a stream of testKeyGroups key groups.
func createStream(t *testing.T, c *apiClients, name string) {
	t.Helper()
	resp, err := c.streams.CreateStream(ctxT(t), connect.NewRequest(&dstlv1.CreateStreamRequest{Name: name, KeyGroups: testKeyGroups}))
	if err != nil {
		t.Fatalf("CreateStream %s (%s): %v", name, c.protocol, err)
	}
	if s := resp.Msg.GetStream(); s.GetName() != name || s.GetKeyGroups() != testKeyGroups {
		t.Fatalf("CreateStream %s: got %v", name, s)
	}
}

// openWriter opens a writer over every key group of stream.
func openWriter(t *testing.T, c *apiClients, req *dstlv1.OpenWriterRequest) *dstlv1.OpenWriterResponse {
	t.Helper()
	resp, err := c.writers.OpenWriter(ctxT(t), connect.NewRequest(req))
	if err != nil {
		t.Fatalf("OpenWriter %v (%s): %v", req, c.protocol, err)
	}
	return resp.Msg
}

// appendBatch appends one batch and checks its SQNs follow last.
func appendBatch(t *testing.T, c *apiClients, writer string, d dstlv1.Durability, last uint64, changes []*dstlv1.Change) uint64 {
	t.Helper()
	resp, err := c.writers.Append(ctxT(t), connect.NewRequest(&dstlv1.AppendRequest{WriterId: writer, Changes: changes, Durability: d}))
	if err != nil {
		t.Fatalf("Append %d changes (%v) to %s (%s): %v", len(changes), d, writer, c.protocol, err)
	}
	if resp.Msg.GetFirstSqn() != last+1 || resp.Msg.GetLastSqn() != last+uint64(len(changes)) {
		t.Fatalf("Append to %s after SQN %d: SQNs %d..%d, want %d..%d", writer, last, resp.Msg.GetFirstSqn(), resp.Msg.GetLastSqn(), last+1, last+uint64(len(changes)))
	}
	return resp.Msg.GetLastSqn()
}

func persist(t *testing.T, c *apiClients, writer string) uint64 {
	t.Helper()
	resp, err := c.writers.Persist(ctxT(t), connect.NewRequest(&dstlv1.PersistRequest{WriterId: writer}))
	if err != nil {
		t.Fatalf("Persist %s (%s): %v", writer, c.protocol, err)
	}
	if len(resp.Msg.GetSegments()) == 0 {
		t.Errorf("Persist %s up to %d: no segments in the persist handle", writer, resp.Msg.GetUpToSqn())
	}
	return resp.Msg.GetUpToSqn()
}

func checkpoint(t *testing.T, c *apiClients, writer string, id uint64, metadata string) {
	t.Helper()
	resp, err := c.writers.Checkpoint(ctxT(t), connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: writer, CheckpointId: id, Metadata: []byte(metadata)}))
	if err != nil {
		t.Fatalf("Checkpoint %d of %s (%s): %v", id, writer, c.protocol, err)
	}
	if !resp.Msg.GetComplete() || resp.Msg.GetCheckpointId() != id {
		t.Fatalf("Checkpoint %d of %s: got id %d complete %v, want complete (the only writer)", id, writer, resp.Msg.GetCheckpointId(), resp.Msg.GetComplete())
	}
}
