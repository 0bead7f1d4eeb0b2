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
	"bufio"
	"bytes"
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

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
)

const (
	modulePath = "github.com/dstl-dev/dstl"
	gwModule   = "github.com/versity/versitygw"
	gwPackage  = gwModule + "/cmd/versitygw"
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

// RepoRoot finds the dstl repository root: the nearest directory at or above
// the working directory whose go.mod declares the dstl module.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && modulePathOf(data) == modulePath {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod of module %s at or above the working directory", modulePath)
		}
		dir = parent
	}
}

func modulePathOf(gomod []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(gomod))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`)
		}
	}
	return ""
}

// gwVersion reads the versitygw version pinned in the tools module.
func gwVersion(toolsDir string) (string, error) {
	data, err := os.ReadFile(filepath.Join(toolsDir, "go.mod"))
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(sc.Text()), "require "))
		if len(f) >= 2 && f[0] == gwModule {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("%s/go.mod does not require %s", toolsDir, gwModule)
}

// Binary returns the path of the versitygw binary, building it into the user
// cache directory first if needed.
func Binary(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	toolsDir := filepath.Join(root, "tools", "s3gw")
	version, err := gwVersion(toolsDir)
	if err != nil {
		return "", err
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("no cache directory for the versitygw binary: %w", err)
	}
	dir := filepath.Join(cache, "dstl", "versitygw-"+version)
	bin := filepath.Join(dir, "versitygw")
	if isExecutable(bin) {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := flock(ctx, lock); err != nil {
		return "", fmt.Errorf("lock %s: %w", dir, err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if isExecutable(bin) { // built by another process while we waited
		return bin, nil
	}
	logf("s3server: building versitygw %s into %s (a cold build takes a minute or two)", version, bin)
	start := time.Now()
	tmp := fmt.Sprintf("%s.tmp-%d", bin, os.Getpid())
	// "go test" puts its toolchain's bin directory first in PATH.
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, gwPackage)
	cmd.Dir = toolsDir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	out, err := cmd.CombinedOutput()
	if err != nil {
		_ = os.Remove(tmp)
		return "", fmt.Errorf("build versitygw %s: %w\n%s", version, err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	logf("s3server: built versitygw %s in %v", version, time.Since(start).Round(time.Second))
	return bin, nil
}

func flock(ctx context.Context, f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func isExecutable(path string) bool {
	info, err := os.Stat(path)
	return err == nil && info.Mode().IsRegular() && info.Mode()&0o111 != 0
}
