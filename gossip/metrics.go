package gossip

import "github.com/prometheus/client_golang/prometheus"

// NewCollector exports c's view as Prometheus metrics (dstl_cluster_*),
// read at scrape time:
//
//	dstl_cluster_members{state}                      members by state (this node included)
//	dstl_cluster_member_info{node,addr,rpc,zone,state} 1 per member in the view
//	dstl_cluster_member_load{node}                   each member's gossiped load figure
//	dstl_cluster_events_total{event}                 membership events seen (join, update, dead, left, forget)
func NewCollector(c *Cluster) prometheus.Collector { return &collector{c: c} }

var (
	membersDesc = prometheus.NewDesc("dstl_cluster_members", "Members of the cluster in this node's view, by state (this node included).", []string{"state"}, nil)
	infoDesc    = prometheus.NewDesc("dstl_cluster_member_info", "One series per member in this node's view: its gossip address, RPC URL, zone and state.", []string{"node", "addr", "rpc", "zone", "state"}, nil)
	loadDesc    = prometheus.NewDesc("dstl_cluster_member_load", "The load figure each member gossips.", []string{"node"}, nil)
	eventsDesc  = prometheus.NewDesc("dstl_cluster_events_total", "Membership events this node has seen, by kind (join, update, dead, left, forget).", []string{"event"}, nil)
)

type collector struct{ c *Cluster }

func (col *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- membersDesc
	ch <- infoDesc
	ch <- loadDesc
	ch <- eventsDesc
}

func (col *collector) Collect(ch chan<- prometheus.Metric) {
	members := col.c.Members()
	counts := map[State]int{}
	for _, m := range members {
		counts[m.State]++
		ch <- prometheus.MustNewConstMetric(infoDesc, prometheus.GaugeValue, 1, m.ID, m.Addr, m.Meta.RPC, m.Meta.Zone, m.State.String())
		ch <- prometheus.MustNewConstMetric(loadDesc, prometheus.GaugeValue, float64(m.Meta.Load), m.ID)
	}
	for _, s := range States() {
		ch <- prometheus.MustNewConstMetric(membersDesc, prometheus.GaugeValue, float64(counts[s]), s.String())
	}
	for kind, n := range col.c.EventCounts() {
		ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(n), kind)
	}
}
