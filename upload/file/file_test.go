package file_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobtest"
	"github.com/dstl-dev/dstl/upload/file"
)

func newStore(t *testing.T) upload.BlobStore {
	s, err := file.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformance(t *testing.T) { blobtest.Run(t, newStore) }

func TestOpenRejectsRelativeRoot(t *testing.T) {
	if _, err := file.Open("relative/dir"); err == nil {
		t.Fatal("Open(relative) succeeded")
	}
}

func TestOpenTidiesStaleTempFiles(t *testing.T) {
	root := t.TempDir()
	if _, err := file.Open(root); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(root, ".tmp", "put-stale")
	fresh := filepath.Join(root, ".tmp", "put-fresh")
	for _, p := range []string{stale, fresh} {
		if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := file.Open(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale temp file survived Open: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("fresh temp file removed: %v", err)
	}
}

func TestLayoutAndPruning(t *testing.T) {
	root := t.TempDir()
	s, err := file.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.PutIfAbsent(ctx, "a/b/c", strings.NewReader("abc"), 3); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, "a", "b", "c"))
	if err != nil || string(data) != "abc" {
		t.Fatalf("object file = %q, %v", data, err)
	}
	if entries, _ := os.ReadDir(filepath.Join(root, ".tmp")); len(entries) != 0 {
		t.Errorf("temp files left behind: %v", entries)
	}
	if err := s.Delete(ctx, "a/b/c"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "a")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("empty parents not pruned: %v", err)
	}
	if _, err := os.Stat(root); err != nil {
		t.Errorf("root removed: %v", err)
	}
}

func TestFileDirectoryConflict(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if err := s.PutIfAbsent(ctx, "p/q", strings.NewReader("x"), 1); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"p", "p/q/r"} {
		err := s.PutIfAbsent(ctx, key, strings.NewReader("y"), 1)
		if err == nil || errors.Is(err, upload.ErrAlreadyExists) || upload.IsTransient(err) {
			t.Errorf("PutIfAbsent(%q) = %v, want a permanent conflict error", key, err)
		}
		if _, err := s.Stat(ctx, key); !errors.Is(err, upload.ErrNotFound) {
			t.Errorf("Stat(%q) = %v, want ErrNotFound", key, err)
		}
	}
}
