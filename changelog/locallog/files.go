package locallog

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// WAL files are <dir>/<20-digit file number>.wal, numbered from 1, so that
// name order is number order.
const walSuffix = ".wal"

type walName struct{ num uint64 }

func (w walName) path(dir string) string {
	return filepath.Join(dir, fmt.Sprintf("%020d%s", w.num, walSuffix))
}

// listWAL returns the WAL files of dir in number order. Other files (the
// lock file) are ignored.
func listWAL(dir string) ([]walName, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("locallog: list %s: %w", dir, err)
	}
	var out []walName
	for _, e := range ents {
		name := e.Name()
		digits, ok := strings.CutSuffix(name, walSuffix)
		if !ok || len(digits) != 20 || !e.Type().IsRegular() {
			continue
		}
		n, err := strconv.ParseUint(digits, 10, 64)
		if err != nil || n == 0 {
			continue
		}
		out = append(out, walName{n})
	}
	slices.SortFunc(out, func(a, b walName) int {
		switch {
		case a.num < b.num:
			return -1
		case a.num > b.num:
			return 1
		}
		return 0
	})
	return out, nil
}

// ensureDir creates dir if missing and syncs its parent, so that the
// directory itself survives a crash once a record in it is acknowledged.
func ensureDir(dir string, noSync bool) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("locallog: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("locallog: %w", err)
	}
	if noSync {
		return nil
	}
	return syncDir(filepath.Dir(dir))
}

// syncDir makes creations and renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("locallog: sync dir: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("locallog: sync dir %s: %w", dir, err)
	}
	return nil
}
