package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	dstl "github.com/dstl-dev/dstl/sdk/go"
)

func newSubscriptionCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "subscription",
		Aliases: []string{"sub"},
		Short:   "Register, show, commit and delete CDC subscriptions",
		Long: `A registered subscription is a named CDC reader of a stream with a committed
position: while it is registered, garbage collection keeps the changelog it
has not consumed (up to the node's retention cap). Read it with
"dstl tail STREAM --subscription NAME [--commit]". See docs/cdc.md.`,
	}
	cmd.AddCommand(newSubscriptionCreateCommand(cli), newSubscriptionGetCommand(cli), newSubscriptionListCommand(cli),
		newSubscriptionDeleteCommand(cli), newSubscriptionCommitCommand(cli))
	return cmd
}

// printSubscriptions prints subscriptions as a table.
func printSubscriptions(cmd *cobra.Command, subs ...*dstlv1.Subscription) error {
	tw := newTable(cmd.OutOrStdout())
	fmt.Fprintln(tw, "NAME\tCHECKPOINT\tLAG CHECKPOINTS\tLAG CHANGES\tLAG BYTES\tLAG\tEXPIRED\tUPDATED\tTOKEN")
	for _, s := range subs {
		tok := "-"
		if t, err := dstl.TokenFromBytes(s.GetToken()); err == nil && !t.IsZero() {
			tok = t.String()
		}
		lag := time.Duration(s.GetLagSeconds() * float64(time.Second)).Round(time.Millisecond)
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", s.GetName(), s.GetCheckpoint(), s.GetLagCheckpoints(), s.GetLagChanges(),
			humanBytes(int64(s.GetLagBytes())), lag, yesNo(s.GetExpired()), formatTime(s.GetUpdatedAtMs()), tok)
	}
	return tw.Flush()
}

// tokenArg parses a token given on the command line ("" is none).
func tokenArg(what, s string) ([]byte, error) {
	if s == "" {
		return nil, nil
	}
	t, err := dstl.ParseToken(s)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return t.Bytes(), nil
}

func newSubscriptionCreateCommand(cli *cliOptions) *cobra.Command {
	var (
		from             string
		snapshot, latest bool
	)
	cmd := &cobra.Command{
		Use:   "create STREAM NAME",
		Short: "Register a subscription of a stream",
		Long: `Register subscription NAME of STREAM at --from TOKEN, or (without a token)
from the earliest change (the default), a snapshot of the newest complete
checkpoint (--snapshot) or after it (--latest).`,
		Example: `  dstl subscription create orders billing
  dstl subscription create orders billing --latest`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := tokenArg("--from", from)
			if err != nil {
				return err
			}
			start := dstlv1.StartFrom_START_FROM_EARLIEST
			switch {
			case snapshot && latest:
				return errors.New("--snapshot and --latest exclude each other")
			case snapshot:
				start = dstlv1.StartFrom_START_FROM_SNAPSHOT
			case latest:
				start = dstlv1.StartFrom_START_FROM_LATEST
			}
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.CreateSubscriptionResponse], error) {
				return c.cdc.CreateSubscription(ctx, connect.NewRequest(&dstlv1.CreateSubscriptionRequest{Stream: args[0], Name: args[1], Token: tok, Start: start}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printSubscriptions(cmd, res.GetSubscription())
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "start after this token (from dstl tail)")
	cmd.Flags().BoolVar(&snapshot, "snapshot", false, "without --from: start with a snapshot of the newest complete checkpoint")
	cmd.Flags().BoolVar(&latest, "latest", false, "without --from: start after the newest complete checkpoint")
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newSubscriptionGetCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "get STREAM NAME",
		Short: "Show a subscription: its committed position and how far behind it is",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.GetSubscriptionResponse], error) {
				return c.cdc.GetSubscription(ctx, connect.NewRequest(&dstlv1.GetSubscriptionRequest{Stream: args[0], Name: args[1]}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printSubscriptions(cmd, res.GetSubscription())
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newSubscriptionListCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "list STREAM",
		Aliases: []string{"ls"},
		Short:   "List a stream's subscriptions",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.ListSubscriptionsResponse], error) {
				return c.cdc.ListSubscriptions(ctx, connect.NewRequest(&dstlv1.ListSubscriptionsRequest{Stream: args[0]}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printSubscriptions(cmd, res.GetSubscriptions()...)
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newSubscriptionDeleteCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "delete STREAM NAME",
		Aliases: []string{"rm"},
		Short:   "Unregister a subscription: it no longer holds the changelog back",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.DeleteSubscriptionResponse], error) {
				return c.cdc.DeleteSubscription(ctx, connect.NewRequest(&dstlv1.DeleteSubscriptionRequest{Stream: args[0], Name: args[1]}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "deleted subscription %s of stream %s\n", args[1], args[0])
			return err
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}

func newSubscriptionCommitCommand(cli *cliOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "commit STREAM NAME TOKEN",
		Short: "Record that a subscription consumed everything up to a token",
		Long: `Record that subscription NAME of STREAM consumed every event up to TOKEN (a
token printed by dstl tail, usually a CHECKPOINT line's).`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := tokenArg("token", args[2])
			if err != nil {
				return err
			}
			res, err := call(cmd, cli, func(ctx context.Context, c *clients) (*connect.Response[dstlv1.CommitSubscriptionResponse], error) {
				return c.cdc.CommitSubscription(ctx, connect.NewRequest(&dstlv1.CommitSubscriptionRequest{Stream: args[0], Name: args[1], Token: tok}))
			})
			if err != nil {
				return err
			}
			if cli.json {
				return printProto(cmd.OutOrStdout(), res)
			}
			return printSubscriptions(cmd, res.GetSubscription())
		},
	}
	addTimeoutFlag(cmd, defaultTimeout)
	return cmd
}
