package dstl

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"iter"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// ---------------------------------------------------------------- tokens

// Token is a position in a subscription's events: every event up to and
// including it was delivered. It is opaque (its text form is String, URL-safe
// base64) and comparable; the zero Token means "no position". A token is
// valid only for the stream, form and key groups it was issued for.
type Token struct{ b string }

// ParseToken parses a token's text form (Token.String), checking its
// checksum and fields. The error matches ErrBadToken.
func ParseToken(s string) (Token, error) {
	t, err := cdc.ParseToken(s)
	if err != nil {
		return Token{}, fmt.Errorf("%w: %q: %w", ErrBadToken, s, err)
	}
	return Token{b: string(t.Encode())}, nil
}

// TokenFromBytes returns the token of b (Token.Bytes), checking it as
// ParseToken does.
func TokenFromBytes(b []byte) (Token, error) {
	if len(b) == 0 {
		return Token{}, nil
	}
	if _, err := cdc.DecodeToken(b); err != nil {
		return Token{}, fmt.Errorf("%w: %w", ErrBadToken, err)
	}
	return Token{b: string(b)}, nil
}

// String is the token in URL-safe base64 without padding ("" for the zero
// Token): what the CLI prints and takes.
func (t Token) String() string {
	return base64.RawURLEncoding.EncodeToString([]byte(t.b))
}

// Bytes returns the token's binary form (nil for the zero Token).
func (t Token) Bytes() []byte {
	if t.b == "" {
		return nil
	}
	return []byte(t.b)
}

// IsZero reports whether t is the zero Token (no position).
func (t Token) IsZero() bool { return t.b == "" }

// ---------------------------------------------------------------- events

// Form is how a subscription reports a change.
type Form int

const (
	// FormUpsert (the default): EventPut with the key's new value, or
	// EventDelete.
	FormUpsert Form = iota
	// FormRetract: EventInsert (+I) for a new key, EventUpdateBefore (-U)
	// with the old value then EventUpdateAfter (+U) with the new one for a
	// changed key, EventDelete (-D) with the old value for a removed key.
	FormRetract
)

func (f Form) String() string {
	switch f {
	case FormUpsert:
		return "upsert"
	case FormRetract:
		return "retract"
	}
	return fmt.Sprintf("form(%d)", int(f))
}

func (f Form) cdc() cdc.Form {
	if f == FormRetract {
		return cdc.FormRetract
	}
	return cdc.FormUpsert
}

func (f Form) proto() dstlv1.EventForm {
	if f == FormRetract {
		return dstlv1.EventForm_EVENT_FORM_RETRACT
	}
	return dstlv1.EventForm_EVENT_FORM_UPSERT
}

// Start is where a subscription without a token begins.
type Start int

const (
	// StartEarliest (the default): from the empty state, every committed
	// change of every checkpoint (a snapshot, with a reset, if the
	// changelog from the beginning is no longer kept).
	StartEarliest Start = iota
	// StartSnapshot: a consistent scan of the newest complete checkpoint
	// (EventReset, then its keys as EventInsert/EventPut), then the
	// changes of every later checkpoint.
	StartSnapshot
	// StartLatest: only the changes of checkpoints after the newest
	// complete one.
	StartLatest
)

func (s Start) String() string {
	switch s {
	case StartEarliest:
		return "earliest"
	case StartSnapshot:
		return "snapshot"
	case StartLatest:
		return "latest"
	}
	return fmt.Sprintf("start(%d)", int(s))
}

func (s Start) proto() dstlv1.StartFrom {
	switch s {
	case StartSnapshot:
		return dstlv1.StartFrom_START_FROM_SNAPSHOT
	case StartLatest:
		return dstlv1.StartFrom_START_FROM_LATEST
	}
	return dstlv1.StartFrom_START_FROM_EARLIEST
}

// EventKind is what an Event says: a change of a key, or a marker.
type EventKind int

const (
	// EventPut (upsert form): the key now holds Value.
	EventPut EventKind = iota + 1
	// EventDelete (-D): the key was removed. Retract form: Value is the
	// removed value; upsert form: Value is empty.
	EventDelete
	// EventInsert (+I, retract form): a key that did not exist now holds
	// Value.
	EventInsert
	// EventUpdateBefore (-U, retract form): the key's value before an
	// update; its EventUpdateAfter follows at once.
	EventUpdateBefore
	// EventUpdateAfter (+U, retract form): the key's value after an update.
	EventUpdateAfter
	// EventCheckpointComplete marks the end of a checkpoint's events: every
	// change of Checkpoint was delivered. A consumer can commit its output
	// for the checkpoint and store Token().
	EventCheckpointComplete
	// EventReset: discard your state of the subscribed key groups; a
	// snapshot of Checkpoint follows (Snapshot is set).
	EventReset
)

// String is the kind's short form: "PUT", "-D", "+I", "-U", "+U",
// "CHECKPOINT" (complete) and "RESET".
func (k EventKind) String() string {
	switch k {
	case EventPut:
		return "PUT"
	case EventDelete:
		return "-D"
	case EventInsert:
		return "+I"
	case EventUpdateBefore:
		return "-U"
	case EventUpdateAfter:
		return "+U"
	case EventCheckpointComplete:
		return "CHECKPOINT"
	case EventReset:
		return "RESET"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// IsMarker reports whether k is a marker (checkpoint complete or reset)
// rather than a change of a key.
func (k EventKind) IsMarker() bool { return k == EventCheckpointComplete || k == EventReset }

func kindOf(k dstlv1.EventKind) (EventKind, bool) {
	switch k {
	case dstlv1.EventKind_EVENT_KIND_PUT:
		return EventPut, true
	case dstlv1.EventKind_EVENT_KIND_DELETE:
		return EventDelete, true
	case dstlv1.EventKind_EVENT_KIND_INSERT:
		return EventInsert, true
	case dstlv1.EventKind_EVENT_KIND_UPDATE_BEFORE:
		return EventUpdateBefore, true
	case dstlv1.EventKind_EVENT_KIND_UPDATE_AFTER:
		return EventUpdateAfter, true
	}
	return 0, false
}

// Event is one item of a subscription: a committed change of a key (Kind
// EventPut ... EventUpdateAfter) or a marker (EventCheckpointComplete,
// EventReset: only Kind, Checkpoint and Snapshot are set).
type Event struct {
	Kind     EventKind
	KeyGroup int
	State    string
	Key      []byte
	// Value: see Kind.
	Value []byte
	// Checkpoint is the checkpoint the change belongs to (the one whose
	// scan it is, for a snapshot).
	Checkpoint uint64
	// Time is the change's timestamp as appended (zero for snapshot rows
	// and for changes computed as a difference).
	Time time.Time
	// Snapshot: the event is a row of a consistent scan of Checkpoint.
	Snapshot bool

	pos position
}

// Token is the position right after the event: a subscription from it
// resumes with the next event, without a duplicate or a gap.
func (e Event) Token() Token { return e.pos.token() }

// position is a token, kept decoded until someone asks for it: an event's
// token is its message's token_base with the event's ordinal, and encoding
// one per event would cost an allocation each.
type position struct {
	tok     Token      // if base is nil
	base    *cdc.Token // shared by the events of one message
	ordinal uint64
}

func (p position) token() Token {
	if p.base == nil {
		return p.tok
	}
	return Token{b: string(p.base.WithOrdinal(p.ordinal).Encode())}
}

// ---------------------------------------------------------------- subscribe

// SubscribeOptions select what a subscription delivers and where it
// starts.
type SubscribeOptions struct {
	// From resumes after this token (an Event's or a Subscription's
	// Token). Zero: start as Start says, or from the registered
	// subscription Name's committed token.
	From Token
	// Start is where a subscription without a token begins (default
	// StartEarliest).
	Start Start
	// KeyGroups restricts the events to a range; nil means every key
	// group. A token is valid only with the key groups it was issued for.
	KeyGroups *KeyGroupRange
	// State restricts the events to one state; empty means every state.
	State string
	// KeyPrefix restricts the events to keys starting with it.
	KeyPrefix []byte
	// Form is how changes are reported (default FormUpsert).
	Form Form
	// Name is a registered subscription (CreateSubscription): without From,
	// the subscription resumes from its committed token. Its position is
	// never replaced by a snapshot silently: one that is no longer
	// replayable fails with ErrResnapshot.
	Name string
	// NoFollow ends the iteration once every complete checkpoint is
	// delivered, instead of waiting for new ones.
	NoFollow bool
	// MaxEvents bounds the events the node sends per message (0: the
	// node's default, 4096; at most 65536).
	MaxEvents int
}

// maxEventsPerMessage is the node's bound on SubscribeRequest.max_events.
const maxEventsPerMessage = 65536

// Subscription is a CDC reader of a stream, made by Client.Subscribe.
// Changes iterates over its events; Token is the position after the last
// event yielded, from which a later Changes (or another Subscribe with
// From) resumes. A Subscription is not safe for concurrent iteration, but
// Token may be called from any goroutine.
type Subscription struct {
	c      *Client
	ctx    context.Context
	stream string
	opts   SubscribeOptions
	err    error // from validating the options: every Changes yields it

	iterating sync.Mutex // held by a running Changes

	mu     sync.Mutex
	pos    position
	newest uint64
}

// Subscribe returns a subscription of stream's committed changes: the
// changes of each complete checkpoint, checkpoint after checkpoint, then,
// unless NoFollow, those of each new one as it completes. Nothing is sent
// until Changes is iterated; ctx bounds the whole subscription. Invalid
// options are reported by Changes.
//
// A subscription resumes transparently: if the stream breaks with a
// retryable error (UNAVAILABLE, RESOURCE_EXHAUSTED, a broken connection),
// Changes subscribes again from the token of the last event it yielded,
// with the client's retries and backoff (WithRetries counts failed
// attempts in a row: any message received starts the count again), so the
// caller sees every event once, in order, without a gap.
func (c *Client) Subscribe(ctx context.Context, stream string, opts SubscribeOptions) *Subscription {
	s := &Subscription{c: c, ctx: ctx, stream: stream, opts: opts}
	s.opts.KeyPrefix = append([]byte(nil), opts.KeyPrefix...)
	s.pos.tok = opts.From
	s.err = s.validate()
	return s
}

func (s *Subscription) validate() error {
	const op = "Subscribe"
	o := s.opts
	if err := validStream(op, s.stream); err != nil {
		return err
	}
	if err := validName(op, "state", o.State); err != nil {
		return err
	}
	if err := validName(op, "subscription", o.Name); err != nil {
		return err
	}
	switch {
	case o.Form != FormUpsert && o.Form != FormRetract:
		return invalid(op, "unknown %v", o.Form)
	case o.Start < StartEarliest || o.Start > StartLatest:
		return invalid(op, "unknown %v", o.Start)
	case o.MaxEvents < 0 || o.MaxEvents > maxEventsPerMessage:
		return invalid(op, "max events %d: want 0..%d", o.MaxEvents, maxEventsPerMessage)
	case o.KeyGroups != nil && (o.KeyGroups.Lo < 0 || o.KeyGroups.Lo > o.KeyGroups.Hi || o.KeyGroups.Hi >= keygroup.Max):
		return invalid(op, "key groups %d..%d: want lo <= hi < %d", o.KeyGroups.Lo, o.KeyGroups.Hi, keygroup.Max)
	}
	if o.From.IsZero() {
		return nil
	}
	t, err := cdc.DecodeToken(o.From.Bytes())
	if err != nil {
		return withSentinel(invalid(op, "token: %v", err), ErrBadToken)
	}
	bad := func(format string, args ...any) error {
		return withSentinel(invalid(op, "token "+format, args...), ErrBadToken)
	}
	// The node decides the rest (docs/cdc.md, "Tokens"): a position inside
	// a checkpoint or a snapshot resumes only with its key groups and form,
	// a boundary with any form and key groups it covers. Checked here only
	// where the answer cannot depend on the stream (its key-group count).
	switch {
	case t.Stream != s.stream:
		return bad("of stream %q, not %q", t.Stream, s.stream)
	case t.Ordinal != 0 && t.Form != o.Form.cdc():
		return bad("of the %v form, not %v", t.Form, o.Form)
	case t.Ordinal != 0 && o.KeyGroups != nil && (int(t.KeyGroups.Lo) != o.KeyGroups.Lo || int(t.KeyGroups.Hi) != o.KeyGroups.Hi):
		return bad("of key groups %d..%d, not %d..%d", t.KeyGroups.Lo, t.KeyGroups.Hi, o.KeyGroups.Lo, o.KeyGroups.Hi)
	}
	return nil
}

// Token returns the position after the last event Changes yielded (the
// options' From before any; zero if none). Subscribe from it to resume.
func (s *Subscription) Token() Token {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pos.token()
}

// NewestCheckpoint is the newest complete checkpoint of the stream the
// node knew when it sent the last message (0 before any): with the
// Checkpoint of the events, how far behind the subscription is.
func (s *Subscription) NewestCheckpoint() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.newest
}

func (s *Subscription) request() *dstlv1.SubscribeRequest {
	o := s.opts
	req := &dstlv1.SubscribeRequest{
		Stream: s.stream, FromToken: s.Token().Bytes(), Start: o.Start.proto(), State: o.State,
		KeyPrefix: o.KeyPrefix, Form: o.Form.proto(), Subscription: o.Name,
		MaxEvents: uint32(o.MaxEvents), NoFollow: o.NoFollow,
	}
	if o.KeyGroups != nil {
		req.KeyGroups = &dstlv1.KeyGroupRange{Lo: uint32(o.KeyGroups.Lo), Hi: uint32(o.KeyGroups.Hi)}
	}
	return req
}

// errFollowEnded: a follow subscription that the node ended without an
// error (e.g. while shutting down); it is resumed like a broken stream.
var errFollowEnded = connect.NewError(connect.CodeUnavailable, errors.New("the node ended the subscription"))

// Changes iterates over the subscription's events, in order: for each
// checkpoint its changes (after an EventReset when a snapshot begins),
// then an EventCheckpointComplete. It ends after the last complete
// checkpoint with NoFollow, when the loop breaks, or with an error it
// yields last: a non-retryable one at once (ErrBadToken, ErrResnapshot,
// ErrNotFound, ...), a retryable one after the client's retries, or the
// context's.
//
// Calling Changes again continues after the last event yielded (Token),
// subscribing anew. Only one Changes of a Subscription may run at a time.
func (s *Subscription) Changes() iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		if s.err != nil {
			yield(Event{}, s.err)
			return
		}
		if !s.iterating.TryLock() {
			yield(Event{}, invalid("Subscribe", "Changes of the subscription is already running"))
			return
		}
		defer s.iterating.Unlock()
		failures := 0
		for {
			err := s.c.guardSubscribe(s.ctx)
			if err == nil {
				var progressed bool
				progressed, err = s.attempt(yield)
				if err == errStop {
					return
				}
				if progressed {
					failures = 0
				}
				if err == nil {
					return
				}
			}
			if !s.retryable(err) || failures >= s.c.opts.retries {
				yield(Event{}, s.wrap(err))
				return
			}
			if err := sleep(s.ctx, backoff(s.c.opts.backoff, s.c.opts.maxBackoff, failures)); err != nil {
				yield(Event{}, s.wrap(err))
				return
			}
			failures++
		}
	}
}

// errStop: the caller broke the loop.
var errStop = errors.New("stop")

// attempt runs one Subscribe stream from the current token: nil when it
// ended as it should, errStop when yield asked to stop, or the stream's
// error. progressed reports whether a message arrived.
func (s *Subscription) attempt(yield func(Event, error) bool) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	req := s.request()
	if err := validRequest("Subscribe", req); err != nil {
		return false, err
	}
	st, err := s.c.subscribe(ctx, req)
	if err != nil {
		return false, err
	}
	defer func() {
		cancel() // first: closing a remote stream that follows would wait for its next message
		_ = st.Close()
	}()
	for {
		msg, err := st.Receive()
		if err == io.EOF {
			if s.opts.NoFollow {
				return progressed, nil
			}
			return progressed, errFollowEnded
		}
		if err != nil {
			return progressed, err
		}
		progressed = true
		if err := s.deliver(msg, yield); err != nil {
			return progressed, err
		}
	}
}

// deliver yields the items of one message: a reset marker, the events, a
// checkpoint-complete marker. The last item's token is the message's
// token (which also covers events filtered out after it); a reset's is the
// position before it.
func (s *Subscription) deliver(msg *dstlv1.SubscribeResponse, yield func(Event, error) bool) error {
	next, err := TokenFromBytes(msg.GetToken())
	if err != nil {
		return connect.NewError(connect.CodeInternal, fmt.Errorf("the node sent a bad message token: %w", err))
	}
	var base *cdc.Token
	if len(msg.GetEvents()) > 0 {
		b, err := cdc.DecodeToken(msg.GetTokenBase())
		if err != nil {
			return connect.NewError(connect.CodeInternal, fmt.Errorf("the node sent a bad token base: %w", err))
		}
		base = &b
	}
	s.mu.Lock()
	s.newest = msg.GetNewestCheckpoint()
	s.mu.Unlock()

	n := len(msg.GetEvents())
	if msg.GetSnapshotStart() {
		n++
	}
	if msg.GetCheckpointComplete() {
		n++
	}
	i := 0
	emit := func(e Event) error {
		if err := s.ctx.Err(); err != nil {
			return err
		}
		if i++; i == n && !next.IsZero() {
			e.pos = position{tok: next}
		}
		s.mu.Lock()
		s.pos = e.pos
		s.mu.Unlock()
		if !yield(e, nil) {
			return errStop
		}
		return nil
	}
	cp, snap := msg.GetCheckpoint(), msg.GetSnapshot()
	if msg.GetSnapshotStart() {
		if err := emit(Event{Kind: EventReset, Checkpoint: cp, Snapshot: true, pos: s.currentPos()}); err != nil {
			return err
		}
	}
	for _, ev := range msg.GetEvents() {
		kind, ok := kindOf(ev.GetKind())
		if !ok {
			return connect.NewError(connect.CodeInternal, fmt.Errorf("the node sent an event of unknown kind %v", ev.GetKind()))
		}
		e := Event{
			Kind: kind, KeyGroup: int(ev.GetKeyGroup()), State: ev.GetState(), Key: ev.GetKey(), Value: ev.GetValue(),
			Checkpoint: cp, Snapshot: snap, pos: position{base: base, ordinal: ev.GetOrdinal()},
		}
		if ms := ev.GetTimestampMs(); ms != 0 {
			e.Time = time.UnixMilli(ms)
		}
		if err := emit(e); err != nil {
			return err
		}
	}
	if msg.GetCheckpointComplete() {
		if err := emit(Event{Kind: EventCheckpointComplete, Checkpoint: cp, Snapshot: snap, pos: position{tok: next}}); err != nil {
			return err
		}
	}
	if n == 0 && !next.IsZero() {
		s.mu.Lock()
		s.pos = position{tok: next}
		s.mu.Unlock()
	}
	return nil
}

func (s *Subscription) currentPos() position {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pos
}

// retryable: Subscribe only reads, so a stream that broke (whatever the
// transport made of it) may always be opened again from the last token;
// errors the node answered are retried only if they say "try later". A
// closed in-process client is final.
func (s *Subscription) retryable(err error) bool {
	if s.ctx.Err() != nil || errors.Is(err, errClientClosed) {
		return false
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return false
	}
	switch ce.Code() {
	case connect.CodeUnavailable, connect.CodeResourceExhausted, connect.CodeDeadlineExceeded, connect.CodeAborted:
		return true
	case connect.CodeUnknown, connect.CodeInternal, connect.CodeCanceled:
		// A broken connection surfaces as one of these (a reset stream, an
		// unexpected EOF); the node's own answers of these codes are final.
		return !s.c.inProcess() && !connect.IsWireError(ce)
	}
	return false
}

// wrap converts a subscription's final error into an *Error matching the
// sentinels of Subscribe.
func (s *Subscription) wrap(err error) error {
	const op = "Subscribe"
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	if ctxErr := s.ctx.Err(); ctxErr != nil {
		err = ctxErr // whatever broke the stream, the caller ended it
	}
	w := wrapErr(op, err)
	if connect.CodeOf(err) == connect.CodeFailedPrecondition {
		return withSentinel(w, ErrResnapshot)
	}
	return tokenErr(w)
}

// guardSubscribe refuses a subscription of a closed in-process client.
func (c *Client) guardSubscribe(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.gate != nil && c.gate.isClosed() {
		return errClientClosed
	}
	return nil
}

// ---------------------------------------------------------------- streams

// eventStream is one Subscribe call: the messages in order, io.EOF at a
// clean end. Close ends the call and waits for whatever serves it.
type eventStream interface {
	Receive() (*dstlv1.SubscribeResponse, error)
	Close() error
}

type remoteStream struct {
	s *connect.ServerStreamForClient[dstlv1.SubscribeResponse]
}

func (r remoteStream) Receive() (*dstlv1.SubscribeResponse, error) {
	if r.s.Receive() {
		return r.s.Msg(), nil
	}
	if err := r.s.Err(); err != nil {
		return nil, err
	}
	return nil, io.EOF
}

func (r remoteStream) Close() error { return r.s.Close() }

// inProcessStream runs the node's Subscribe handler in a goroutine that
// hands each message over an unbuffered channel, so the node runs at most
// one message ahead of the caller, as over the network. Close cancels the
// handler and waits for the goroutine.
type inProcessStream struct {
	cancel context.CancelFunc
	msgs   chan *dstlv1.SubscribeResponse
	done   chan error // the handler's result, then closed
	ended  bool
	gate   *callGate
}

func openInProcessStream(ctx context.Context, gate *callGate, h func(context.Context, *dstlv1.SubscribeRequest, func(*dstlv1.SubscribeResponse) error) error, req *dstlv1.SubscribeRequest) (eventStream, error) {
	if err := gate.enter(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &inProcessStream{cancel: cancel, msgs: make(chan *dstlv1.SubscribeResponse), done: make(chan error, 1), gate: gate}
	go func() {
		defer close(s.done)
		// The client's Close waits for calls in flight: a subscription
		// that follows would never end by itself.
		go func() {
			select {
			case <-gate.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		err := h(ctx, req, func(m *dstlv1.SubscribeResponse) error {
			select {
			case s.msgs <- m:
				return nil
			case <-ctx.Done():
				return connect.NewError(connect.CodeCanceled, ctx.Err())
			}
		})
		s.done <- err
	}()
	return s, nil
}

func (s *inProcessStream) Receive() (*dstlv1.SubscribeResponse, error) {
	if s.ended {
		return nil, io.EOF
	}
	select {
	case m := <-s.msgs:
		return m, nil
	case err := <-s.done:
		s.ended = true
		if err == nil {
			return nil, io.EOF
		}
		if s.gate.isClosed() {
			return nil, errClientClosed
		}
		return nil, err
	}
}

func (s *inProcessStream) Close() error {
	s.cancel()
	for range s.done { // wait for the handler's goroutine
	}
	s.gate.exit()
	return nil
}

// noCDC stands in for the CDC handlers of an in-process client whose node
// has none.
type noCDC struct{}

var errNoCDC = connect.NewError(connect.CodeUnimplemented, errors.New("the in-process node serves no CDC"))

func (noCDC) CreateSubscription(context.Context, *connect.Request[dstlv1.CreateSubscriptionRequest]) (*connect.Response[dstlv1.CreateSubscriptionResponse], error) {
	return nil, errNoCDC
}

func (noCDC) CommitSubscription(context.Context, *connect.Request[dstlv1.CommitSubscriptionRequest]) (*connect.Response[dstlv1.CommitSubscriptionResponse], error) {
	return nil, errNoCDC
}

func (noCDC) GetSubscription(context.Context, *connect.Request[dstlv1.GetSubscriptionRequest]) (*connect.Response[dstlv1.GetSubscriptionResponse], error) {
	return nil, errNoCDC
}

func (noCDC) ListSubscriptions(context.Context, *connect.Request[dstlv1.ListSubscriptionsRequest]) (*connect.Response[dstlv1.ListSubscriptionsResponse], error) {
	return nil, errNoCDC
}

func (noCDC) DeleteSubscription(context.Context, *connect.Request[dstlv1.DeleteSubscriptionRequest]) (*connect.Response[dstlv1.DeleteSubscriptionResponse], error) {
	return nil, errNoCDC
}

func (c *Client) subscribeUnimplemented(context.Context, *dstlv1.SubscribeRequest) (eventStream, error) {
	return nil, errNoCDC
}

// ---------------------------------------------------------------- registered subscriptions

// SubscriptionInfo is a registered subscription and how far behind it is.
type SubscriptionInfo struct {
	Stream string
	Name   string
	// Token is the committed token (zero: from the start it was created
	// with).
	Token Token
	// Checkpoint: every change of it and before is consumed.
	Checkpoint uint64
	UpdatedAt  time.Time
	// LagCheckpoints is the number of complete checkpoints newer than
	// Checkpoint; LagChanges and LagBytes estimate their changes and
	// changelog bytes; Lag is the time between the completion of
	// Checkpoint and of the newest one.
	LagCheckpoints uint64
	LagChanges     uint64
	LagBytes       uint64
	Lag            time.Duration
	// Expired: held back past the node's retention cap; Subscribe with it
	// fails with ErrResnapshot until it is recreated from a snapshot.
	Expired bool
}

func subscriptionOf(p *dstlv1.Subscription) SubscriptionInfo {
	info := SubscriptionInfo{
		Stream: p.GetStream(), Name: p.GetName(), Token: Token{b: string(p.GetToken())}, Checkpoint: p.GetCheckpoint(),
		LagCheckpoints: p.GetLagCheckpoints(), LagChanges: p.GetLagChanges(), LagBytes: p.GetLagBytes(),
		Lag: time.Duration(p.GetLagSeconds() * float64(time.Second)), Expired: p.GetExpired(),
	}
	if ms := p.GetUpdatedAtMs(); ms != 0 {
		info.UpdatedAt = time.UnixMilli(ms)
	}
	return info
}

// CreateSubscriptionOptions say where a registered subscription starts.
type CreateSubscriptionOptions struct {
	// From is the position to start at; zero: Start.
	From  Token
	Start Start
}

// CreateSubscription registers subscription name of stream. While it is
// registered, garbage collection and truncation keep what it has not
// consumed (up to the node's retention cap). ErrAlreadyExists if the name
// is taken.
func (c *Client) CreateSubscription(ctx context.Context, stream, name string, o CreateSubscriptionOptions) (SubscriptionInfo, error) {
	const op = "CreateSubscription"
	if err := validStream(op, stream); err != nil {
		return SubscriptionInfo{}, err
	}
	if o.Start < StartEarliest || o.Start > StartLatest {
		return SubscriptionInfo{}, invalid(op, "unknown %v", o.Start)
	}
	res, err := call(ctx, c, op, false, c.cdc.CreateSubscription, &dstlv1.CreateSubscriptionRequest{Stream: stream, Name: name, Token: o.From.Bytes(), Start: o.Start.proto()})
	if err != nil {
		return SubscriptionInfo{}, tokenErr(err)
	}
	return subscriptionOf(res.GetSubscription()), nil
}

// CommitSubscription records that subscription name of stream consumed
// everything up to token (typically an EventCheckpointComplete's Token).
func (c *Client) CommitSubscription(ctx context.Context, stream, name string, token Token) (SubscriptionInfo, error) {
	const op = "CommitSubscription"
	if err := validStream(op, stream); err != nil {
		return SubscriptionInfo{}, err
	}
	if token.IsZero() {
		return SubscriptionInfo{}, withSentinel(invalid(op, "no token to commit"), ErrBadToken)
	}
	res, err := call(ctx, c, op, true, c.cdc.CommitSubscription, &dstlv1.CommitSubscriptionRequest{Stream: stream, Name: name, Token: token.Bytes()})
	if err != nil {
		return SubscriptionInfo{}, tokenErr(err)
	}
	return subscriptionOf(res.GetSubscription()), nil
}

// GetSubscription returns registered subscription name of stream.
// ErrNotFound if there is none.
func (c *Client) GetSubscription(ctx context.Context, stream, name string) (SubscriptionInfo, error) {
	if err := validStream("GetSubscription", stream); err != nil {
		return SubscriptionInfo{}, err
	}
	res, err := call(ctx, c, "GetSubscription", true, c.cdc.GetSubscription, &dstlv1.GetSubscriptionRequest{Stream: stream, Name: name})
	if err != nil {
		return SubscriptionInfo{}, err
	}
	return subscriptionOf(res.GetSubscription()), nil
}

// ListSubscriptions returns the registered subscriptions of stream.
func (c *Client) ListSubscriptions(ctx context.Context, stream string) ([]SubscriptionInfo, error) {
	if err := validStream("ListSubscriptions", stream); err != nil {
		return nil, err
	}
	res, err := call(ctx, c, "ListSubscriptions", true, c.cdc.ListSubscriptions, &dstlv1.ListSubscriptionsRequest{Stream: stream})
	if err != nil {
		return nil, err
	}
	out := make([]SubscriptionInfo, 0, len(res.GetSubscriptions()))
	for _, p := range res.GetSubscriptions() {
		out = append(out, subscriptionOf(p))
	}
	return out, nil
}

// DeleteSubscription unregisters subscription name of stream: it no longer
// holds anything back. ErrNotFound if there is none.
func (c *Client) DeleteSubscription(ctx context.Context, stream, name string) error {
	if err := validStream("DeleteSubscription", stream); err != nil {
		return err
	}
	_, err := call(ctx, c, "DeleteSubscription", false, c.cdc.DeleteSubscription, &dstlv1.DeleteSubscriptionRequest{Stream: stream, Name: name})
	return err
}

// tokenErr marks a registry call's token errors with ErrBadToken.
func tokenErr(err error) error {
	var e *Error
	if !errors.As(err, &e) {
		return err
	}
	if e.Code == connect.CodeOutOfRange || (e.Code == connect.CodeInvalidArgument && strings.Contains(strings.ToLower(e.Message), "token")) {
		return withSentinel(err, ErrBadToken)
	}
	return err
}
