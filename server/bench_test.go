package server

import (
	"context"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/changelog/keygroup"
	"github.com/dstl-dev/dstl/upload/file"
)

// BenchmarkServerAppend measures the server's append path (without the
// network): changelog append plus the write-through into the read path,
// for the Pebble-backed read path, the in-memory one, and none at all (the
// changelog-only path the others are compared with). One op is a batch of
// 100 puts of 100-byte values, buffered: of the same 100 keys every time
// (hot keys: the fold writes a key overwritten by several batches of one
// Apply once), or with keys=unique of keys never written before (the fold
// writes every change).
func BenchmarkServerAppend(b *testing.B) {
	for _, tc := range []struct {
		name     string
		stateDir bool
		none     bool
		unique   bool
	}{
		{"state=pebble", true, false, false}, {"state=memory", false, false, false}, {"state=none", false, true, false},
		{"state=pebble,keys=unique", true, false, true}, {"state=none,keys=unique", false, true, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			store, err := file.Open(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer store.Close()
			node, err := changelog.Open(ctx, changelog.Options{Store: store, DataDir: b.TempDir(), GCInterval: -1})
			if err != nil {
				b.Fatal(err)
			}
			defer node.Close(ctx)
			opts := Options{}
			switch {
			case tc.stateDir:
				opts.StateDir = b.TempDir()
			case tc.none:
				opts.State = readerOnly{NewLiveState(node)} // no write hooks
			}
			s, err := New(node, opts)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if _, err := node.CreateStream(ctx, "bench", 128); err != nil {
				b.Fatal(err)
			}
			w, err := node.OpenWriter(ctx, changelog.WriterConfig{Stream: "bench", KeyGroups: keygroup.Full(128)})
			if err != nil {
				b.Fatal(err)
			}
			if s.hooks != nil {
				if err := s.hooks.WriterOpened(ctx, w); err != nil {
					b.Fatal(err)
				}
			}
			s.writers[w.LogID()] = w
			value := make([]byte, 100)
			req := &dstlv1.AppendRequest{WriterId: w.LogID(), Durability: dstlv1.Durability_DURABILITY_BUFFERED}
			for i := range 100 {
				key := fmt.Appendf(nil, "user:%06d", i)
				req.Changes = append(req.Changes, &dstlv1.Change{KeyGroup: uint32(keygroup.Of(key, 128)), State: "s", Op: dstlv1.Op_OP_PUT, Key: key, Value: value})
			}
			start := time.Now()
			var n uint64
			for b.Loop() {
				if tc.unique {
					// The keys' last 8 bytes count up (the server copies
					// keys: rewriting them is safe once append returns).
					for _, c := range req.Changes {
						n++
						c.Key = binary.BigEndian.AppendUint64(c.Key[:len("user:%06d")-2], n)
					}
				}
				if _, _, err := s.append(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*100)/time.Since(start).Seconds(), "changes/s")
			if s.owned != nil {
				// The fold runs behind the appends: also report the rate
				// including the time it takes to catch up, the rate the
				// read store sustains.
				for s.owned.foldLag() > 0 {
					time.Sleep(time.Millisecond)
				}
				b.ReportMetric(float64(b.N*100)/time.Since(start).Seconds(), "folded-changes/s")
			}
		})
	}
}

// readerOnly hides the write hooks of a StateReader.
type readerOnly struct{ StateReader }
