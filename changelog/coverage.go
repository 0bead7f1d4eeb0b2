package changelog

import (
	"context"
	"fmt"
)

// EpochCoverage is one live epoch of a stream and whether the newest
// complete checkpoint holds every change of it.
type EpochCoverage struct {
	EpochState
	// Covered: the epoch is closed and the newest complete checkpoint has a
	// part of it reaching its final part's SQN. An open epoch is never
	// covered: its writer may have appended after its last part.
	Covered bool
}

// Coverage returns the newest complete checkpoint of a stream (0: none)
// and its live epochs (sorted by key groups), each saying whether that
// checkpoint covers it. It reads the journal and, for closed epochs, the
// parts to compare; it changes nothing. A stream whose live epochs are all
// covered has nothing a new checkpoint could add.
func (n *Node) Coverage(ctx context.Context, stream string) (newest uint64, epochs []EpochCoverage, err error) {
	h, err := n.freshHandle(ctx, stream)
	if err != nil {
		return 0, nil, err
	}
	st := h.journal.snapshot()
	newest = st.lastCheckpoint()
	cp, _ := st.checkpoint(newest)
	for _, ep := range st.live {
		c := EpochCoverage{EpochState: ep}
		if ep.Closed {
			if !hasEpoch(cp, ep.Epoch) && ep.FromCheckpoint == newest {
				// Opened from the newest checkpoint after it completed:
				// covered if it closed without a change of its own.
				final, err := n.part(ctx, ep.FinalPart.Key)
				if err != nil {
					return 0, nil, fmt.Errorf("stream %s: epoch %d: final part: %w", stream, ep.Epoch, err)
				}
				c.Covered = final.UpToSQN == 0
			}
			for _, ref := range cp.Parts {
				if ref.Epoch != ep.Epoch {
					continue
				}
				if ref.Key == ep.FinalPart.Key {
					c.Covered = true
					break
				}
				final, err := n.part(ctx, ep.FinalPart.Key)
				if err != nil {
					return 0, nil, fmt.Errorf("stream %s: epoch %d: final part: %w", stream, ep.Epoch, err)
				}
				in, err := n.part(ctx, ref.Key)
				if err != nil {
					return 0, nil, fmt.Errorf("stream %s: checkpoint %d: %w", stream, newest, err)
				}
				c.Covered = in.UpToSQN >= final.UpToSQN
				break
			}
		}
		epochs = append(epochs, c)
	}
	return newest, epochs, nil
}

func hasEpoch(cp CheckpointComplete, epoch uint64) bool {
	for _, ref := range cp.Parts {
		if ref.Epoch == epoch {
			return true
		}
	}
	return false
}
