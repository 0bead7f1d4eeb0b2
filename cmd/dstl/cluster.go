package main

import (
	"context"
	"fmt"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func newClusterCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Show the cluster as a node sees it",
		Long: `Show the cluster's membership as the node named by --server
(DSTL_SERVER, default ` + defaultServer + `) sees it.`,
	}
	cmd.AddCommand(newClusterMembersCommand(cli))
	return cmd
}

func newClusterMembersCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "members",
		Aliases: []string{"ls"},
		Short:   "List the cluster's members",
		Long: `List the members of the node's membership view, in node id order: state
(alive, dead, left), RPC URL, zone, gossip address, load, and since when the
node knows the state. The answering node is marked with *. With gossip off
(dstl serve without --gossip-listen or --join) it lists just that node.`,
		Example: "  dstl cluster members --server http://10.0.0.5:7600\n  dstl cluster members --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.ListMembersResponse], error) {
				return c.cluster.ListMembers(ctx, connect.NewRequest(&dstlv1.ListMembersRequest{}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printMembers(cmd, res)
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func printMembers(cmd *cobra.Command, res *dstlv1.ListMembersResponse) error {
	tw := newTable(cmd.OutOrStdout())
	fmt.Fprintln(tw, "NODE\tSTATE\tRPC\tZONE\tGOSSIP\tLOAD\tSINCE")
	for _, m := range res.GetMembers() {
		id := m.GetNodeId()
		if m.GetSelf() {
			id += " *"
		}
		state := memberState(m.GetState())
		if m.GetLeaving() && m.GetState() == dstlv1.MemberState_MEMBER_STATE_ALIVE {
			state += " (leaving)"
		}
		rpc := orDash(m.GetRpcUrl())
		if e := m.GetMetaError(); e != "" {
			rpc = "? (" + e + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", id, state, rpc, orDash(m.GetZone()), orDash(m.GetGossipAddr()),
			m.GetLoad(), formatTime(m.GetStateSinceMs()))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if !res.GetGossip() {
		_, err := fmt.Fprintln(cmd.OutOrStdout(), "(gossip is off on this node: a single node)")
		return err
	}
	return nil
}

// memberState is "alive", "dead", "left".
func memberState(s dstlv1.MemberState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "MEMBER_STATE_"))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
