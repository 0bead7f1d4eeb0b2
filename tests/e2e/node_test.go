package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// nodeConfig says how to start `dstl serve`.
type nodeConfig struct {
	dataDir string
	blob    string   // --blob; empty: the default, <data-dir>/blobs
	env     []string // extra environment (e.g. AWS credentials)
	args    []string // extra flags
}

// node is one running (or exited) `dstl serve` child process.
type node struct {
	t    *testing.T
	cfg  nodeConfig
	name string
	Addr string // 127.0.0.1:PORT
	URL  string // http://127.0.0.1:PORT

	cmd     *exec.Cmd
	log     *logBuffer
	done    chan struct{} // closed once the process has been reaped
	waitErr error
	began   time.Time
}

// startNode starts `dstl serve` on a free loopback port and waits until
// /readyz answers 200. The process is killed when the test ends (if it is
// still running), and its log is printed if the test failed.
func startNode(t *testing.T, name string, cfg nodeConfig) *node {
	t.Helper()
	var lastErr error
	for range 3 { // the free port can be taken before the child binds it
		n, err := launchNode(t, name, cfg)
		if err == nil {
			return n
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("start %s: %v", name, lastErr)
	return nil
}

func launchNode(t *testing.T, name string, cfg nodeConfig) (*node, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
	args := []string{"serve", "--listen", addr, "--data-dir", cfg.dataDir, "--log-format", "text"}
	if cfg.blob != "" {
		args = append(args, "--blob", cfg.blob)
	}
	args = append(args, cfg.args...)
	cmd := exec.Command(dstlBin, args...)
	cmd.Env = append(childEnv(), cfg.env...)
	n := &node{t: t, cfg: cfg, name: name, Addr: addr, URL: "http://" + addr, cmd: cmd, log: &logBuffer{}, done: make(chan struct{})}
	cmd.Stdout = n.log
	cmd.Stderr = n.log
	// Never leave a node behind if the test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	n.began = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", dstlBin, err)
	}
	go func() {
		n.waitErr = cmd.Wait()
		close(n.done)
	}()
	t.Cleanup(func() {
		n.Kill()
		if t.Failed() {
			t.Logf("---- log of %s (%s, data %s):\n%s", n.name, n.Addr, n.cfg.dataDir, n.log.String())
		}
	})
	if err := n.waitReady(30 * time.Second); err != nil {
		n.Kill()
		return nil, err
	}
	t.Logf("%s: ready at %s in %v (data %s)", name, addr, time.Since(n.began).Round(time.Millisecond), cfg.dataDir)
	return n, nil
}

// childEnv is the environment without DSTL_* settings and AWS credentials,
// so that only the flags (and nodeConfig.env) configure the child.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "DSTL_") || strings.HasPrefix(kv, "AWS_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func (n *node) waitReady(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, n.URL+"/readyz", nil)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-n.done:
			return fmt.Errorf("%s exited before it was ready (%v): %s", n.name, n.waitErr, n.log.String())
		case <-ctx.Done():
			return fmt.Errorf("%s not ready at %s after %v (last: %v): %s", n.name, n.URL, timeout, err, n.log.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Kill SIGKILLs the node (if it still runs) and reaps it.
func (n *node) Kill() {
	select {
	case <-n.done:
		return
	default:
	}
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
}

// Terminate sends SIGTERM and waits (at most timeout) for the process to
// exit; it returns the exit code (-1 if a signal killed it).
func (n *node) Terminate(timeout time.Duration) int {
	n.t.Helper()
	if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		n.t.Fatalf("SIGTERM %s: %v", n.name, err)
	}
	select {
	case <-n.done:
	case <-time.After(timeout):
		n.Kill()
		n.t.Fatalf("%s did not exit within %v of SIGTERM", n.name, timeout)
	}
	var exit *exec.ExitError
	if errors.As(n.waitErr, &exit) {
		return exit.ExitCode()
	}
	if n.waitErr != nil {
		n.t.Fatalf("wait for %s: %v", n.name, n.waitErr)
	}
	return 0
}

// Log returns what the node printed so far.
func (n *node) Log() string { return n.log.String() }

// h2cClient speaks HTTP/2 cleartext with prior knowledge, as `dstl serve`
// does without TLS (what gRPC clients need).
func h2cClient() *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: p}}
}

// apiClients are the generated clients of the four services.
type apiClients struct {
	protocol    string
	streams     dstlv1connect.StreamServiceClient
	writers     dstlv1connect.WriterServiceClient
	state       dstlv1connect.StateServiceClient
	checkpoints dstlv1connect.CheckpointServiceClient
}

// protocols are the wire protocols the generated clients can speak.
var protocols = []string{"connect", "grpc", "grpcweb"}

// clients returns the generated clients of n speaking protocol ("connect",
// "grpc" or "grpcweb"), over h2c.
func (n *node) clients(protocol string) *apiClients {
	var opts []connect.ClientOption
	switch protocol {
	case "connect":
	case "grpc":
		opts = append(opts, connect.WithGRPC())
	case "grpcweb":
		opts = append(opts, connect.WithGRPCWeb())
	default:
		n.t.Fatalf("unknown protocol %q", protocol)
	}
	hc := h2cClient()
	return &apiClients{
		protocol:    protocol,
		streams:     dstlv1connect.NewStreamServiceClient(hc, n.URL, opts...),
		writers:     dstlv1connect.NewWriterServiceClient(hc, n.URL, opts...),
		state:       dstlv1connect.NewStateServiceClient(hc, n.URL, opts...),
		checkpoints: dstlv1connect.NewCheckpointServiceClient(hc, n.URL, opts...),
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	return port, l.Close()
}

// logBuffer collects a child's output for the failure report.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
