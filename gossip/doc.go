// Package gossip is dstl's cluster membership: which nodes exist, how to
// reach them and whether they are alive, learned by gossip over
// hashicorp/memberlist (SWIM), plus the rendezvous-hashing function that
// will decide ownership (owner.go).
//
// A Cluster keeps its own view of the members, copied inside memberlist's
// event callbacks: memberlist's Members() hands out pointers it keeps
// mutating, so nothing here reads memberlist's node structs outside those
// callbacks. The view is what Members, Watch and the metrics report.
//
// What a member gossips (its metadata, meta.go) is small, versioned and
// decoded defensively: any bytes decode to a Meta or an error, never a
// panic.
//
// docs/cluster.md describes the membership, its timings and what of the
// cluster is not built yet.
package gossip
