package dstl_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/gossip"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/server"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// member is one node of a test cluster: a real changelog node over the
// cluster's blob store, served over loopback h2c, with real memberlist
// gossip (fast timings) carrying its URL, or a fixed membership view.
type member struct {
	url    string
	id     string
	gossip *gossip.Cluster // nil with a fixed view
	api    *server.Server
	reg    *prometheus.Registry
	stop   func() // crash: stops serving and gossip (no leave)
}

// staticView is a membership view that never changes: a test hook to make
// two nodes disagree about owners.
type staticView []gossip.Member

func (v staticView) Members() []gossip.Member { return v }

// startMember starts a member on store. join: gossip seeds (nil: the first
// member); view, if set, replaces gossip by a fixed view, given the
// member's id and URL.
func startMember(t *testing.T, store upload.BlobStore, join []string, view func(id, url string) server.Membership) *member {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dir := t.TempDir()
	node, err := changelog.Open(ctx, changelog.Options{Store: store, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &member{url: "http://" + ln.Addr().String(), id: node.ID(), reg: prometheus.NewRegistry()}
	var ms server.Membership
	if view != nil {
		ms = view(m.id, m.url)
	} else {
		m.gossip, err = gossip.Open(ctx, gossip.Config{NodeID: node.ID(), Bind: "127.0.0.1:0", Join: join,
			Timings: gossip.FastTimings(), Meta: gossip.Meta{RPC: m.url}})
		if err != nil {
			t.Fatal(err)
		}
		ms = m.gossip
	}
	m.api, err = server.New(node, server.Options{StateDir: filepath.Join(dir, "state"), Registry: m.reg, Cluster: server.ClusterOptions{Members: ms}})
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: m.api.Handler(), Protocols: new(http.Protocols)}
	hs.Protocols.SetUnencryptedHTTP2(true)
	go hs.Serve(ln)
	var once sync.Once
	m.stop = func() {
		once.Do(func() {
			_ = hs.Close()
			if m.gossip != nil {
				_ = m.gossip.Close() // no Leave: the others see it dead
			}
			_ = m.api.Close()
			_ = node.Close(context.Background())
		})
	}
	t.Cleanup(m.stop)
	return m
}

// startMembers starts n gossiping members on one blob store and waits
// until every one sees all alive.
func startMembers(t *testing.T, n int) []*member {
	t.Helper()
	store, err := blobstore.Open(t.Context(), filepath.Join(t.TempDir(), "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	var ms []*member
	for i := range n {
		var join []string
		if i > 0 {
			join = []string{ms[0].gossip.Addr()}
		}
		ms = append(ms, startMember(t, store, join, nil))
	}
	for _, m := range ms {
		waitView(t, m, func(v []gossip.Member) bool { return aliveCount(v) == n })
	}
	return ms
}

func aliveCount(v []gossip.Member) int {
	n := 0
	for _, m := range v {
		if m.Alive() {
			n++
		}
	}
	return n
}

func waitView(t *testing.T, m *member, ok func([]gossip.Member) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok(m.gossip.Members()) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: view not as expected: %+v", m.id, m.gossip.Members())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// counter sums a counter of m's registry over its labels.
func counter(t *testing.T, m *member, name string) float64 {
	t.Helper()
	mfs, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, x := range mf.GetMetric() {
				sum += x.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// ownerAmong returns the member owning stream's writer of key groups
// lo..hi in view, and the others.
func ownerAmong(t *testing.T, ms []*member, view []gossip.Member, stream string, lo, hi uint32) (owner *member, others []*member) {
	t.Helper()
	o, ok := gossip.WriterOwner(stream, lo, hi, view)
	if !ok {
		t.Fatal("no owner")
	}
	for _, m := range ms {
		if m.id == o.ID {
			owner = m
		} else {
			others = append(others, m)
		}
	}
	if owner == nil {
		t.Fatalf("owner %s is not a running member", o.ID)
	}
	return owner, others
}

func dialMember(t *testing.T, m *member, opts ...dstl.Option) *dstl.Client {
	t.Helper()
	c, err := dstl.Dial(t.Context(), m.url, append([]dstl.Option{dstl.WithRetries(0)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// A client of a member that does not own the writer opens it on the owner
// without being told, and every call of the writer goes there: appends,
// reads, checkpoints, close. The client's own calls stay on its node.
// Three real memberlist nodes and servers.
func TestWriterFollowsOwner(t *testing.T) {
	ctx := t.Context()
	ms := startMembers(t, 3)
	owner, others := ownerAmong(t, ms, ms[0].gossip.Members(), "orders", 0, 7)
	entry := others[0]
	c := dialMember(t, entry)
	mustCreate(t, c, "orders", 8)

	w := openWriter(t, c, "orders", dstl.WriterOptions{})
	if w.Node() != owner.url {
		t.Fatalf("writer on %s, want the owner %s", w.Node(), owner.url)
	}
	for _, k := range []string{"a", "b", "c"} {
		if err := w.Put(ctx, "s", []byte(k), []byte("v-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	// A read the cache cannot answer travels with the flush to the owner.
	if v, found, err := w.Get(ctx, "s", []byte("zz")); err != nil || found || v != nil {
		t.Fatalf("Get of a missing key: %q %v %v", v, found, err)
	}
	if _, err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for kv, err := range w.Scan(ctx, "s", nil, nil) {
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, string(kv.Key))
	}
	slices.Sort(keys)
	if strings.Join(keys, ",") != "a,b,c" {
		t.Fatalf("writer scan on the owner: %v", keys)
	}
	if complete, err := w.Checkpoint(ctx, 1, []byte("offsets")); err != nil || !complete {
		t.Fatalf("checkpoint 1: %v %v", complete, err)
	}
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := counter(t, owner, "dstl_server_appended_changes_total"); got != 3 {
		t.Fatalf("changes appended on the owner: %v, want 3", got)
	}
	if got := counter(t, entry, "dstl_server_appended_changes_total"); got != 0 {
		t.Fatalf("changes appended on the client's node: %v, want 0", got)
	}
	if got := counter(t, entry, "dstl_server_writer_redirects_total"); got != 1 {
		t.Fatalf("redirects on the client's node: %v, want 1", got)
	}
	if got := counter(t, owner, "dstl_server_writer_redirects_total"); got != 0 {
		t.Fatalf("redirects on the owner: %v, want 0", got)
	}
	// The client's own calls: on its node, which sees the checkpoint on
	// the shared blob store.
	cp, ok, err := c.LatestCheckpoint(ctx, "orders")
	if err != nil || !ok || cp.ID != 1 || string(cp.Parts[0].Metadata) != "offsets" {
		t.Fatalf("latest checkpoint from the client's node: %+v %v %v", cp, ok, err)
	}
	// A reopen follows the owner again (the connect client is cached),
	// and restores what the first writer checkpointed.
	w2 := openWriter(t, c, "orders", dstl.WriterOptions{})
	if w2.Node() != owner.url || w2.FromCheckpoint() != 1 {
		t.Fatalf("reopen on %s from %d", w2.Node(), w2.FromCheckpoint())
	}
	if v, found, err := w2.Get(ctx, "s", []byte("b")); err != nil || !found || string(v) != "v-b" {
		t.Fatalf("restored read on the owner: %q %v %v", v, found, err)
	}
	if err := w2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// AnyNode: on the client's node.
	w3 := openWriter(t, c, "orders", dstl.WriterOptions{AnyNode: true})
	if w3.Node() != entry.url {
		t.Fatalf("AnyNode writer on %s, want %s", w3.Node(), entry.url)
	}
	if err := w3.Put(ctx, "s", []byte("d"), []byte("v-d")); err != nil {
		t.Fatal(err)
	}
	if err := w3.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := counter(t, entry, "dstl_server_appended_changes_total"); got != 1 {
		t.Fatalf("AnyNode changes on the client's node: %v, want 1", got)
	}
}

// When the owner dies (stopped without leaving), once the survivors see it
// dead a new OpenWriter goes to the member that was second for the key.
func TestWriterOwnerDies(t *testing.T) {
	ctx := t.Context()
	ms := startMembers(t, 3)
	view := ms[0].gossip.Members()
	owner, others := ownerAmong(t, ms, view, "orders", 0, 7)
	// The member second in the key's order takes over (the client's
	// node may be it or the third).
	second := gossip.Owners(gossip.WriterKey("orders", 0, 7), view, 2)[1]
	c := dialMember(t, others[0])
	mustCreate(t, c, "orders", 8)
	w := openWriter(t, c, "orders", dstl.WriterOptions{})
	if w.Node() != owner.url {
		t.Fatalf("writer on %s, want the owner %s", w.Node(), owner.url)
	}
	if err := w.Put(ctx, "s", []byte("k"), []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if complete, err := w.Checkpoint(ctx, 1, nil); err != nil || !complete {
		t.Fatalf("checkpoint 1: %v %v", complete, err)
	}
	owner.stop() // a crash: no leave
	for _, m := range others {
		waitView(t, m, func(v []gossip.Member) bool {
			for _, x := range v {
				if x.ID == owner.id {
					return x.State == gossip.StateDead
				}
			}
			return false
		})
	}
	w2 := openWriter(t, c, "orders", dstl.WriterOptions{})
	var want *member
	for _, m := range others {
		if m.id == second.ID {
			want = m
		}
	}
	if w2.Node() != want.url {
		t.Fatalf("writer reopened on %s, want the new owner %s (%s)", w2.Node(), want.url, want.id)
	}
	if v, found, err := w2.Get(ctx, "s", []byte("k")); err != nil || !found || string(v) != "v1" {
		t.Fatalf("read on the new owner: %q %v %v", v, found, err)
	}
	if err := w2.Put(ctx, "s", []byte("k"), []byte("v2")); err != nil {
		t.Fatal(err)
	}
	if complete, err := w2.Checkpoint(ctx, 2, nil); err != nil || !complete {
		t.Fatalf("checkpoint 2: %v %v", complete, err)
	}
	if err := w2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := counter(t, want, "dstl_server_appended_changes_total"); got != 1 {
		t.Fatalf("changes on the new owner: %v, want 1", got)
	}
	w.Abort()
}

// Two nodes whose views disagree (a fixed view each: the other is the only
// member that can own) send the client back and forth: after
// MaxOwnerRedirects it gives up with ErrNotOwner, naming the path.
func TestOpenWriterRedirectLoop(t *testing.T) {
	store, err := blobstore.Open(t.Context(), filepath.Join(t.TempDir(), "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	var mu sync.Mutex
	views := map[string]*staticView{}
	// Each view: itself leaving (so it cannot own), the other alive. The
	// other's entry is filled in once both exist.
	mk := func(id, url string) server.Membership {
		mu.Lock()
		defer mu.Unlock()
		v := &staticView{{ID: id, State: gossip.StateAlive, Leaving: true, Self: true, Meta: gossip.Meta{RPC: url}}}
		views[id] = v
		return viewPtr{v}
	}
	a := startMember(t, store, nil, mk)
	b := startMember(t, store, nil, mk)
	*views[a.id] = append(*views[a.id], gossip.Member{ID: b.id, State: gossip.StateAlive, Meta: gossip.Meta{RPC: b.url}})
	*views[b.id] = append(*views[b.id], gossip.Member{ID: a.id, State: gossip.StateAlive, Meta: gossip.Meta{RPC: a.url}})

	c := dialMember(t, a)
	mustCreate(t, c, "orders", 8)
	_, err = c.OpenWriter(t.Context(), "orders", dstl.WriterOptions{})
	if !errors.Is(err, dstl.ErrNotOwner) || !errors.Is(err, dstl.ErrFenced) {
		t.Fatalf("open with disagreeing views: %v, want ErrNotOwner", err)
	}
	if !strings.Contains(err.Error(), "3 redirects") || !strings.Contains(err.Error(), a.url+" -> "+b.url+" -> "+a.url+" -> "+b.url) {
		t.Fatalf("error does not name the path: %v", err)
	}
	if ra, rb := counter(t, a, "dstl_server_writer_redirects_total"), counter(t, b, "dstl_server_writer_redirects_total"); ra != 2 || rb != 2 {
		t.Fatalf("redirects %v on a, %v on b, want 2 and 2", ra, rb)
	}
	// AnyNode still opens where asked.
	w := openWriter(t, c, "orders", dstl.WriterOptions{AnyNode: true})
	if w.Node() != a.url {
		t.Fatalf("AnyNode writer on %s", w.Node())
	}
	if err := w.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	// An in-process client of b cannot follow: ErrNotOwner at once.
	h := b.api.InProcess()
	ic, err := dstl.NewInProcessClient(dstl.Handlers{Streams: h.Streams, Writers: h.Writers, State: h.State, Checkpoints: h.Checkpoints})
	if err != nil {
		t.Fatal(err)
	}
	defer ic.Close()
	if _, err := ic.OpenWriter(t.Context(), "orders", dstl.WriterOptions{}); !errors.Is(err, dstl.ErrNotOwner) || !strings.Contains(err.Error(), "in-process") {
		t.Fatalf("in-process open on a non-owner: %v, want ErrNotOwner", err)
	}
}

// viewPtr reads a staticView that the test completes after the server
// starts (before any call).
type viewPtr struct{ v *staticView }

func (p viewPtr) Members() []gossip.Member { return *p.v }

// Without a cluster (embedded, or a remote node with gossip off) a node
// owns every writer: the writer lives on the client's node.
func TestWriterNodeWithoutCluster(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			c := clientIn(t, mode, nil)
			mustCreate(t, c, "orders", 8)
			for _, r := range []dstl.KeyGroupRange{{Lo: 0, Hi: 7}, {Lo: 0, Hi: 3}, {Lo: 4, Hi: 7}} {
				w := openWriter(t, c, "orders", dstl.WriterOptions{KeyGroups: &r})
				want := "in-process"
				if mode == "remote" {
					want = "http://"
				}
				if !strings.HasPrefix(w.Node(), want) {
					t.Fatalf("writer of %v on %q, want the client's node", r, w.Node())
				}
				if err := w.Apply(t.Context(), dstl.Change{KeyGroup: r.Lo, State: "s", Op: dstl.OpPut, Key: []byte("k"), Value: []byte("v")}); err != nil {
					t.Fatal(err)
				}
				if err := w.Close(t.Context()); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
