//go:build unix

package locallog

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// lockDir takes an exclusive advisory lock on <dir>/LOCK, so that two Logs
// (two processes, or a test that forgot to Close) never write one directory.
// The kernel drops the lock when the process dies, so a crash never leaves
// the directory locked.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("locallog: lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("locallog: %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("locallog: lock %s: %w", dir, err)
	}
	return f, nil
}
