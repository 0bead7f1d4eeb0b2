package blobstore_test

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dstl-dev/dstl/internal/s3server"
	"github.com/dstl-dev/dstl/upload/blobstore"
	"github.com/dstl-dev/dstl/upload/file"
	"github.com/dstl-dev/dstl/upload/s3"
)

func TestMain(m *testing.M) { os.Exit(s3server.Main(m)) }

func TestS3Options(t *testing.T) {
	for _, tc := range []struct {
		url  string
		want s3.Options
		bad  string // substring of the error, if it must fail
	}{
		{url: "s3://bucket", want: s3.Options{Bucket: "bucket"}},
		{url: "s3://bucket/", want: s3.Options{Bucket: "bucket"}},
		{url: "s3://bucket/a/prefix/", want: s3.Options{Bucket: "bucket", Prefix: "a/prefix"}},
		{url: "s3://bucket/p?endpoint=http://127.0.0.1:9000&region=eu-west-1&path_style=true",
			want: s3.Options{Bucket: "bucket", Prefix: "p", Endpoint: "http://127.0.0.1:9000", Region: "eu-west-1", UsePathStyle: true}},
		{url: "s3://bucket?path_style=0", want: s3.Options{Bucket: "bucket"}},
		{url: "s3:///prefix", bad: "no bucket"},
		{url: "s3://bucket?endpoint=127.0.0.1:9000", bad: "not an http(s) URL"},
		{url: "s3://bucket?endpoint=ftp://h", bad: "not an http(s) URL"},
		{url: "s3://bucket?path_style=maybe", bad: "not a boolean"},
		{url: "s3://bucket?regoin=x", bad: `unknown parameter "regoin"`},
		{url: "s3://bucket?region=a&region=b", bad: "given 2 times"},
		{url: "s3://bucket?region=", bad: "empty region"},
		{url: "s3://key:secret@bucket/p", bad: "credentials do not belong"},
		{url: "s3://bucket/p#frag", bad: "fragment"},
	} {
		t.Run(tc.url, func(t *testing.T) {
			u, err := url.Parse(tc.url)
			if err != nil {
				t.Fatal(err)
			}
			got, err := blobstore.S3Options(u)
			if tc.bad != "" {
				if !errors.Is(err, blobstore.ErrBadURL) || !strings.Contains(err.Error(), tc.bad) {
					t.Fatalf("error %v, want ErrBadURL mentioning %q", err, tc.bad)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Errorf("error leaks the secret: %v", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestOpenFile(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	for _, tc := range []struct{ url, root string }{
		{filepath.Join(dir, "abs"), filepath.Join(dir, "abs")},
		{"rel/blobs", filepath.Join(dir, "rel/blobs")},
		{"./dot", filepath.Join(dir, "dot")},
		{"with:colon", filepath.Join(dir, "with:colon")},
		{"file://" + filepath.Join(dir, "url"), filepath.Join(dir, "url")},
		{"file://localhost" + filepath.Join(dir, "host"), filepath.Join(dir, "host")},
		{"FILE://" + filepath.Join(dir, "upper"), filepath.Join(dir, "upper")},
	} {
		s, err := blobstore.Open(t.Context(), tc.url)
		if err != nil {
			t.Errorf("Open(%q): %v", tc.url, err)
			continue
		}
		fs, ok := s.(*file.Store)
		if !ok || fs.Root() != tc.root {
			t.Errorf("Open(%q) = %T rooted at %v, want a file store at %s", tc.url, s, fs, tc.root)
		}
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	}
}

func TestOpenBadURLs(t *testing.T) {
	for _, raw := range []string{
		"", "gs://bucket/x", "http://example.com/x", "file://otherhost/x", "file:///x?y=1",
		"s3://", "s3://bucket?nope=1", "s3://b/%zz",
	} {
		_, err := blobstore.Open(context.Background(), raw)
		if !errors.Is(err, blobstore.ErrBadURL) {
			t.Errorf("Open(%q) = %v, want ErrBadURL", raw, err)
		}
	}
}

func TestOpenS3WithEnvironmentCredentials(t *testing.T) {
	srv := s3server.Shared(t)
	t.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	s, err := blobstore.Open(t.Context(), srv.URL("dstl/test"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.PutIfAbsent(t.Context(), "k", strings.NewReader("v"), 1); err != nil {
		t.Fatal(err)
	}
	if st, ok := s.(*s3.Store); !ok || st.Prefix() != "dstl/test/" || st.Bucket() != srv.Bucket {
		t.Fatalf("Open = %T %+v", s, s)
	}

	// Wrong credentials fail at Open, not at the first write.
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
	if _, err := blobstore.Open(t.Context(), srv.URL("x")); err == nil {
		t.Fatal("Open with a wrong secret succeeded")
	}
	// So does a missing bucket.
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
	missing := *srv
	missing.Bucket = "no-such-bucket"
	if _, err := blobstore.Open(t.Context(), missing.URL("")); err == nil {
		t.Fatal("Open of a missing bucket succeeded")
	}
}
