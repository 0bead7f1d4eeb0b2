package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	dstl "github.com/dstl-dev/dstl/sdk/go"
)

// tailEvent is one line of `dstl tail --format json`.
type tailEvent struct {
	Kind       string `json:"kind"`
	Checkpoint uint64 `json:"checkpoint"`
	KeyGroup   *int   `json:"key_group,omitempty"`
	State      string `json:"state,omitempty"`
	// Key and Value are base64, as in `dstl scan --json`.
	Key         []byte `json:"key,omitempty"`
	Value       []byte `json:"value,omitempty"`
	TimestampMs int64  `json:"timestamp_ms,omitempty"`
	Snapshot    bool   `json:"snapshot,omitempty"`
	Token       string `json:"token"`
}

func newTailCommand(cli *cliOptions) *cobra.Command {
	var (
		from, format, state, prefix, keyGroups, name string
		retract, snapshot, latest, noFollow, commit  bool
		maxEvents                                    int
	)
	cmd := &cobra.Command{
		Use:   "tail STREAM",
		Short: "Print a stream's committed changes (CDC), then follow new checkpoints",
		Long: `Print the committed changes of STREAM, checkpoint after checkpoint, one line
per event, then wait for new checkpoints (until interrupted, or --timeout;
--no-follow stops after the newest complete checkpoint). See docs/cdc.md.

Events: PUT and -D (the upsert form, the default), or +I, -U, +U, -D with
--retract (a change of an existing key is -U with the old value, then +U
with the new one). Marker lines: CHECKPOINT (every change of the checkpoint
was printed: a consumer may commit its output) and RESET (a snapshot of the
checkpoint follows: discard what you built from the subscribed key groups).

Every line ends with a token: "dstl tail STREAM --from TOKEN" (with the same
--retract and --key-groups) resumes right after that line, with no duplicate
and no gap. When tail stops, it prints the token to resume from on stderr.
A connection that breaks is resumed by itself.

Table columns: kind, checkpoint, key group, state, key, value (printable
UTF-8 as is, anything else Go-quoted), token. --format json prints one
object per line (key and value in base64, as "dstl scan --json").

--subscription NAME reads a registered subscription (dstl subscription
create): without --from it starts after the subscription's committed token;
with --commit, tail commits the token of every checkpoint it printed
completely, so the next "dstl tail --subscription NAME" continues there.`,
		Example: `  dstl tail orders
  dstl tail orders --no-follow --format json
  dstl tail orders --retract --state status --prefix order- --key-groups 0..15
  dstl tail orders --from AQZvcmRlcnM...
  dstl tail orders --subscription billing --commit`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			stream := args[0]
			if cli.json {
				format = "json"
			}
			if format != "table" && format != "json" {
				return fmt.Errorf("--format %q: want table or json", format)
			}
			opts := dstl.SubscribeOptions{State: state, KeyPrefix: []byte(prefix), Name: name, NoFollow: noFollow, MaxEvents: maxEvents}
			switch {
			case snapshot && latest:
				return errors.New("--snapshot and --latest exclude each other")
			case snapshot:
				opts.Start = dstl.StartSnapshot
			case latest:
				opts.Start = dstl.StartLatest
			}
			if commit && name == "" {
				return errors.New("--commit needs --subscription NAME")
			}
			if retract {
				opts.Form = dstl.FormRetract
			}
			if keyGroups != "" {
				lo, hi, err := parseKeyGroupRange(keyGroups)
				if err != nil {
					return fmt.Errorf("--key-groups: %w", err)
				}
				opts.KeyGroups = &dstl.KeyGroupRange{Lo: int(lo), Hi: int(hi)}
			}
			if from != "" {
				tok, err := dstl.ParseToken(from)
				if err != nil {
					return fmt.Errorf("--from: %w", err)
				}
				opts.From = tok
			}
			c, err := cli.dial(cmd)
			if err != nil {
				return err
			}
			client, err := dstl.Dial(cmd.Context(), c.server, dstl.WithHTTPClient(newHTTPClient(c.server)))
			if err != nil {
				return err
			}
			defer func() { _ = client.Close() }()
			ctx, cancel := commandContext(cmd)
			defer cancel()

			out := cmd.OutOrStdout()
			if format == "table" {
				fmt.Fprintln(out, "KIND        CHECKPOINT  KEY GROUP  STATE  KEY  VALUE  TOKEN")
			}
			sub := client.Subscribe(ctx, stream, opts)
			for ev, err := range sub.Changes() {
				if err != nil {
					if ctx.Err() != nil && !noFollow {
						// Interrupted or --timeout: the normal end of a follow.
						printResume(cmd.ErrOrStderr(), stream, sub.Token())
						return nil
					}
					printResume(cmd.ErrOrStderr(), stream, sub.Token())
					return c.explain(err)
				}
				if err := printTailEvent(out, format, ev); err != nil {
					return err
				}
				if commit && ev.Kind == dstl.EventCheckpointComplete {
					if _, err := client.CommitSubscription(ctx, stream, name, ev.Token()); err != nil {
						if ctx.Err() != nil && !noFollow {
							printResume(cmd.ErrOrStderr(), stream, sub.Token())
							return nil
						}
						return fmt.Errorf("commit checkpoint %d to subscription %s: %w", ev.Checkpoint, name, c.explain(err))
					}
				}
			}
			printResume(cmd.ErrOrStderr(), stream, sub.Token())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from", "", "resume after this token (printed with every event)")
	f.StringVar(&format, "format", "table", "output: table or json (one object per line)")
	f.BoolVar(&retract, "retract", false, "the retract form: +I, -U/+U (old and new value), -D (old value)")
	f.StringVar(&state, "state", "", "only this state (default: every state)")
	f.StringVar(&prefix, "prefix", "", "only keys starting with this prefix")
	f.StringVar(&keyGroups, "key-groups", "", "only these key groups, lo..hi inclusive (default: all)")
	f.BoolVar(&snapshot, "snapshot", false, "without --from: start with a snapshot of the newest complete checkpoint, then its changes")
	f.BoolVar(&latest, "latest", false, "without --from: only checkpoints completed after the newest one")
	f.BoolVar(&noFollow, "no-follow", false, "stop after the newest complete checkpoint instead of waiting for new ones")
	f.StringVar(&name, "subscription", "", "a registered subscription: start from its committed token (without --from)")
	f.BoolVar(&commit, "commit", false, "commit each completely printed checkpoint's token to --subscription")
	f.IntVar(&maxEvents, "max-events", 0, "events per message from the node (0: its default, 4096)")
	f.Duration("timeout", 0, "stop after this long (0: never); a follow then ends normally, --no-follow fails")
	return cmd
}

// printResume tells the operator how to continue.
func printResume(w io.Writer, stream string, tok dstl.Token) {
	if tok.IsZero() {
		return
	}
	fmt.Fprintf(w, "resume with: dstl tail %s --from %s\n", stream, tok)
}

func printTailEvent(w io.Writer, format string, ev dstl.Event) error {
	tok := ev.Token().String()
	if format == "json" {
		e := tailEvent{Kind: ev.Kind.String(), Checkpoint: ev.Checkpoint, Snapshot: ev.Snapshot, Token: tok}
		if !ev.Kind.IsMarker() {
			kg := ev.KeyGroup
			e.KeyGroup, e.State, e.Key, e.Value = &kg, ev.State, ev.Key, ev.Value
			if !ev.Time.IsZero() {
				e.TimestampMs = ev.Time.UnixMilli()
			}
		}
		b, err := json.Marshal(e)
		if err != nil {
			return err
		}
		_, err = w.Write(append(b, '\n'))
		return err
	}
	var err error
	switch ev.Kind {
	case dstl.EventCheckpointComplete:
		what := "complete"
		if ev.Snapshot {
			what = "complete (snapshot)"
		}
		_, err = fmt.Fprintf(w, "%-10s  %10d  %s  %s\n", ev.Kind, ev.Checkpoint, what, tok)
	case dstl.EventReset:
		_, err = fmt.Fprintf(w, "%-10s  %10d  snapshot of checkpoint %d follows: discard the state built so far  %s\n", ev.Kind, ev.Checkpoint, ev.Checkpoint, tok)
	default:
		value := display(ev.Value)
		if ev.Kind == dstl.EventDelete && len(ev.Value) == 0 {
			value = "-"
		}
		_, err = fmt.Fprintf(w, "%-10s  %10d  %9d  %s  %s  %s  %s\n", ev.Kind, ev.Checkpoint, ev.KeyGroup, display([]byte(ev.State)), display(ev.Key), value, tok)
	}
	return err
}
