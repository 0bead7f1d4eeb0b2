package main

import (
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func newScanCommand(cli *cliOptions) *cobra.Command {
	var (
		state, prefix, keyGroups string
		limit, pageSize          int
	)
	cmd := &cobra.Command{
		Use:   "scan STREAM",
		Short: "List a stream's keys and values",
		Long: `List the keys and values of STREAM in (key group, state, key) order, fetching
every page (or stop after --limit entries).

Keys and values that are not printable UTF-8 are shown Go-quoted ("a\x00b").
With --json it prints one KeyValue object per line (key and value base64).`,
		Example: `  dstl scan orders
  dstl scan orders --state status --prefix order- --key-groups 0..15 --limit 10`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 0 || pageSize < 1 || pageSize > 10000 {
				return fmt.Errorf("--limit must be >= 0 and --page-size 1..10000")
			}
			r, err := keyGroupRangeProto(keyGroups)
			if err != nil {
				return fmt.Errorf("--key-groups: %w", err)
			}
			c, err := cli.dial(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := commandContext(cmd)
			defer cancel()
			out := cmd.OutOrStdout()
			tw := newTable(out)
			if !cli.json {
				fmt.Fprintln(tw, "KEY GROUP\tSTATE\tKEY\tVALUE")
			}
			n, token := 0, ""
			for {
				size := pageSize
				if limit > 0 {
					size = min(size, limit-n)
				}
				res, err := c.state.Scan(ctx, connect.NewRequest(&dstlv1.ScanRequest{
					Stream: args[0], State: state, Prefix: []byte(prefix), KeyGroups: r,
					PageSize: int32(size), PageToken: token,
				}))
				if err != nil {
					_ = tw.Flush()
					return c.explain(err)
				}
				for _, e := range res.Msg.GetEntries() {
					if cli.json {
						if err := printProto(out, e); err != nil {
							return err
						}
					} else {
						fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", e.GetKeyGroup(), display([]byte(e.GetState())), display(e.GetKey()), display(e.GetValue()))
					}
				}
				n += len(res.Msg.GetEntries())
				token = res.Msg.GetNextPageToken()
				if token == "" || (limit > 0 && n >= limit) {
					break
				}
			}
			if cli.json {
				return nil
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.StringVar(&state, "state", "", "only this state (default: every state)")
	f.StringVar(&prefix, "prefix", "", "only keys starting with this prefix")
	f.StringVar(&keyGroups, "key-groups", "", "only these key groups, lo..hi inclusive (default: all)")
	f.IntVar(&limit, "limit", 0, "stop after this many entries (0: all)")
	f.IntVar(&pageSize, "page-size", 1000, "entries fetched per request, 1..10000")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}
