package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// appendWire is a marshalled AppendRequest of n tiny changes (7-byte key,
// 1-byte value), built directly so that the test itself stays small.
func appendWire(writer string, n int) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	b = protowire.AppendString(b, writer)
	var c []byte
	for i := range n {
		c = c[:0]
		c = protowire.AppendTag(c, 2, protowire.BytesType)
		c = protowire.AppendString(c, "s")
		c = protowire.AppendTag(c, 3, protowire.VarintType)
		c = protowire.AppendVarint(c, uint64(dstlv1.Op_OP_PUT))
		c = protowire.AppendTag(c, 4, protowire.BytesType)
		c = protowire.AppendBytes(c, fmt.Appendf(nil, "k%06d", i%1_000_000))
		c = protowire.AppendTag(c, 5, protowire.BytesType)
		c = protowire.AppendBytes(c, []byte("v"))
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, c)
	}
	return b
}

// procStatus reads a field of /proc/PID/status in bytes (VmRSS, VmHWM).
func procStatus(pid int, field string) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// TestMemoryBoundUnderHugeBatches (D2): many concurrent Appends of the
// most tiny changes a batch may carry keep the real daemon's resident
// memory under --max-inflight-bytes + --max-request-memory + one batch's
// in-flight changes + --fold-queue-bytes + the documented base
// (docs/operations.md), and a batch above --max-batch-changes is
// INVALID_ARGUMENT before it is decoded.
// Before admission, one 3 M-change Append took the daemon to 3.2 GB, and
// these 24 batches (~1.1 KB per change while applied) could take ~3.5 GB at
// once.
func TestMemoryBoundUnderHugeBatches(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skip("needs /proc")
	}
	const (
		inflight   = 64 << 20
		requestMem = 768 << 20 // the default
		maxBatch   = 1 << 18   // the default
		base       = 256 << 20 // memoryLimitBase of cmd/dstl
		foldQueue  = 64 << 20  // --fold-queue-bytes, the default
		clients    = 12
		// A batch larger than the in-flight bound is admitted alone: one
		// batch of tiny changes in flight (137 B each) beyond it.
		oneBatch = maxBatch * 137
		bound    = inflight + requestMem + oneBatch + foldQueue + base
	)
	n := startNode(t, "node", nodeConfig{dataDir: t.TempDir(), args: []string{
		"--max-inflight-bytes=" + strconv.Itoa(inflight), "--max-request-memory=" + strconv.Itoa(requestMem),
		"--max-batch-changes=" + strconv.Itoa(maxBatch),
	}})
	pid := n.cmd.Process.Pid
	c := n.clients("connect")
	createStream(t, c, "mem")
	w := openWriter(t, c, &dstlv1.OpenWriterRequest{Stream: "mem"})
	post := func(ctx context.Context, hc *http.Client, body []byte) (int, string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.URL+dstlv1connect.WriterServiceAppendProcedure, bytes.NewReader(body))
		if err != nil {
			return 0, "", err
		}
		req.Header.Set("Content-Type", "application/proto")
		res, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer res.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
		return res.StatusCode, string(msg), nil
	}
	before, err := procStatus(pid, "VmRSS")
	if err != nil {
		t.Fatal(err)
	}

	// 3 M changes in 57 MB (under the 64 MiB message cap): refused.
	huge := appendWire(w.GetWriterId(), 3_000_000)
	code, msg, err := post(ctxT(t), h2cClient(), huge)
	if err != nil || code != http.StatusBadRequest || !strings.Contains(msg, "invalid_argument") || !strings.Contains(msg, "at most") {
		t.Fatalf("append of 3 M changes (%d bytes): HTTP %d %s %v, want 400 invalid_argument", len(huge), code, msg, err)
	}
	huge = nil

	// 12 clients (a connection each), 2 batches of the maximum each, all at
	// once; a batch refused with RESOURCE_EXHAUSTED (the node's request
	// memory or in-flight bytes stayed full for the back-pressure wait) is
	// sent again, as the SDK does.
	batch := appendWire(w.GetWriterId(), maxBatch)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		fails   []string
		applied int
		refused int
	)
	for range clients {
		wg.Go(func() {
			hc := h2cClient()
			for sent := 0; sent < 2; {
				code, msg, err := post(ctx, hc, batch)
				mu.Lock()
				switch {
				case err != nil:
					fails = append(fails, err.Error())
				case code == http.StatusOK:
					applied++
					sent++
				case strings.Contains(msg, "resource_exhausted"):
					refused++
				default:
					fails = append(fails, fmt.Sprintf("HTTP %d %s", code, msg))
				}
				mu.Unlock()
				if err != nil || (code != http.StatusOK && !strings.Contains(msg, "resource_exhausted")) {
					return
				}
			}
		})
	}
	var peakRSS int64
	sample := time.NewTicker(50 * time.Millisecond)
	defer sample.Stop()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
wait:
	for {
		select {
		case <-done:
			break wait
		case <-sample.C:
			if rss, err := procStatus(pid, "VmRSS"); err == nil {
				peakRSS = max(peakRSS, rss)
			}
		}
	}
	hwm, err := procStatus(pid, "VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d of 2x%d batches of %d changes (%d bytes each) applied (%d refusals with resource_exhausted, sent again); resident before %d MiB, peak sampled %d MiB, VmHWM %d MiB; bound %d MiB",
		applied, clients, maxBatch, len(batch), refused, before>>20, peakRSS>>20, hwm>>20, bound>>20)
	if len(fails) > 0 {
		t.Errorf("appends failed: %v", fails)
	}
	if applied != 2*clients {
		t.Errorf("%d of %d batches applied", applied, 2*clients)
	}
	if hwm > bound {
		t.Errorf("the daemon's peak resident memory was %d MiB, above the bound %d MiB (in-flight %d + requests %d + one batch %d + base %d)",
			hwm>>20, bound>>20, inflight>>20, requestMem>>20, oneBatch>>20, base>>20)
	}
}
