package main

import (
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func newDelCommand(cli *cliOptions) *cobra.Command {
	var o writeOptions
	cmd := &cobra.Command{
		Use:     "del STREAM KEY",
		Aliases: []string{"delete"},
		Short:   "Delete one key (a convenience for humans; fences the stream's writers)",
		Long: `Delete KEY from a state of STREAM, durably. Deleting an absent key is not an
error.

` + writeFencingNote,
		Example: "  dstl del orders order-17",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return writeOne(cmd, cli, &o, dstlv1.Op_OP_DELETE, args[0], []byte(args[1]), nil)
		},
	}
	o.addFlags(cmd)
	return cmd
}
