package upload

import "github.com/prometheus/client_golang/prometheus"

// SchedulerMetrics are the upload scheduler's Prometheus collectors. They are
// not registered anywhere: the daemon registers Collectors() with its own
// registry (no global registry).
type SchedulerMetrics struct {
	// Flushes counts flushes that drained something, by outcome
	// ("success", "failure"). Flushes with nothing to upload are not counted.
	Flushes *prometheus.CounterVec
	// SegmentBytes and Changes count what successful flushes uploaded.
	SegmentBytes prometheus.Counter
	Changes      prometheus.Counter
	// Attempts counts PutIfAbsent calls (hedges included); Retries the
	// attempts that followed a failed one; Hedges the hedged puts.
	Attempts prometheus.Counter
	Retries  prometheus.Counter
	Hedges   prometheus.Counter
	// FlushSeconds is the latency of a flush from drain to last callback.
	FlushSeconds prometheus.Histogram
	// PendingBytes are reserved and not in a flush; InFlightBytes are all
	// reserved bytes (pending + uploading), bounded by MaxInFlightBytes.
	PendingBytes  prometheus.Gauge
	InFlightBytes prometheus.Gauge
	// BackpressureWaits counts Reserve calls that had to wait and
	// TryReserve calls that were refused.
	BackpressureWaits prometheus.Counter
}

// NewSchedulerMetrics returns unregistered collectors named
// dstl_upload_*.
func NewSchedulerMetrics() *SchedulerMetrics {
	const ns, sub = "dstl", "upload"
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	m := &SchedulerMetrics{
		Flushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "flushes_total",
			Help: "Flushes that drained changes, by outcome (success, failure).",
		}, []string{"outcome"}),
		SegmentBytes: counter("segment_bytes_total", "Bytes of segment objects uploaded."),
		Changes:      counter("changes_total", "Changes uploaded in segments."),
		Attempts:     counter("attempts_total", "Segment put attempts, hedged puts included."),
		Retries:      counter("retries_total", "Segment put attempts retried after a failure."),
		Hedges:       counter("hedges_total", "Hedged segment puts started because an attempt was slow."),
		FlushSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "flush_duration_seconds",
			Help:    "Latency of a flush, from draining the logs to the last callback.",
			Buckets: prometheus.ExponentialBuckets(0.002, 2, 14), // 2ms .. ~16s
		}),
		PendingBytes:      gauge("pending_bytes", "Reserved bytes not yet in a flush."),
		InFlightBytes:     gauge("inflight_bytes", "Reserved bytes pending or uploading."),
		BackpressureWaits: counter("backpressure_waits_total", "Reservations that waited or were refused for lack of room."),
	}
	for _, outcome := range []string{flushSucceeded, flushFailed} {
		m.Flushes.WithLabelValues(outcome) // export zeros from the start
	}
	return m
}

// Collectors returns every collector, for registering with a registry.
func (m *SchedulerMetrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{
		m.Flushes, m.SegmentBytes, m.Changes, m.Attempts, m.Retries, m.Hedges,
		m.FlushSeconds, m.PendingBytes, m.InFlightBytes, m.BackpressureWaits,
	}
}
