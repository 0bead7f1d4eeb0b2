package materializer

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Collector exports the materializer's Status as Prometheus metrics
// (dstl_materializer_*), one series per stream.
type Collector struct {
	m     *Materializer
	descs map[string]*prometheus.Desc
}

// NewCollector returns a collector of m's metrics.
func NewCollector(m *Materializer) *Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("dstl_materializer_"+name, help, append([]string{"stream"}, labels...), nil)
	}
	return &Collector{m: m, descs: map[string]*prometheus.Desc{
		"lag_sqns":       d("lag_sqns", "Changes (SQNs) a restore of the newest checkpoint replays on top of the newest snapshot."),
		"lag_bytes":      d("lag_bytes", "Changelog bytes a restore of the newest checkpoint replays on top of the newest snapshot."),
		"last_snapshot":  d("last_snapshot_timestamp_seconds", "Creation time of the newest published snapshot."),
		"snapshot_ckpt":  d("snapshot_checkpoint", "Checkpoint id of the newest published snapshot."),
		"newest_ckpt":    d("newest_checkpoint", "Newest complete checkpoint seen."),
		"snapshot_bytes": d("snapshot_bytes", "Total size of the files the newest snapshot references."),
		"snapshots":      d("snapshots_total", "Snapshots published by this process, by kind (base: full export; delta).", "kind"),
		"uploaded_bytes": d("uploaded_bytes_total", "Bytes of snapshot files uploaded by this process."),
		"uploaded_files": d("uploaded_files_total", "Snapshot files uploaded by this process."),
		"folded_changes": d("folded_changes_total", "Changes folded into the local stores."),
		"deleted_files":  d("deleted_files_total", "Snapshot files deleted by garbage collection."),
		"errors_current": d("failing", "1 while the stream's last materialization failed."),
	}}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.m.Status() {
		g := func(key string, v float64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(c.descs[key], prometheus.GaugeValue, v, append([]string{s.Stream}, labels...)...)
		}
		n := func(key string, v float64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(c.descs[key], prometheus.CounterValue, v, append([]string{s.Stream}, labels...)...)
		}
		g("lag_sqns", float64(s.LagSQNs))
		g("lag_bytes", float64(s.LagBytes))
		last := 0.0
		if !s.LastSnapshotAt.IsZero() {
			last = float64(s.LastSnapshotAt.UnixNano()) / 1e9
		}
		g("last_snapshot", last)
		g("snapshot_ckpt", float64(s.SnapshotCheckpoint))
		g("newest_ckpt", float64(s.NewestCheckpoint))
		g("snapshot_bytes", float64(s.SnapshotBytes))
		n("snapshots", float64(s.BaseSnapshots), "base")
		n("snapshots", float64(s.Snapshots-s.BaseSnapshots), "delta")
		n("uploaded_bytes", float64(s.BytesUploaded))
		n("uploaded_files", float64(s.FilesUploaded))
		n("folded_changes", float64(s.ChangesFolded))
		n("deleted_files", float64(s.FilesDeleted))
		failing := 0.0
		if s.LastError != "" {
			failing = 1
		}
		g("errors_current", failing)
	}
}

// StoreCollector exports a Store's hydration progress (lazily imported
// snapshot files made local, see Store.Hydration) as Prometheus metrics
// (dstl_store_*), one series per stream.
type StoreCollector struct {
	s                                                 *Store
	total, local, totalFiles, localFiles, read, fails *prometheus.Desc
	remote                                            *prometheus.Desc
}

// NewStoreCollector returns a collector of s's hydration metrics.
func NewStoreCollector(s *Store) *StoreCollector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("dstl_store_"+name, help, []string{"stream"}, nil)
	}
	return &StoreCollector{
		s:          s,
		total:      d("hydration_total_bytes", "Bytes of snapshot files imported lazily (read from the blob store until hydrated) since the store opened."),
		local:      d("hydration_local_bytes", "Of those, bytes hydrated (local)."),
		totalFiles: d("hydration_total_files", "Snapshot files imported lazily since the store opened."),
		localFiles: d("hydration_local_files", "Of those, files hydrated (local)."),
		read:       d("hydration_read_bytes_total", "Bytes the hydrator read from the blob store (whole files, CRC32C-verified)."),
		fails:      d("hydration_failing", "1 while the stream's last hydration or reference refresh failed (it is retried)."),
		remote:     prometheus.NewDesc("dstl_store_remote_read_bytes_total", "Bytes Pebble read from the blob store through lazily imported files before they were hydrated.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *StoreCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.total, c.local, c.totalFiles, c.localFiles, c.read, c.fails, c.remote} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *StoreCollector) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.s.Hydration() {
		g := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, h.Stream)
		}
		g(c.total, float64(h.TotalBytes))
		g(c.local, float64(h.LocalBytes))
		g(c.totalFiles, float64(h.TotalFiles))
		g(c.localFiles, float64(h.LocalFiles))
		ch <- prometheus.MustNewConstMetric(c.read, prometheus.CounterValue, float64(h.RemoteReadBytes), h.Stream)
		failing := 0.0
		if h.LastError != "" {
			failing = 1
		}
		g(c.fails, failing)
	}
	ch <- prometheus.MustNewConstMetric(c.remote, prometheus.CounterValue, float64(c.s.RemoteReadBytes()))
}
