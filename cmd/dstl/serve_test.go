package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// writeSelfSigned writes a certificate for 127.0.0.1 and its key.
func writeSelfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dstl test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// With a certificate and key, serve speaks TLS (HTTP/2) and the API works
// over it; cancelling serve's context shuts it down cleanly.
func TestServeTLSAndGracefulStop(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := writeSelfSigned(t, dir)
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, serveOptions{
			dataDir: filepath.Join(dir, "data"), listen: addr, logFormat: "text", logLevel: "error",
			durability: "buffered", uploadInterval: time.Second, batchDelay: time.Millisecond,
			flushBytes: 1 << 20, maxInFlightBytes: 64 << 20, maxKeySize: 1024, maxValueSize: 1 << 20,
			retainCheckpoints: 3, gcInterval: -1, tlsCert: certFile, tlsKey: keyFile, shutdownTimeout: 10 * time.Second,
		})
	}()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
	streams := dstlv1connect.NewStreamServiceClient(hc, "https://"+addr, connect.WithGRPC())
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: "tls"}))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no TLS answer: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	res, err := streams.GetStream(ctx, connect.NewRequest(&dstlv1.GetStreamRequest{Name: "tls"}))
	if err != nil || res.Msg.GetStream().GetKeyGroups() != 128 {
		t.Fatalf("get over TLS: %+v, %v", res, err)
	}
	// Plain HTTP/2 cleartext is not served when TLS is on.
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	plain := dstlv1connect.NewStreamServiceClient(&http.Client{Transport: &http.Transport{Protocols: p}}, "http://"+addr)
	if _, err := plain.GetStream(ctx, connect.NewRequest(&dstlv1.GetStreamRequest{Name: "tls"})); err == nil {
		t.Fatal("a cleartext request succeeded against a TLS server")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve returned %v after a graceful stop", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
}
