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

// Hydration implements hydrationReporter: the progress of the snapshot
// files lazily imported for stream into the read store since it opened
// (every incarnation of the name: a deleted one's files are forgotten when
// its key groups are dropped).
func (p *PebbleState) Hydration(stream string) (*dstlv1.Hydration, bool) {
	var out *dstlv1.Hydration
	for _, h := range p.store.Hydration() {
		if h.Stream != stream {
			continue
		}
		if out == nil {
			out = &dstlv1.Hydration{}
		}
		out.TotalBytes += uint64(h.TotalBytes)
		out.LocalBytes += uint64(h.LocalBytes)
		out.TotalFiles += uint32(h.TotalFiles)
		out.LocalFiles += uint32(h.LocalFiles)
		if h.LastError != "" {
			out.LastError = h.LastError
		}
	}
	return out, out != nil
}
