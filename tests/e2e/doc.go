// Package e2e holds dstl's end-to-end tests: they build the real dstl binary
// once (TestMain), run `dstl serve` as a child process on a free loopback
// port, and drive it the way users do: the generated Connect/gRPC/gRPC-Web
// clients, the dstl CLI, the Go SDK and a stock gRPC client (grpcurl, built
// from the pinned tools module tools/grpcurl). The crash tests SIGKILL the
// node and restart it; the shutdown test SIGTERMs it and reads the blob store
// directly. See tests/README.md.
package e2e
