package main

import (
	"context"
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func newGetCommand(cli *cliOptions) *cobra.Command {
	var state string
	cmd := &cobra.Command{
		Use:   "get STREAM KEY",
		Short: "Print one key's value",
		Long: `Print the current value of KEY in a state of STREAM: the value's bytes alone,
followed by a newline, so that it can be piped. An absent key prints nothing
on stdout, "not found" on stderr, and exits 1.

With --json it prints {"found", "value" (base64), "key_group"}, and still
exits 1 when the key is absent.`,
		Example: `  dstl get orders order-17
  dstl get orders order-17 --state status --json`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.GetResponse], error) {
				return c.state.Get(ctx, connect.NewRequest(&dstlv1.GetRequest{Stream: args[0], State: state, Key: []byte(args[1])}))
			})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if cli.json {
				if err := printProto(out, res); err != nil {
					return err
				}
			} else if res.GetFound() {
				if _, err := out.Write(append(res.GetValue(), '\n')); err != nil {
					return err
				}
			}
			if !res.GetFound() {
				return fmt.Errorf("not found: key %s in state %q of stream %s (key group %d)", display([]byte(args[1])), state, args[0], res.GetKeyGroup())
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&state, "state", "default", "the state (named map) of the key")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}
