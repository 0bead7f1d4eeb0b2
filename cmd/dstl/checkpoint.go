package main

import (
	"context"
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func newCheckpointCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "checkpoint",
		Aliases: []string{"cp"},
		Short:   "Create, list, show and retain checkpoints",
	}
	cmd.AddCommand(newCheckpointCreateCommand(cli), newCheckpointListCommand(cli),
		newCheckpointGetCommand(cli), newCheckpointRetainCommand(cli))
	return cmd
}

// printCheckpoint prints one checkpoint and its parts.
func printCheckpoint(cmd *cobra.Command, cp *dstlv1.Checkpoint) error {
	tw := newTable(cmd.OutOrStdout())
	fmt.Fprintf(tw, "stream:\t%s\n", cp.GetStream())
	fmt.Fprintf(tw, "id:\t%d\n", cp.GetId())
	fmt.Fprintf(tw, "completed:\t%s\n", formatTime(cp.GetCompletedAtMs()))
	fmt.Fprintf(tw, "retained:\t%s\n", yesNo(cp.GetRetained()))
	fmt.Fprintf(tw, "parts:\t%d\n", len(cp.GetParts()))
	if m := cp.GetMaterialization(); m != nil {
		if m.GetSnapshotCheckpoint() == 0 {
			fmt.Fprintf(tw, "restores from:\tthe changelog alone (no snapshot)\n")
		} else {
			fmt.Fprintf(tw, "restores from:\tsnapshot of checkpoint %d (%s, %s, %s uploaded for it)\n", m.GetSnapshotCheckpoint(),
				formatTime(m.GetSnapshotCreatedAtMs()), humanBytes(int64(m.GetSnapshotBytes())), humanBytes(int64(m.GetSnapshotNewBytes())))
		}
		fmt.Fprintf(tw, "changelog tail:\t%d changes, %s\n", m.GetTailChanges(), humanBytes(int64(m.GetTailBytes())))
		newest := "none"
		if m.GetNewestSnapshotCheckpoint() != 0 {
			newest = fmt.Sprintf("checkpoint %d (%s)", m.GetNewestSnapshotCheckpoint(), formatTime(m.GetNewestSnapshotCreatedAtMs()))
		}
		fmt.Fprintf(tw, "newest snapshot:\t%s; %d kept\n", newest, m.GetSnapshots())
		fmt.Fprintf(tw, "materializer lag:\t%d changes, %s\n", m.GetLagChanges(), humanBytes(int64(m.GetLagBytes())))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(cp.GetParts()) == 0 {
		return nil
	}
	fmt.Fprintln(cmd.OutOrStdout())
	tw = newTable(cmd.OutOrStdout())
	fmt.Fprintln(tw, "LOG\tEPOCH\tKEY GROUPS\tUP TO SQN\tFROM CHECKPOINT\tTRUNCATED BEFORE\tSEGMENTS\tMETADATA")
	for _, p := range cp.GetParts() {
		md := "-"
		if len(p.GetMetadata()) > 0 {
			md = truncate(display(p.GetMetadata()), 40)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%d\t%d\t%s\n", p.GetLogId(), p.GetEpoch(), formatRange(p.GetKeyGroups()),
			p.GetUpToSqn(), p.GetFromCheckpoint(), p.GetTruncatedBefore(), p.GetSegments(), md)
	}
	return tw.Flush()
}

func newCheckpointCreateCommand(cli *cliOptions) *cobra.Command {
	var metadata string
	cmd := &cobra.Command{
		Use:   "create STREAM",
		Short: "Checkpoint every open writer of the stream on the node",
		Long: `Checkpoint every writer of STREAM that is open on the node (--server) under
the next id (newest complete + 1). The checkpoint is complete once every live
writer of the stream, on any node, has recorded its part; writers on other
nodes record theirs when their own application checkpoints.

Without an open writer of the stream on the node, there is usually nothing
to checkpoint: "dstl put" and "dstl del" checkpoint by themselves and close
their writer. When every change of the stream is already in the newest
complete checkpoint, the command says so and exits 0 (--json: up_to_date is
true). It fails with failed_precondition only when the stream has changes
that no complete checkpoint covers and no writer on this node could record
them (a live writer on another node, or a recovered epoch not yet resumed).`,
		Example: "  dstl checkpoint create orders",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.CreateCheckpointResponse], error) {
				return c.checkpoints.CreateCheckpoint(ctx, connect.NewRequest(&dstlv1.CreateCheckpointRequest{Stream: args[0], Metadata: []byte(metadata)}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			if res.GetUpToDate() {
				if res.GetCheckpoint() == nil {
					_, err := fmt.Fprintf(cmd.OutOrStdout(), "stream %s has no changes; nothing to checkpoint\n", args[0])
					return err
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "stream %s: every change is already in complete checkpoint %d; nothing to checkpoint\n",
					args[0], res.GetCheckpoint().GetId())
				return err
			}
			if !res.GetComplete() {
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "checkpoint %d of stream %s recorded by this node's writers; not complete yet (other live writers of the stream have not recorded their parts)\n",
					res.GetCheckpoint().GetId(), args[0])
				return err
			}
			return printCheckpoint(cmd, res.GetCheckpoint())
		},
	}
	cmd.Flags().StringVar(&metadata, "metadata", "", "client metadata to record with each part (returned on restore)")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newCheckpointListCommand(cli *cliOptions) *cobra.Command {
	var (
		newestFirst, parts bool
		limit              int
	)
	cmd := &cobra.Command{
		Use:     "list STREAM",
		Aliases: []string{"ls"},
		Short:   "List a stream's complete checkpoints, oldest first",
		Long: `List the complete checkpoints of STREAM, oldest first (--newest-first for
the other way), fetching them a page at a time. --parts also reads each
checkpoint's parts to show its segment count (one blob read per part);
--limit stops after that many checkpoints. --json prints one
ListCheckpointsResponse holding every checkpoint listed.`,
		Example: `  dstl checkpoint list orders
  dstl checkpoint list orders --newest-first --limit 5 --parts`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 0 {
				return fmt.Errorf("--limit %d is negative", limit)
			}
			c, err := cli.dial(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := commandContext(cmd)
			defer cancel()
			all := &dstlv1.ListCheckpointsResponse{}
			req := &dstlv1.ListCheckpointsRequest{Stream: args[0], NewestFirst: newestFirst, IncludeParts: parts}
			for {
				if limit > 0 {
					req.PageSize = int32(min(limit-len(all.Checkpoints), 1000))
				}
				res, err := c.checkpoints.ListCheckpoints(ctx, connect.NewRequest(req))
				if err != nil {
					return c.explain(err)
				}
				all.Checkpoints = append(all.Checkpoints, res.Msg.GetCheckpoints()...)
				req.PageToken = res.Msg.GetNextPageToken()
				if req.PageToken == "" || (limit > 0 && len(all.Checkpoints) >= limit) {
					break
				}
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), all)
			}
			tw := newTable(cmd.OutOrStdout())
			if parts {
				fmt.Fprintln(tw, "ID\tCOMPLETED\tRETAINED\tPARTS\tSEGMENTS")
			} else {
				fmt.Fprintln(tw, "ID\tCOMPLETED\tRETAINED\tPARTS")
			}
			for _, cp := range all.GetCheckpoints() {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d", cp.GetId(), formatTime(cp.GetCompletedAtMs()), yesNo(cp.GetRetained()), cp.GetPartCount())
				if parts {
					segs := uint64(0)
					for _, p := range cp.GetParts() {
						segs += uint64(p.GetSegments())
					}
					fmt.Fprintf(tw, "\t%d", segs)
				}
				fmt.Fprintln(tw)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&newestFirst, "newest-first", false, "list the newest checkpoint first")
	cmd.Flags().BoolVar(&parts, "parts", false, "read each checkpoint's parts (segment counts; --json: the parts)")
	cmd.Flags().IntVar(&limit, "limit", 0, "list at most this many checkpoints (0: all)")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newCheckpointGetCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "get STREAM ID",
		Short: "Show a complete checkpoint and its parts",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseID(args[1])
			if err != nil {
				return err
			}
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.GetCheckpointResponse], error) {
				return c.checkpoints.GetCheckpoint(ctx, connect.NewRequest(&dstlv1.GetCheckpointRequest{Stream: args[0], Id: id}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			if err := printCheckpoint(cmd, res.GetCheckpoint()); err != nil {
				return err
			}
			if h := res.GetHydration(); h != nil {
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "hydrated on this node: %s\n", formatHydration(h))
			}
			return err
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newCheckpointRetainCommand(cli *cliOptions) *cobra.Command {
	var release bool
	cmd := &cobra.Command{
		Use:   "retain STREAM ID",
		Short: "Keep a checkpoint restorable (or --release it)",
		Long: `Mark checkpoint ID of STREAM retained: garbage collection keeps everything
it needs even after newer checkpoints subsume it. --release undoes it.`,
		Example: `  dstl checkpoint retain orders 3
  dstl checkpoint retain orders 3 --release`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseID(args[1])
			if err != nil {
				return err
			}
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.RetainCheckpointResponse], error) {
				return c.checkpoints.RetainCheckpoint(ctx, connect.NewRequest(&dstlv1.RetainCheckpointRequest{Stream: args[0], Id: id, Retained: !release}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			verb := "retained"
			if release {
				verb = "released"
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s checkpoint %d of stream %s\n", verb, id, args[0])
			return err
		},
	}
	cmd.Flags().BoolVar(&release, "release", false, "release an earlier retention instead")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}
