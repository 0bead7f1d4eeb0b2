package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// writeOptions are the flags of put and del.
type writeOptions struct {
	state      string
	durability string
}

func (o *writeOptions) addFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&o.state, "state", "default", "the state (named map) of the key")
	cmd.Flags().StringVar(&o.durability, "durability", "local", "durability of the append before the checkpoint: local or buffered (the checkpoint makes it durable on the blob store either way)")
	addTimeoutFlag(cmd, defaultTimeout)
}

func parseDurability(s string) (dstlv1.Durability, error) {
	switch s {
	case "local":
		return dstlv1.Durability_DURABILITY_LOCAL, nil
	case "buffered":
		return dstlv1.Durability_DURABILITY_BUFFERED, nil
	case "replicated":
		return dstlv1.Durability_DURABILITY_REPLICATED, nil
	}
	return 0, fmt.Errorf("--durability %q: want local, buffered or replicated", s)
}

// writeFencingNote is the part of put's and del's help about what they do.
const writeFencingNote = `It opens a writer over the WHOLE stream (every key group, starting from the
newest complete checkpoint), appends the one change, records checkpoint
newest+1 with that writer and closes it. The change is therefore part of a
complete checkpoint when the command returns: it survives a restart and the
next "dstl get" sees it. The client metadata of the checkpoint it starts from
(e.g. source offsets) is carried over to the new checkpoint.

Opening that writer FENCES every other writer of the stream, on any node: an
application writing the stream gets failed_precondition (fenced) on its next
call and must reopen, losing whatever it appended after its last complete
checkpoint. This command is for humans on streams they own (tests, fixing
data by hand), not for production writes: applications use the writer API
or the Go SDK.`

// writeResult is what put and del print with --json.
type writeResult struct {
	Stream       string `json:"stream"`
	State        string `json:"state"`
	Key          []byte `json:"key"`
	KeyGroup     uint32 `json:"key_group"`
	Op           string `json:"op"`
	SQN          uint64 `json:"sqn"`
	Epoch        uint64 `json:"epoch"`
	CheckpointID uint64 `json:"checkpoint_id"`
}

// writeOne makes one change durable as part of a new complete checkpoint
// (see writeFencingNote).
func writeOne(cmd *cobra.Command, cli *cliOptions, o *writeOptions, op dstlv1.Op, stream string, key, value []byte) error {
	durability, err := parseDurability(o.durability)
	if err != nil {
		return err
	}
	c, err := cli.dial(cmd)
	if err != nil {
		return err
	}
	ctx, cancel := commandContext(cmd)
	defer cancel()

	st, err := c.streams.GetStream(ctx, connect.NewRequest(&dstlv1.GetStreamRequest{Name: stream}))
	if err != nil {
		return c.explain(err)
	}
	kg := uint32(keygroup.Of(key, int(st.Msg.GetStream().GetKeyGroups())))

	// One writer over the whole stream is the only live writer once it is
	// open, so its checkpoint completes alone. Refuse before fencing anyone
	// if that checkpoint could not carry the client metadata over.
	before, err := newestCheckpoint(ctx, c, stream, true)
	if err != nil {
		return c.explain(err)
	}
	if before != nil {
		var mds [][]byte
		for _, p := range before.GetParts() {
			mds = append(mds, p.GetMetadata())
		}
		if _, err := oneMetadata(mds); err != nil {
			return fmt.Errorf("stream %s: checkpoint %d: %w", stream, before.GetId(), err)
		}
	}

	// In a cluster the writer is opened on its owner (the node follows
	// NotOwner answers), and its calls go there.
	ow, wc, err := openOnOwner(ctx, cmd, c, &dstlv1.OpenWriterRequest{Stream: stream})
	if err != nil {
		return err
	}
	wid := ow.Msg.GetWriterId()
	closed := false
	defer func() {
		if closed {
			return
		}
		// Give the writer back even if the command failed or timed out.
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer ccancel()
		_, _ = wc.writers.CloseWriter(cctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: wid}))
	}()
	metadata, err := oneMetadata(ow.Msg.GetRestoredMetadata())
	if err != nil {
		return fmt.Errorf("stream %s: checkpoint %d: %w", stream, ow.Msg.GetFromCheckpoint(), err)
	}

	app, err := wc.writers.Append(ctx, connect.NewRequest(&dstlv1.AppendRequest{
		WriterId:   wid,
		Durability: durability,
		Changes:    []*dstlv1.Change{{KeyGroup: kg, State: o.state, Op: op, Key: key, Value: value}},
	}))
	if err != nil {
		return wc.explain(err)
	}

	latest, err := newestCheckpoint(ctx, c, stream, false)
	if err != nil {
		return c.explain(err)
	}
	newest := max(ow.Msg.GetFromCheckpoint(), latest.GetId())
	id := newest + 1
	cp, err := wc.writers.Checkpoint(ctx, connect.NewRequest(&dstlv1.CheckpointRequest{WriterId: wid, CheckpointId: id, Metadata: metadata}))
	if err != nil {
		return fmt.Errorf("the change (sqn %d) was appended but checkpoint %d failed, so it is not committed: %w", app.Msg.GetLastSqn(), id, wc.explain(err))
	}
	if !cp.Msg.GetComplete() {
		return fmt.Errorf("the change (sqn %d) was appended but checkpoint %d is not complete: another live writer of stream %s has not recorded its part", app.Msg.GetLastSqn(), id, stream)
	}
	_, err = wc.writers.CloseWriter(ctx, connect.NewRequest(&dstlv1.CloseWriterRequest{WriterId: wid}))
	closed = true
	if err != nil {
		return fmt.Errorf("the change is committed in checkpoint %d, but closing writer %s failed: %w", id, wid, wc.explain(err))
	}

	res := writeResult{
		Stream: stream, State: o.state, Key: key, KeyGroup: kg, Op: opName(op),
		SQN: app.Msg.GetLastSqn(), Epoch: ow.Msg.GetEpoch(), CheckpointID: id,
	}
	if cli.json {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s %s/%s key %s (key group %d): committed in checkpoint %d\n",
		res.Op, stream, o.state, display(key), kg, id)
	return err
}

// maxOwnerRedirects bounds the NotOwner answers openOnOwner follows.
const maxOwnerRedirects = 3

// openOnOwner opens a writer on c's node, following NotOwner answers to
// the owner of the writer (docs/cluster.md, "Ownership"); it returns the
// clients of the node that opened it.
func openOnOwner(ctx context.Context, cmd *cobra.Command, c *clients, req *dstlv1.OpenWriterRequest) (*connect.Response[dstlv1.OpenWriterResponse], *clients, error) {
	target := c
	for redirects := 0; ; redirects++ {
		res, err := target.writers.OpenWriter(ctx, connect.NewRequest(req))
		if err == nil {
			return res, target, nil
		}
		owner := notOwnerURL(err)
		if owner == "" || redirects >= maxOwnerRedirects {
			return nil, nil, target.explain(err)
		}
		u, uerr := serverURL(owner)
		if uerr != nil {
			return nil, nil, fmt.Errorf("%w (owner's URL: %v)", target.explain(err), uerr)
		}
		target = dialURL(cmd, u)
	}
}

// notOwnerURL returns the owner's URL of a NotOwner answer ("" if err is
// not one).
func notOwnerURL(err error) string {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return ""
	}
	for _, d := range ce.Details() {
		if v, derr := d.Value(); derr == nil {
			if no, ok := v.(*dstlv1.NotOwner); ok {
				return no.GetOwnerRpc()
			}
		}
	}
	return ""
}

// newestCheckpoint returns the newest complete checkpoint of stream (nil if
// none), with its parts if parts: one page of one checkpoint, newest first.
func newestCheckpoint(ctx context.Context, c *clients, stream string, parts bool) (*dstlv1.Checkpoint, error) {
	res, err := c.checkpoints.ListCheckpoints(ctx, connect.NewRequest(&dstlv1.ListCheckpointsRequest{
		Stream: stream, PageSize: 1, NewestFirst: true, IncludeParts: parts,
	}))
	if err != nil {
		return nil, err
	}
	if cps := res.Msg.GetCheckpoints(); len(cps) > 0 {
		return cps[0], nil
	}
	return nil, nil
}

// oneMetadata returns the one distinct non-empty client metadata of a
// checkpoint's parts, or nil; parts with different metadata (writers that
// each stored their own source offsets) cannot be merged into one part.
func oneMetadata(mds [][]byte) ([]byte, error) {
	var out []byte
	for _, md := range mds {
		switch {
		case len(md) == 0:
		case out == nil:
			out = md
		case !bytes.Equal(out, md):
			return nil, errors.New("its parts carry different client metadata (each writer's source offsets), which one checkpoint part cannot carry over; refusing to fence the stream's writers")
		}
	}
	return out, nil
}

func opName(op dstlv1.Op) string {
	switch op {
	case dstlv1.Op_OP_PUT:
		return "put"
	case dstlv1.Op_OP_DELETE:
		return "delete"
	case dstlv1.Op_OP_MERGE:
		return "merge"
	case dstlv1.Op_OP_CLEAR:
		return "clear"
	}
	return op.String()
}

func newPutCommand(cli *cliOptions) *cobra.Command {
	var o writeOptions
	cmd := &cobra.Command{
		Use:   "put STREAM KEY VALUE",
		Short: "Set one key (a convenience for humans; fences the stream's writers)",
		Long: `Set KEY to VALUE in a state of STREAM, durably.

` + writeFencingNote,
		Example: `  dstl put orders order-17 '{"qty": 3}'
  dstl put orders order-17 shipped --state status`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			return writeOne(cmd, cli, &o, dstlv1.Op_OP_PUT, args[0], []byte(args[1]), []byte(args[2]))
		},
	}
	o.addFlags(cmd)
	return cmd
}
