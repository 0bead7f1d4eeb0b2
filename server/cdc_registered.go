package server

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/dstl-dev/dstl/cdc/feed"
)

// registeredToken returns the committed token of a registered subscription.
func (s *Server) registeredToken(ctx context.Context, stream, name string, req feed.Request) ([]byte, error) {
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("registered subscriptions: not merged yet"))
}
