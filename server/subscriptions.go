package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// errMustResnapshot explains FAILED_PRECONDITION on a subscription whose
// position's data is gone or past the retention cap.
const mustResnapshot = "the subscription must start from a snapshot (create it again with start SNAPSHOT, or with a snapshot token)"

// subscriptionError maps a registry error to its connect code: a hold
// whose data is gone or expired is FAILED_PRECONDITION saying that the
// consumer must start from a snapshot, a hold that is not a complete
// checkpoint OUT_OF_RANGE; the rest as everywhere (toConnect).
func subscriptionError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, changelog.ErrCheckpointNotRestorable), errors.Is(err, changelog.ErrSubscriptionExpired):
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%w; %s", err, mustResnapshot))
	case errors.Is(err, changelog.ErrCheckpointNotFound):
		return connect.NewError(connect.CodeOutOfRange, err)
	}
	return toConnect(err)
}

// subscriptionToken decodes a token given for stream and returns it with
// its hold point: INVALID_ARGUMENT if it is malformed or of another stream,
// incarnation or key-group range; OUT_OF_RANGE if a checkpoint it names is
// not complete; FAILED_PRECONDITION if one was forgotten (its data is no
// longer kept).
func (c *cdcService) subscriptionToken(ctx context.Context, cfg changelog.StreamConfig, b []byte) (cdc.Token, uint64, error) {
	tok, err := cdc.DecodeToken(b)
	if err != nil {
		return cdc.Token{}, 0, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if tok.Stream != cfg.Name || tok.Incarnation != cfg.Incarnation {
		return cdc.Token{}, 0, connect.NewError(connect.CodeInvalidArgument,
			fmt.Errorf("token of stream %q incarnation %q, not of stream %q incarnation %q (deleted and created again?): %w", tok.Stream, tok.Incarnation, cfg.Name, cfg.Incarnation, errInvalid))
	}
	if err := tok.KeyGroups.Validate(cfg.KeyGroups); err != nil {
		return cdc.Token{}, 0, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("token: %w", err))
	}
	cps, err := c.s.node.Checkpoints(ctx, cfg.Name)
	if err != nil {
		return cdc.Token{}, 0, toConnect(err)
	}
	complete := make(map[uint64]bool, len(cps))
	var newest uint64
	for _, cp := range cps {
		complete[cp.ID] = true
		newest = cp.ID
	}
	for _, id := range []uint64{tok.After, tok.Checkpoint} {
		switch {
		case id == 0 || complete[id]:
		case id > newest:
			return cdc.Token{}, 0, connect.NewError(connect.CodeOutOfRange,
				fmt.Errorf("token names checkpoint %d of stream %s, which is not complete (newest %d)", id, cfg.Name, newest))
		default:
			return cdc.Token{}, 0, connect.NewError(connect.CodeFailedPrecondition,
				fmt.Errorf("token names checkpoint %d of stream %s, no longer kept: %w; %s", id, cfg.Name, changelog.ErrCheckpointNotRestorable, mustResnapshot))
		}
	}
	hold := tok.After
	if tok.Snapshot {
		hold = tok.Checkpoint
	}
	return tok, hold, nil
}

// startToken is the token of a subscription created without one.
func (c *cdcService) startToken(ctx context.Context, cfg changelog.StreamConfig, start dstlv1.StartFrom) (cdc.Token, uint64, error) {
	tok := cdc.Token{Stream: cfg.Name, Incarnation: cfg.Incarnation, KeyGroups: keygroup.Full(cfg.KeyGroups), Form: cdc.FormUpsert}
	cps, err := c.s.node.Checkpoints(ctx, cfg.Name)
	if err != nil {
		return cdc.Token{}, 0, toConnect(err)
	}
	var newest uint64
	if len(cps) > 0 {
		newest = cps[len(cps)-1].ID
	}
	switch start {
	case dstlv1.StartFrom_START_FROM_UNSPECIFIED, dstlv1.StartFrom_START_FROM_EARLIEST:
		return tok, 0, nil
	case dstlv1.StartFrom_START_FROM_LATEST:
		tok.After = newest
		return tok, newest, nil
	case dstlv1.StartFrom_START_FROM_SNAPSHOT:
		if newest == 0 {
			return tok, 0, nil // the empty state is the snapshot
		}
		tok.Snapshot, tok.Checkpoint = true, newest
		return tok, newest, nil
	}
	return cdc.Token{}, 0, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("start %v: %w", start, errInvalid))
}

func (c *cdcService) CreateSubscription(ctx context.Context, req *connect.Request[dstlv1.CreateSubscriptionRequest]) (*connect.Response[dstlv1.CreateSubscriptionResponse], error) {
	stream, name := req.Msg.GetStream(), req.Msg.GetName()
	if err := changelog.ValidateSubscriptionName(name); err != nil {
		return nil, toConnect(err)
	}
	cfg, err := c.s.node.Stream(ctx, stream)
	if err != nil {
		return nil, toConnect(err)
	}
	var (
		tok  cdc.Token
		hold uint64
	)
	if len(req.Msg.GetToken()) > 0 {
		tok, hold, err = c.subscriptionToken(ctx, cfg, req.Msg.GetToken())
	} else {
		tok, hold, err = c.startToken(ctx, cfg, req.Msg.GetStart())
	}
	if err != nil {
		return nil, err
	}
	rec, err := c.s.node.CreateSubscription(ctx, stream, changelog.SubscriptionRecord{Name: name, Token: tok.Encode(), Hold: hold})
	if len(req.Msg.GetToken()) == 0 && hold == 0 && tok.After == 0 && !tok.Snapshot && isGone(err) {
		// EARLIEST, and the changelog from the beginning is no longer
		// kept: start with a snapshot of the newest checkpoint instead.
		if tok, hold, err = c.startToken(ctx, cfg, dstlv1.StartFrom_START_FROM_SNAPSHOT); err != nil {
			return nil, err
		}
		rec, err = c.s.node.CreateSubscription(ctx, stream, changelog.SubscriptionRecord{Name: name, Token: tok.Encode(), Hold: hold})
	}
	if err != nil {
		return nil, subscriptionError(err)
	}
	sub, err := c.subscriptionProto(ctx, stream, rec)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&dstlv1.CreateSubscriptionResponse{Subscription: sub}), nil
}

// isGone: the hold's data is no longer kept (or past the cap).
func isGone(err error) bool {
	return errors.Is(err, changelog.ErrCheckpointNotRestorable) || errors.Is(err, changelog.ErrSubscriptionExpired)
}

func (c *cdcService) CommitSubscription(ctx context.Context, req *connect.Request[dstlv1.CommitSubscriptionRequest]) (*connect.Response[dstlv1.CommitSubscriptionResponse], error) {
	stream, name := req.Msg.GetStream(), req.Msg.GetName()
	if err := changelog.ValidateSubscriptionName(name); err != nil {
		return nil, toConnect(err)
	}
	if len(req.Msg.GetToken()) == 0 {
		return nil, toConnect(fmt.Errorf("commit of subscription %s: no token: %w", name, errInvalid))
	}
	cfg, err := c.s.node.Stream(ctx, stream)
	if err != nil {
		return nil, toConnect(err)
	}
	tok, hold, err := c.subscriptionToken(ctx, cfg, req.Msg.GetToken())
	if err != nil {
		return nil, err
	}
	rec, err := c.s.node.CommitSubscription(ctx, stream, name, tok.Encode(), hold)
	if err != nil {
		return nil, subscriptionError(err)
	}
	sub, err := c.subscriptionProto(ctx, stream, rec)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&dstlv1.CommitSubscriptionResponse{Subscription: sub}), nil
}

func (c *cdcService) GetSubscription(ctx context.Context, req *connect.Request[dstlv1.GetSubscriptionRequest]) (*connect.Response[dstlv1.GetSubscriptionResponse], error) {
	rec, err := c.s.node.Subscription(ctx, req.Msg.GetStream(), req.Msg.GetName())
	if err != nil {
		return nil, subscriptionError(err)
	}
	sub, err := c.subscriptionProto(ctx, req.Msg.GetStream(), rec)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&dstlv1.GetSubscriptionResponse{Subscription: sub}), nil
}

func (c *cdcService) ListSubscriptions(ctx context.Context, req *connect.Request[dstlv1.ListSubscriptionsRequest]) (*connect.Response[dstlv1.ListSubscriptionsResponse], error) {
	recs, err := c.s.node.Subscriptions(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, subscriptionError(err)
	}
	out := &dstlv1.ListSubscriptionsResponse{}
	for _, rec := range recs {
		sub, err := c.subscriptionProto(ctx, req.Msg.GetStream(), rec)
		if err != nil {
			return nil, err
		}
		out.Subscriptions = append(out.Subscriptions, sub)
	}
	return connect.NewResponse(out), nil
}

func (c *cdcService) DeleteSubscription(ctx context.Context, req *connect.Request[dstlv1.DeleteSubscriptionRequest]) (*connect.Response[dstlv1.DeleteSubscriptionResponse], error) {
	if err := c.s.node.DeleteSubscription(ctx, req.Msg.GetStream(), req.Msg.GetName()); err != nil {
		return nil, subscriptionError(err)
	}
	return connect.NewResponse(&dstlv1.DeleteSubscriptionResponse{}), nil
}

// subscriptionProto fills the API's Subscription, with its lag. Checkpoint
// is the hold point (for a snapshot in progress, the checkpoint scanned).
func (c *cdcService) subscriptionProto(ctx context.Context, stream string, rec changelog.SubscriptionRecord) (*dstlv1.Subscription, error) {
	lag, err := c.s.node.SubscriptionLag(ctx, stream, rec)
	if err != nil {
		return nil, toConnect(err)
	}
	return &dstlv1.Subscription{
		Stream: stream, Name: rec.Name, Token: rec.Token, Checkpoint: rec.Hold, UpdatedAtMs: rec.UpdatedAtMs,
		LagCheckpoints: lag.Checkpoints, LagChanges: lag.Changes, LagBytes: lag.Bytes, LagSeconds: lag.Seconds,
		Expired: rec.Expired,
	}, nil
}

// subscriptionCollectTimeout bounds one scrape's reading of subscriptions.
const subscriptionCollectTimeout = 5 * time.Second

// subscriptionCollector exports the lag of every registered subscription
// (dstl_cdc_subscription_*), computed at scrape time: the values are never
// staler than the scrape, and there is no goroutine to own. One scrape
// lists the streams and each stream's subscriptions and reads the parts of
// their hold and newest checkpoints (through the node's part cache), bounded
// by subscriptionCollectTimeout; a stream that cannot be read within it is
// left out of that scrape (and logged).
type subscriptionCollector struct {
	node *changelog.Node
	log  *slog.Logger

	checkpoints, changes, bytes, seconds, expired *prometheus.Desc
}

func newSubscriptionCollector(node *changelog.Node, log *slog.Logger) *subscriptionCollector {
	labels := []string{"stream", "subscription"}
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("dstl_cdc_subscription_"+name, help, labels, nil)
	}
	return &subscriptionCollector{
		node:        node,
		log:         log,
		checkpoints: d("lag_checkpoints", "Complete checkpoints after the registered subscription's position."),
		changes:     d("lag_changes", "Changes (estimated from the parts' SQNs) after the registered subscription's position."),
		bytes:       d("lag_bytes", "Changelog bytes (estimated from block sizes) after the registered subscription's position."),
		seconds:     d("lag_seconds", "Seconds since the oldest checkpoint the registered subscription has not consumed completed (0: caught up)."),
		expired:     d("expired", "1 if the registered subscription is past the retention cap (--cdc-max-hold) and holds nothing back."),
	}
}

func (s *subscriptionCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.checkpoints, s.changes, s.bytes, s.seconds, s.expired} {
		ch <- d
	}
}

func (s *subscriptionCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), subscriptionCollectTimeout)
	defer cancel()
	streams, err := s.node.ListStreams(ctx)
	if err != nil {
		s.log.Warn("metrics: list streams for subscription lag", "err", err)
		return
	}
	for _, stream := range streams {
		recs, err := s.node.Subscriptions(ctx, stream)
		if errors.Is(err, changelog.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			s.log.Warn("metrics: list subscriptions", "stream", stream, "err", err)
			continue
		}
		for _, rec := range recs {
			lag, err := s.node.SubscriptionLag(ctx, stream, rec)
			if err != nil {
				s.log.Warn("metrics: subscription lag", "stream", stream, "subscription", rec.Name, "err", err)
				continue
			}
			expired := 0.0
			if rec.Expired {
				expired = 1
			}
			for _, m := range []struct {
				d *prometheus.Desc
				v float64
			}{
				{s.checkpoints, float64(lag.Checkpoints)}, {s.changes, float64(lag.Changes)},
				{s.bytes, float64(lag.Bytes)}, {s.seconds, lag.Seconds}, {s.expired, expired},
			} {
				ch <- prometheus.MustNewConstMetric(m.d, prometheus.GaugeValue, m.v, stream, rec.Name)
			}
		}
	}
}
