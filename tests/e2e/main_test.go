package e2e

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/toolbin"
)

// dstlBin is the dstl binary built by TestMain for this run.
var dstlBin string

// TestMain builds ./cmd/dstl once (without -race: the child is the product,
// the test binary is what runs under the race detector), runs the tests and
// removes the binary.
func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	flag.Parse() // for testing.Verbose
	dir, err := os.MkdirTemp("", "dstl-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	root, err := toolbin.RepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	dstlBin = filepath.Join(dir, "dstl")
	start := time.Now()
	// "go test" puts its toolchain's bin directory first in PATH.
	cmd := exec.Command("go", "build", "-o", dstlBin, "./cmd/dstl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go build ./cmd/dstl: %v\n%s", err, out)
		return 1
	}
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "e2e: built %s in %v\n", dstlBin, time.Since(start).Round(time.Millisecond))
	}
	return m.Run()
}
