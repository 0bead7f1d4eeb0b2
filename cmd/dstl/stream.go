package main

import (
	"context"
	"fmt"
	"slices"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func newStreamCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "stream",
		Short: "Create, list, show and delete streams",
		Long: `Create, list, show and delete streams on the node named by --server
(DSTL_SERVER, default ` + defaultServer + `).`,
	}
	cmd.AddCommand(newStreamCreateCommand(cli), newStreamListCommand(cli), newStreamGetCommand(cli), newStreamDeleteCommand(cli))
	return cmd
}

func printStreams(cmd *cobra.Command, streams []*dstlv1.Stream) error {
	tw := newTable(cmd.OutOrStdout())
	hydration := slices.ContainsFunc(streams, func(s *dstlv1.Stream) bool { return s.GetHydration() != nil })
	if hydration {
		fmt.Fprintln(tw, "NAME\tKEY GROUPS\tCREATED\tHYDRATED")
	} else {
		fmt.Fprintln(tw, "NAME\tKEY GROUPS\tCREATED")
	}
	for _, s := range streams {
		fmt.Fprintf(tw, "%s\t%d\t%s", s.GetName(), s.GetKeyGroups(), formatTime(s.GetCreatedAtMs()))
		if hydration {
			fmt.Fprintf(tw, "\t%s", formatHydration(s.GetHydration()))
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// formatHydration says how much of a lazily restored state is local:
// "100%" once every file is, "-" when nothing was restored lazily.
func formatHydration(h *dstlv1.Hydration) string {
	if h == nil {
		return "-"
	}
	pct := 100.0
	if h.GetTotalBytes() > 0 {
		pct = 100 * float64(h.GetLocalBytes()) / float64(h.GetTotalBytes())
	}
	out := fmt.Sprintf("%.1f%% (%s of %s, %d/%d files)", pct, humanBytes(int64(h.GetLocalBytes())), humanBytes(int64(h.GetTotalBytes())), h.GetLocalFiles(), h.GetTotalFiles())
	if e := h.GetLastError(); e != "" {
		out += "; retrying after: " + e
	}
	return out
}

func newStreamCreateCommand(cli *cliOptions) *cobra.Command {
	var keyGroups uint32
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a stream",
		Long: `Create a stream. NAME is 1..128 characters of [A-Za-z0-9._-], not starting
with '.' or '-'. The number of key groups (the unit of partitioning and
rescaling) is fixed for the stream's life; 0 means the default, 128.`,
		Example: "  dstl stream create orders --key-groups 64",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.CreateStreamResponse], error) {
				return c.streams.CreateStream(ctx, connect.NewRequest(&dstlv1.CreateStreamRequest{Name: args[0], KeyGroups: keyGroups}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printStreams(cmd, []*dstlv1.Stream{res.GetStream()})
		},
	}
	cmd.Flags().Uint32Var(&keyGroups, "key-groups", 0, "number of key groups, 1..32768 (0: the default, 128)")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newStreamListCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List every stream, in name order",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := cli.dial(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := commandContext(cmd)
			defer cancel()
			all := &dstlv1.ListStreamsResponse{}
			token := ""
			for {
				res, err := c.streams.ListStreams(ctx, connect.NewRequest(&dstlv1.ListStreamsRequest{PageSize: 1000, PageToken: token}))
				if err != nil {
					return c.explain(err)
				}
				all.Streams = append(all.Streams, res.Msg.GetStreams()...)
				token = res.Msg.GetNextPageToken()
				if token == "" {
					break
				}
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), all)
			}
			return printStreams(cmd, all.Streams)
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newStreamGetCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "get NAME",
		Short: "Show a stream",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.GetStreamResponse], error) {
				return c.streams.GetStream(ctx, connect.NewRequest(&dstlv1.GetStreamRequest{Name: args[0]}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printStreams(cmd, []*dstlv1.Stream{res.GetStream()})
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newStreamDeleteCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "delete NAME",
		Aliases: []string{"rm"},
		Short:   "Delete a stream (its objects become garbage)",
		Long: `Delete a stream's definition; its objects on the blob store become garbage
and are collected later. Refused (failed_precondition) while the node has open
writers of the stream.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.DeleteStreamResponse], error) {
				return c.streams.DeleteStream(ctx, connect.NewRequest(&dstlv1.DeleteStreamRequest{Name: args[0]}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "deleted stream %s\n", args[0])
			return err
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}
