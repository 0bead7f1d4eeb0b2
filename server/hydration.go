package server

import dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"

// hydrationReporter is implemented by a read path that restores state
// lazily (PebbleState): the progress of its background downloads per
// stream, for GetStream, GetCheckpoint and `dstl stream get`.
type hydrationReporter interface {
	// Hydration returns the stream's progress, and false if nothing of it
	// was restored lazily on this node.
	Hydration(stream string) (*dstlv1.Hydration, bool)
}

// hydration returns the stream's hydration on this node, or nil.
func (s *Server) hydration(stream string) *dstlv1.Hydration {
	r, ok := s.state.(hydrationReporter)
	if !ok {
		return nil
	}
	h, ok := r.Hydration(stream)
	if !ok {
		return nil
	}
	return h
}
