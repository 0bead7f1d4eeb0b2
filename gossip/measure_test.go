package gossip

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"
)

// TestMeasureDetection prints the figures of docs/cluster.md: for each
// preset, on loopback, how long until n nodes converge, a crash (Close
// without Leave) is seen dead by every other node, and a leave is seen
// left. It runs only with DSTL_GOSSIP_MEASURE=1 (the default timings
// take ~10 s per round):
//
//	DSTL_GOSSIP_MEASURE=1 go test -run TestMeasureDetection -v ./gossip
func TestMeasureDetection(t *testing.T) {
	if os.Getenv("DSTL_GOSSIP_MEASURE") == "" {
		t.Skip("set DSTL_GOSSIP_MEASURE=1 to measure")
	}
	for _, p := range []struct {
		name   string
		t      Timings
		rounds int
	}{{"fast", FastTimings(), 5}, {"default", DefaultTimings(), 3}} {
		for _, n := range []int{3, 5} {
			var conv, crash, leave []time.Duration
			for range p.rounds {
				c, d, l := measureRound(t, n, p.t)
				conv, crash, leave = append(conv, c), append(crash, d), append(leave, l)
			}
			t.Logf("%-7s n=%d  converge %s  crash→dead(all) %s  leave→left(all) %s", p.name, n, span(conv), span(crash), span(leave))
		}
	}
}

func span(ds []time.Duration) string {
	slices.Sort(ds)
	return fmt.Sprintf("%v..%v (median %v)", ds[0].Round(time.Millisecond), ds[len(ds)-1].Round(time.Millisecond), ds[len(ds)/2].Round(time.Millisecond))
}

func measureRound(t *testing.T, n int, timings Timings) (converge, crash, leave time.Duration) {
	var nodes []*Cluster
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("m%d", i)
	}
	start := time.Now()
	for i := range n {
		nodes = append(nodes, testNode(t, ids[i], func(c *Config) {
			c.Timings = timings
			if i > 0 {
				c.Join = []string{nodes[0].Addr()}
			}
		}))
	}
	for _, c := range nodes {
		waitFor(t, c, time.Minute, "all alive", allAlive(ids...))
	}
	converge = time.Since(start)

	killed := time.Now()
	_ = nodes[n-1].Close()
	for _, c := range nodes[:n-1] {
		waitFor(t, c, time.Minute, "dead", stateOf(ids[n-1], StateDead))
	}
	crash = time.Since(killed)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	left := time.Now()
	if err := nodes[n-2].Leave(ctx); err != nil {
		t.Fatal(err)
	}
	_ = nodes[n-2].Close()
	for _, c := range nodes[:n-2] {
		waitFor(t, c, time.Minute, "left", stateOf(ids[n-2], StateLeft))
	}
	leave = time.Since(left)
	for _, c := range nodes {
		_ = c.Close()
	}
	return converge, crash, leave
}
