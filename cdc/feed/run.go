package feed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"slices"
	"time"

	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/segments"
)

// feed is one subscription's run.
type feed struct {
	cfg  Config
	req  Request
	inc  string
	r    keygroup.Range
	st   *state
	send func(*Batch) error

	// The batch being built and the position of its checkpoint.
	out     Batch
	arena   []byte
	base    cdc.Token
	ordinal uint64 // events of the current checkpoint counted so far
	skip    uint64 // events of the current checkpoint already delivered
	reset   bool   // the next batch sent carries Reset
	newest  uint64
	// complete: the complete checkpoints of the last journal read
	// (checkpoints), oldest first.
	complete []changelog.CheckpointComplete

	// descent: the checkpoints the complete checkpoint descentOf descends
	// from (next).
	descent   map[uint64]bool
	descentOf uint64
}

// Run delivers the feed req asks for to send, batch after batch, until ctx
// ends, send fails, or (NoFollow) every complete checkpoint is delivered.
// A Batch and everything it holds are valid only during its send call.
func Run(ctx context.Context, cfg Config, req Request, send func(*Batch) error) error {
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = defaultPollInterval
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = defaultCacheSize
	}
	if cfg.CacheBytes <= 0 {
		cfg.CacheBytes = defaultCacheBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case req.MaxEvents == 0:
		req.MaxEvents = defaultMaxEvents
	case req.MaxEvents < 0 || req.MaxEvents > maxMaxEvents:
		return fmt.Errorf("%w: max events %d, want 1..%d", ErrInvalidRequest, req.MaxEvents, maxMaxEvents)
	}
	if req.Form == 0 {
		req.Form = cdc.FormUpsert
	}
	if req.Form != cdc.FormUpsert && req.Form != cdc.FormRetract {
		return fmt.Errorf("%w: form %d", ErrInvalidRequest, req.Form)
	}
	scfg, err := cfg.Node.Stream(ctx, req.Stream)
	if err != nil {
		return err
	}
	r := keygroup.Full(scfg.KeyGroups)
	if req.KeyGroups != nil {
		if err := req.KeyGroups.Validate(scfg.KeyGroups); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
		r = *req.KeyGroups
	}
	f := &feed{cfg: cfg, req: req, inc: scfg.Incarnation, r: r, send: send}
	defer func() {
		if f.st != nil {
			if err := f.st.close(); err != nil {
				cfg.Logger.Warn("cdc: close feed store", "stream", req.Stream, "err", err)
			}
		}
	}()
	return f.run(ctx)
}

// token returns a token of this feed at the given position.
func (f *feed) token(snapshot bool, after, checkpoint, ordinal uint64) cdc.Token {
	return cdc.Token{Stream: f.req.Stream, Incarnation: f.inc, KeyGroups: f.r, Form: f.req.Form, Snapshot: snapshot, After: after, Checkpoint: checkpoint, Ordinal: ordinal}
}

// checkpoints returns the complete checkpoint ids of the stream, in
// journal order (ascending: a completion needs an id above the newest).
func (f *feed) checkpoints(ctx context.Context) ([]uint64, error) {
	scfg, cps, err := f.cfg.Node.StreamCheckpoints(ctx, f.req.Stream)
	if err != nil {
		return nil, err
	}
	if scfg.Incarnation != f.inc {
		// Its checkpoints are another stream's: never continue with them.
		return nil, fmt.Errorf("stream %s was deleted and created again: %w", f.req.Stream, changelog.ErrStreamNotFound)
	}
	ids := make([]uint64, len(cps))
	for i, c := range cps {
		ids[i] = c.ID
	}
	if len(ids) > 0 {
		f.newest = ids[len(ids)-1]
	}
	f.complete = cps
	return ids, nil
}

func (f *feed) run(ctx context.Context) error {
	after, err := f.begin(ctx)
	if err != nil {
		return err
	}
	for {
		ids, err := f.checkpoints(ctx)
		if err != nil {
			return err
		}
		next, ok, err := f.next(ctx, ids, after)
		if err != nil {
			return err
		}
		if !ok {
			if f.req.NoFollow {
				return nil
			}
			if err := f.wait(ctx); err != nil {
				return err
			}
			continue
		}
		err = f.deliver(ctx, after, next, 0)
		if isLost(err) {
			after, err = f.lost(ctx, fmt.Errorf("checkpoint %d after %d: %w", next, after, err))
		} else if err == nil {
			after = next
		}
		if err != nil {
			return err
		}
	}
}

// next returns the checkpoint to deliver after checkpoint after: the first
// complete one after it that the newest complete checkpoint descends from
// in some of the feed's key groups. A checkpoint that writers rolled back
// (reopened from an older one, abandoning it) is skipped, so its changes
// never appear to a subscriber that has not consumed it yet; one that
// consumed it gets the difference to the next (deliver).
func (f *feed) next(ctx context.Context, ids []uint64, after uint64) (uint64, bool, error) {
	i, _ := slices.BinarySearch(ids, after+1)
	if i == len(ids) {
		return 0, false, nil
	}
	newest := ids[len(ids)-1]
	if f.descentOf != newest {
		// The journal view ids came from (checkpoints): no second read, and
		// the incarnation it checked.
		anc := map[uint64]bool{}
		if err := f.ancestors(ctx, f.complete, newest, f.r, anc, 0); err != nil {
			return 0, false, err
		}
		f.descent, f.descentOf = anc, newest
	}
	for ; i < len(ids); i++ {
		if ids[i] == newest || f.descent[ids[i]] {
			return ids[i], true, nil
		}
	}
	return 0, false, nil
}

// ancestors adds to anc the checkpoints whose state of some key group of r
// checkpoint cp continues: those with a part of the same epoch as one of
// cp's (the same log, up to an earlier SQN), and recursively the ancestors
// of the checkpoint each epoch started from.
func (f *feed) ancestors(ctx context.Context, cps []changelog.CheckpointComplete, cp uint64, r keygroup.Range, anc map[uint64]bool, depth int) error {
	if depth > len(cps)+1 {
		return fmt.Errorf("cdc: stream %s: checkpoint %d: epochs start from each other in a cycle", f.req.Stream, cp)
	}
	parts, err := f.cfg.Node.CheckpointParts(ctx, f.req.Stream, cp)
	if err != nil {
		return err
	}
	for _, p := range parts {
		if !p.KeyGroups.Overlaps(r) {
			continue
		}
		for _, c := range cps {
			if c.ID > cp {
				break
			}
			for _, ref := range c.Parts {
				if ref.Epoch == p.Epoch {
					anc[c.ID] = true
					break
				}
			}
		}
		if p.FromCheckpoint != 0 {
			sub := keygroup.Range{Lo: max(r.Lo, p.KeyGroups.Lo), Hi: min(r.Hi, p.KeyGroups.Hi)}
			if err := f.ancestors(ctx, cps, p.FromCheckpoint, sub, anc, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// begin establishes the starting position and returns the checkpoint whose
// state is delivered.
func (f *feed) begin(ctx context.Context) (uint64, error) {
	ids, err := f.checkpoints(ctx)
	if err != nil {
		return 0, err
	}
	complete := func(id uint64) error {
		if id == 0 {
			return nil
		}
		if _, ok := slices.BinarySearch(ids, id); ok {
			return nil
		}
		if id > f.newest {
			return fmt.Errorf("%w: checkpoint %d is not complete (newest is %d)", ErrTokenFuture, id, f.newest)
		}
		return fmt.Errorf("checkpoint %d: %w", id, changelog.ErrCheckpointNotFound)
	}
	if tok := f.req.From; tok != nil {
		switch {
		case tok.Stream != f.req.Stream:
			return 0, fmt.Errorf("%w: token of stream %q", ErrTokenMismatch, tok.Stream)
		case tok.Incarnation != f.inc:
			return 0, fmt.Errorf("%w: token of an earlier incarnation of stream %q (deleted and created again)", ErrTokenMismatch, tok.Stream)
		// Ordinals count the events of the token's key groups in its form,
		// so a position inside a checkpoint or a snapshot resumes only
		// with the same key groups and form. A boundary says the state of
		// the token's key groups was delivered: it resumes any of them
		// (not more), in any form; the start of a snapshot (ordinal 0)
		// resumes anything (the scan starts with a reset).
		case tok.Ordinal != 0 && tok.KeyGroups != f.r:
			return 0, fmt.Errorf("%w: token of key groups %s, subscription has %s", ErrTokenMismatch, tok.KeyGroups, f.r)
		case tok.Boundary() && !tok.KeyGroups.Covers(f.r):
			return 0, fmt.Errorf("%w: token of key groups %s does not cover the subscription's %s (their state was not delivered)", ErrTokenMismatch, tok.KeyGroups, f.r)
		case tok.Ordinal != 0 && tok.Form != f.req.Form:
			return 0, fmt.Errorf("%w: token of the %s form, subscription asks for %s", ErrTokenMismatch, tok.Form, f.req.Form)
		}
		if err := errors.Join(complete(tok.After), complete(tok.Checkpoint)); err != nil {
			if errors.Is(err, ErrTokenFuture) {
				return 0, err
			}
			return f.lost(ctx, err)
		}
		if tok.Snapshot {
			err = f.snapshot(ctx, tok.Checkpoint, tok.Ordinal)
			if isLost(err) {
				return f.lost(ctx, err)
			}
			return tok.Checkpoint, err
		}
		if err := f.at(ctx, tok.After); err != nil {
			if isLost(err) {
				return f.lost(ctx, err)
			}
			return 0, err
		}
		if tok.Checkpoint == 0 {
			return tok.After, nil
		}
		err = f.deliver(ctx, tok.After, tok.Checkpoint, tok.Ordinal)
		if isLost(err) {
			return f.lost(ctx, err)
		}
		return tok.Checkpoint, err
	}
	switch f.req.Start {
	case StartSnapshot:
		return f.snapshotNewest(ctx)
	case StartLatest:
		return f.newest, f.at(ctx, f.newest)
	}
	return 0, f.at(ctx, 0)
}

// at positions the feed at the state of checkpoint cp: restored, or, in
// the upsert form, not at all until a change needs it (materialize).
func (f *feed) at(ctx context.Context, cp uint64) error {
	if f.req.Form == cdc.FormUpsert {
		return nil
	}
	return f.fresh(ctx, cp)
}

// lost handles a position that cannot be replayed: a snapshot of the newest
// checkpoint, or ErrMustResnapshot.
func (f *feed) lost(ctx context.Context, cause error) (uint64, error) {
	if f.req.NoAutoSnapshot {
		return 0, fmt.Errorf("%w: %w", ErrMustResnapshot, cause)
	}
	f.cfg.Logger.Info("cdc: position no longer replayable, starting from a snapshot", "stream", f.req.Stream, "cause", cause)
	if _, err := f.checkpoints(ctx); err != nil {
		return 0, err
	}
	return f.snapshotNewest(ctx)
}

func (f *feed) snapshotNewest(ctx context.Context) (uint64, error) {
	if f.newest == 0 {
		return 0, f.at(ctx, 0)
	}
	return f.newest, f.snapshot(ctx, f.newest, 0)
}

// fresh replaces the feed's state with the state at checkpoint cp.
func (f *feed) fresh(ctx context.Context, cp uint64) error {
	st, err := openState(&f.cfg, f.req.Stream, f.r)
	if err != nil {
		return err
	}
	if err := st.restore(ctx, cp); err != nil {
		return errors.Join(err, st.close())
	}
	if f.st != nil {
		if err := f.st.close(); err != nil {
			f.cfg.Logger.Warn("cdc: close feed store", "stream", f.req.Stream, "err", err)
		}
	}
	f.st = st
	return nil
}

// startCheckpoint begins the events of one checkpoint.
func (f *feed) startCheckpoint(base cdc.Token, skip uint64) {
	f.base, f.ordinal, f.skip = base, 0, skip
	f.out = Batch{Checkpoint: base.Checkpoint, Base: base, Snapshot: base.Snapshot}
	f.arena = f.arena[:0]
}

// emit counts one event of the current checkpoint and adds it to the batch
// unless it was delivered before (ordinal ≤ skip) or is filtered out.
func (f *feed) emit(ctx context.Context, k Kind, kg uint16, st string, key, value []byte, ts int64) error {
	f.ordinal++
	if f.ordinal <= f.skip {
		return nil
	}
	if f.req.State != "" && st != f.req.State {
		return nil
	}
	if len(f.req.KeyPrefix) > 0 && !bytes.HasPrefix(key, f.req.KeyPrefix) {
		return nil
	}
	start := len(f.arena)
	f.arena = append(f.arena, key...)
	f.arena = append(f.arena, value...)
	kb := f.arena[start : start+len(key) : start+len(key)]
	vb := f.arena[start+len(key) : len(f.arena) : len(f.arena)]
	if value == nil {
		vb = nil
	}
	f.out.Events = append(f.out.Events, Event{Kind: k, KeyGroup: kg, State: st, Key: kb, Value: vb, Ordinal: f.ordinal, TimestampMs: ts})
	f.out.Bytes += len(key) + len(value)
	if len(f.out.Events) >= f.req.MaxEvents || f.out.Bytes >= batchBytes {
		return f.flush(ctx, false, cdc.Token{})
	}
	return nil
}

// flush sends the batch built so far; complete ends the checkpoint (the
// batch then resumes at next, a boundary token).
func (f *feed) flush(ctx context.Context, complete bool, next cdc.Token) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b := &f.out
	b.Complete, b.Newest = complete, f.newest
	b.Token = f.base.WithOrdinal(f.ordinal)
	if complete {
		b.Token = next
	}
	b.Reset, f.reset = f.reset, false
	if err := f.send(b); err != nil {
		return err
	}
	f.out = Batch{Checkpoint: f.base.Checkpoint, Base: f.base, Snapshot: f.base.Snapshot, Events: b.Events[:0]}
	f.arena = f.arena[:0]
	return nil
}

// snapshot delivers a consistent scan of checkpoint cp (rows after the
// first skip) and leaves the feed's state at cp.
func (f *feed) snapshot(ctx context.Context, cp uint64, skip uint64) error {
	if err := f.fresh(ctx, cp); err != nil {
		return err
	}
	f.startCheckpoint(f.token(true, 0, cp, 0), skip)
	f.reset = skip == 0
	kind := KindPut
	if f.req.Form == cdc.FormRetract {
		kind = KindInsert
	}
	for row, err := range f.st.store.Rows(ctx, f.req.Stream, f.r) {
		if err != nil {
			return err
		}
		if err := f.emit(ctx, kind, row.KeyGroup, row.State, row.Key, row.Value, 0); err != nil {
			return err
		}
	}
	if err := f.flush(ctx, true, f.token(false, cp, 0, 0)); err != nil {
		return err
	}
	if f.req.Form == cdc.FormUpsert {
		// What follows needs no state until a MERGE or CLEAR (materialize).
		err := f.st.close()
		f.st = nil
		return err
	}
	return nil
}

// deliver sends the events of checkpoint cp after the state at after
// (the feed's state), skipping the first skip, and leaves the state at cp.
func (f *feed) deliver(ctx context.Context, after, cp, skip uint64) error {
	f.startCheckpoint(f.token(false, after, cp, 0), skip)
	pl, ok, err := f.lineage(ctx, after, cp)
	if err != nil {
		return err
	}
	if !ok {
		if f.st == nil {
			if err := f.fresh(ctx, after); err != nil {
				return err
			}
		}
		if err := f.diff(ctx, cp); err != nil {
			return err
		}
		return f.flush(ctx, true, f.token(false, cp, 0, 0))
	}
	var n uint64 // changes of the plan seen
	for c, err := range f.cfg.Node.ReplayPlan(ctx, pl) {
		if err != nil {
			return err
		}
		if f.st == nil {
			// Stateless (upsert form): a PUT or DELETE needs no state.
			if c.Op == segments.OpPut || c.Op == segments.OpDelete {
				if err := f.emitUpsert(ctx, c); err != nil {
					return err
				}
				n++
				continue
			}
			if err := f.materialize(ctx, after, pl, n); err != nil {
				return err
			}
		}
		if err := f.apply(ctx, c); err != nil {
			return err
		}
		n++
	}
	return f.flush(ctx, true, f.token(false, cp, 0, 0))
}

// emitUpsert emits the upsert event of a PUT or DELETE.
func (f *feed) emitUpsert(ctx context.Context, c segments.Change) error {
	if c.Op == segments.OpPut {
		return f.emit(ctx, KindPut, c.KeyGroup, c.State, c.Key, c.Value, c.TimestampMs)
	}
	return f.emit(ctx, KindDelete, c.KeyGroup, c.State, c.Key, nil, c.TimestampMs)
}

// materialize builds the state a stateless feed needs from here on (a
// MERGE or CLEAR needs the key's or the state's rows): the state at after
// plus the first n changes of plan pl. The feed stays stateful afterwards.
func (f *feed) materialize(ctx context.Context, after uint64, pl changelog.RestorePlan, n uint64) error {
	if err := f.fresh(ctx, after); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	var i uint64
	for c, err := range f.cfg.Node.ReplayPlan(ctx, pl) {
		if err != nil {
			return err
		}
		if err := f.st.fold(ctx, c); err != nil {
			return err
		}
		if i++; i == n {
			break
		}
	}
	return nil
}

// lineage returns the plan of the changes between checkpoints after and cp
// when every key group of the feed reached cp by appending to its state at
// after (no rollback to an older checkpoint, no log truncated in between):
// the restore plan of cp with after's state as its only base.
func (f *feed) lineage(ctx context.Context, after, cp uint64) (changelog.RestorePlan, bool, error) {
	node := f.cfg.Node
	var (
		base       *changelog.Snapshot
		afterParts []changelog.Part
	)
	if after != 0 {
		var err error
		afterParts, err = node.CheckpointParts(ctx, f.req.Stream, after)
		if err != nil {
			return changelog.RestorePlan{}, false, err
		}
		base = &changelog.Snapshot{Stream: f.req.Stream, Checkpoint: after, Logs: make(map[string]uint64, len(afterParts))}
		for _, pt := range afterParts {
			base.Logs[pt.LogID] = pt.UpToSQN
		}
	}
	pl, err := node.PlanRestoreFrom(ctx, f.req.Stream, cp, f.r, base)
	if errors.Is(err, changelog.ErrLogTruncated) {
		return changelog.RestorePlan{}, false, nil
	}
	if err != nil {
		return changelog.RestorePlan{}, false, err
	}
	// Every key group of the feed must continue its state at after: taken
	// from after (a base of after), or empty at after and rebuilt from the
	// empty state (no part in after, no base), or empty in both (no part
	// in cp: key groups no writer owns hold nothing; a checkpoint cannot
	// complete while owned ones are orphaned).
	cpParts, err := node.CheckpointParts(ctx, f.req.Stream, cp)
	if err != nil {
		return changelog.RestorePlan{}, false, err
	}
	fromAfter, ownedAtCP, ownedAtAfter := f.keyGroupSet(), f.keyGroupSet(), f.keyGroupSet()
	for _, b := range pl.Bases {
		if b.Snapshot.Checkpoint != after {
			return changelog.RestorePlan{}, false, nil
		}
		for _, br := range b.Ranges {
			fromAfter.add(br)
		}
	}
	for _, p := range cpParts {
		ownedAtCP.add(p.KeyGroups)
	}
	for _, p := range afterParts {
		ownedAtAfter.add(p.KeyGroups)
	}
	for i := range fromAfter.in {
		if !fromAfter.in[i] && ownedAtCP.in[i] && ownedAtAfter.in[i] {
			return changelog.RestorePlan{}, false, nil // a key group does not continue from after
		}
	}
	return pl, true, nil
}

// keyGroups is a set of the feed's key groups.
type keyGroups struct {
	r  keygroup.Range
	in []bool // in[g-r.Lo]
}

func (f *feed) keyGroupSet() keyGroups {
	return keyGroups{r: f.r, in: make([]bool, int(f.r.Hi)-int(f.r.Lo)+1)}
}

// add adds the key groups of o that are the feed's.
func (k keyGroups) add(o keygroup.Range) {
	for g := max(int(o.Lo), int(k.r.Lo)); g <= min(int(o.Hi), int(k.r.Hi)); g++ {
		k.in[g-int(k.r.Lo)] = true
	}
}

// apply folds one change into the state and emits the events it causes.
func (f *feed) apply(ctx context.Context, c segments.Change) error {
	retract := f.req.Form == cdc.FormRetract
	switch c.Op {
	case segments.OpPut, segments.OpMerge:
		value := c.Value
		var old []byte
		existed := false
		if retract || c.Op == segments.OpMerge {
			v, ok, err := f.st.get(c.KeyGroup, c.State, c.Key)
			if err != nil {
				return err
			}
			old, existed = v, ok
			if c.Op == segments.OpMerge && ok {
				value = append(slices.Clip(v), c.Value...)
			}
		}
		switch {
		case !retract:
			if err := f.emit(ctx, KindPut, c.KeyGroup, c.State, c.Key, value, c.TimestampMs); err != nil {
				return err
			}
		case existed:
			if err := f.emit(ctx, KindUpdateBefore, c.KeyGroup, c.State, c.Key, old, c.TimestampMs); err != nil {
				return err
			}
			if err := f.emit(ctx, KindUpdateAfter, c.KeyGroup, c.State, c.Key, value, c.TimestampMs); err != nil {
				return err
			}
		default:
			if err := f.emit(ctx, KindInsert, c.KeyGroup, c.State, c.Key, value, c.TimestampMs); err != nil {
				return err
			}
		}
		return f.st.set(ctx, c.KeyGroup, c.State, c.Key, value, false)
	case segments.OpDelete:
		if retract {
			old, ok, err := f.st.get(c.KeyGroup, c.State, c.Key)
			if err != nil {
				return err
			}
			if !ok {
				return nil // nothing to retract; nothing changes
			}
			if err := f.emit(ctx, KindDelete, c.KeyGroup, c.State, c.Key, old, c.TimestampMs); err != nil {
				return err
			}
		} else if err := f.emit(ctx, KindDelete, c.KeyGroup, c.State, c.Key, nil, c.TimestampMs); err != nil {
			return err
		}
		return f.st.set(ctx, c.KeyGroup, c.State, c.Key, nil, true)
	case segments.OpClear:
		return f.st.clearState(ctx, c.KeyGroup, c.State, c.TimestampMs, func(key, value []byte) error {
			if !retract {
				value = nil
			}
			return f.emit(ctx, KindDelete, c.KeyGroup, c.State, key, value, c.TimestampMs)
		})
	}
	return fmt.Errorf("cdc: change SQN %d of log %s: unknown op %v", c.SQN, c.LogID, c.Op)
}

// diff emits the difference between the feed's state and the state at
// checkpoint cp, in key order, then makes the latter the feed's state.
// Used when cp does not continue the state the feed holds (a rollback, a
// truncated log): the net change, not the individual changes.
func (f *feed) diff(ctx context.Context, cp uint64) error {
	if err := f.st.flush(ctx); err != nil {
		return err
	}
	next, err := openState(&f.cfg, f.req.Stream, f.r)
	if err != nil {
		return err
	}
	if err := next.restore(ctx, cp); err != nil {
		return errors.Join(err, next.close())
	}
	if err := f.emitDiff(ctx, f.st, next); err != nil {
		return errors.Join(err, next.close())
	}
	old := f.st
	f.st = next
	return old.close()
}

func (f *feed) emitDiff(ctx context.Context, old, next *state) error {
	retract := f.req.Form == cdc.FormRetract
	oldNext, oldStop := iter.Pull2(old.store.Rows(ctx, f.req.Stream, f.r))
	defer oldStop()
	newNext, newStop := iter.Pull2(next.store.Rows(ctx, f.req.Stream, f.r))
	defer newStop()
	o, oerr, ook := oldNext()
	n, nerr, nok := newNext()
	var ok1, nk1 []byte
	for {
		if oerr != nil {
			return oerr
		}
		if nerr != nil {
			return nerr
		}
		if !ook && !nok {
			return nil
		}
		c := 0
		switch {
		case !ook:
			c = 1
		case !nok:
			c = -1
		default:
			ok1 = old.overlayKey(o.KeyGroup, o.State, o.Key)
			nk1 = next.overlayKey(n.KeyGroup, n.State, n.Key)
			c = bytes.Compare(ok1, nk1)
		}
		var err error
		switch {
		case c < 0: // removed
			v := o.Value
			if !retract {
				v = nil
			}
			err = f.emit(ctx, KindDelete, o.KeyGroup, o.State, o.Key, v, 0)
			o, oerr, ook = oldNext()
		case c > 0: // added
			k := KindPut
			if retract {
				k = KindInsert
			}
			err = f.emit(ctx, k, n.KeyGroup, n.State, n.Key, n.Value, 0)
			n, nerr, nok = newNext()
		default:
			if !bytes.Equal(o.Value, n.Value) {
				if retract {
					err = f.emit(ctx, KindUpdateBefore, o.KeyGroup, o.State, o.Key, o.Value, 0)
					if err == nil {
						err = f.emit(ctx, KindUpdateAfter, n.KeyGroup, n.State, n.Key, n.Value, 0)
					}
				} else {
					err = f.emit(ctx, KindPut, n.KeyGroup, n.State, n.Key, n.Value, 0)
				}
			}
			o, oerr, ook = oldNext()
			n, nerr, nok = newNext()
		}
		if err != nil {
			return err
		}
	}
}

// wait returns when a new checkpoint may be complete: the poll interval
// passed, or this node completed a checkpoint.
func (f *feed) wait(ctx context.Context) error {
	// Deliver what is pending first: nothing is (batches are flushed at
	// every checkpoint's end), so a waiting feed holds no events back.
	var notify <-chan struct{}
	if f.cfg.Notify != nil {
		notify = f.cfg.Notify()
	}
	t := time.NewTimer(f.cfg.PollInterval)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	case <-notify:
	}
	return nil
}
