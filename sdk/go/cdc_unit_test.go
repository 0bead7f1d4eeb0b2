package dstl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// fakeFeed serves scripted Subscribe streams: checkpoint i (1..cps) has
// per events, sent perMsg at a time, as the server's feed does (the token
// of a message is its base with the last ordinal, a boundary after the
// checkpoint's complete message). breaks[n] breaks the n-th stream
// (0-based) with err after that many messages.
type fakeFeed struct {
	cps, per, perMsg int
	breaks           map[int]breakAt
	opened           []*dstlv1.SubscribeRequest
}

type breakAt struct {
	after int
	err   error
}

func (f *fakeFeed) tok(cp, ordinal uint64) cdc.Token {
	t := cdc.Token{Stream: "s", Incarnation: "inc", KeyGroups: keygroup.Range{Lo: 0, Hi: 127}, Form: cdc.FormUpsert, Ordinal: ordinal}
	if cp != 0 {
		t.After, t.Checkpoint = cp-1, cp
	} else {
		t.After = 0
	}
	return t
}

// messages returns every message after position from (nil: the start).
func (f *fakeFeed) messages(from *cdc.Token) []*dstlv1.SubscribeResponse {
	var out []*dstlv1.SubscribeResponse
	for cp := uint64(1); cp <= uint64(f.cps); cp++ {
		skip := uint64(0)
		if from != nil {
			switch {
			case from.Boundary() && from.After >= cp:
				continue
			case !from.Boundary() && from.Checkpoint > cp:
				continue
			case !from.Boundary() && from.Checkpoint == cp:
				skip = from.Ordinal
			}
		}
		base := f.tok(cp, 0)
		var evs []*dstlv1.ChangeEvent
		flush := func(complete bool) {
			last := uint64(skip)
			if len(evs) > 0 {
				last = evs[len(evs)-1].Ordinal
			}
			next := base.WithOrdinal(last)
			if complete {
				next = cdc.Token{Stream: "s", Incarnation: "inc", KeyGroups: base.KeyGroups, Form: base.Form, After: cp}
			}
			out = append(out, &dstlv1.SubscribeResponse{Events: evs, Checkpoint: cp, CheckpointComplete: complete, TokenBase: base.Encode(), Token: next.Encode(), NewestCheckpoint: uint64(f.cps)})
			evs = nil
		}
		for o := skip + 1; o <= uint64(f.per); o++ {
			evs = append(evs, &dstlv1.ChangeEvent{Kind: dstlv1.EventKind_EVENT_KIND_PUT, KeyGroup: 3, State: "st", Key: fmt.Appendf(nil, "k%d.%d", cp, o), Value: []byte("v"), Ordinal: o})
			if len(evs) == f.perMsg && o < uint64(f.per) {
				flush(false)
				skip = o
			}
		}
		flush(true)
	}
	return out
}

type scripted struct {
	msgs []*dstlv1.SubscribeResponse
	brk  *breakAt
	n    int
}

func (s *scripted) Receive() (*dstlv1.SubscribeResponse, error) {
	if s.brk != nil && s.n == s.brk.after {
		return nil, s.brk.err
	}
	if s.n == len(s.msgs) {
		return nil, io.EOF
	}
	s.n++
	return s.msgs[s.n-1], nil
}

func (s *scripted) Close() error { return nil }

func (f *fakeFeed) client(retries int) *Client {
	c := &Client{opts: options{retries: retries, backoff: time.Millisecond, maxBackoff: time.Millisecond}}
	c.subscribe = func(_ context.Context, req *dstlv1.SubscribeRequest) (eventStream, error) {
		n := len(f.opened)
		f.opened = append(f.opened, req)
		var from *cdc.Token
		if len(req.GetFromToken()) > 0 {
			t, err := cdc.DecodeToken(req.GetFromToken())
			if err != nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, err)
			}
			from = &t
		}
		s := &scripted{msgs: f.messages(from)}
		if b, ok := f.breaks[n]; ok {
			s.brk = &b
		}
		return s, nil
	}
	return c
}

// describe renders an event for comparisons.
func describe(e Event) string {
	if e.Kind.IsMarker() {
		return fmt.Sprintf("%v %d", e.Kind, e.Checkpoint)
	}
	return fmt.Sprintf("%v %d %s", e.Kind, e.Checkpoint, e.Key)
}

func collect(t *testing.T, s *Subscription, stopAfter int) ([]string, []Token, error) {
	t.Helper()
	var got []string
	var toks []Token
	for e, err := range s.Changes() {
		if err != nil {
			return got, toks, err
		}
		got = append(got, describe(e))
		toks = append(toks, e.Token())
		if s.Token() != e.Token() {
			t.Fatalf("after %s: Subscription.Token %v, Event.Token %v", describe(e), s.Token(), e.Token())
		}
		if len(got) == stopAfter {
			break
		}
	}
	return got, toks, nil
}

func TestSubscriptionDeliverAndResume(t *testing.T) {
	f := &fakeFeed{cps: 3, per: 5, perMsg: 2}
	c := f.client(0)
	all, toks, err := collect(t, c.Subscribe(t.Context(), "s", SubscribeOptions{NoFollow: true}), -1)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 3*6 || all[5] != "CHECKPOINT 1" || all[17] != "CHECKPOINT 3" || all[0] != "PUT 1 k1.1" {
		t.Fatalf("events: %q", all)
	}
	// From every event's token: the rest, no duplicate, no gap.
	for i, tok := range toks {
		rest, _, err := collect(t, c.Subscribe(t.Context(), "s", SubscribeOptions{NoFollow: true, From: tok}), -1)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(rest, all[i+1:]) {
			t.Fatalf("from the token of %d (%s): %q, want %q", i, all[i], rest, all[i+1:])
		}
	}
	// Changes again continues where a break left it.
	s := c.Subscribe(t.Context(), "s", SubscribeOptions{NoFollow: true})
	first, _, _ := collect(t, s, 7)
	rest, _, err := collect(t, s, -1)
	if err != nil || !slices.Equal(append(first, rest...), all) {
		t.Fatalf("break then Changes again: %q + %q (%v)", first, rest, err)
	}
}

func TestSubscriptionTransparentResume(t *testing.T) {
	unavailable := connect.NewError(connect.CodeUnavailable, errors.New("gone"))
	f := &fakeFeed{cps: 3, per: 5, perMsg: 2}
	want, _, _ := collect(t, f.client(0).Subscribe(t.Context(), "s", SubscribeOptions{NoFollow: true}), -1)

	// Every stream breaks after 2 messages: retries never run out, since
	// each attempt makes progress.
	f = &fakeFeed{cps: 3, per: 5, perMsg: 2, breaks: map[int]breakAt{}}
	for i := range 20 {
		f.breaks[i] = breakAt{after: 2, err: unavailable}
	}
	got, _, err := collect(t, f.client(1).Subscribe(t.Context(), "s", SubscribeOptions{NoFollow: true}), -1)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("with breaks: %q (%v), want %q", got, err, want)
	}
	if len(f.opened) < 4 || len(f.opened[0].GetFromToken()) != 0 || len(f.opened[1].GetFromToken()) == 0 {
		t.Fatalf("opened %d streams: %v", len(f.opened), f.opened)
	}

	// Failures in a row without progress exhaust the retries.
	f = &fakeFeed{cps: 3, per: 5, perMsg: 2, breaks: map[int]breakAt{0: {2, unavailable}, 1: {0, unavailable}, 2: {0, unavailable}}}
	// The failure after progress gets the whole budget (2 retries).
	got, _, err = collect(t, f.client(2).Subscribe(t.Context(), "s", SubscribeOptions{NoFollow: true}), -1)
	if !errors.Is(err, ErrUnavailable) || len(f.opened) != 3 || len(got) != 4 {
		t.Fatalf("retries exhausted: %d events, %d streams, %v", len(got), len(f.opened), err)
	}

	// Non-retryable errors end it at once, with their sentinel.
	for _, tc := range []struct {
		err  error
		want []error
	}{
		{connect.NewError(connect.CodeFailedPrecondition, errors.New("must resnapshot")), []error{ErrResnapshot, ErrFenced}},
		{connect.NewError(connect.CodeOutOfRange, errors.New("checkpoint 9 is not complete")), []error{ErrBadToken}},
		{connect.NewError(connect.CodeInvalidArgument, errors.New("token of another incarnation")), []error{ErrBadToken, ErrInvalidArgument}},
		{connect.NewError(connect.CodeNotFound, errors.New("no stream")), []error{ErrNotFound}},
		// A node's own INTERNAL answer is not retried (a wire error).
		{connect.NewWireError(connect.CodeInternal, errors.New("bug")), nil},
	} {
		f = &fakeFeed{cps: 1, per: 1, perMsg: 1, breaks: map[int]breakAt{0: {0, tc.err}}}
		_, _, err := collect(t, f.client(3).Subscribe(t.Context(), "s", SubscribeOptions{}), -1)
		var e *Error
		if !errors.As(err, &e) || len(f.opened) != 1 {
			t.Fatalf("%v: %v after %d streams", tc.err, err, len(f.opened))
		}
		for _, w := range tc.want {
			if !errors.Is(err, w) {
				t.Errorf("%v does not match %v", err, w)
			}
		}
		if errors.Is(err, ErrBadToken) != slices.Contains(tc.want, ErrBadToken) {
			t.Errorf("%v: ErrBadToken mismatch", err)
		}
	}

	// A follow the node ends without an error is resumed.
	f = &fakeFeed{cps: 1, per: 1, perMsg: 1}
	got, _, err = collect(t, f.client(2).Subscribe(t.Context(), "s", SubscribeOptions{}), -1)
	if !errors.Is(err, ErrUnavailable) || len(f.opened) != 3 || len(got) != 2 {
		t.Fatalf("follow ended by the node: %q, %d streams, %v", got, len(f.opened), err)
	}
	if !strings.Contains(err.Error(), "ended the subscription") {
		t.Fatalf("error %v", err)
	}
}

func TestSubscriptionCancel(t *testing.T) {
	f := &fakeFeed{cps: 1, per: 1, perMsg: 1, breaks: map[int]breakAt{0: {1, connect.NewError(connect.CodeUnavailable, errors.New("gone"))}}}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	s := f.client(5).Subscribe(ctx, "s", SubscribeOptions{})
	n := 0
	var last error
	for _, err := range s.Changes() {
		if err != nil {
			last = err
			break
		}
		n++
		cancel()
	}
	if !errors.Is(last, context.Canceled) || n != 1 {
		t.Fatalf("after cancel: %d events, %v", n, last)
	}
}

func TestTokens(t *testing.T) {
	if (Token{}).String() != "" || !(Token{}).IsZero() || (Token{}).Bytes() != nil {
		t.Fatal("zero token")
	}
	ct := cdc.Token{Stream: "s", Incarnation: "i", KeyGroups: keygroup.Range{Lo: 0, Hi: 7}, Form: cdc.FormRetract, After: 1, Checkpoint: 2, Ordinal: 3}
	tok, err := ParseToken(ct.String())
	if err != nil || tok.String() != ct.String() {
		t.Fatalf("parse %q: %v, %v", ct.String(), tok, err)
	}
	if b, err := TokenFromBytes(tok.Bytes()); err != nil || b != tok {
		t.Fatalf("from bytes: %v %v", b, err)
	}
	for _, bad := range []string{"x", "!!!", ct.String()[:len(ct.String())-2]} {
		if _, err := ParseToken(bad); !errors.Is(err, ErrBadToken) || !errors.Is(err, cdc.ErrBadToken) {
			t.Errorf("ParseToken(%q): %v", bad, err)
		}
	}
	if _, err := TokenFromBytes([]byte("junkjunk")); !errors.Is(err, ErrBadToken) {
		t.Errorf("TokenFromBytes: %v", err)
	}

	// Options checked before anything is sent.
	c := (&fakeFeed{}).client(0)
	for _, tc := range []struct {
		stream string
		o      SubscribeOptions
		bad    bool // ErrBadToken
	}{
		{"-x", SubscribeOptions{}, false},
		{"s", SubscribeOptions{Form: 7}, false},
		{"s", SubscribeOptions{Start: -1}, false},
		{"s", SubscribeOptions{MaxEvents: 1 << 20}, false},
		{"s", SubscribeOptions{KeyGroups: &KeyGroupRange{Lo: 3, Hi: 2}}, false},
		{"s", SubscribeOptions{State: "\xff"}, false},
		{"s", SubscribeOptions{From: tok}, true},                                                             // retract token, upsert form
		{"t", SubscribeOptions{From: tok, Form: FormRetract}, true},                                          // other stream
		{"s", SubscribeOptions{From: tok, Form: FormRetract, KeyGroups: &KeyGroupRange{Lo: 0, Hi: 3}}, true}, // other key groups
		{"s", SubscribeOptions{From: Token{b: "corrupt token bytes"}, Form: FormRetract}, true},              // corrupt
	} {
		_, _, err := collect(t, c.Subscribe(t.Context(), tc.stream, tc.o), -1)
		if !errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrBadToken) != tc.bad {
			t.Errorf("%q %+v: %v", tc.stream, tc.o, err)
		}
	}
	// A token of the same stream, form and key groups passes.
	_, _, err = collect(t, c.Subscribe(t.Context(), "s", SubscribeOptions{From: tok, Form: FormRetract, KeyGroups: &KeyGroupRange{Lo: 0, Hi: 7}, NoFollow: true}), -1)
	if err != nil {
		t.Fatal(err)
	}

	kinds := map[EventKind]string{EventPut: "PUT", EventDelete: "-D", EventInsert: "+I", EventUpdateBefore: "-U", EventUpdateAfter: "+U", EventCheckpointComplete: "CHECKPOINT", EventReset: "RESET"}
	for k, s := range kinds {
		if k.String() != s || k.IsMarker() != (k >= EventCheckpointComplete) {
			t.Errorf("%d: %v", k, k)
		}
	}
}

func TestSubscriptionMarkers(t *testing.T) {
	before := cdc.Token{Stream: "s", Incarnation: "inc", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}, Form: cdc.FormUpsert, After: 4}
	base := cdc.Token{Stream: "s", Incarnation: "inc", KeyGroups: keygroup.Range{Lo: 0, Hi: 1}, Form: cdc.FormUpsert, Snapshot: true, Checkpoint: 7}
	after := before
	after.After = 7
	msg := &dstlv1.SubscribeResponse{
		Checkpoint: 7, Snapshot: true, SnapshotStart: true, CheckpointComplete: true, TokenBase: base.Encode(), Token: after.Encode(), NewestCheckpoint: 9,
		Events: []*dstlv1.ChangeEvent{
			{Kind: dstlv1.EventKind_EVENT_KIND_PUT, Key: []byte("a"), Value: []byte("1"), Ordinal: 1},
			{Kind: dstlv1.EventKind_EVENT_KIND_PUT, Key: []byte("b"), Value: []byte("2"), Ordinal: 2, TimestampMs: 1000},
		},
	}
	s := (&Client{}).Subscribe(t.Context(), "s", SubscribeOptions{From: Token{b: string(before.Encode())}})
	var got []Event
	if err := s.deliver(msg, func(e Event, _ error) bool { got = append(got, e); return true }); err != nil {
		t.Fatal(err)
	}
	wantToks := []cdc.Token{before, base.WithOrdinal(1), base.WithOrdinal(2), after}
	wantKinds := []EventKind{EventReset, EventPut, EventPut, EventCheckpointComplete}
	for i, e := range got {
		if e.Kind != wantKinds[i] || e.Token().String() != wantToks[i].String() || e.Checkpoint != 7 || !e.Snapshot {
			t.Errorf("%d: %+v token %v", i, e, e.Token())
		}
	}
	if len(got) != 4 || !got[1].Time.IsZero() || got[2].Time.UnixMilli() != 1000 || s.NewestCheckpoint() != 9 || s.Token().String() != after.String() {
		t.Fatalf("%+v, newest %d", got, s.NewestCheckpoint())
	}
	// Without a complete marker, the last event's token is the message's.
	msg.CheckpointComplete, msg.SnapshotStart = false, false
	mid := base.WithOrdinal(5)
	msg.Token = mid.Encode()
	got = nil
	if err := s.deliver(msg, func(e Event, _ error) bool { got = append(got, e); return true }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[1].Token().String() != mid.String() || got[0].Token().String() != base.WithOrdinal(1).String() {
		t.Fatalf("%+v", got)
	}
	// A message without events moves the position.
	msg.Events = nil
	msg.Token = after.Encode()
	if err := s.deliver(msg, func(Event, error) bool { t.Fatal("yielded"); return false }); err != nil || s.Token().String() != after.String() {
		t.Fatalf("empty message: %v, %v", err, s.Token())
	}
}
