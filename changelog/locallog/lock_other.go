//go:build !unix

package locallog

import (
	"fmt"
	"os"
	"path/filepath"
)

// lockDir only creates the lock file where flock(2) is not available: one
// Log per directory is then the caller's responsibility.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("locallog: lock: %w", err)
	}
	return f, nil
}
