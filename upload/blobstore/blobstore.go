// Package blobstore opens a BlobStore from a blob URL:
//
//	/var/lib/dstl/blobs                      a local directory (a bare path; relative paths are made absolute)
//	file:///var/lib/dstl/blobs               the same, as a URL
//	s3://bucket/prefix                       AWS S3, credentials and region from the environment
//	s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&path_style=true
//	                                         any S3-compatible store
package blobstore

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/file"
	"github.com/dstl-dev/dstl/upload/s3"
)

// ErrBadURL is wrapped by every error about the URL itself (as opposed to
// failing to reach the store it names).
var ErrBadURL = errors.New("bad blob store URL")

var schemeRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)

// Open opens the blob store named by rawURL (see the package comment). For
// S3 it checks that the bucket is reachable.
func Open(ctx context.Context, rawURL string) (upload.BlobStore, error) {
	if rawURL == "" {
		return nil, fmt.Errorf("%w: empty", ErrBadURL)
	}
	if !schemeRE.MatchString(rawURL) {
		return openFile(rawURL)
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadURL, err)
	}
	switch strings.ToLower(u.Scheme) {
	case "file":
		if strings.HasPrefix(rawURL, "file://./") || strings.HasPrefix(rawURL, "file://../") {
			// file://./dir: a path relative to the working directory.
			return openFile(rawURL[len("file://"):])
		}
		p, err := FilePath(u)
		if err != nil {
			return nil, err
		}
		return openFile(p)
	case "s3":
		opts, err := S3Options(u)
		if err != nil {
			return nil, err
		}
		return s3.New(ctx, opts)
	default:
		return nil, fmt.Errorf("%w %q: unknown scheme %q (want file:// or s3://, or a bare path)", ErrBadURL, rawURL, u.Scheme)
	}
}

func openFile(path string) (upload.BlobStore, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("%w: path %q: %v", ErrBadURL, path, err)
	}
	return file.Open(abs)
}

// FilePath returns the directory of a file:// URL, which must be absolute
// and have no host (or "localhost"), query or fragment.
func FilePath(u *url.URL) (string, error) {
	switch {
	case u.Host != "" && u.Host != "localhost":
		return "", fmt.Errorf("%w %q: file URLs take no host (file:///abs/path)", ErrBadURL, u.Redacted())
	case u.Opaque != "" || !strings.HasPrefix(u.Path, "/"):
		return "", fmt.Errorf("%w %q: file URLs need an absolute path (file:///abs/path)", ErrBadURL, u.Redacted())
	case u.RawQuery != "" || u.Fragment != "":
		return "", fmt.Errorf("%w %q: file URLs take no query or fragment", ErrBadURL, u.Redacted())
	}
	return filepath.Clean(u.Path), nil
}

// S3Options returns the options of an s3://bucket/prefix URL. Query
// parameters: endpoint (an http or https URL), region, path_style (a
// boolean). Credentials come from the environment, never from the URL.
func S3Options(u *url.URL) (s3.Options, error) {
	bad := func(format string, args ...any) (s3.Options, error) {
		return s3.Options{}, fmt.Errorf("%w %q: %s", ErrBadURL, u.Redacted(), fmt.Sprintf(format, args...))
	}
	if u.User != nil {
		return bad("credentials do not belong in the URL: use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
	}
	if u.Host == "" {
		return bad("no bucket (s3://bucket/prefix)")
	}
	if u.Fragment != "" {
		return bad("no fragment allowed")
	}
	opts := s3.Options{Bucket: u.Host, Prefix: strings.Trim(u.Path, "/")}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return bad("query: %v", err)
	}
	for name, values := range q {
		if len(values) != 1 {
			return bad("parameter %s given %d times", name, len(values))
		}
		v := values[0]
		switch name {
		case "endpoint":
			e, err := url.Parse(v)
			if err != nil || (e.Scheme != "http" && e.Scheme != "https") || e.Host == "" {
				return bad("endpoint %q is not an http(s) URL", v)
			}
			opts.Endpoint = v
		case "region":
			if v == "" {
				return bad("empty region")
			}
			opts.Region = v
		case "path_style":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return bad("path_style %q is not a boolean", v)
			}
			opts.UsePathStyle = b
		default:
			return bad("unknown parameter %q (known: endpoint, region, path_style)", name)
		}
	}
	return opts, nil
}
