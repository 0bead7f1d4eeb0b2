// Command dstl is the dstl daemon and its operator CLI.
//
// Every subcommand lives in its own file; flags can also be set with DSTL_*
// environment variables (DSTL_DATA_DIR for --data-dir, and so on).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

// run executes the CLI and returns the process exit code. Errors go to
// stderr; nothing is printed twice.
func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal starts a graceful shutdown, restore the default
	// handling so that a second signal exits at once.
	go func() {
		<-ctx.Done()
		stop()
	}()

	root := newRootCommand()
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		var exit *exitError
		if errors.As(err, &exit) {
			return exit.code
		}
		fmt.Fprintln(os.Stderr, "dstl:", err)
		return 1
	}
	return 0
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "dstl",
		Short:         "dstl: a durable changelog and snapshot store",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return bindSettings(cmd)
		},
	}
	root.AddCommand(newServeCommand(), newMaterializeCommand(), newVersionCommand())
	root.AddCommand(newCLICommands(root)...)
	return root
}

// exitError carries a specific exit code for errors already reported.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }
