// Package s3server runs a real S3-compatible server (versitygw with its posix
// backend) on loopback for tests.
//
// The versitygw binary is built from the tools module tools/s3gw (which pins
// its version) once per machine into the user cache directory
// (os.UserCacheDir()/dstl/versitygw-<version>/versitygw), under a file lock,
// so concurrently running test packages build it once. A cold build takes a
// minute or two; later runs reuse the binary.
//
// Start gives a test its own server; Shared gives every test of a package one
// server (started on first use, stopped by Main) and a fresh bucket each.
// A server that cannot be built or started fails the test: it is never
// skipped.
package s3server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/toolbin"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
)

const (
	gwModule = "github.com/versity/versitygw"
	// Region is the region every server reports.
	Region = "us-east-1"
	// AccessKey and SecretKey are the root credentials of every server.
	AccessKey = "dstl-test-access"
	SecretKey = "dstl-test-secret-key"
)

// Server is one bucket on a running versitygw, ready for a test.
type Server struct {
	Endpoint  string // http://127.0.0.1:PORT
	Region    string
	AccessKey string
	SecretKey string
	Bucket    string // created empty for this test
}

// Process is a running versitygw.
type Process struct {
	Endpoint string
	dataDir  string
	ownsDir  bool
	cmd      *exec.Cmd
	done     chan struct{} // closed when the process has been reaped
	waitErr  error
	stderr   *tailBuffer
	buckets  atomic.Int64
	stopOnce sync.Once
}

// Start starts a versitygw for this test alone, with one fresh bucket. The
// server is killed when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	p, err := Launch(t.Context(), t.TempDir(), t.Logf)
	if err != nil {
		t.Fatalf("s3server: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(); err != nil {
			t.Errorf("s3server: %v", err)
		}
	})
	return p.NewBucket(t)
}

var shared struct {
	mu   sync.Mutex
	proc *Process
	err  error
}

// Shared returns a fresh bucket on the package's shared versitygw, starting
// it on first use. Packages that use Shared stop it from TestMain with Main
// (it is also killed if the test binary dies).
func Shared(t testing.TB) *Server {
	t.Helper()
	shared.mu.Lock()
	if shared.proc == nil && shared.err == nil {
		dir, err := os.MkdirTemp("", "dstl-s3server-")
		if err == nil {
			shared.proc, err = Launch(context.Background(), dir, t.Logf)
			if err != nil {
				_ = os.RemoveAll(dir)
			} else {
				shared.proc.ownsDir = true
			}
		}
		shared.err = err
	}
	p, err := shared.proc, shared.err
	shared.mu.Unlock()
	if err != nil {
		t.Fatalf("s3server: %v", err)
	}
	return p.NewBucket(t)
}

// Main runs the package's tests and then stops the shared server, if one was
// started. Use it as `func TestMain(m *testing.M) { os.Exit(s3server.Main(m)) }`.
func Main(m *testing.M) int {
	code := m.Run()
	shared.mu.Lock()
	p := shared.proc
	shared.proc, shared.err = nil, errors.New("shared server already stopped")
	shared.mu.Unlock()
	if p != nil {
		if err := p.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "s3server: %v\n", err)
			if code == 0 {
				code = 1
			}
		}
	}
	return code
}

// Launch builds versitygw if needed and starts it on a free loopback port
// with its posix backend in dataDir.
func Launch(ctx context.Context, dataDir string, logf func(format string, args ...any)) (*Process, error) {
	bin, err := Binary(ctx, logf)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for range 3 { // the free port can be taken before versitygw binds it
		p, err := launch(ctx, bin, dataDir)
		if err == nil {
			logf("s3server: versitygw ready at %s (data in %s)", p.Endpoint, dataDir)
			return p, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func launch(ctx context.Context, bin, dataDir string) (*Process, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
	args := []string{"--access", AccessKey, "--secret", SecretKey, "--port", addr, "--region", Region, "--quiet", "posix"}
	if !xattrsWork(dataDir) {
		sidecar := filepath.Join(dataDir, ".sidecar")
		if err := os.MkdirAll(sidecar, 0o755); err != nil {
			return nil, err
		}
		args = append(args, "--sidecar", sidecar)
	}
	args = append(args, dataDir)
	cmd := exec.Command(bin, args...)
	cmd.Env = cleanEnv()
	stderr := &tailBuffer{max: 8 << 10}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	// Kill the server if the test binary dies without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start versitygw: %w", err)
	}
	p := &Process{Endpoint: "http://" + addr, dataDir: dataDir, cmd: cmd, done: make(chan struct{}), stderr: stderr}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	if err := p.waitReady(ctx, 30*time.Second); err != nil {
		_ = p.Stop()
		return nil, err
	}
	return p, nil
}

func (p *Process) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := &http.Client{Timeout: time.Second}
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.Endpoint+"/", nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			return nil // any HTTP answer (403 unsigned) means it serves
		}
		select {
		case <-p.done:
			return fmt.Errorf("versitygw exited before serving (%v): %s", p.waitErr, p.stderr.String())
		case <-ctx.Done():
			return fmt.Errorf("versitygw not ready at %s: %w (output: %s)", p.Endpoint, ctx.Err(), p.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Stop kills the server, reaps it, and removes its data directory if Launch
// was not given one by the caller's test.
func (p *Process) Stop() error {
	var err error
	p.stopOnce.Do(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
				_ = p.cmd.Process.Kill()
				<-p.done
			}
		}
		if p.ownsDir {
			err = os.RemoveAll(p.dataDir)
		}
	})
	return err
}

// Signal sends sig to the server process; tests freeze it with SIGSTOP (a
// blob store that hangs) and thaw it with SIGCONT.
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// NewBucket creates an empty bucket for t and returns its coordinates.
func (p *Process) NewBucket(t testing.TB) *Server {
	t.Helper()
	s := &Server{
		Endpoint:  p.Endpoint,
		Region:    Region,
		AccessKey: AccessKey,
		SecretKey: SecretKey,
		Bucket:    fmt.Sprintf("dstl-test-%04d", p.buckets.Add(1)),
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if _, err := s.Client().CreateBucket(ctx, &awss3.CreateBucketInput{Bucket: aws.String(s.Bucket)}); err != nil {
		t.Fatalf("s3server: create bucket %s: %v (server output: %s)", s.Bucket, err, p.stderr.String())
	}
	return s
}

// Client returns a plain S3 client for the server (for tests that inspect
// the bucket directly).
func (s *Server) Client() *awss3.Client {
	return awss3.New(awss3.Options{
		Region:       s.Region,
		BaseEndpoint: aws.String(s.Endpoint),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(s.AccessKey, s.SecretKey, ""),
	})
}

// URL returns the blob URL of the bucket with the given prefix.
func (s *Server) URL(prefix string) string {
	return fmt.Sprintf("s3://%s/%s?endpoint=%s&region=%s&path_style=true", s.Bucket, prefix, s.Endpoint, s.Region)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	return port, l.Close()
}

// xattrsWork reports whether dir's file system takes user extended
// attributes (versitygw's posix backend keeps metadata in them).
func xattrsWork(dir string) bool {
	f, err := os.CreateTemp(dir, ".xattr-probe-")
	if err != nil {
		return false
	}
	name := f.Name()
	_ = f.Close()
	defer os.Remove(name)
	return syscall.Setxattr(name, "user.dstl.probe", []byte("1"), 0) == nil
}

// cleanEnv is the environment without versitygw's configuration variables,
// so only the flags configure the server.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "VGW_") || strings.HasPrefix(kv, "ROOT_ACCESS_KEY") || strings.HasPrefix(kv, "ROOT_SECRET") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > b.max {
		b.buf = append([]byte(nil), b.buf[len(b.buf)-b.max:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.TrimSpace(string(b.buf))
}

// Binary returns the path of the versitygw binary pinned in tools/s3gw,
// building it into the user cache directory first if needed.
func Binary(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	return toolbin.Build(ctx, toolbin.Tool{Name: "versitygw", ToolsDir: "tools/s3gw", Module: gwModule, Package: gwModule + "/cmd/versitygw"}, logf)
}
