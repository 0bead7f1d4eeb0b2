package dstl_test

import (
	"errors"
	"testing"

	dstl "github.com/dstl-dev/dstl/sdk/go"
)

// A name that is not UTF-8 is a bad name like any other: ErrInvalidArgument
// (it used to be INTERNAL, "marshal message: string field contains invalid
// UTF-8"), in both modes and for every call that takes a name.
func TestInvalidUTF8IsInvalidArgument(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		bad := "s\xff\xfe"
		mustCreate(t, c, "ok", 4)
		w := openWriter(t, c, "ok", dstl.WriterOptions{})
		defer w.Abort()
		calls := map[string]func() error{
			"CreateStream": func() error { _, err := c.CreateStream(ctx, bad, 0); return err },
			"EnsureStream": func() error { _, err := c.EnsureStream(ctx, bad, 0); return err },
			"Stream":       func() error { _, err := c.Stream(ctx, bad); return err },
			"DeleteStream": func() error { return c.DeleteStream(ctx, bad) },
			"OpenWriter":   func() error { _, err := c.OpenWriter(ctx, bad, dstl.WriterOptions{}); return err },
			"Get":          func() error { _, _, err := c.Get(ctx, bad, "st", []byte("k")); return err },
			"Get state":    func() error { _, _, err := c.Get(ctx, "ok", bad, []byte("k")); return err },
			"Scan": func() error {
				for _, err := range c.Scan(ctx, bad, dstl.ScanOptions{}) {
					return err
				}
				return nil
			},
			"Scan state": func() error {
				for _, err := range c.Scan(ctx, "ok", dstl.ScanOptions{State: bad}) {
					return err
				}
				return nil
			},
			"Checkpoints": func() error {
				for _, err := range c.Checkpoints(ctx, bad, dstl.CheckpointListOptions{}) {
					return err
				}
				return nil
			},
			"Checkpoint":       func() error { _, err := c.Checkpoint(ctx, bad, 1); return err },
			"RetainCheckpoint": func() error { _, err := c.RetainCheckpoint(ctx, bad, 1, true); return err },
			"Writer.Put state": func() error { return w.Put(ctx, bad, []byte("k"), []byte("v")) },
			"Writer.Get state": func() error { _, _, err := w.Get(ctx, bad, []byte("k")); return err },
		}
		for name, call := range calls {
			if err := call(); !errors.Is(err, dstl.ErrInvalidArgument) {
				t.Errorf("%s with a name that is not UTF-8: %v, want ErrInvalidArgument", name, err)
			}
		}
		// The writer is unharmed.
		if err := w.Put(ctx, "st", []byte("k"), []byte("v")); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

func collect[T any](seq func(func(T, error) bool)) ([]T, error) {
	var out []T
	for v, err := range seq {
		if err != nil {
			return out, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Checkpoints iterates over every page, in either order, with or without
// parts.
func TestCheckpointsPages(t *testing.T) {
	bothModes(t, func(t *testing.T, c *dstl.Client) {
		ctx := t.Context()
		mustCreate(t, c, "s", 4)
		w := openWriter(t, c, "s", dstl.WriterOptions{})
		const n = 7
		for id := uint64(1); id <= n; id++ {
			if err := w.Put(ctx, "st", []byte("k"), []byte{byte(id)}); err != nil {
				t.Fatal(err)
			}
			if complete, err := w.Checkpoint(ctx, id, []byte("m")); err != nil || !complete {
				t.Fatalf("checkpoint %d: %v %v", id, complete, err)
			}
		}
		for _, o := range []dstl.CheckpointListOptions{{PageSize: 2}, {PageSize: 3, NewestFirst: true, Parts: true}, {}} {
			cps, err := collect(c.Checkpoints(ctx, "s", o))
			if err != nil || len(cps) != n {
				t.Fatalf("%+v: %d checkpoints, %v; want %d", o, len(cps), err, n)
			}
			for i, cp := range cps {
				want := uint64(i + 1)
				if o.NewestFirst {
					want = n - uint64(i)
				}
				if cp.ID != want || cp.PartCount != 1 || (len(cp.Parts) == 1) != o.Parts {
					t.Fatalf("%+v: checkpoint %d is %+v, want id %d, 1 part (filled in: %v)", o, i, cp, want, o.Parts)
				}
				if o.Parts && string(cp.Parts[0].Metadata) != "m" {
					t.Fatalf("%+v: parts of %d: %+v", o, cp.ID, cp.Parts)
				}
			}
		}
		latest, ok, err := c.LatestCheckpoint(ctx, "s")
		if err != nil || !ok || latest.ID != n || len(latest.Parts) != 1 {
			t.Fatalf("LatestCheckpoint = %+v %v %v", latest, ok, err)
		}
		cp, err := c.Checkpoint(ctx, "s", 3)
		if err != nil || cp.ID != 3 || len(cp.Parts) != 1 {
			t.Fatalf("Checkpoint(3) = %+v %v", cp, err)
		}
		if _, err := c.Checkpoint(ctx, "s", 99); !errors.Is(err, dstl.ErrNotFound) {
			t.Fatalf("Checkpoint(99): %v, want ErrNotFound", err)
		}
		if err := w.Close(ctx); err != nil {
			t.Fatal(err)
		}
	})
}
