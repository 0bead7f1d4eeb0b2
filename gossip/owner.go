package gossip

import (
	"cmp"
	"slices"
	"strconv"

	"github.com/cespare/xxhash/v2"
)

// Owners returns the n members that own key, best first, by rendezvous
// (highest-random-weight) hashing over the alive members; fewer if fewer
// are alive, none for n ≤ 0. members is not modified.
//
// The function is part of the cluster's contract: every node must compute
// the same owners from the same view, across versions, so it never
// changes:
//
//	weight(key, member) = xxh64(key ‖ 0x00 ‖ member.ID, seed 0)
//
// read as an unsigned 64-bit integer (XXH64, https://xxhash.com, as
// changelog/keygroup uses), over the raw bytes of key, one zero byte and
// the member's ID. Members are ordered by weight, highest first, ties (a
// 64-bit collision) broken by ID in byte order. Only the ID enters the
// weight, so a member keeps its keys across restarts and address changes;
// dead and left members are skipped, so when a member goes only the keys
// it owned move, each to the member that was next in its order, and a
// member that (re)joins takes from every other member only keys it now
// weighs highest on. TestOwnerVectors pins values.
//
// The key the cluster hashes for a writer is WriterKey; WriterOwner picks
// a writer's owner.
func Owners(key string, members []Member, n int) []Member {
	if n <= 0 {
		return nil
	}
	type weighted struct {
		m Member
		w uint64
	}
	ws := make([]weighted, 0, len(members))
	for _, m := range members {
		if m.State != StateAlive {
			continue
		}
		ws = append(ws, weighted{m, Weight(key, m.ID)})
	}
	slices.SortFunc(ws, func(a, b weighted) int {
		if c := cmp.Compare(b.w, a.w); c != 0 {
			return c
		}
		return cmp.Compare(a.m.ID, b.m.ID)
	})
	out := make([]Member, 0, min(n, len(ws)))
	for _, w := range ws[:min(n, len(ws))] {
		out = append(out, w.m)
	}
	return out
}

// Weight is the rendezvous weight of a member for a key (see Owners).
func Weight(key, memberID string) uint64 {
	var d xxhash.Digest
	d.Reset()
	_, _ = d.WriteString(key)
	_, _ = d.Write([]byte{0})
	_, _ = d.WriteString(memberID)
	return d.Sum64()
}

// WriterKey is the rendezvous key of the writer of key groups lo..hi
// (inclusive) of stream:
//
//	stream ‖ 0x00 ‖ decimal(lo) ‖ "-" ‖ decimal(hi)
//
// e.g. "orders\x000-63". Like Owners it is part of the cluster's contract
// (docs/cluster.md, "Ownership"; TestWriterOwnerVectors pins values).
// Stream names never hold a zero byte, so the encoding is unambiguous.
func WriterKey(stream string, lo, hi uint32) string {
	b := make([]byte, 0, len(stream)+12)
	b = append(b, stream...)
	b = append(b, 0)
	b = strconv.AppendUint(b, uint64(lo), 10)
	b = append(b, '-')
	b = strconv.AppendUint(b, uint64(hi), 10)
	return string(b)
}

// CanOwn reports whether m may own writers: alive, not leaving, and with
// an RPC URL clients can be sent to. Every node decides it from gossiped
// state alone, so views that agree pick the same owners.
func CanOwn(m Member) bool {
	return m.State == StateAlive && !m.Leaving && m.MetaErr == nil && m.Meta.RPC != ""
}

// WriterOwner returns the owner of the writer of key groups lo..hi of
// stream in the view members: the first of Owners(WriterKey(stream, lo,
// hi), candidates, 1), where the candidates are the members that CanOwn.
// ok is false if there is no candidate (the caller then serves the writer
// itself: a node never refuses a writer for want of an owner).
func WriterOwner(stream string, lo, hi uint32, members []Member) (owner Member, ok bool) {
	candidates := make([]Member, 0, len(members))
	for _, m := range members {
		if CanOwn(m) {
			candidates = append(candidates, m)
		}
	}
	o := Owners(WriterKey(stream, lo, hi), candidates, 1)
	if len(o) == 0 {
		return Member{}, false
	}
	return o[0], true
}
