package server

import (
	"context"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
	"github.com/dstl-dev/dstl/cdc"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

type cdcEnv struct {
	srv     *Server
	node    *changelog.Node
	reg     *prometheus.Registry
	streams dstlv1connect.StreamServiceClient
	writers dstlv1connect.WriterServiceClient
	cdc     dstlv1connect.CDCServiceClient
}

// startCDC runs a real node (file blob store) behind the stream, writer and
// CDC services on a loopback HTTP server.
func startCDC(t *testing.T, opt func(*changelog.Options)) *cdcEnv {
	t.Helper()
	ctx := context.Background()
	store, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	nodeOpts := changelog.Options{Store: store, DataDir: t.TempDir(), GCInterval: -1}
	nodeOpts.Scheduler.BatchDelay = time.Millisecond
	if opt != nil {
		opt(&nodeOpts)
	}
	node, err := changelog.Open(ctx, nodeOpts)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	srv, err := New(node, Options{Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		hs.Close()
		node.Close(context.Background())
		store.Close()
	})
	return &cdcEnv{
		srv: srv, node: node, reg: reg,
		streams: dstlv1connect.NewStreamServiceClient(hs.Client(), hs.URL),
		writers: dstlv1connect.NewWriterServiceClient(hs.Client(), hs.URL),
		cdc:     dstlv1connect.NewCDCServiceClient(hs.Client(), hs.URL),
	}
}

// checkpoints creates stream with one writer and completes checkpoints
// 1..n, each after one change.
func (e *cdcEnv) checkpoints(t *testing.T, stream string, n uint64) {
	t.Helper()
	ctx := context.Background()
	if _, err := e.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: stream, KeyGroups: 4})); err != nil {
		t.Fatal(err)
	}
	ow, err := e.writers.OpenWriter(ctx, connect.NewRequest(&dstlv1.OpenWriterRequest{Stream: stream}))
	if err != nil {
		t.Fatal(err)
	}
	for id := uint64(1); id <= n; id++ {
		if _, err := e.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{WriterId: ow.Msg.GetWriterId(), Changes: []*dstlv1.Change{put(0, "k", "v")}})); err != nil {
			t.Fatal(err)
		}
		if _, err := e.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: ow.Msg.GetWriterId(), CheckpointId: id})); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *cdcEnv) create(name string, token []byte, start dstlv1.StartFrom) (*dstlv1.Subscription, error) {
	res, err := e.cdc.CreateSubscription(context.Background(), connect.NewRequest(&dstlv1.CreateSubscriptionRequest{Stream: "s", Name: name, Token: token, Start: start}))
	if err != nil {
		return nil, err
	}
	return res.Msg.GetSubscription(), nil
}

func decodeTok(t *testing.T, b []byte) cdc.Token {
	t.Helper()
	tok, err := cdc.DecodeToken(b)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestSubscriptionRPCs(t *testing.T) {
	ctx := context.Background()
	e := startCDC(t, nil)
	e.checkpoints(t, "s", 2)
	e.checkpoints(t, "other", 1)
	cfg, err := e.node.Stream(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	base := cdc.Token{Stream: "s", Incarnation: cfg.Incarnation, KeyGroups: keygroup.Full(4), Form: cdc.FormUpsert}

	latest, err := e.create("latest", nil, dstlv1.StartFrom_START_FROM_LATEST)
	if err != nil {
		t.Fatal(err)
	}
	if tok := decodeTok(t, latest.Token); latest.Checkpoint != 2 || tok.After != 2 || tok.Snapshot || latest.LagCheckpoints != 0 || latest.LagSeconds != 0 {
		t.Fatalf("latest: %+v %+v", latest, tok)
	}
	early, err := e.create("early", nil, dstlv1.StartFrom_START_FROM_UNSPECIFIED)
	if err != nil {
		t.Fatal(err)
	}
	if tok := decodeTok(t, early.Token); early.Checkpoint != 0 || tok != base || early.LagCheckpoints != 2 || early.LagChanges != 2 || early.LagBytes == 0 || early.LagSeconds <= 0 {
		t.Fatalf("earliest: %+v %+v", early, tok)
	}
	snap, err := e.create("snap", nil, dstlv1.StartFrom_START_FROM_SNAPSHOT)
	if err != nil {
		t.Fatal(err)
	}
	if tok := decodeTok(t, snap.Token); snap.Checkpoint != 2 || !tok.Snapshot || tok.Checkpoint != 2 || tok.Ordinal != 0 || tok.KeyGroups != keygroup.Full(4) || tok.Form != cdc.FormUpsert {
		t.Fatalf("snapshot: %+v %+v", snap, tok)
	}
	at1 := base
	at1.After = 1
	if sub, err := e.create("tok", at1.Encode(), 0); err != nil || sub.Checkpoint != 1 || sub.LagCheckpoints != 1 {
		t.Fatalf("create at a token: %+v %v", sub, err)
	}

	_, err = e.create("latest", nil, 0)
	wantCode(t, "name taken", err, connect.CodeAlreadyExists, "latest")
	_, err = e.create("bad/name", nil, 0)
	wantCode(t, "bad name", err, connect.CodeInvalidArgument, "bad/name")
	_, err = e.cdc.CreateSubscription(ctx, connect.NewRequest(&dstlv1.CreateSubscriptionRequest{Stream: "nope", Name: "x"}))
	wantCode(t, "unknown stream", err, connect.CodeNotFound, "nope")
	_, err = e.create("x", []byte("garbage"), 0)
	wantCode(t, "corrupt token", err, connect.CodeInvalidArgument, "token")
	otherTok := base
	otherTok.Stream = "other"
	_, err = e.create("x", otherTok.Encode(), 0)
	wantCode(t, "token of another stream", err, connect.CodeInvalidArgument, "other")
	oldInc := base
	oldInc.Incarnation = "0123456789abcdef01234567"
	_, err = e.create("x", oldInc.Encode(), 0)
	wantCode(t, "token of another incarnation", err, connect.CodeInvalidArgument, "incarnation")
	future := base
	future.After = 9
	_, err = e.create("x", future.Encode(), 0)
	wantCode(t, "token from the future", err, connect.CodeOutOfRange, "9")

	// Commit, get, list, delete.
	at2 := base
	at2.After = 2
	cres, err := e.cdc.CommitSubscription(ctx, connect.NewRequest(&dstlv1.CommitSubscriptionRequest{Stream: "s", Name: "early", Token: at2.Encode()}))
	if err != nil {
		t.Fatal(err)
	}
	if sub := cres.Msg.GetSubscription(); sub.Checkpoint != 2 || sub.LagCheckpoints != 0 || sub.Expired {
		t.Fatalf("committed: %+v", sub)
	}
	_, err = e.cdc.CommitSubscription(ctx, connect.NewRequest(&dstlv1.CommitSubscriptionRequest{Stream: "s", Name: "early", Token: future.Encode()}))
	wantCode(t, "commit from the future", err, connect.CodeOutOfRange, "")
	_, err = e.cdc.CommitSubscription(ctx, connect.NewRequest(&dstlv1.CommitSubscriptionRequest{Stream: "s", Name: "ghost", Token: at2.Encode()}))
	wantCode(t, "commit of unknown", err, connect.CodeNotFound, "ghost")
	g, err := e.cdc.GetSubscription(ctx, connect.NewRequest(&dstlv1.GetSubscriptionRequest{Stream: "s", Name: "early"}))
	if err != nil || g.Msg.GetSubscription().GetCheckpoint() != 2 || g.Msg.GetSubscription().GetStream() != "s" {
		t.Fatalf("get: %+v %v", g, err)
	}
	l, err := e.cdc.ListSubscriptions(ctx, connect.NewRequest(&dstlv1.ListSubscriptionsRequest{Stream: "s"}))
	if err != nil || len(l.Msg.GetSubscriptions()) != 4 {
		t.Fatalf("list: %+v %v", l, err)
	}

	// Metrics, per subscription, at scrape.
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]float64{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "dstl_cdc_subscription_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			var sub string
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "subscription" {
					sub = lp.GetValue()
				}
			}
			found[mf.GetName()+"/"+sub] = m.GetGauge().GetValue()
		}
	}
	if found["dstl_cdc_subscription_lag_checkpoints/tok"] != 1 || found["dstl_cdc_subscription_lag_checkpoints/early"] != 0 ||
		found["dstl_cdc_subscription_lag_changes/tok"] != 1 || found["dstl_cdc_subscription_expired/tok"] != 0 {
		t.Fatalf("metrics: %v", found)
	}
	if _, ok := found["dstl_cdc_subscription_lag_seconds/snap"]; !ok {
		t.Fatalf("no lag_seconds for snap: %v", found)
	}

	if _, err := e.cdc.DeleteSubscription(ctx, connect.NewRequest(&dstlv1.DeleteSubscriptionRequest{Stream: "s", Name: "early"})); err != nil {
		t.Fatal(err)
	}
	_, err = e.cdc.GetSubscription(ctx, connect.NewRequest(&dstlv1.GetSubscriptionRequest{Stream: "s", Name: "early"}))
	wantCode(t, "get after delete", err, connect.CodeNotFound, "early")
	_, err = e.cdc.DeleteSubscription(ctx, connect.NewRequest(&dstlv1.DeleteSubscriptionRequest{Stream: "s", Name: "early"}))
	wantCode(t, "second delete", err, connect.CodeNotFound, "early")
}

// Past the retention cap a position is FAILED_PRECONDITION saying the
// subscription must start from a snapshot; EARLIEST falls back to a
// snapshot of the newest checkpoint.
func TestSubscriptionRPCsPastTheCap(t *testing.T) {
	e := startCDC(t, func(o *changelog.Options) { o.SubscriptionMaxHold = time.Millisecond })
	e.checkpoints(t, "s", 2)
	time.Sleep(5 * time.Millisecond)
	cfg, err := e.node.Stream(context.Background(), "s")
	if err != nil {
		t.Fatal(err)
	}
	at1 := cdc.Token{Stream: "s", Incarnation: cfg.Incarnation, KeyGroups: keygroup.Full(4), Form: cdc.FormRetract, After: 1}
	_, err = e.create("x", at1.Encode(), 0)
	wantCode(t, "create past the cap", err, connect.CodeFailedPrecondition, "must start from a snapshot")
	sub, err := e.create("x", nil, dstlv1.StartFrom_START_FROM_EARLIEST)
	if err != nil {
		t.Fatal(err)
	}
	if tok := decodeTok(t, sub.Token); !tok.Snapshot || tok.Checkpoint != 2 || sub.Checkpoint != 2 || sub.Expired {
		t.Fatalf("earliest past the cap: %+v %+v", sub, tok)
	}
}
