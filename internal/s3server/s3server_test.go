package s3server_test

import (
	"bytes"
	"io"
	"os"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/dstl-dev/dstl/internal/s3server"
)

func TestMain(m *testing.M) { os.Exit(s3server.Main(m)) }

func roundTrip(t *testing.T, s *s3server.Server) {
	t.Helper()
	c := s.Client()
	if _, err := c.PutObject(t.Context(), &awss3.PutObjectInput{
		Bucket: aws.String(s.Bucket), Key: aws.String("k"), Body: bytes.NewReader([]byte("v")),
	}); err != nil {
		t.Fatal(err)
	}
	out, err := c.GetObject(t.Context(), &awss3.GetObjectInput{Bucket: aws.String(s.Bucket), Key: aws.String("k")})
	if err != nil {
		t.Fatal(err)
	}
	defer out.Body.Close()
	if data, err := io.ReadAll(out.Body); err != nil || string(data) != "v" {
		t.Fatalf("got %q, %v", data, err)
	}
}

func TestStart(t *testing.T) {
	s := s3server.Start(t)
	roundTrip(t, s)
}

func TestSharedGivesFreshBuckets(t *testing.T) {
	a, b := s3server.Shared(t), s3server.Shared(t)
	if a.Endpoint != b.Endpoint || a.Bucket == b.Bucket {
		t.Fatalf("shared servers %+v and %+v", a, b)
	}
	roundTrip(t, a)
	list, err := b.Client().ListObjectsV2(t.Context(), &awss3.ListObjectsV2Input{Bucket: aws.String(b.Bucket)})
	if err != nil || len(list.Contents) != 0 {
		t.Fatalf("fresh bucket lists %d objects, %v", len(list.Contents), err)
	}
}
