// Package zstdwire is zstd for connect's message compression, shared by the
// node (server) and the Go SDK (client): both register it under the name
// "zstd" after gzip, so two dstl ends prefer it and anything else still
// negotiates gzip. It compresses at klauspost's fastest level: a CDC replay
// spends less CPU on it than on gzip's fastest level, for fewer bytes.
package zstdwire

import (
	"io"

	"connectrpc.com/connect"
	"github.com/klauspost/compress/zstd"
)

// Name is the encoding's name on the wire (Connect-Content-Encoding,
// grpc-encoding).
const Name = "zstd"

// maxWindow bounds the memory a decoder may need for one frame, so a
// hostile peer cannot make it allocate more.
const maxWindow = 8 << 20

// NewCompressor returns a compressor for connect's pool.
func NewCompressor() connect.Compressor {
	w, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err) // the options are valid
	}
	return w
}

// NewDecompressor returns a decompressor for connect's pool.
func NewDecompressor() connect.Decompressor {
	r, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(maxWindow))
	if err != nil {
		panic(err) // the options are valid
	}
	return &decoder{r}
}

// decoder adapts *zstd.Decoder: its Close frees it for good, while connect
// closes a decompressor after every message and then resets it for reuse.
type decoder struct{ d *zstd.Decoder }

func (d *decoder) Read(p []byte) (int, error) { return d.d.Read(p) }
func (d *decoder) Reset(r io.Reader) error    { return d.d.Reset(r) }
func (d *decoder) Close() error               { return nil }
