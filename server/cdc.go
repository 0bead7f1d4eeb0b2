package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/cdc/feed"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// cdcService serves CDC: Subscribe here, the registered subscriptions in
// subscriptions.go.
type cdcService struct {
	dstlv1connect.UnimplementedCDCServiceHandler
	s *Server
}

// Subscribe implements dstlv1connect.CDCServiceHandler.
func (x *cdcService) Subscribe(ctx context.Context, req *connect.Request[dstlv1.SubscribeRequest], stream *connect.ServerStream[dstlv1.SubscribeResponse]) error {
	// The response headers go out once the request is validated, so that a
	// client's call returns (connect clients wait for them) before the
	// first event, which may be far off on a caught-up stream.
	return x.s.subscribe(ctx, req.Msg, func() error { return stream.Send(nil) }, stream.Send)
}

// checkpointSignal wakes caught-up feeds when a checkpoint call of this
// node returns: the checkpoint may have completed (feeds poll the blob
// store for those completed elsewhere).
type checkpointSignal struct {
	mu sync.Mutex
	ch chan struct{}
}

func (c *checkpointSignal) wait() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch == nil {
		c.ch = make(chan struct{})
	}
	return c.ch
}

func (c *checkpointSignal) notify() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch != nil {
		close(c.ch)
		c.ch = nil
	}
}

// cdcDir returns the directory of the feeds' stores, creating (and, for a
// server-owned temporary one, remembering to remove) it once.
func (s *Server) cdcDir() (string, error) {
	s.cdcOnce.Do(func() {
		if s.opts.CDCDir != "" {
			s.cdcPath = s.opts.CDCDir
			return
		}
		s.cdcPath, s.cdcErr = os.MkdirTemp("", "dstl-cdc-")
		s.cdcTemp = s.cdcErr == nil
	})
	return s.cdcPath, s.cdcErr
}

// Subscribe runs one subscription, sending its messages to send until ctx
// ends, send fails, or (no_follow) every complete checkpoint is delivered.
// The in-process client calls it directly; the RPC handler wraps it.
// Errors are *connect.Error.
func (s *Server) Subscribe(ctx context.Context, msg *dstlv1.SubscribeRequest, send func(*dstlv1.SubscribeResponse) error) error {
	return s.subscribe(ctx, msg, nil, send)
}

// subscribe is Subscribe with ready (if set) called once the request is
// valid, before the feed starts.
func (s *Server) subscribe(ctx context.Context, msg *dstlv1.SubscribeRequest, ready func() error, send func(*dstlv1.SubscribeResponse) error) error {
	if s.feedsCtx.Err() != nil {
		return connect.NewError(connect.CodeUnavailable, errStopping)
	}
	req, err := s.feedRequest(ctx, msg)
	if err != nil {
		return toConnect(err)
	}
	if ready != nil {
		if err := ready(); err != nil {
			return err
		}
	}
	dir, err := s.cdcDir()
	if err != nil {
		return connect.NewError(connect.CodeInternal, fmt.Errorf("cdc dir: %w", err))
	}
	// A feed ends when the node stops serving subscriptions (StopSubscriptions),
	// not only when its client goes away.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := context.AfterFunc(s.feedsCtx, func() { cancel(errStopping) })
	defer stop()
	cfg := feed.Config{Node: s.node, Dir: dir, PollInterval: s.opts.CDCPollInterval, Notify: s.cpSignal.wait, Logger: s.log}
	m := s.metrics
	m.cdcFeeds.Inc()
	defer m.cdcFeeds.Dec()
	var sendErr error
	err = feed.Run(ctx, cfg, req, func(b *feed.Batch) error {
		res := batchMessage(b)
		if err := send(res); err != nil {
			sendErr = err
			return err
		}
		m.cdcEvents.Add(float64(len(b.Events)))
		m.cdcBytes.Add(float64(b.Bytes))
		m.cdcMessages.Inc()
		if b.Complete && !b.Snapshot {
			m.cdcCheckpoints.Inc()
		}
		return nil
	})
	if err != nil && sendErr != nil && errors.Is(err, sendErr) {
		return sendErr // the client went away; nothing to map
	}
	if err != nil && errors.Is(context.Cause(ctx), errStopping) {
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("%w: resume from the last token (here or on another node)", errStopping))
	}
	return toConnect(err)
}

// errStopping ends the feeds of a node that stops serving.
var errStopping = errors.New("node shutting down")

// StopSubscriptions ends every subscription being served (UNAVAILABLE:
// clients resume from their last token) and refuses new ones. Call it
// before shutting the HTTP server down: a follow never ends on its own,
// and would hold the shutdown until its deadline.
func (s *Server) StopSubscriptions() { s.feedsStop() }

// feedRequest validates a SubscribeRequest.
func (s *Server) feedRequest(ctx context.Context, msg *dstlv1.SubscribeRequest) (feed.Request, error) {
	req := feed.Request{
		Stream: msg.GetStream(), State: msg.GetState(), KeyPrefix: msg.GetKeyPrefix(),
		MaxEvents: int(msg.GetMaxEvents()), NoFollow: msg.GetNoFollow(),
	}
	if req.Stream == "" {
		return req, fmt.Errorf("%w: stream is required", errInvalid)
	}
	switch msg.GetForm() {
	case dstlv1.EventForm_EVENT_FORM_UNSPECIFIED, dstlv1.EventForm_EVENT_FORM_UPSERT:
		req.Form = cdc.FormUpsert
	case dstlv1.EventForm_EVENT_FORM_RETRACT:
		req.Form = cdc.FormRetract
	default:
		return req, fmt.Errorf("%w: unknown form %v", errInvalid, msg.GetForm())
	}
	switch msg.GetStart() {
	case dstlv1.StartFrom_START_FROM_UNSPECIFIED, dstlv1.StartFrom_START_FROM_EARLIEST:
		req.Start = feed.StartEarliest
	case dstlv1.StartFrom_START_FROM_SNAPSHOT:
		req.Start = feed.StartSnapshot
	case dstlv1.StartFrom_START_FROM_LATEST:
		req.Start = feed.StartLatest
	default:
		return req, fmt.Errorf("%w: unknown start %v", errInvalid, msg.GetStart())
	}
	if kg := msg.GetKeyGroups(); kg != nil {
		if kg.GetLo() > kg.GetHi() || kg.GetHi() >= keygroup.Max {
			return req, fmt.Errorf("%w: key groups %d..%d", keygroup.ErrInvalidRange, kg.GetLo(), kg.GetHi())
		}
		req.KeyGroups = &keygroup.Range{Lo: uint16(kg.GetLo()), Hi: uint16(kg.GetHi())}
	}
	if n := msg.GetMaxEvents(); n > 65536 {
		return req, fmt.Errorf("%w: max_events %d, the maximum is 65536", errInvalid, n)
	}
	from := msg.GetFromToken()
	if name := msg.GetSubscription(); name != "" {
		committed, err := s.registeredToken(ctx, req.Stream, name, req)
		if err != nil {
			return req, err
		}
		req.NoAutoSnapshot = true
		if len(from) == 0 && req.Start != feed.StartSnapshot {
			from = committed
		}
	}
	if len(from) > 0 {
		tok, err := cdc.DecodeToken(from)
		if err != nil {
			return req, err
		}
		req.From = &tok
	}
	return req, nil
}

// batchMessage converts a feed batch to its message.
func batchMessage(b *feed.Batch) *dstlv1.SubscribeResponse {
	res := &dstlv1.SubscribeResponse{
		Checkpoint: b.Checkpoint, CheckpointComplete: b.Complete, TokenBase: b.Base.Encode(), Token: b.Token.Encode(),
		Snapshot: b.Snapshot, SnapshotStart: b.Reset, NewestCheckpoint: b.Newest,
	}
	if len(b.Events) > 0 {
		// One allocation for the events, one for the pointers, one for the
		// bytes: the message owns its keys and values (the batch's are
		// reused once send returns, and an in-process receiver keeps them).
		evs := make([]dstlv1.ChangeEvent, len(b.Events))
		res.Events = make([]*dstlv1.ChangeEvent, len(b.Events))
		arena := make([]byte, 0, b.Bytes)
		own := func(p []byte) []byte {
			if p == nil {
				return nil
			}
			arena = append(arena, p...)
			return arena[len(arena)-len(p) : len(arena) : len(arena)]
		}
		for i, e := range b.Events {
			evs[i] = dstlv1.ChangeEvent{
				Kind: dstlv1.EventKind(e.Kind), KeyGroup: uint32(e.KeyGroup), State: e.State,
				Key: own(e.Key), Value: own(e.Value), Ordinal: e.Ordinal, TimestampMs: e.TimestampMs,
			}
			res.Events[i] = &evs[i]
		}
	}
	return res
}
