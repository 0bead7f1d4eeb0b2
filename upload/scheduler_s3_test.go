package upload_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/faulty"
	"github.com/dstl-dev/dstl/upload/s3"
)

// The package's tests share one versitygw (started on first use).
func TestMain(m *testing.M) { os.Exit(s3server.Main(m)) }

func newS3Store(t testing.TB) upload.BlobStore {
	t.Helper()
	srv := s3server.Shared(t)
	s, err := s3.New(context.Background(), s3.Options{
		Bucket:          srv.Bucket,
		Prefix:          "dstl",
		Endpoint:        srv.Endpoint,
		Region:          srv.Region,
		UsePathStyle:    true,
		AccessKeyID:     srv.AccessKey,
		SecretAccessKey: srv.SecretKey,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

// TestS3ManyLogsOneObjectPerFlush runs the multiplexing test against a real
// S3-compatible server, with lost acknowledgements on top.
func TestS3ManyLogsOneObjectPerFlush(t *testing.T) {
	// How many puts a run makes depends on how the flushes coalesce, so a
	// seed may draw no lost ack: then the run is repeated (each on a fresh
	// bucket, each checked in full) with the next seed.
	for seed := uint64(21); ; seed++ {
		store := faulty.Wrap(newS3Store(t), faulty.Options{Seed: seed, PerOp: map[faulty.Op]faulty.Faults{
			faulty.OpPut: {LostAck: 0.2, Transient: 0.1},
		}})
		h := start(t, upload.SchedulerOptions{
			Store: store, BatchDelay: 5 * time.Millisecond, MaxAttempts: 30,
			BaseBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond,
		})
		manyLogsOneObjectPerFlush(t, h, 32, 12)
		if store.Count(faulty.OpPut, faulty.LostAck) > 0 {
			return
		}
		if seed == 30 {
			t.Fatal("no lost acks injected in 10 runs")
		}
	}
}
