package server

import (
	"context"
	"fmt"

	"github.com/dstl-dev/dstl/cdc/feed"
)

// registeredToken returns the committed token of a registered subscription
// (req is the subscription's request). An expired subscription must
// resnapshot: its position is no longer held, whatever is left of it.
func (s *Server) registeredToken(ctx context.Context, stream, name string, req feed.Request) ([]byte, error) {
	rec, err := s.node.Subscription(ctx, stream, name)
	if err != nil {
		return nil, err
	}
	if rec.Expired && req.Start != feed.StartSnapshot {
		return nil, fmt.Errorf("subscription %s of stream %s is expired (held back past the retention cap): %w; %s", name, stream, feed.ErrMustResnapshot, mustResnapshot)
	}
	return rec.Token, nil
}
