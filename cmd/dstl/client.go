package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
	"github.com/dstl-dev/dstl/api/dstl/v1/dstlv1/dstlv1connect"
)

// defaultServer is the address `dstl serve` listens on by default.
const defaultServer = "http://127.0.0.1:7600"

// defaultTimeout bounds one CLI command's calls to the node.
const defaultTimeout = 30 * time.Second

// cliOptions are the operator CLI's persistent root flags, shared by every
// client subcommand of one root command (no package state, so tests can
// build many roots).
type cliOptions struct {
	server string
	json   bool
}

// newCLICommands registers the CLI's persistent flags (--server, --json) on
// root and returns the operator subcommands to add to it.
func newCLICommands(root *cobra.Command) []*cobra.Command {
	cli := &cliOptions{}
	pf := root.PersistentFlags()
	pf.StringVar(&cli.server, "server", defaultServer, "dstl node to talk to: http://host:port (HTTP/2 cleartext) or https://host:port (TLS)")
	pf.BoolVar(&cli.json, "json", false, "print JSON for machines instead of tables (protojson of API results; one object per line for scan and segment output)")
	return []*cobra.Command{
		newStreamCommand(cli),
		newPutCommand(cli),
		newGetCommand(cli),
		newDelCommand(cli),
		newScanCommand(cli),
		newCheckpointCommand(cli),
		newSegmentCommand(cli),
		newTailCommand(cli),
		newSubscriptionCommand(cli),
		newClusterCommand(cli),
	}
}

// addTimeoutFlag adds --timeout to a command that talks to a node or a blob
// store.
func addTimeoutFlag(cmd *cobra.Command, def time.Duration) {
	help := "give up on the command after this long (0: never)"
	cmd.Flags().Duration("timeout", def, help)
}

// commandContext is the command's context bounded by its --timeout.
func commandContext(cmd *cobra.Command) (context.Context, context.CancelFunc) {
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	if f := cmd.Flags().Lookup("timeout"); f != nil {
		if d, err := time.ParseDuration(f.Value.String()); err == nil && d > 0 {
			return context.WithTimeout(ctx, d)
		}
	}
	return context.WithCancel(ctx)
}

// clients are connect clients of the services of one node.
type clients struct {
	server      string
	timeout     string
	streams     dstlv1connect.StreamServiceClient
	writers     dstlv1connect.WriterServiceClient
	state       dstlv1connect.StateServiceClient
	checkpoints dstlv1connect.CheckpointServiceClient
	cdc         dstlv1connect.CDCServiceClient
	cluster     dstlv1connect.ClusterServiceClient
}

// serverURL normalizes --server: a bare host:port means http://host:port.
func serverURL(raw string) (string, error) {
	raw = strings.TrimSpace(raw)
	if raw == "" {
		return "", errors.New("--server is empty (want http://host:port or https://host:port)")
	}
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("--server %q: %w", raw, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("--server %q: want http://host:port (h2c) or https://host:port (TLS)", raw)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("--server %q: want only scheme, host, port and an optional path", raw)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// newHTTPClient speaks HTTP/2 cleartext (prior knowledge, as `dstl serve`
// does) to http:// URLs and HTTP/2 over TLS (HTTP/1.1 as a fallback) to
// https:// URLs.
func newHTTPClient(base string) *http.Client {
	p := new(http.Protocols)
	t := &http.Transport{Protocols: p, Proxy: http.ProxyFromEnvironment}
	if strings.HasPrefix(base, "https://") {
		p.SetHTTP2(true)
		p.SetHTTP1(true)
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	} else {
		p.SetUnencryptedHTTP2(true)
		t.Proxy = nil // h2c with prior knowledge does not go through HTTP proxies
	}
	return &http.Client{Transport: t}
}

// dial builds the clients of the node named by --server. Nothing is sent
// until the first call.
func (o *cliOptions) dial(cmd *cobra.Command) (*clients, error) {
	base, err := serverURL(o.server)
	if err != nil {
		return nil, err
	}
	return dialURL(cmd, base), nil
}

// dialURL builds the clients of the node at base (a normalized URL).
func dialURL(cmd *cobra.Command, base string) *clients {
	hc := newHTTPClient(base)
	timeout := ""
	if f := cmd.Flags().Lookup("timeout"); f != nil {
		timeout = f.Value.String()
	}
	return &clients{
		server:      base,
		timeout:     timeout,
		streams:     dstlv1connect.NewStreamServiceClient(hc, base),
		writers:     dstlv1connect.NewWriterServiceClient(hc, base),
		state:       dstlv1connect.NewStateServiceClient(hc, base),
		checkpoints: dstlv1connect.NewCheckpointServiceClient(hc, base),
		cdc:         dstlv1connect.NewCDCServiceClient(hc, base),
		cluster:     dstlv1connect.NewClusterServiceClient(hc, base),
	}
}

// explain turns an RPC error into one readable line: "not_found: stream x:
// stream not found", with a hint when the node could not be reached.
func (c *clients) explain(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	var netErr *net.OpError
	switch code := ce.Code(); {
	case code == connect.CodeUnavailable && errors.As(err, &netErr):
		return fmt.Errorf("unavailable: cannot reach the dstl node at %s (%v); is `dstl serve` running there? Pick another node with --server or DSTL_SERVER", c.server, netErr.Err)
	case code == connect.CodeDeadlineExceeded || (errors.Is(err, context.DeadlineExceeded) && code != connect.CodeCanceled):
		return fmt.Errorf("deadline_exceeded: no answer from %s within --timeout %s", c.server, c.timeout)
	case code == connect.CodeUnimplemented && len(ce.Meta()) == 0 && strings.Contains(ce.Message(), "404"):
		return fmt.Errorf("unimplemented: %s (is %s a dstl node?)", ce.Message(), c.server)
	default:
		msg := ce.Message()
		if msg == "" {
			msg = code.String()
		}
		return fmt.Errorf("%s: %s", code, msg)
	}
}

// printProto prints an API result as one line of protojson with the
// proto's field names (snake_case) and every field, zero values included.
func printProto(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	_, err = w.Write(b)
	return err
}

// newTable returns the tab writer every table of the CLI uses; Flush it.
func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
}

// display renders bytes for a table: as they are if they are printable
// UTF-8 (spaces allowed), otherwise Go-quoted ("a\x00b"). Values that
// start with a quote, and the empty value, are quoted too, so the two
// forms cannot be confused.
func display(b []byte) string {
	if len(b) == 0 || b[0] == '"' || !utf8.Valid(b) {
		return strconv.Quote(string(b))
	}
	for _, r := range string(b) {
		if !unicode.IsPrint(r) {
			return strconv.Quote(string(b))
		}
	}
	return string(b)
}

// truncate shortens s for a table column.
func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n-1]) + "…"
}

// parseKeyGroupRange parses "lo..hi" (inclusive); one key group is "5..5".
func parseKeyGroupRange(s string) (lo, hi uint16, err error) {
	a, b, ok := strings.Cut(s, "..")
	if !ok {
		return 0, 0, fmt.Errorf("key groups %q: want lo..hi (inclusive, e.g. 0..63; one key group is 5..5)", s)
	}
	l, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 16)
	h, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 16)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("key groups %q: want lo..hi with numbers 0..32767", s)
	}
	if l > h {
		return 0, 0, fmt.Errorf("key groups %q: lo is above hi", s)
	}
	return uint16(l), uint16(h), nil
}

// keyGroupRangeProto parses a --key-groups flag; "" means absent (nil).
func keyGroupRangeProto(s string) (*dstlv1.KeyGroupRange, error) {
	if s == "" {
		return nil, nil
	}
	lo, hi, err := parseKeyGroupRange(s)
	if err != nil {
		return nil, err
	}
	return &dstlv1.KeyGroupRange{Lo: uint32(lo), Hi: uint32(hi)}, nil
}

func formatRange(r *dstlv1.KeyGroupRange) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%d..%d", r.GetLo(), r.GetHi())
}

// formatTime renders a Unix time in ms for tables; 0 is "-".
func formatTime(ms int64) string {
	if ms == 0 {
		return "-"
	}
	return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z")
}

// parseID parses a checkpoint id argument.
func parseID(s string) (uint64, error) {
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("checkpoint id %q: want a positive integer", s)
	}
	return id, nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// call runs one RPC of a command: it dials the node named by --server,
// bounds the call by --timeout and turns an error into a readable one.
func call[Res any](cmd *cobra.Command, cli *cliOptions, rpc func(context.Context, *clients) (*connect.Response[Res], error)) (*Res, error) {
	c, err := cli.dial(cmd)
	if err != nil {
		return nil, err
	}
	ctx, cancel := commandContext(cmd)
	defer cancel()
	res, err := rpc(ctx, c)
	if err != nil {
		return nil, c.explain(err)
	}
	return res.Msg, nil
}
