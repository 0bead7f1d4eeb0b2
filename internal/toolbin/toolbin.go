// Package toolbin builds the helper programs tests run (the S3-compatible
// server, grpcurl) from versions pinned in the repository's tools modules
// (tools/<name>/go.mod, kept out of dstl's own go.mod), once per machine,
// into the user cache directory.
package toolbin

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// modulePath is dstl's module: RepoRoot looks for its go.mod.
const modulePath = "github.com/dstl-dev/dstl"

// Tool names a program pinned in a tools module.
type Tool struct {
	Name     string // binary name, e.g. "versitygw"
	ToolsDir string // tools module directory relative to the repository root, e.g. "tools/s3gw"
	Module   string // module whose required version pins the tool
	Package  string // package to build
}

// Build returns the path of t's binary at the version its tools module
// pins, building it first if this machine has not yet:
// os.UserCacheDir()/dstl/<name>-<version>/<name>. Concurrent callers (test
// packages run in parallel) build it once, under a file lock, and publish it
// with an atomic rename. logf reports a build.
func Build(ctx context.Context, t Tool, logf func(format string, args ...any)) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	toolsDir := filepath.Join(root, t.ToolsDir)
	version, err := requiredVersion(filepath.Join(toolsDir, "go.mod"), t.Module)
	if err != nil {
		return "", err
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("no cache directory for the %s binary: %w", t.Name, err)
	}
	dir := filepath.Join(cache, "dstl", t.Name+"-"+version)
	bin := filepath.Join(dir, t.Name)
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
	logf("toolbin: building %s %s into %s (a cold build takes a minute or two)", t.Name, version, bin)
	start := time.Now()
	tmp := fmt.Sprintf("%s.tmp-%d", bin, os.Getpid())
	// "go test" puts its toolchain's bin directory first in PATH.
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, t.Package)
	cmd.Dir = toolsDir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = os.Remove(tmp)
		return "", fmt.Errorf("build %s %s: %w\n%s", t.Name, version, err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	logf("toolbin: built %s %s in %v", t.Name, version, time.Since(start).Round(time.Second))
	return bin, nil
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

// requiredVersion reads the version of module a go.mod requires.
func requiredVersion(gomod, module string) (string, error) {
	data, err := os.ReadFile(gomod)
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(sc.Text()), "require "))
		if len(f) >= 2 && f[0] == module {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("%s does not require %s", gomod, module)
}

// flock takes an exclusive lock on f, polling so that ctx can end the wait.
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
