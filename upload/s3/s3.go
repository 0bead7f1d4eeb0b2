// Package s3 is the BlobStore on Amazon S3 or any S3-compatible store,
// through aws-sdk-go-v2.
//
// Create-only writes use conditional requests (If-None-Match: *), on
// PutObject for objects up to the multipart threshold and on
// CompleteMultipartUpload above it, so racing creators are settled by the
// store: exactly one wins, the others get upload.ErrAlreadyExists. Retries
// are the SDK's standard retryer (tuned, not re-implemented); errors that
// are still retryable when it gives up are marked upload.ErrTransient.
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"

	"github.com/dstl-dev/dstl/upload"
)

// Defaults for Options.
const (
	DefaultPartSize    = 16 << 20
	DefaultConcurrency = 4
	DefaultMaxAttempts = 5
	DefaultMaxBackoff  = 2 * time.Second
	DefaultRegion      = "us-east-1"

	minPartSize = 5 << 20 // S3's minimum for all parts but the last
	maxParts    = 10000
	maxListKeys = 1000
)

// Options configure a Store. Only Bucket is required.
type Options struct {
	Bucket string
	// Prefix is prepended to every key ("dstl/prod" stores key "a/b" as
	// "dstl/prod/a/b"); a missing trailing slash is added.
	Prefix string
	// Endpoint is the store's base URL (for S3-compatible stores), or ""
	// for AWS S3.
	Endpoint string
	// Region; "" takes it from the environment (AWS_REGION, shared config),
	// else DefaultRegion.
	Region string
	// UsePathStyle addresses buckets as ENDPOINT/BUCKET rather than
	// BUCKET.ENDPOINT (most S3-compatible stores need it).
	UsePathStyle bool
	// AccessKeyID, SecretAccessKey and SessionToken, if AccessKeyID is set,
	// are static credentials; otherwise the SDK's default chain is used
	// (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, shared files, IMDS, ...).
	AccessKeyID     string
	SecretAccessKey string
	SessionToken    string
	// PartSize is the multipart part size and the threshold above which a
	// put is multipart (default DefaultPartSize, at least 5 MiB). Objects up
	// to it are buffered in memory and sent with one PutObject.
	PartSize int64
	// Concurrency is the number of parts of one put in flight (default
	// DefaultConcurrency); a put buffers at most Concurrency parts.
	Concurrency int
	// MaxAttempts and MaxBackoff tune the SDK's standard retryer.
	MaxAttempts int
	MaxBackoff  time.Duration
	// HTTPClient replaces the default HTTP client (whose timeouts bound
	// connecting and waiting for response headers, not streaming bodies).
	HTTPClient *http.Client
	// SkipBucketCheck skips the HeadBucket that New does to report a
	// missing bucket or bad credentials early.
	SkipBucketCheck bool
}

// Store is a BlobStore in an S3 bucket. It is safe for concurrent use.
type Store struct {
	client      *awss3.Client
	bucket      string
	prefix      string
	partSize    int64
	concurrency int
	closeIdle   func()
}

var _ upload.BlobStore = (*Store)(nil)

// New connects to the bucket described by opts.
func New(ctx context.Context, opts Options) (*Store, error) {
	if opts.Bucket == "" {
		return nil, errors.New("s3 blob store: no bucket")
	}
	if opts.PartSize == 0 {
		opts.PartSize = DefaultPartSize
	}
	if opts.PartSize < minPartSize {
		return nil, fmt.Errorf("s3 blob store: part size %d is below S3's minimum %d", opts.PartSize, minPartSize)
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = DefaultConcurrency
	}
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = DefaultMaxAttempts
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	httpClient := opts.HTTPClient
	var closeIdle func()
	if httpClient == nil {
		bc := awshttp.NewBuildableClient().
			WithDialerOptions(func(d *net.Dialer) { d.Timeout = 5 * time.Second }).
			WithTransportOptions(func(t *http.Transport) {
				t.TLSHandshakeTimeout = 10 * time.Second
				t.ResponseHeaderTimeout = time.Minute // a multipart completion can take a while
				t.ExpectContinueTimeout = time.Second
				t.IdleConnTimeout = 90 * time.Second
				t.MaxIdleConnsPerHost = 4 * opts.Concurrency
			})
		closeIdle = bc.GetTransport().CloseIdleConnections
		loadOpts := []func(*config.LoadOptions) error{config.WithHTTPClient(bc)}
		return newStore(ctx, opts, loadOpts, closeIdle)
	}
	closeIdle = httpClient.CloseIdleConnections
	return newStore(ctx, opts, []func(*config.LoadOptions) error{config.WithHTTPClient(httpClient)}, closeIdle)
}

func newStore(ctx context.Context, opts Options, loadOpts []func(*config.LoadOptions) error, closeIdle func()) (*Store, error) {
	loadOpts = append(loadOpts,
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) {
				o.MaxAttempts = opts.MaxAttempts
				o.MaxBackoff = opts.MaxBackoff
				// dstl's upload scheduler retries on top: no client-side
				// retry quota that would fail requests under an outage.
				o.RateLimiter = ratelimit.None
			})
		}),
		// Only send checksums S3 requires: S3-compatible stores differ in
		// their support for the newer flexible checksums.
		config.WithRequestChecksumCalculation(aws.RequestChecksumCalculationWhenRequired),
		config.WithResponseChecksumValidation(aws.ResponseChecksumValidationWhenRequired),
	)
	if opts.Region != "" {
		loadOpts = append(loadOpts, config.WithRegion(opts.Region))
	}
	if opts.AccessKeyID != "" {
		loadOpts = append(loadOpts, config.WithCredentialsProvider(
			credentials.NewStaticCredentialsProvider(opts.AccessKeyID, opts.SecretAccessKey, opts.SessionToken)))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("s3 blob store: load AWS config: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = DefaultRegion
	}
	client := awss3.NewFromConfig(cfg, func(o *awss3.Options) {
		if opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(opts.Endpoint)
		}
		o.UsePathStyle = opts.UsePathStyle
	})
	prefix := strings.TrimLeft(opts.Prefix, "/")
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	s := &Store{
		client:      client,
		bucket:      opts.Bucket,
		prefix:      prefix,
		partSize:    opts.PartSize,
		concurrency: opts.Concurrency,
		closeIdle:   closeIdle,
	}
	if !opts.SkipBucketCheck {
		if _, err := client.HeadBucket(ctx, &awss3.HeadBucketInput{Bucket: aws.String(opts.Bucket)}); err != nil {
			return nil, fmt.Errorf("s3 blob store: bucket %s: %w", opts.Bucket, classify(err, false))
		}
	}
	return s, nil
}

// Client returns the underlying S3 client.
func (s *Store) Client() *awss3.Client { return s.client }

// Bucket returns the store's bucket.
func (s *Store) Bucket() string { return s.bucket }

// Prefix returns the store's key prefix ("" or ending in "/").
func (s *Store) Prefix() string { return s.prefix }

func (s *Store) objectKey(key string) *string { return aws.String(s.prefix + key) }

func wrap(op, key string, err error) error {
	return fmt.Errorf("s3 blob store: %s %s: %w", op, key, err)
}

// classify maps an SDK error to dstl's typed errors, keeping the original
// in the chain. put selects the conditional-write meaning of 409 and 412.
func classify(err error, put bool) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	code, status := "", 0
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		code = apiErr.ErrorCode()
	}
	var respErr *awshttp.ResponseError
	if errors.As(err, &respErr) {
		status = respErr.HTTPStatusCode()
	}
	switch {
	case put && (code == "PreconditionFailed" || code == "ConditionalRequestConflict" || status == http.StatusPreconditionFailed || status == http.StatusConflict):
		return fmt.Errorf("%w (%v)", upload.ErrAlreadyExists, err)
	case code == "NoSuchBucket":
		return err // configuration error: the bucket, not the object, is missing
	case code == "NoSuchKey" || code == "NotFound" || status == http.StatusNotFound:
		return fmt.Errorf("%w (%v)", upload.ErrNotFound, err)
	case code == "InvalidRange" || status == http.StatusRequestedRangeNotSatisfiable:
		return fmt.Errorf("%w (%v)", upload.ErrInvalidRange, err)
	case isTransient(err, code, status):
		return fmt.Errorf("%w: %w", upload.ErrTransient, err)
	}
	return err
}

func isTransient(err error, code string, status int) bool {
	var maxAttempts *retry.MaxAttemptsError
	if errors.As(err, &maxAttempts) {
		return true // the retryer only retries retryable errors
	}
	switch code {
	case "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestTimeout",
		"InternalError", "ServiceUnavailable", "RequestTimeTooSkewed":
		return true
	}
	if status == http.StatusRequestTimeout || status == http.StatusTooManyRequests || status >= 500 {
		return true
	}
	if retry.IsErrorRetryables(retry.DefaultRetryables).IsErrorRetryable(err).Bool() {
		return true
	}
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, io.ErrUnexpectedEOF)
}

// PutIfAbsent implements upload.BlobStore. r need not be seekable.
func (s *Store) PutIfAbsent(ctx context.Context, key string, r io.Reader, size int64) error {
	if err := upload.ValidateKey(key); err != nil {
		return wrap("put", key, err)
	}
	if size < 0 {
		return wrap("put", key, fmt.Errorf("negative size %d", size))
	}
	if err := ctx.Err(); err != nil {
		return wrap("put", key, err)
	}
	var err error
	if size <= s.partSize {
		err = s.putSingle(ctx, key, r, size)
	} else {
		err = s.putMultipart(ctx, key, r, size)
	}
	if err != nil {
		return wrap("put", key, err)
	}
	return nil
}

// readBody reads exactly size bytes of r (and checks r ends there).
func readBody(ctx context.Context, r io.Reader, size int64) ([]byte, error) {
	buf := make([]byte, size)
	n, err := io.ReadFull(upload.CtxReader(ctx, r), buf)
	if err != nil {
		return nil, upload.ShortRead(err, int64(n), size)
	}
	if err := upload.CheckEOF(r, size); err != nil {
		return nil, err
	}
	return buf, nil
}

func (s *Store) putSingle(ctx context.Context, key string, r io.Reader, size int64) error {
	// Buffered so the SDK can sign the payload and rewind it on retries.
	body, err := readBody(ctx, r, size)
	if err != nil {
		return err
	}
	_, err = s.client.PutObject(ctx, &awss3.PutObjectInput{
		Bucket:        aws.String(s.bucket),
		Key:           s.objectKey(key),
		Body:          bytes.NewReader(body),
		ContentLength: aws.Int64(size),
		IfNoneMatch:   aws.String("*"),
	})
	return classify(err, true)
}

func (s *Store) putMultipart(ctx context.Context, key string, r io.Reader, size int64) (err error) {
	partSize := s.partSize
	for (size+partSize-1)/partSize > maxParts {
		partSize *= 2
	}
	// Fail before uploading anything if the key is taken; the conditional
	// completion below is what settles races.
	if _, err := s.client.HeadObject(ctx, &awss3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: s.objectKey(key)}); err == nil {
		return upload.ErrAlreadyExists
	} else if err := classify(err, false); !errors.Is(err, upload.ErrNotFound) {
		return err
	}
	created, err := s.client.CreateMultipartUpload(ctx, &awss3.CreateMultipartUploadInput{
		Bucket: aws.String(s.bucket),
		Key:    s.objectKey(key),
	})
	if err != nil {
		return fmt.Errorf("create multipart upload: %w", classify(err, false))
	}
	uploadID := created.UploadId
	defer func() {
		if err == nil {
			return
		}
		// Abort even if ctx is done, with a short context of its own.
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if _, aerr := s.client.AbortMultipartUpload(actx, &awss3.AbortMultipartUploadInput{
			Bucket: aws.String(s.bucket), Key: s.objectKey(key), UploadId: uploadID,
		}); aerr != nil {
			err = fmt.Errorf("%w (and aborting multipart upload %s failed: %v)", err, aws.ToString(uploadID), aerr)
		}
	}()
	parts, err := s.uploadParts(ctx, key, uploadID, r, size, partSize)
	if err != nil {
		return err
	}
	_, err = s.client.CompleteMultipartUpload(ctx, &awss3.CompleteMultipartUploadInput{
		Bucket:          aws.String(s.bucket),
		Key:             s.objectKey(key),
		UploadId:        uploadID,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
		IfNoneMatch:     aws.String("*"),
	})
	if err != nil {
		return fmt.Errorf("complete multipart upload: %w", classify(err, true))
	}
	return nil
}

// uploadParts reads r part by part and uploads up to s.concurrency parts at
// once, reusing that many buffers.
func (s *Store) uploadParts(ctx context.Context, key string, uploadID *string, r io.Reader, size, partSize int64) ([]types.CompletedPart, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	nparts := int((size + partSize - 1) / partSize)
	parts := make([]types.CompletedPart, nparts)
	buffers := make(chan []byte, s.concurrency)
	for range s.concurrency {
		buffers <- nil // allocated on first use
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		cancel(err)
	}
	cr := upload.CtxReader(ctx, r)
	for i := range nparts {
		var buf []byte
		select {
		case buf = <-buffers:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		n := min(partSize, size-int64(i)*partSize)
		if buf == nil {
			buf = make([]byte, partSize)
		}
		got, err := io.ReadFull(cr, buf[:n])
		if err != nil {
			fail(upload.ShortRead(err, int64(i)*partSize+int64(got), size))
			break
		}
		if i == nparts-1 {
			if err := upload.CheckEOF(r, size); err != nil {
				fail(err)
				break
			}
		}
		wg.Go(func() {
			out, err := s.client.UploadPart(ctx, &awss3.UploadPartInput{
				Bucket:        aws.String(s.bucket),
				Key:           s.objectKey(key),
				UploadId:      uploadID,
				PartNumber:    aws.Int32(int32(i + 1)),
				Body:          bytes.NewReader(buf[:n]),
				ContentLength: aws.Int64(n),
			})
			if err != nil {
				fail(fmt.Errorf("upload part %d: %w", i+1, classify(err, false)))
				// The transport may still read a failed request's body:
				// do not reuse the buffer.
				buffers <- nil
				return
			}
			parts[i] = types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(int32(i + 1))}
			buffers <- buf
		})
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = context.Cause(ctx)
	}
	return parts, firstErr
}

// Get implements upload.BlobStore.
func (s *Store) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	if err := upload.ValidateKey(key); err != nil {
		return nil, wrap("get", key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, wrap("get", key, err)
	}
	out, err := s.client.GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String(s.bucket), Key: s.objectKey(key)})
	if err != nil {
		return nil, wrap("get", key, classify(err, false))
	}
	return &body{rc: out.Body, op: "get", key: key}, nil
}

// GetRange implements upload.BlobStore.
func (s *Store) GetRange(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	if err := upload.ValidateKey(key); err != nil {
		return nil, wrap("get range", key, err)
	}
	if offset < 0 || length < 0 {
		return nil, wrap("get range", key, fmt.Errorf("%w: offset %d length %d", upload.ErrInvalidRange, offset, length))
	}
	if err := ctx.Err(); err != nil {
		return nil, wrap("get range", key, err)
	}
	if length == 0 {
		// No HTTP range is empty: check the object and the offset instead.
		info, err := s.Stat(ctx, key)
		if err != nil {
			return nil, err
		}
		if offset > info.Size {
			return nil, wrap("get range", key, fmt.Errorf("%w: offset %d of a %d-byte object", upload.ErrInvalidRange, offset, info.Size))
		}
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	last := offset + length - 1
	out, err := s.client.GetObject(ctx, &awss3.GetObjectInput{
		Bucket: aws.String(s.bucket),
		Key:    s.objectKey(key),
		Range:  aws.String(fmt.Sprintf("bytes=%d-%d", offset, last)),
	})
	if err != nil {
		return nil, wrap("get range", key, classify(err, false))
	}
	// S3 answers a range that starts inside the object but ends past it with
	// the bytes up to the end: that is ErrInvalidRange here.
	first, end, total, ok := parseContentRange(aws.ToString(out.ContentRange))
	if !ok || first != offset || end != last {
		_ = out.Body.Close()
		return nil, wrap("get range", key, fmt.Errorf("%w: asked for bytes %d-%d, got %q of a %d-byte object",
			upload.ErrInvalidRange, offset, last, aws.ToString(out.ContentRange), total))
	}
	return &body{rc: out.Body, op: "get range", key: key}, nil
}

// parseContentRange parses "bytes FIRST-LAST/TOTAL" (TOTAL may be "*").
func parseContentRange(s string) (first, last, total int64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, -1, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, -1, false
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, -1, false
	}
	var err1, err2 error
	first, err1 = strconv.ParseInt(a, 10, 64)
	last, err2 = strconv.ParseInt(b, 10, 64)
	total = -1
	if tot != "*" {
		if t, err := strconv.ParseInt(tot, 10, 64); err == nil {
			total = t
		}
	}
	return first, last, total, err1 == nil && err2 == nil
}

// body wraps an object's HTTP body so read errors name the object and are
// classified.
type body struct {
	rc      io.ReadCloser
	op, key string
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err != nil && err != io.EOF {
		err = wrap(b.op, b.key, fmt.Errorf("read body: %w", classify(err, false)))
	}
	return n, err
}

func (b *body) Close() error { return b.rc.Close() }

// Stat implements upload.BlobStore.
func (s *Store) Stat(ctx context.Context, key string) (upload.ObjectInfo, error) {
	if err := upload.ValidateKey(key); err != nil {
		return upload.ObjectInfo{}, wrap("stat", key, err)
	}
	if err := ctx.Err(); err != nil {
		return upload.ObjectInfo{}, wrap("stat", key, err)
	}
	out, err := s.client.HeadObject(ctx, &awss3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: s.objectKey(key)})
	if err != nil {
		return upload.ObjectInfo{}, wrap("stat", key, classify(err, false))
	}
	return upload.ObjectInfo{Key: key, Size: aws.ToInt64(out.ContentLength), ModTime: aws.ToTime(out.LastModified)}, nil
}

// List implements upload.BlobStore.
func (s *Store) List(ctx context.Context, prefix, startAfter string, limit int) (upload.ListPage, error) {
	if err := ctx.Err(); err != nil {
		return upload.ListPage{}, fmt.Errorf("s3 blob store: list %q: %w", prefix, err)
	}
	if limit <= 0 {
		limit = 1000
	}
	in := &awss3.ListObjectsV2Input{
		Bucket: aws.String(s.bucket),
		Prefix: aws.String(s.prefix + prefix),
	}
	if startAfter != "" {
		in.StartAfter = aws.String(s.prefix + startAfter)
	}
	// Ask for one key more than the page holds, so whether more follow is
	// known from the keys themselves: some S3-compatible stores (versitygw
	// with a prefix that ends mid-name) report IsTruncated when no matching
	// key follows. A limit of 1000 or more trusts IsTruncated rather than
	// spending a request on one key, so the page after may be empty.
	var page upload.ListPage
	for {
		in.MaxKeys = aws.Int32(int32(min(limit+1-len(page.Objects), maxListKeys)))
		out, err := s.client.ListObjectsV2(ctx, in)
		if err != nil {
			return upload.ListPage{}, fmt.Errorf("s3 blob store: list %q: %w", prefix, classify(err, false))
		}
		for _, o := range out.Contents {
			key, ok := strings.CutPrefix(aws.ToString(o.Key), s.prefix)
			if !ok {
				continue
			}
			page.Objects = append(page.Objects, upload.ObjectInfo{Key: key, Size: aws.ToInt64(o.Size), ModTime: aws.ToTime(o.LastModified)})
		}
		switch {
		case len(page.Objects) > limit:
			page.Objects = page.Objects[:limit]
			page.Next = page.Objects[limit-1].Key
			return page, nil
		case !aws.ToBool(out.IsTruncated) || out.NextContinuationToken == nil:
			return page, nil
		case len(page.Objects) == limit:
			page.Next = page.Objects[limit-1].Key
			return page, nil
		}
		in.ContinuationToken = out.NextContinuationToken
	}
}

// Delete implements upload.BlobStore.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := upload.ValidateKey(key); err != nil {
		return wrap("delete", key, err)
	}
	if err := ctx.Err(); err != nil {
		return wrap("delete", key, err)
	}
	_, err := s.client.DeleteObject(ctx, &awss3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: s.objectKey(key)})
	if err := classify(err, false); err != nil && !errors.Is(err, upload.ErrNotFound) {
		return wrap("delete", key, err)
	}
	return nil
}

// Close releases idle connections.
func (s *Store) Close() error {
	if s.closeIdle != nil {
		s.closeIdle()
	}
	return nil
}
