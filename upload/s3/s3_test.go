package s3_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobtest"
	"github.com/dstl-dev/dstl/upload/s3"
)

func TestMain(m *testing.M) { os.Exit(s3server.Main(m)) }

func open(t *testing.T, srv *s3server.Server, prefix string) *s3.Store {
	t.Helper()
	s, err := s3.New(t.Context(), s3.Options{
		Bucket:          srv.Bucket,
		Prefix:          prefix,
		Endpoint:        srv.Endpoint,
		Region:          srv.Region,
		UsePathStyle:    true,
		AccessKeyID:     srv.AccessKey,
		SecretAccessKey: srv.SecretKey,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformance(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) upload.BlobStore { return open(t, s3server.Shared(t), "") })
}

func TestConformanceWithPrefix(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) upload.BlobStore { return open(t, s3server.Shared(t), "some/prefix") })
}

// onlyReader hides Seek and friends.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func pendingUploads(t *testing.T, srv *s3server.Server) int {
	t.Helper()
	out, err := srv.Client().ListMultipartUploads(t.Context(), &awss3.ListMultipartUploadsInput{Bucket: aws.String(srv.Bucket)})
	if err != nil {
		t.Fatal(err)
	}
	return len(out.Uploads)
}

func TestFailedMultipartPutsAreAborted(t *testing.T) {
	srv := s3server.Shared(t)
	s := open(t, srv, "")
	const size = 3*s3.DefaultPartSize + 100
	// A reader that ends early (after two and a half parts).
	err := s.PutIfAbsent(t.Context(), "short", onlyReader{io.LimitReader(zeros{}, size-s3.DefaultPartSize/2)}, size)
	if !errors.Is(err, upload.ErrSizeMismatch) {
		t.Fatalf("short multipart put = %v", err)
	}
	// A context cancelled during the upload.
	ctx, cancel := context.WithCancel(t.Context())
	r := io.MultiReader(io.LimitReader(zeros{}, 2*s3.DefaultPartSize), readFunc(func([]byte) (int, error) {
		cancel()
		return 0, context.Canceled
	}))
	err = s.PutIfAbsent(ctx, "cancelled", r, size)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled multipart put = %v", err)
	}
	if n := pendingUploads(t, srv); n != 0 {
		t.Fatalf("%d multipart uploads left behind", n)
	}
	// A put that loses the race at completion.
	if err := s.PutIfAbsent(t.Context(), "taken", strings.NewReader("x"), 1); err != nil {
		t.Fatal(err)
	}
	if err := s.PutIfAbsent(t.Context(), "taken", onlyReader{io.LimitReader(zeros{}, size)}, size); !errors.Is(err, upload.ErrAlreadyExists) {
		t.Fatalf("multipart put over an existing key = %v", err)
	}
	if n := pendingUploads(t, srv); n != 0 {
		t.Fatalf("%d multipart uploads left behind", n)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

type readFunc func([]byte) (int, error)

func (f readFunc) Read(p []byte) (int, error) { return f(p) }

// fakeS3 answers every request with status and an S3 error code.
func fakeS3(t *testing.T, status int, code string) (*s3.Store, *atomic.Int64) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/xml")
		w.WriteHeader(status)
		if r.Method != http.MethodHead {
			fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>fake</Message></Error>`, code)
		}
	}))
	t.Cleanup(srv.Close)
	s, err := s3.New(t.Context(), s3.Options{
		Bucket: "b", Endpoint: srv.URL, Region: "us-east-1", UsePathStyle: true,
		AccessKeyID: "a", SecretAccessKey: "s", MaxAttempts: 3, MaxBackoff: time.Millisecond,
		SkipBucketCheck: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, &calls
}

func TestErrorMapping(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		status    int
		code      string
		put, get  error // want errors.Is
		transient bool
		attempts  int64 // per call
	}{
		{412, "PreconditionFailed", upload.ErrAlreadyExists, nil, false, 1},
		{409, "ConditionalRequestConflict", upload.ErrAlreadyExists, nil, false, 1},
		{404, "NoSuchKey", upload.ErrNotFound, upload.ErrNotFound, false, 1},
		{416, "InvalidRange", nil, upload.ErrInvalidRange, false, 1},
		{503, "SlowDown", upload.ErrTransient, upload.ErrTransient, true, 3},
		{500, "InternalError", upload.ErrTransient, upload.ErrTransient, true, 3},
		{403, "AccessDenied", nil, nil, false, 1},
	} {
		t.Run(fmt.Sprint(tc.status, tc.code), func(t *testing.T) {
			s, calls := fakeS3(t, tc.status, tc.code)
			err := s.PutIfAbsent(ctx, "k", strings.NewReader("v"), 1)
			if err == nil {
				t.Fatal("put succeeded")
			}
			if tc.put != nil && !errors.Is(err, tc.put) {
				t.Errorf("put: %v, want %v", err, tc.put)
			}
			if upload.IsTransient(err) != tc.transient {
				t.Errorf("put: IsTransient(%v) = %v", err, !tc.transient)
			}
			if got := calls.Load(); got != tc.attempts {
				t.Errorf("put: %d attempts, want %d", got, tc.attempts)
			}
			if tc.code == "PreconditionFailed" || tc.code == "ConditionalRequestConflict" {
				return // meaningless for reads
			}
			_, err = s.GetRange(ctx, "k", 0, 10)
			if tc.get != nil && !errors.Is(err, tc.get) {
				t.Errorf("get: %v, want %v", err, tc.get)
			}
			if errors.Is(err, upload.ErrAlreadyExists) {
				t.Errorf("get: %v", err)
			}
		})
	}
}

func TestConnectionRefusedIsTransient(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	s, err := s3.New(t.Context(), s3.Options{
		Bucket: "b", Endpoint: url, UsePathStyle: true, AccessKeyID: "a", SecretAccessKey: "s",
		MaxAttempts: 2, MaxBackoff: time.Millisecond, SkipBucketCheck: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Stat(t.Context(), "k"); !upload.IsTransient(err) {
		t.Fatalf("Stat against a closed port = %v, want transient", err)
	}
}
