package dstl_test

import (
	"context"
	"net/http"
	"testing"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/changelog"
	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
)

// The two ways a program reaches a node: embedded (the node in-process,
// its handlers called directly) and remote (dstl.Dial over loopback TCP,
// h2c, to a node served as `dstl serve` serves it). Every SDK behaviour is
// tested in both.
var modes = []string{"embedded", "remote"}

// clientIn returns a client of a fresh node in mode, the node's options
// tweaked by nodeOpts (nil: none). Remote clients do not retry (a test
// sees the first answer).
func clientIn(t testing.TB, mode string, nodeOpts func(*changelog.Options)) *dstl.Client {
	t.Helper()
	switch mode {
	case "embedded":
		n, err := embedded.Open(t.Context(), embedded.Options{Dir: t.TempDir(), Node: nodeOpts})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := n.Close(context.Background()); err != nil {
				t.Errorf("close node: %v", err)
			}
		})
		return n.Client()
	case "remote":
		c, err := dstl.Dial(t.Context(), serveTCPWith(t, func(h http.Handler) http.Handler { return h }, nodeOpts), dstl.WithRetries(0))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	t.Fatalf("unknown mode %q", mode)
	return nil
}

// bothModes runs f as a subtest in every mode.
func bothModes(t *testing.T, f func(t *testing.T, c *dstl.Client)) {
	bothModesWith(t, nil, f)
}

// bothModesWith is bothModes with the node's options tweaked by nodeOpts.
func bothModesWith(t *testing.T, nodeOpts func(*changelog.Options), f func(t *testing.T, c *dstl.Client)) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) { f(t, clientIn(t, mode, nodeOpts)) })
	}
}

// interceptedModes runs f with a client whose Append calls counter sees:
// the embedded node over its HTTP transport (connect interceptors need the
// wire path; the in-process transport calls the handlers directly) and a
// remote node.
func interceptedModes(t *testing.T, f func(t *testing.T, c *dstl.Client, counter *appendCounter)) {
	for _, mode := range []string{"embedded-http", "remote"} {
		t.Run(mode, func(t *testing.T) {
			counter := &appendCounter{}
			opt := dstl.WithConnectOptions(connect.WithInterceptors(counter.interceptor()))
			var c *dstl.Client
			if mode == "remote" {
				var err error
				if c, err = dstl.Dial(t.Context(), serveTCP(t, func(h http.Handler) http.Handler { return h }), opt); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = c.Close() })
			} else {
				c = open(t, embedded.Options{Transport: embedded.HTTP, ClientOptions: []dstl.Option{opt}}).Client()
			}
			f(t, c, counter)
		})
	}
}
