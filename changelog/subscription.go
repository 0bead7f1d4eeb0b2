package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
)

// Registered CDC subscriptions (issue 11).
//
// A subscription is a named reader of a stream whose position is recorded
// on the blob store, so that truncation and garbage collection keep what it
// has not consumed. Its record lives at
//
//	streams/<stream>/<inc>/subscriptions/<name>/<seq:020d>
//
// as create-only numbered records (objects are immutable): the newest seq
// that exists is the subscription, a commit creates seq+1 (so of two racing
// commits exactly one wins a position; the other re-reads and tries again)
// and deletes the older ones best-effort once its record is accepted. A
// record whose put failed with an unknown outcome is resolved by reading it
// back: every record carries the nonce of its writer.
//
// The record holds the consumer's opaque token and its hold point H: the
// complete checkpoint whose state, plus the changelog after it, the
// consumer needs (0: the empty state, everything from the beginning).
//
// Invariant (brief invariant 5): while a subscription is registered and not
// expired, garbage collection keeps checkpoint H and every complete
// checkpoint after it as roots (as if retained: their restore plans'
// segments and snapshots, plus every segment their parts list), does not
// forget their journal records, and AdoptSnapshots truncates no log below
// what H needs. A create (or a commit that moves H backwards, or out of
// expiry) creates its record first and then follows the GC/root protocol of
// restorable.go — wait for the GC rounds in progress, then check that H is
// restorable and the changelog after it is replayable — so a create that
// returns nil protects data that exists.
//
// Expiry (the retention cap, Options.SubscriptionMaxHold): a subscription
// is expired once the oldest complete checkpoint it has not consumed (the
// first one after H) completed more than the cap ago, or once the journal
// forgot H or a checkpoint after it. An expired subscription holds nothing
// back. Expiry is sticky: garbage collection records it in a newer record
// (Expired), so raising the cap later does not revive a subscription whose
// data may already be gone; only a commit to a non-expired position
// (checked like a create) clears it.

// Errors of the subscription registry.
var (
	// ErrInvalidSubscriptionName: see ValidateSubscriptionName.
	ErrInvalidSubscriptionName = errors.New("invalid subscription name")
	// ErrSubscriptionExists: the name is taken on that stream.
	ErrSubscriptionExists = errors.New("subscription already exists")
	// ErrSubscriptionNotFound: no subscription of that name on the stream.
	ErrSubscriptionNotFound = errors.New("subscription not found")
	// ErrSubscriptionExpired: the position is older than the retention cap
	// (Options.SubscriptionMaxHold): registering it would hold nothing.
	// The consumer must start again from a snapshot.
	ErrSubscriptionExpired = errors.New("subscription position is past the retention cap")
)

// DefaultSubscriptionMaxHold is Options.SubscriptionMaxHold's default: a
// subscription may hold truncation and garbage collection back by a day.
const DefaultSubscriptionMaxHold = 24 * time.Hour

// subscriptionKind is the envelope kind of a subscription record.
const subscriptionKind = "subscription"

// MaxSubscriptionNameLen bounds subscription names; they appear in blob keys.
const MaxSubscriptionNameLen = 128

// maxSubscriptionToken bounds the opaque token stored in a record.
const maxSubscriptionToken = 4096

// ValidateSubscriptionName accepts the same names as streams: 1..128
// characters of [A-Za-z0-9._-], not starting with '.' or '-', so that a
// name is always one safe path element in blob keys.
func ValidateSubscriptionName(name string) error {
	if err := ValidateStreamName(name); err != nil {
		msg := strings.TrimSuffix(strings.TrimPrefix(err.Error(), "stream name"), ": "+ErrInvalidStreamName.Error())
		return fmt.Errorf("subscription name%s: %w", msg, ErrInvalidSubscriptionName)
	}
	return nil
}

// SubscriptionRecord is one registered subscription.
type SubscriptionRecord struct {
	Name string `json:"name"`
	// Token is the consumer's opaque position (a cdc.Token's bytes).
	Token []byte `json:"token,omitempty"`
	// Hold is the hold point H: the complete checkpoint whose state, plus
	// the changelog after it, the consumer needs (0: everything).
	Hold        uint64 `json:"hold"`
	CreatedAtMs int64  `json:"created_at_ms"`
	UpdatedAtMs int64  `json:"updated_at_ms"`
	// Expired: held back past the retention cap; it holds nothing. Stored
	// once observed (sticky), and also set on records returned by reads
	// when the cap has passed since.
	Expired bool `json:"expired,omitempty"`
	// Nonce names the writer of this record (resolves unknown outcomes).
	Nonce string `json:"nonce"`
	// Seq is the record's position (from its key, not stored).
	Seq uint64 `json:"-"`
}

// SubscriptionLag says how far behind a subscription is.
type SubscriptionLag struct {
	// Newest is the newest complete checkpoint.
	Newest uint64
	// Checkpoints: complete checkpoints after the hold point.
	Checkpoints uint64
	// Changes: estimated changes in them: per log of the newest
	// checkpoint, its part's SQN minus the SQN of the same log's part in
	// the hold checkpoint (0 for a log opened after it). Logs fenced in
	// between are not counted.
	Changes uint64
	// Bytes: estimated changelog bytes in them: the stored (compressed)
	// lengths of the blocks of those logs, in the newest checkpoint's
	// parts, holding SQNs above the hold's.
	Bytes uint64
	// Seconds since the first checkpoint after the hold point completed
	// (0 when caught up).
	Seconds float64
}

func subscriptionsPrefix(ns streamNS) string { return streamPrefix(ns) + "subscriptions/" }

func subscriptionPrefix(ns streamNS, name string) string {
	return subscriptionsPrefix(ns) + name + "/"
}

func subscriptionKey(ns streamNS, name string, seq uint64) string {
	return fmt.Sprintf("%s%020d", subscriptionPrefix(ns, name), seq)
}

// maxHold returns the cap of a stream's subscriptions, 0 for none: its
// entry in SubscriptionMaxHoldFor, else SubscriptionMaxHold.
func (n *Node) maxHold(stream string) time.Duration {
	cap := n.opts.SubscriptionMaxHold
	if c, ok := n.opts.SubscriptionMaxHoldFor[stream]; ok {
		cap = c
	}
	if cap < 0 {
		return 0
	}
	return cap
}

// holdExpired reports whether a subscription holding hold is past the cap
// at now, in the journal state s (see the expiry rules at the top).
func holdExpired(s *journalState, hold uint64, now time.Time, cap time.Duration) bool {
	if holdForgotten(s, hold) {
		return true
	}
	if cap <= 0 {
		return false
	}
	i, _ := slices.BinarySearchFunc(s.checkpoints, hold+1, func(c CheckpointComplete, id uint64) int {
		switch {
		case c.ID < id:
			return -1
		case c.ID > id:
			return 1
		}
		return 0
	})
	if i == len(s.checkpoints) {
		return false // caught up
	}
	return now.Sub(time.UnixMilli(s.checkpoints[i].CompletedAtMs)) > cap
}

// holdForgotten reports whether the journal forgot hold or a checkpoint
// after it: a consumer at hold can no longer be served.
func holdForgotten(s *journalState, hold uint64) bool {
	return (hold != 0 && s.forgotten(hold)) || s.forgotUpTo > hold
}

// validHold checks that hold is 0 or a complete checkpoint of s.
func validHold(stream string, s *journalState, hold uint64) error {
	if hold == 0 {
		return nil
	}
	if _, ok := s.checkpoint(hold); ok {
		return nil
	}
	if s.forgotten(hold) {
		return fmt.Errorf("stream %s: checkpoint %d was forgotten: %w", stream, hold, ErrCheckpointNotRestorable)
	}
	return fmt.Errorf("stream %s: hold checkpoint %d: %w", stream, hold, ErrCheckpointNotFound)
}

// checkNotExpired refuses a hold that is forgotten
// (ErrCheckpointNotRestorable) or past the cap (ErrSubscriptionExpired).
func (n *Node) checkNotExpired(stream string, s *journalState, hold uint64) error {
	if holdForgotten(s, hold) {
		return fmt.Errorf("stream %s: checkpoint %d or a later one was forgotten: %w", stream, hold, ErrCheckpointNotRestorable)
	}
	if holdExpired(s, hold, n.clock.Now(), n.maxHold(stream)) {
		return fmt.Errorf("stream %s: checkpoint %d: %w", stream, hold, ErrSubscriptionExpired)
	}
	return nil
}

// CreateSubscription registers subscription rec.Name of stream at
// rec.Token, holding rec.Hold. The name must be free
// (ErrSubscriptionExists) and valid (ValidateSubscriptionName); Hold must
// be 0 or a complete checkpoint (ErrCheckpointNotFound) that is still
// restorable and whose following changelog is still on the blob store
// (ErrCheckpointNotRestorable), and not past the cap
// (ErrSubscriptionExpired). The record is created first and checked after
// every GC round that may not have seen it ended, so a create that returns
// nil protects data that exists; a refused create removes its record.
func (n *Node) CreateSubscription(ctx context.Context, stream string, rec SubscriptionRecord) (SubscriptionRecord, error) {
	if err := ValidateSubscriptionName(rec.Name); err != nil {
		return SubscriptionRecord{}, err
	}
	if len(rec.Token) > maxSubscriptionToken {
		return SubscriptionRecord{}, fmt.Errorf("subscription %s: token of %d bytes exceeds %d: %w", rec.Name, len(rec.Token), maxSubscriptionToken, ErrInvalidChange)
	}
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return SubscriptionRecord{}, err
	}
	ns := h.cfg.ns()
	js := h.journal.snapshot()
	if err := validHold(stream, &js, rec.Hold); err != nil {
		return SubscriptionRecord{}, err
	}
	if err := n.checkNotExpired(stream, &js, rec.Hold); err != nil {
		return SubscriptionRecord{}, fmt.Errorf("subscription %s: %w", rec.Name, err)
	}
	now := n.clock.Now()
	seqs, err := listNumbered(ctx, n.store, subscriptionPrefix(ns, rec.Name))
	if err != nil {
		return SubscriptionRecord{}, fmt.Errorf("stream %s: subscription %s: %w", stream, rec.Name, err)
	}
	if len(seqs) > 0 {
		return SubscriptionRecord{}, fmt.Errorf("stream %s: subscription %s: %w", stream, rec.Name, ErrSubscriptionExists)
	}
	rec.CreatedAtMs, rec.UpdatedAtMs = now.UnixMilli(), now.UnixMilli()
	rec.Expired, rec.Nonce, rec.Seq = false, newNonce(), 1
	key := subscriptionKey(ns, rec.Name, rec.Seq)
	if err := n.putSubscription(ctx, key, rec); err != nil {
		if errors.Is(err, errSeqTaken) {
			return SubscriptionRecord{}, fmt.Errorf("stream %s: subscription %s: %w", stream, rec.Name, ErrSubscriptionExists)
		}
		return SubscriptionRecord{}, fmt.Errorf("stream %s: create subscription %s: %w", stream, rec.Name, err)
	}
	if err := n.makeHoldRoot(ctx, stream, rec.Hold, key); err != nil {
		return SubscriptionRecord{}, fmt.Errorf("stream %s: create subscription %s: %w", stream, rec.Name, err)
	}
	return rec, nil
}

// CommitSubscription records that subscription name of stream consumed
// through token, now holding hold. Moving the hold forward from a
// non-expired position needs no check (everything after the old hold was
// held); moving it backwards, or out of expiry, is checked like a create
// (ErrCheckpointNotRestorable, and the old record stays). A commit to a
// position that is itself past the cap is recorded, expired; one whose
// checkpoint (or a later one) the journal forgot is refused
// (ErrCheckpointNotRestorable).
func (n *Node) CommitSubscription(ctx context.Context, stream, name string, token []byte, hold uint64) (SubscriptionRecord, error) {
	if err := ValidateSubscriptionName(name); err != nil {
		return SubscriptionRecord{}, err
	}
	if len(token) > maxSubscriptionToken {
		return SubscriptionRecord{}, fmt.Errorf("subscription %s: token of %d bytes exceeds %d: %w", name, len(token), maxSubscriptionToken, ErrInvalidChange)
	}
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return SubscriptionRecord{}, err
	}
	ns := h.cfg.ns()
	for attempt := 0; ; attempt++ {
		cur, _, err := n.readSubscription(ctx, ns, name)
		if err != nil {
			return SubscriptionRecord{}, err
		}
		js := h.journal.snapshot()
		if err := validHold(stream, &js, hold); err != nil {
			return SubscriptionRecord{}, err
		}
		if holdForgotten(&js, hold) {
			return SubscriptionRecord{}, fmt.Errorf("stream %s: subscription %s: checkpoint %d or a later one was forgotten: %w", stream, name, hold, ErrCheckpointNotRestorable)
		}
		now := n.clock.Now()
		// Conservatively expired: a GC round on a node whose clock is
		// ahead by the tolerated skew may have released the old hold.
		curExpired := cur.Expired || holdExpired(&js, cur.Hold, now.Add(gcMarkerSkew), n.maxHold(stream))
		newExpired := holdExpired(&js, hold, now, n.maxHold(stream))
		check := !newExpired && (hold < cur.Hold || curExpired)
		next := cur
		next.Token, next.Hold, next.UpdatedAtMs = bytes.Clone(token), hold, now.UnixMilli()
		next.Expired, next.Nonce, next.Seq = newExpired, newNonce(), cur.Seq+1
		key := subscriptionKey(ns, name, next.Seq)
		if err := n.putSubscription(ctx, key, next); errors.Is(err, errSeqTaken) && attempt < 16 {
			continue // another commit (or GC's expiry mark) won the position
		} else if err != nil {
			return SubscriptionRecord{}, fmt.Errorf("stream %s: commit subscription %s: %w", stream, name, err)
		}
		if check {
			if err := n.makeHoldRoot(ctx, stream, hold, key); err != nil {
				return SubscriptionRecord{}, fmt.Errorf("stream %s: commit subscription %s: %w", stream, name, err)
			}
		}
		n.deleteOlderSubscriptions(ctx, ns, name, next.Seq)
		return next, nil
	}
}

// Subscription returns subscription name of stream (Expired set if the
// cap has passed).
func (n *Node) Subscription(ctx context.Context, stream, name string) (SubscriptionRecord, error) {
	if err := ValidateSubscriptionName(name); err != nil {
		return SubscriptionRecord{}, err
	}
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return SubscriptionRecord{}, err
	}
	rec, _, err := n.readSubscription(ctx, h.cfg.ns(), name)
	if err != nil {
		return SubscriptionRecord{}, err
	}
	js := h.journal.snapshot()
	rec.Expired = rec.Expired || holdExpired(&js, rec.Hold, n.clock.Now(), n.maxHold(stream))
	return rec, nil
}

// Subscriptions returns the subscriptions of stream by name (Expired set
// if the cap has passed).
func (n *Node) Subscriptions(ctx context.Context, stream string) ([]SubscriptionRecord, error) {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return nil, err
	}
	recs, err := n.subscriptions(ctx, h.cfg.ns())
	if err != nil {
		return nil, err
	}
	js := h.journal.snapshot()
	now := n.clock.Now()
	for i := range recs {
		recs[i].Expired = recs[i].Expired || holdExpired(&js, recs[i].Hold, now, n.maxHold(stream))
	}
	return recs, nil
}

// DeleteSubscription unregisters subscription name of stream: it holds
// nothing from then on (what it held is collected by later GC rounds). A
// commit racing the delete may leave a record behind: delete again.
func (n *Node) DeleteSubscription(ctx context.Context, stream, name string) error {
	if err := ValidateSubscriptionName(name); err != nil {
		return err
	}
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return err
	}
	ns := h.cfg.ns()
	seqs, err := listNumbered(ctx, n.store, subscriptionPrefix(ns, name))
	if err != nil {
		return fmt.Errorf("stream %s: subscription %s: %w", stream, name, err)
	}
	if len(seqs) == 0 {
		return fmt.Errorf("stream %s: subscription %s: %w", stream, name, ErrSubscriptionNotFound)
	}
	// Oldest first: a delete that stops half way leaves the newest record,
	// a subscription that still exists.
	for _, seq := range seqs {
		if err := n.store.Delete(ctx, subscriptionKey(ns, name, seq)); err != nil && !errors.Is(err, upload.ErrNotFound) {
			return fmt.Errorf("stream %s: delete subscription %s: %w", stream, name, err)
		}
	}
	return nil
}

// SubscriptionLag estimates how far behind rec is (see SubscriptionLag).
func (n *Node) SubscriptionLag(ctx context.Context, stream string, rec SubscriptionRecord) (SubscriptionLag, error) {
	h, err := n.streamHandle(ctx, stream)
	if err != nil {
		return SubscriptionLag{}, err
	}
	js := h.journal.snapshot()
	lag := SubscriptionLag{Newest: js.lastCheckpoint()}
	var first *CheckpointComplete
	for i := range js.checkpoints {
		if js.checkpoints[i].ID > rec.Hold {
			if first == nil {
				first = &js.checkpoints[i]
			}
			lag.Checkpoints++
		}
	}
	if first == nil {
		return lag, nil
	}
	lag.Seconds = max(0, n.clock.Now().Sub(time.UnixMilli(first.CompletedAtMs)).Seconds())
	held := map[uint64]uint64{} // epoch → SQN the hold covers
	if cp, ok := js.checkpoint(rec.Hold); ok && rec.Hold != 0 {
		for _, ref := range cp.Parts {
			p, err := n.part(ctx, ref.Key)
			if err != nil {
				return lag, fmt.Errorf("stream %s: subscription %s: %w", stream, rec.Name, err)
			}
			held[p.Epoch] = p.UpToSQN
		}
	}
	newest := js.checkpoints[len(js.checkpoints)-1]
	for _, ref := range newest.Parts {
		p, err := n.part(ctx, ref.Key)
		if err != nil {
			return lag, fmt.Errorf("stream %s: subscription %s: %w", stream, rec.Name, err)
		}
		from := held[p.Epoch]
		if p.UpToSQN > from {
			lag.Changes += p.UpToSQN - from
		}
		for _, s := range p.Segments {
			for _, b := range s.Blocks {
				if b.LastSQN > from {
					lag.Bytes += b.Length
				}
			}
		}
	}
	return lag, nil
}

// errSeqTaken: another writer's record holds that position.
var errSeqTaken = errors.New("subscription record position taken")

// putSubscription creates rec at key. An unknown outcome is resolved by
// reading the key back (our nonce: it landed); a put that did not land is
// retried a few times, since it may still land late (a retry then finds
// it). errSeqTaken if another writer's record is there.
func (n *Node) putSubscription(ctx context.Context, key string, rec SubscriptionRecord) error {
	data, err := envelope.Seal(subscriptionKind, rec)
	if err != nil {
		return err
	}
	delay := 10 * time.Millisecond
	for attempt := 0; ; attempt++ {
		err := n.store.PutIfAbsent(ctx, key, bytes.NewReader(data), int64(len(data)))
		if err == nil {
			return nil
		}
		got, rerr := n.readSubscriptionKey(ctx, key)
		switch {
		case rerr == nil && got.Nonce == rec.Nonce:
			return nil // ours landed (lost acknowledgement, late write)
		case rerr == nil:
			return fmt.Errorf("%s: %w", key, errSeqTaken)
		case errors.Is(err, upload.ErrAlreadyExists):
			// Taken, but unreadable: report the read's error.
			return fmt.Errorf("read back %s: %w", key, rerr)
		case !errors.Is(rerr, upload.ErrNotFound) || attempt >= 4:
			return fmt.Errorf("put %s: %w", key, errors.Join(err, rerr))
		}
		if serr := clock.Sleep(ctx, n.clock, delay); serr != nil {
			return fmt.Errorf("put %s: %w", key, errors.Join(err, serr))
		}
		delay *= 2
	}
}

// makeHoldRoot runs steps (2) and (3) of the GC/root protocol
// (restorable.go) for a subscription record already created at key that
// holds hold; on refusal it removes the record.
func (n *Node) makeHoldRoot(ctx context.Context, stream string, hold uint64, key string) error {
	err := n.waitGCRounds(ctx)
	if err == nil {
		err = n.checkHold(ctx, stream, hold)
	}
	if err != nil {
		if derr := n.store.Delete(context.WithoutCancel(ctx), key); derr != nil {
			err = errors.Join(err, fmt.Errorf("remove %s: %w", key, derr))
		}
		return err
	}
	return nil
}

// checkHold checks that a consumer at hold can still be served from the
// blob store: hold is not expired (nor forgotten, nor any checkpoint after
// it), its state is restorable (checkRestorable), and the changes of every
// complete checkpoint after it are in that checkpoint's parts (not
// truncated away) and their segments exist (one Stat each).
func (n *Node) checkHold(ctx context.Context, stream string, hold uint64) error {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return err
	}
	js := h.journal.snapshot()
	if err := validHold(stream, &js, hold); err != nil {
		return err
	}
	if err := n.checkNotExpired(stream, &js, hold); err != nil {
		return err
	}
	if hold != 0 {
		if err := n.checkRestorable(ctx, stream, hold, nil); err != nil {
			return err
		}
	}
	upTo := map[uint64]uint64{} // epoch → last SQN consumed
	if cp, ok := js.checkpoint(hold); ok {
		for _, ref := range cp.Parts {
			p, err := n.part(ctx, ref.Key)
			if err != nil {
				return fmt.Errorf("stream %s: checkpoint %d: %w", stream, hold, err)
			}
			upTo[p.Epoch] = p.UpToSQN
		}
	}
	stat := map[string]bool{}
	for _, cp := range js.checkpoints {
		if cp.ID <= hold {
			continue
		}
		for _, ref := range cp.Parts {
			p, err := n.part(ctx, ref.Key)
			if err != nil {
				return fmt.Errorf("stream %s: checkpoint %d: %w", stream, cp.ID, err)
			}
			need := upTo[p.Epoch] + 1
			if p.UpToSQN < need {
				continue // nothing new of this log
			}
			if p.TruncatedBefore > need {
				return fmt.Errorf("stream %s: checkpoint %d: log %s truncated before %d, changes from %d needed: %w",
					stream, cp.ID, p.LogID, p.TruncatedBefore, need, ErrCheckpointNotRestorable)
			}
			for _, s := range p.Segments {
				if s.lastSQN() >= need {
					stat[s.Key] = true
				}
			}
			upTo[p.Epoch] = p.UpToSQN
		}
	}
	keys := make([]string, 0, len(stat))
	for k := range stat {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if _, err := n.store.Stat(ctx, k); errors.Is(err, upload.ErrNotFound) {
			return fmt.Errorf("stream %s: changes after checkpoint %d: segment %s was collected: %w", stream, hold, k, ErrCheckpointNotRestorable)
		} else if err != nil {
			return fmt.Errorf("stream %s: changes after checkpoint %d: %w", stream, hold, err)
		}
	}
	return nil
}

// readSubscriptionKey reads and verifies one record.
func (n *Node) readSubscriptionKey(ctx context.Context, key string) (SubscriptionRecord, error) {
	data, err := readAll(ctx, n.store, key)
	if err != nil {
		return SubscriptionRecord{}, err
	}
	return decodeSubscription(key, data)
}

// decodeSubscription decodes the record stored at key: sealed, of the
// name its key says, with a valid name.
func decodeSubscription(key string, data []byte) (SubscriptionRecord, error) {
	var rec SubscriptionRecord
	if err := envelope.Open(key, data, subscriptionKind, &rec); err != nil {
		return SubscriptionRecord{}, err
	}
	i := strings.LastIndexByte(key, '/')
	seq, err := strconv.ParseUint(key[i+1:], 10, 64)
	if err != nil || i < 0 {
		return SubscriptionRecord{}, fmt.Errorf("subscription record %s: bad key: %w", key, envelope.ErrCorrupt)
	}
	if name := key[strings.LastIndexByte(key[:i], '/')+1 : i]; rec.Name != name || ValidateSubscriptionName(rec.Name) != nil {
		return SubscriptionRecord{}, fmt.Errorf("subscription record %s names subscription %q: %w", key, rec.Name, envelope.ErrCorrupt)
	}
	rec.Seq = seq
	return rec, nil
}

// readSubscription reads the newest record of name, and how many records
// it has.
func (n *Node) readSubscription(ctx context.Context, ns streamNS, name string) (SubscriptionRecord, int, error) {
	for attempt := 0; ; attempt++ {
		seqs, err := listNumbered(ctx, n.store, subscriptionPrefix(ns, name))
		if err != nil {
			return SubscriptionRecord{}, 0, fmt.Errorf("stream %s: subscription %s: %w", ns.name, name, err)
		}
		if len(seqs) == 0 {
			return SubscriptionRecord{}, 0, fmt.Errorf("stream %s: subscription %s: %w", ns.name, name, ErrSubscriptionNotFound)
		}
		rec, err := n.readSubscriptionKey(ctx, subscriptionKey(ns, name, seqs[len(seqs)-1]))
		if errors.Is(err, upload.ErrNotFound) && attempt < 3 {
			continue // deleted since the listing (a delete, or a refused commit)
		}
		if err != nil {
			return SubscriptionRecord{}, 0, fmt.Errorf("stream %s: subscription %s: %w", ns.name, name, err)
		}
		return rec, len(seqs), nil
	}
}

// subscriptions reads the newest record of every subscription of ns.
func (n *Node) subscriptions(ctx context.Context, ns streamNS) ([]SubscriptionRecord, error) {
	prefix := subscriptionsPrefix(ns)
	var names []string
	for o, err := range upload.Walk(ctx, n.store, prefix, "") {
		if err != nil {
			return nil, fmt.Errorf("stream %s: list subscriptions: %w", ns.name, err)
		}
		name, _, ok := strings.Cut(strings.TrimPrefix(o.Key, prefix), "/")
		if ok && (len(names) == 0 || names[len(names)-1] != name) {
			names = append(names, name)
		}
	}
	var out []SubscriptionRecord
	for _, name := range names {
		rec, _, err := n.readSubscription(ctx, ns, name)
		if errors.Is(err, ErrSubscriptionNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, rec)
	}
	return out, nil
}

// deleteOlderSubscriptions deletes the records of name below seq, best
// effort (a later commit or GC retries).
func (n *Node) deleteOlderSubscriptions(ctx context.Context, ns streamNS, name string, seq uint64) {
	seqs, err := listNumbered(ctx, n.store, subscriptionPrefix(ns, name))
	if err != nil {
		n.log.Warn("subscription: list old records", "stream", ns.name, "subscription", name, "err", err)
		return
	}
	for _, s := range seqs {
		if s >= seq {
			break
		}
		if err := n.store.Delete(ctx, subscriptionKey(ns, name, s)); err != nil && !errors.Is(err, upload.ErrNotFound) {
			n.log.Warn("subscription: delete old record", "stream", ns.name, "subscription", name, "seq", s, "err", err)
		}
	}
}

// subscriptionHold is what the registered subscriptions of a stream hold:
// nothing (held false), or every complete checkpoint from hold on (hold 0:
// everything).
type subscriptionHold struct {
	held bool
	hold uint64
}

// covers reports whether checkpoint id is held.
func (sh subscriptionHold) covers(id uint64) bool { return sh.held && id >= sh.hold }

// subscriptionHolds lists the subscriptions of h's stream and returns the
// lowest hold of those not expired in js at the node's clock. With mark
// (garbage collection), a subscription found expired whose record does not
// say so gets a newer record that does (best effort: a racing commit wins).
func (n *Node) subscriptionHolds(ctx context.Context, h *streamHandle, js *journalState, mark bool) (subscriptionHold, error) {
	ns := h.cfg.ns()
	recs, err := n.subscriptions(ctx, ns)
	if err != nil {
		return subscriptionHold{}, err
	}
	now := n.clock.Now()
	var sh subscriptionHold
	for _, rec := range recs {
		if rec.Expired {
			continue
		}
		if holdExpired(js, rec.Hold, now, n.maxHold(h.cfg.Name)) {
			if mark {
				n.markExpired(ctx, ns, rec, now)
			}
			continue
		}
		if !sh.held || rec.Hold < sh.hold {
			sh = subscriptionHold{held: true, hold: rec.Hold}
		}
	}
	return sh, nil
}

// markExpired records that rec is expired in a newer record.
func (n *Node) markExpired(ctx context.Context, ns streamNS, rec SubscriptionRecord, now time.Time) {
	next := rec
	next.Expired, next.Nonce, next.Seq = true, newNonce(), rec.Seq+1
	key := subscriptionKey(ns, rec.Name, next.Seq)
	if err := n.putSubscription(ctx, key, next); err != nil {
		if !errors.Is(err, errSeqTaken) {
			n.log.Warn("subscription: record expiry", "stream", ns.name, "subscription", rec.Name, "err", err)
		}
		return
	}
	n.log.Info("subscription expired: it no longer holds truncation or garbage collection back",
		"stream", ns.name, "subscription", rec.Name, "hold", rec.Hold, "cap", n.maxHold(ns.name), "at", now)
	n.deleteOlderSubscriptions(ctx, ns, rec.Name, next.Seq)
}

// truncationLimit returns the lowest truncation point ("before") a log of
// epoch may be truncated to while the subscriptions hold sh: the SQN after
// the log's part in the hold checkpoint, 1 (nothing) for a log with no part
// there (opened after it) or when everything is held, and no limit
// (^uint64(0)) when nothing is held.
func (n *Node) truncationLimit(ctx context.Context, stream string, js *journalState, sh subscriptionHold, epoch uint64) (uint64, error) {
	if !sh.held {
		return ^uint64(0), nil
	}
	if sh.hold == 0 {
		return 1, nil
	}
	cp, ok := js.checkpoint(sh.hold)
	if !ok {
		return 1, nil
	}
	for _, ref := range cp.Parts {
		if ref.Epoch != epoch {
			continue
		}
		p, err := n.part(ctx, ref.Key)
		if err != nil {
			return 0, fmt.Errorf("stream %s: checkpoint %d: %w", stream, sh.hold, err)
		}
		return p.UpToSQN + 1, nil
	}
	return 1, nil
}

// markHeldCheckpoints adds to refs what the held checkpoints of js need:
// each one's restore plan (through addCheckpoint, which also marks the
// snapshots it uses) and every segment its parts list, so that the
// changes between consecutive held checkpoints stay readable even where a
// later part no longer lists them.
func (n *Node) markHeldCheckpoints(ctx context.Context, stream string, js *journalState, sh subscriptionHold, all keygroup.Range, refs map[string]bool, addCheckpoint func(uint64, keygroup.Range) error) error {
	if !sh.held {
		return nil
	}
	for _, cp := range js.checkpoints {
		if !sh.covers(cp.ID) {
			continue
		}
		if err := addCheckpoint(cp.ID, all); err != nil {
			return err
		}
		for _, ref := range cp.Parts {
			p, err := n.part(ctx, ref.Key)
			if err != nil {
				return fmt.Errorf("gc: stream %s: %w", stream, err)
			}
			for _, s := range p.Segments {
				refs[s.Key] = true
			}
		}
	}
	return nil
}
