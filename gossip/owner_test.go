package gossip

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/cespare/xxhash/v2"
)

func aliveMembers(ids ...string) []Member {
	out := make([]Member, len(ids))
	for i, id := range ids {
		out[i] = Member{ID: id, State: StateAlive}
	}
	return out
}

func ids(ms []Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// TestOwnerVectors pins the function: these values are part of the
// cluster's contract (owner.go) and must never change.
func TestOwnerVectors(t *testing.T) {
	for _, v := range []struct {
		key, id string
		w       uint64
	}{
		{"", "", 0xe934a84adb052768},
		{"orders/0-63", "node-a", 0x6514a03a54a0f0ec},
		{"orders/0-63", "node-b", 0x87ebc445c444114f},
		{"orders/0-63", "node-c", 0x8ed9fa524b5f5bbe},
	} {
		if got := Weight(v.key, v.id); got != v.w {
			t.Errorf("Weight(%q, %q) = %#x, want %#x", v.key, v.id, got, v.w)
		}
		// The definition, spelled out: XXH64 of key ‖ 0x00 ‖ id.
		if got := xxhash.Sum64([]byte(v.key + "\x00" + v.id)); got != v.w {
			t.Errorf("xxh64(%q ‖ 0 ‖ %q) = %#x, want %#x", v.key, v.id, got, v.w)
		}
	}
	got := ids(Owners("orders/0-63", aliveMembers("node-a", "node-b", "node-c"), 3))
	if want := []string{"node-c", "node-b", "node-a"}; !slices.Equal(got, want) {
		t.Errorf("Owners order %v, want %v", got, want)
	}
}

func TestOwnersEdges(t *testing.T) {
	ms := aliveMembers("a", "b", "c")
	ms[1].State = StateDead
	ms = append(ms, Member{ID: "d", State: StateLeft})
	in := slices.Clone(ms)
	if got := Owners("k", ms, 10); len(got) != 2 || slices.Contains(ids(got), "b") || slices.Contains(ids(got), "d") {
		t.Fatalf("dead or left member among owners, or one missing: %v", ids(got))
	}
	if got := Owners("k", ms, 0); got != nil {
		t.Fatalf("n = 0: %v", got)
	}
	if got := Owners("k", nil, 2); len(got) != 0 {
		t.Fatalf("no members: %v", got)
	}
	if !slices.EqualFunc(ms, in, func(a, b Member) bool { return a.ID == b.ID && a.State == b.State }) {
		t.Fatal("Owners modified its input")
	}
	// The order of the input does not matter.
	rev := slices.Clone(ms)
	slices.Reverse(rev)
	if !slices.Equal(ids(Owners("k", ms, 3)), ids(Owners("k", rev, 3))) {
		t.Fatal("owners depend on the input order")
	}
}

// Properties over many keys: removing a member moves only the keys it
// owned (each to the member that was second); adding one moves keys only
// to it; replica sets (n = 2) change only where the removed member was in
// them; ownership is balanced within tolerance.
func TestOwnersProperties(t *testing.T) {
	const keys = 20000
	rng := rand.New(rand.NewPCG(1, 2))
	all := aliveMembers()
	for i := range 10 {
		all = append(all, Member{ID: fmt.Sprintf("node-%d-%d", i, rng.IntN(1e6)), State: StateAlive})
	}
	keyOf := func(i int) string { return fmt.Sprintf("stream-%d/%d-%d", i%37, i, i+63) }

	before := map[string][]string{}
	count := map[string]int{}
	for i := range keys {
		o := ids(Owners(keyOf(i), all, 2))
		before[keyOf(i)] = o
		count[o[0]]++
	}
	// Balance: each of 10 members owns 10% ± 15% of that (binomial sd is
	// ~2% of the mean at 20k keys; 15% is > 7 sd).
	mean := float64(keys) / float64(len(all))
	for id, c := range count {
		if d := (float64(c) - mean) / mean; d > 0.15 || d < -0.15 {
			t.Errorf("%s owns %d keys, %.1f%% off the mean %.0f", id, c, 100*d, mean)
		}
	}
	if len(count) != len(all) {
		t.Errorf("only %d of %d members own keys", len(count), len(all))
	}

	// Remove one member (dead).
	gone := all[3].ID
	less := slices.Clone(all)
	less[3].State = StateDead
	moved := 0
	for i := range keys {
		k := keyOf(i)
		old, now := before[k], ids(Owners(k, less, 2))
		if old[0] != gone && now[0] != old[0] {
			t.Fatalf("key %s moved from %s to %s though %s was not its owner", k, old[0], now[0], gone)
		}
		if old[0] == gone {
			moved++
			if now[0] != old[1] {
				t.Fatalf("key %s of %s went to %s, not to its second %s", k, gone, now[0], old[1])
			}
		}
		if !slices.Contains(old, gone) && !slices.Equal(old, now) {
			t.Fatalf("replica set of %s changed from %v to %v without %s in it", k, old, now, gone)
		}
	}
	if moved != count[gone] {
		t.Fatalf("%d keys moved, %s owned %d", moved, gone, count[gone])
	}

	// Add a member: keys move only to it.
	more := append(slices.Clone(all), Member{ID: "newcomer", State: StateAlive})
	took := 0
	for i := range keys {
		k := keyOf(i)
		now := Owners(k, more, 1)[0].ID
		if now != before[k][0] {
			if now != "newcomer" {
				t.Fatalf("key %s moved from %s to %s, not to the newcomer", k, before[k][0], now)
			}
			took++
		}
	}
	if f := float64(took) / keys; f < 0.5/11 || f > 1.5/11 {
		t.Errorf("the newcomer took %.1f%% of the keys, want about 1/11", 100*f)
	}
}

// TestWriterOwnerVectors pins the writer key encoding and the owners it
// gives: part of the cluster's contract (docs/cluster.md, "Ownership").
func TestWriterOwnerVectors(t *testing.T) {
	ms := aliveMembers("node-a", "node-b", "node-c")
	for i := range ms {
		ms[i].Meta.RPC = "http://" + ms[i].ID + ":7600"
	}
	for _, v := range []struct {
		stream  string
		lo, hi  uint32
		key     string
		a, b, c uint64
		owner   string
	}{
		{"orders", 0, 63, "orders\x000-63", 0x6a791995089e0176, 0xc487a51a46311155, 0x3d4dce94f15ea429, "node-b"},
		{"orders", 64, 127, "orders\x0064-127", 0x3ffa7d4b81afa035, 0xa72839def229051d, 0x8660bc347e926698, "node-b"},
		{"orders", 0, 127, "orders\x000-127", 0xd2ef321fa248f990, 0xa534f236e173c9e7, 0x775102a3f0724321, "node-a"},
		{"clicks", 0, 0, "clicks\x000-0", 0x258e285db20fa3c, 0x3905343f4e32fb58, 0x3fe41ff4c550a6d2, "node-c"},
		{"clicks", 5, 9, "clicks\x005-9", 0x55ab4bfa1052c23f, 0xc2bb79a0db4c037d, 0x4b56072ede5d16b2, "node-b"},
	} {
		key := WriterKey(v.stream, v.lo, v.hi)
		if key != v.key {
			t.Fatalf("WriterKey(%q, %d, %d) = %q, want %q", v.stream, v.lo, v.hi, key, v.key)
		}
		for i, w := range []uint64{v.a, v.b, v.c} {
			if got := xxhash.Sum64([]byte(key + "\x00" + ms[i].ID)); got != w {
				t.Errorf("weight(%q, %s) = %#x, want %#x", key, ms[i].ID, got, w)
			}
		}
		o, ok := WriterOwner(v.stream, v.lo, v.hi, ms)
		if !ok || o.ID != v.owner {
			t.Errorf("WriterOwner(%q, %d, %d) = %s, %v, want %s", v.stream, v.lo, v.hi, o.ID, ok, v.owner)
		}
	}
}

// Members that cannot own are skipped: dead, left, leaving, without an RPC
// URL or with metadata that did not decode; none left: no owner.
func TestWriterOwnerCandidates(t *testing.T) {
	ms := aliveMembers("node-a", "node-b", "node-c")
	for i := range ms {
		ms[i].Meta.RPC = "http://" + ms[i].ID + ":7600"
	}
	// orders 0-127: node-a, then node-b, then node-c.
	if o, _ := WriterOwner("orders", 0, 127, ms); o.ID != "node-a" {
		t.Fatalf("owner %s", o.ID)
	}
	for _, spoil := range []func(*Member){
		func(m *Member) { m.State = StateDead },
		func(m *Member) { m.State = StateLeft },
		func(m *Member) { m.Leaving = true },
		func(m *Member) { m.Meta.RPC = "" },
		func(m *Member) { m.MetaErr = fmt.Errorf("bad meta") },
	} {
		v := slices.Clone(ms)
		spoil(&v[0])
		if o, ok := WriterOwner("orders", 0, 127, v); !ok || o.ID != "node-b" {
			t.Fatalf("owner %s, %v: want node-b, the second", o.ID, ok)
		}
	}
	none := slices.Clone(ms)
	for i := range none {
		none[i].State = StateDead
	}
	if o, ok := WriterOwner("orders", 0, 127, none); ok {
		t.Fatalf("owner %s among dead members", o.ID)
	}
}
