package server

import (
	"context"
	"errors"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dstl-dev/dstl/changelog"
)

// metrics are the server's Prometheus collectors (dstl_server_*).
type metrics struct {
	changes           *prometheus.CounterVec
	batches           *prometheus.CounterVec
	bytes             prometheus.Counter
	persistSeconds    prometheus.Histogram
	checkpointSeconds prometheus.Histogram
	fenced            prometheus.Counter
	redirects         prometheus.Counter
	requests          *prometheus.CounterVec

	// CDC (dstl_cdc_*).
	cdcFeeds       prometheus.Gauge
	cdcEvents      prometheus.Counter
	cdcBytes       prometheus.Counter
	cdcMessages    prometheus.Counter
	cdcCheckpoints prometheus.Counter
}

func newMetrics() *metrics {
	latency := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	return &metrics{
		changes:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: "dstl_server_appended_changes_total", Help: "Changes appended, by durability."}, []string{"durability"}),
		batches:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: "dstl_server_appended_batches_total", Help: "Batches appended, by durability."}, []string{"durability"}),
		bytes:             prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_server_appended_bytes_total", Help: "Key and value bytes appended."}),
		persistSeconds:    prometheus.NewHistogram(prometheus.HistogramOpts{Name: "dstl_server_persist_seconds", Help: "Latency of successful persists.", Buckets: latency}),
		checkpointSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "dstl_server_checkpoint_seconds", Help: "Latency of successful writer checkpoints.", Buckets: latency}),
		fenced:            prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_server_fenced_writers_total", Help: "Writers found fenced by a newer epoch."}),
		redirects:         prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_server_writer_redirects_total", Help: "OpenWriter calls refused with NotOwner: another member owns the writer's (stream, key-group range) in this node's view."}),
		requests:          prometheus.NewCounterVec(prometheus.CounterOpts{Name: "dstl_server_requests_total", Help: "RPCs by procedure and result code."}, []string{"procedure", "code"}),
		cdcFeeds:          prometheus.NewGauge(prometheus.GaugeOpts{Name: "dstl_cdc_feeds", Help: "CDC subscriptions being served by this node."}),
		cdcEvents:         prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_cdc_events_total", Help: "CDC events delivered."}),
		cdcBytes:          prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_cdc_event_bytes_total", Help: "Key and value bytes of the CDC events delivered."}),
		cdcMessages:       prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_cdc_messages_total", Help: "CDC messages (batches of events) delivered."}),
		cdcCheckpoints:    prometheus.NewCounter(prometheus.CounterOpts{Name: "dstl_cdc_checkpoints_total", Help: "Checkpoints whose events were delivered completely to a subscription."}),
	}
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.changes, m.batches, m.bytes, m.persistSeconds, m.checkpointSeconds, m.fenced, m.redirects, m.requests,
		m.cdcFeeds, m.cdcEvents, m.cdcBytes, m.cdcMessages, m.cdcCheckpoints}
}

// foldCollectors are the metrics of a PebbleState's fold: how far it is
// behind the acknowledged appends (read-your-writes reads wait that out)
// and how long reads waited.
func foldCollectors(p *PebbleState) []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "dstl_server_fold_lag_sqns", Help: "Changes acknowledged to this node's writers and not yet folded into the read store."},
			func() float64 { return float64(p.foldLag()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "dstl_server_fold_queued_batches", Help: "Acknowledged batches waiting for the read store's fold."},
			func() float64 { return float64(p.queuedBatches.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "dstl_server_fold_queued_bytes", Help: "Memory held by the batches waiting for the fold (bounded by the fold queue's size)."},
			func() float64 { return float64(p.queued.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "dstl_server_fold_spilled_batches_total", Help: "Batches over the fold queue's bound, read back from the changelog when folded."},
			func() float64 { return float64(p.spilled.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "dstl_server_read_store_checkpoint_advances_total", Help: "Key-group runs without a local writer moved to a newer checkpoint by folding only the changes between the two."},
			func() float64 { return float64(p.advances.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "dstl_server_read_store_refolds_total", Help: "Key-group runs without a local writer dropped and refolded from a snapshot and the changelog (first fold, or another lineage)."},
			func() float64 { return float64(p.refolds.Load()) }),
		p.waits,
	}
}

func (m *metrics) appended(d changelog.Durability, changes, bytes int) {
	m.changes.WithLabelValues(d.String()).Add(float64(changes))
	m.batches.WithLabelValues(d.String()).Inc()
	m.bytes.Add(float64(bytes))
}

// interceptor counts every RPC by procedure and code.
func (m *metrics) interceptor() connect.Interceptor {
	return &countingInterceptor{m: m}
}

type countingInterceptor struct{ m *metrics }

func (c *countingInterceptor) count(procedure string, err error) {
	code := "ok"
	if err != nil {
		var ce *connect.Error
		if errors.As(err, &ce) {
			code = ce.Code().String()
		} else {
			code = connect.CodeOf(err).String()
		}
	}
	c.m.requests.WithLabelValues(procedure, code).Inc()
}

func (c *countingInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		res, err := next(ctx, req)
		c.count(req.Spec().Procedure, err)
		return res, err
	}
}

func (c *countingInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (c *countingInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		err := next(ctx, conn)
		c.count(conn.Spec().Procedure, err)
		return err
	}
}
