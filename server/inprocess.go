package server

import (
	"context"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// InProcessHandlers are the server's service implementations, for a client
// in the same process (sdk/go/embedded) that calls them directly instead
// of over HTTP: no message is encoded or decoded, and no connection can
// break mid-call.
//
// What the HTTP path adds is not applied: request admission (a caller in
// the process has already allocated its request; MaxBatchChanges is still
// enforced by the handlers), the read limit of MaxMessageBytes, and the
// per-procedure request counter of the metrics interceptor. Everything
// else (validation, errors as *connect.Error, append metrics, the read
// path) is the same code.
type InProcessHandlers struct {
	Streams     dstlv1connect.StreamServiceHandler
	Writers     dstlv1connect.WriterServiceHandler
	State       dstlv1connect.StateServiceHandler
	Checkpoints dstlv1connect.CheckpointServiceHandler
	// CDC's unary methods (its Subscribe needs a connect stream: use
	// Subscribe below).
	CDC dstlv1connect.CDCServiceHandler
	// Subscribe is Server.Subscribe: each message is the receiver's (its
	// keys and values are not reused).
	Subscribe func(ctx context.Context, req *dstlv1.SubscribeRequest, send func(*dstlv1.SubscribeResponse) error) error
	// Cluster lists the members (ClusterService).
	Cluster dstlv1connect.ClusterServiceHandler
}

// InProcess returns the server's handlers for in-process callers.
func (s *Server) InProcess() InProcessHandlers {
	return InProcessHandlers{
		Streams:     &streamService{s},
		Writers:     &writerService{s},
		State:       &stateService{s},
		Checkpoints: &checkpointService{s},
		CDC:         &cdcService{s: s},
		Subscribe:   s.Subscribe,
		Cluster:     &clusterService{s},
	}
}
