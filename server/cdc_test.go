package server

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// subscribeAll reads a no_follow subscription to its end.
func (e *cdcEnv) subscribeAll(t *testing.T, req *dstlv1.SubscribeRequest) ([]*dstlv1.SubscribeResponse, error) {
	t.Helper()
	req.NoFollow = true
	st, err := e.cdc.Subscribe(context.Background(), connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	defer st.Close()
	var out []*dstlv1.SubscribeResponse
	for st.Receive() {
		out = append(out, st.Msg())
	}
	return out, st.Err()
}

// Subscribe over the wire: the committed changes as events with their
// checkpoint markers; a follow sees a checkpoint made after it started; a
// registered subscription resumes from its committed token in any form;
// bad tokens get their codes.
func TestSubscribeRPC(t *testing.T) {
	ctx := context.Background()
	e := startCDC(t, nil)
	e.checkpoints(t, "s", 2) // two checkpoints, each a put of k=v in key group 0
	msgs, err := e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s", Form: dstlv1.EventForm_EVENT_FORM_RETRACT})
	if err != nil {
		t.Fatal(err)
	}
	var kinds []dstlv1.EventKind
	var completed []uint64
	for _, m := range msgs {
		for _, ev := range m.Events {
			kinds = append(kinds, ev.Kind)
		}
		if m.CheckpointComplete {
			completed = append(completed, m.Checkpoint)
		}
	}
	want := []dstlv1.EventKind{dstlv1.EventKind_EVENT_KIND_INSERT, dstlv1.EventKind_EVENT_KIND_UPDATE_BEFORE, dstlv1.EventKind_EVENT_KIND_UPDATE_AFTER}
	if len(kinds) != len(want) || kinds[0] != want[0] || kinds[1] != want[1] || kinds[2] != want[2] || len(completed) != 2 || completed[1] != 2 {
		t.Fatalf("events %v, checkpoints completed %v", kinds, completed)
	}

	// Follow: a checkpoint after the subscription starts is delivered.
	fctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	st, err := e.cdc.Subscribe(fctx, connect.NewRequest(&dstlv1.SubscribeRequest{Stream: "s", Start: dstlv1.StartFrom_START_FROM_LATEST}))
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		e.checkpoints(t, "s2", 1) // another stream: nothing for s
		ow, err := e.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: "s"}))
		if err == nil {
			_, err = e.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: ow.Msg.GetWriterId(), Changes: []*dstlv1.Change{put(1, "new", "x")}}))
		}
		if err == nil {
			_, err = e.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: ow.Msg.GetWriterId(), CheckpointId: 3}))
		}
		if err != nil {
			t.Error(err)
		}
	}()
	var got *dstlv1.ChangeEvent
	for got == nil && st.Receive() {
		if evs := st.Msg().Events; len(evs) > 0 {
			if st.Msg().Checkpoint != 3 {
				t.Fatalf("follow: events of checkpoint %d", st.Msg().Checkpoint)
			}
			got = evs[0]
		}
	}
	if got == nil || string(got.Key) != "new" || got.Kind != dstlv1.EventKind_EVENT_KIND_PUT {
		t.Fatalf("follow: %v, %v", got, st.Err())
	}
	cancel()
	st.Close()

	// A registered subscription (created in the upsert form at the start)
	// resumes from its committed token, here in the retract form.
	if _, err := e.create("reg", nil, dstlv1.StartFrom_START_FROM_EARLIEST); err != nil {
		t.Fatal(err)
	}
	msgs, err = e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s", Subscription: "reg", Form: dstlv1.EventForm_EVENT_FORM_RETRACT})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(msgs); n == 0 || msgs[n-1].Checkpoint != 3 || !msgs[n-1].CheckpointComplete {
		t.Fatalf("registered: %d messages", n)
	}
	last := msgs[len(msgs)-1].Token
	if _, err := e.cdc.CommitSubscription(ctx, connect.NewRequest(&dstlv1.CommitSubscriptionRequest{Stream: "s", Name: "reg", Token: last})); err != nil {
		t.Fatal(err)
	}
	msgs, err = e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s", Subscription: "reg", Form: dstlv1.EventForm_EVENT_FORM_RETRACT})
	if err != nil || len(msgs) != 0 {
		t.Fatalf("after the commit: %d messages, %v", len(msgs), err)
	}
	_, err = e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s", Subscription: "nope"})
	wantCode(t, "unknown subscription", err, connect.CodeNotFound, "nope")

	// Bad tokens.
	cfg, err := e.node.Stream(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	good := cdc.Token{Stream: "s", Incarnation: cfg.Incarnation, KeyGroups: keygroup.Full(4), Form: cdc.FormUpsert, After: 1, Checkpoint: 2, Ordinal: 1}
	corrupt := good.Encode()
	corrupt[2] ^= 0xff
	future := good
	future.After, future.Checkpoint = 3, 9
	otherForm := good
	otherForm.Form = cdc.FormRetract
	otherStream := good
	otherStream.Stream = "s2"
	for _, c := range []struct {
		name string
		tok  []byte
		code connect.Code
	}{
		{"corrupt", corrupt, connect.CodeInvalidArgument},
		{"truncated", good.Encode()[:5], connect.CodeInvalidArgument},
		{"future", future.Encode(), connect.CodeOutOfRange},
		{"other form", otherForm.Encode(), connect.CodeInvalidArgument},
		{"other stream", otherStream.Encode(), connect.CodeInvalidArgument},
	} {
		_, err := e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s", FromToken: c.tok})
		wantCode(t, c.name, err, c.code, "")
	}
	_, err = e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "missing"})
	wantCode(t, "unknown stream", err, connect.CodeNotFound, "missing")
	_, err = e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s", KeyGroups: &dstlv1.KeyGroupRange{Lo: 2, Hi: 9}})
	wantCode(t, "key groups outside", err, connect.CodeInvalidArgument, "")
}

// A follow never ends by itself: StopSubscriptions (called before the HTTP
// server's shutdown) ends it with UNAVAILABLE, so a shutdown does not wait
// for it, and refuses new subscriptions.
func TestStopSubscriptionsEndsFollows(t *testing.T) {
	ctx := context.Background()
	e := startCDC(t, nil)
	e.checkpoints(t, "s", 1)
	st, err := e.cdc.Subscribe(ctx, connect.NewRequest(&dstlv1.SubscribeRequest{Stream: "s", Start: dstlv1.StartFrom_START_FROM_LATEST}))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	done := make(chan error, 1)
	go func() {
		for st.Receive() {
		}
		done <- st.Err()
	}()
	time.Sleep(50 * time.Millisecond) // the feed is waiting for a checkpoint
	e.srv.StopSubscriptions()
	select {
	case err := <-done:
		wantCode(t, "stopped follow", err, connect.CodeUnavailable, "shutting down")
	case <-time.After(30 * time.Second):
		t.Fatal("the follow did not end")
	}
	_, err = e.subscribeAll(t, &dstlv1.SubscribeRequest{Stream: "s"})
	wantCode(t, "subscribe after stop", err, connect.CodeUnavailable, "shutting down")
}
