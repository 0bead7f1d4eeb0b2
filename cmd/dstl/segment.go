package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dstl-dev/dstl/segments"
	"github.com/dstl-dev/dstl/upload"
	"github.com/dstl-dev/dstl/upload/blobstore"
)

// defaultBlob is where `dstl serve` keeps its blobs by default, relative to
// the directory it runs in.
const defaultBlob = "file://./dstl-data/blobs"

// segmentPrefix is where nodes upload segments: segments/<node>/<seq>-<rand>.seg.
const segmentPrefix = "segments/"

func newSegmentCommand(cli *cliOptions) *cobra.Command {
	var blobURL string
	cmd := &cobra.Command{
		Use:     "segment",
		Aliases: []string{"seg"},
		Short:   "List and decode segment objects straight from a blob store",
		Long: `List and decode the changelog's segment objects straight from a blob store,
without a running node: the operator's debugging tool. Every byte read is
checksum-verified; a damaged object is reported with its name and offset.

--blob (DSTL_BLOB) takes the same blob URLs as "dstl serve": a path,
file:///abs/path, or s3://bucket/prefix?endpoint=...&region=...&path_style=true
(credentials from the default AWS chain). A relative file://./path is
accepted too. A local directory must exist: it is never created.`,
	}
	cmd.PersistentFlags().StringVar(&blobURL, "blob", defaultBlob, "blob store URL: a path, file:///abs/path or s3://bucket/prefix?...")
	cmd.AddCommand(newSegmentLsCommand(cli, &blobURL), newSegmentCatCommand(cli, &blobURL))
	return cmd
}

var schemeRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)

// openBlobStoreReadOnly opens a blob URL for reading. A local directory
// must already exist (the file backend would create it), and file://./rel
// (which url.Parse reads as host ".") means the relative path ./rel.
func openBlobStoreReadOnly(ctx context.Context, raw string) (upload.BlobStore, error) {
	if rest, ok := strings.CutPrefix(raw, "file://"); ok && !strings.HasPrefix(rest, "/") && !strings.HasPrefix(rest, "localhost/") {
		raw = rest
	}
	path := ""
	switch {
	case raw == "":
		return nil, errors.New("--blob is empty")
	case !schemeRE.MatchString(raw):
		path = raw
	case strings.HasPrefix(strings.ToLower(raw), "file://"):
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("--blob %q: %w", raw, err)
		}
		if path, err = blobstore.FilePath(u); err != nil {
			return nil, err
		}
	}
	if path != "" {
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("blob store %s: %w (point --blob or DSTL_BLOB at the node's blob store)", path, err)
		}
		if !fi.IsDir() {
			return nil, fmt.Errorf("blob store %s: not a directory", path)
		}
	}
	store, err := blobstore.Open(ctx, raw)
	if err != nil {
		return nil, fmt.Errorf("open blob store: %w", err)
	}
	return store, nil
}

// logSummary describes one log's blocks in a segment.
type logSummary struct {
	Log       string   `json:"log"`
	FirstSQN  uint64   `json:"first_sqn"`
	LastSQN   uint64   `json:"last_sqn"`
	Blocks    int      `json:"blocks"`
	Changes   uint64   `json:"changes"`
	KeyGroups []string `json:"key_groups"`
}

// segmentSummary is one line of `dstl segment ls`.
type segmentSummary struct {
	Key      string       `json:"key"`
	Size     int64        `json:"size"`
	Modified time.Time    `json:"modified"`
	Blocks   int          `json:"blocks"`
	Changes  uint64       `json:"changes"`
	Logs     []logSummary `json:"logs"`
	Error    string       `json:"error,omitempty"`
}

func summarize(obj upload.ObjectInfo, blocks []segments.BlockInfo) segmentSummary {
	s := segmentSummary{Key: obj.Key, Size: obj.Size, Modified: obj.ModTime.UTC(), Blocks: len(blocks), Logs: []logSummary{}}
	runs := map[string][]segments.KeyGroupRun{}
	for _, b := range blocks {
		s.Changes += b.Count
		i := slices.IndexFunc(s.Logs, func(l logSummary) bool { return l.Log == b.LogID })
		if i < 0 {
			s.Logs = append(s.Logs, logSummary{Log: b.LogID, FirstSQN: b.FirstSQN, LastSQN: b.LastSQN})
			i = len(s.Logs) - 1
		}
		l := &s.Logs[i]
		l.FirstSQN, l.LastSQN = min(l.FirstSQN, b.FirstSQN), max(l.LastSQN, b.LastSQN)
		l.Blocks++
		l.Changes += b.Count
		runs[b.LogID] = append(runs[b.LogID], b.KeyGroups...)
	}
	for i := range s.Logs {
		l := &s.Logs[i]
		l.KeyGroups = []string{}
		for _, r := range mergeRuns(runs[l.Log]) {
			l.KeyGroups = append(l.KeyGroups, fmt.Sprintf("%d..%d", r.Lo, r.Hi))
		}
	}
	return s
}

// mergeRuns sorts key-group runs and merges overlapping or adjacent ones.
func mergeRuns(rs []segments.KeyGroupRun) []segments.KeyGroupRun {
	slices.SortFunc(rs, func(a, b segments.KeyGroupRun) int { return int(a.Lo) - int(b.Lo) })
	var out []segments.KeyGroupRun
	for _, r := range rs {
		if n := len(out); n > 0 && int(r.Lo) <= int(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// humanBytes renders a size for tables.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func newSegmentLsCommand(cli *cliOptions, blobURL *string) *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List segment objects with their size, blocks, logs and SQN ranges",
		Long: `List the objects under segments/ (or segments/<node>/ with --node) of the blob
store, reading each one's trailer and index (one ranged read each): size,
blocks, changes, and per log its SQN range. Objects that cannot be read are
listed with the error and make the command exit 1 at the end.

With --json it prints one object per line:
{"key", "size", "modified", "blocks", "changes",
 "logs": [{"log", "first_sqn", "last_sqn", "blocks", "changes", "key_groups"}], "error"}.`,
		Example: `  dstl segment ls
  dstl segment ls --blob /var/lib/dstl/blobs --node 3f9c2a7e1b4d5c60`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := commandContext(cmd)
			defer cancel()
			store, err := openBlobStoreReadOnly(ctx, *blobURL)
			if err != nil {
				return err
			}
			defer store.Close()
			prefix := segmentPrefix
			if node != "" {
				prefix += strings.Trim(node, "/") + "/"
			}
			out := cmd.OutOrStdout()
			tw := newTable(out)
			if !cli.json {
				fmt.Fprintln(tw, "KEY\tSIZE\tMODIFIED\tBLOCKS\tCHANGES\tLOGS\tSQN RANGES")
			}
			var count, bad int
			var total int64
			for obj, err := range upload.Walk(ctx, store, prefix, "") {
				if err != nil {
					_ = tw.Flush()
					return fmt.Errorf("list %s: %w", prefix, err)
				}
				count++
				total += obj.Size
				s := segmentSummary{Key: obj.Key, Size: obj.Size, Modified: obj.ModTime.UTC(), Logs: []logSummary{}}
				r, err := segments.Open(upload.ReaderAt(ctx, store, obj.Key, obj.Size), obj.Size, obj.Key)
				if err != nil {
					bad++
					s.Error = err.Error()
				} else {
					s = summarize(obj, r.Blocks())
				}
				if cli.json {
					if err := json.NewEncoder(out).Encode(s); err != nil {
						return err
					}
					continue
				}
				if s.Error != "" {
					fmt.Fprintf(tw, "%s\t%s\t%s\tERROR: %s\t\t\t\n", s.Key, humanBytes(s.Size), s.Modified.Format(time.RFC3339), s.Error)
					continue
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%s\n", s.Key, humanBytes(s.Size), s.Modified.Format(time.RFC3339),
					s.Blocks, s.Changes, len(s.Logs), sqnRanges(s.Logs))
			}
			if !cli.json {
				if err := tw.Flush(); err != nil {
					return err
				}
				fmt.Fprintf(out, "%d objects, %s\n", count, humanBytes(total))
			}
			if bad > 0 {
				return fmt.Errorf("%d of %d objects under %s could not be read as segments", bad, count, prefix)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "only this node's segments (segments/<node>/)")
	addTimeoutFlag(cmd, 0)
	return cmd
}

// sqnRanges renders "log:first..last" for the first few logs.
func sqnRanges(logs []logSummary) string {
	const show = 4
	var parts []string
	for i, l := range logs {
		if i == show {
			parts = append(parts, fmt.Sprintf("(+%d more)", len(logs)-show))
			break
		}
		parts = append(parts, fmt.Sprintf("%s:%d..%d", l.Log, l.FirstSQN, l.LastSQN))
	}
	return strings.Join(parts, " ")
}

// changeJSON is one line of `dstl segment cat --json`.
type changeJSON struct {
	Log         string `json:"log"`
	SQN         uint64 `json:"sqn"`
	KeyGroup    uint16 `json:"key_group"`
	State       string `json:"state"`
	Op          string `json:"op"`
	Key         []byte `json:"key"`
	Value       []byte `json:"value"`
	TimestampMs int64  `json:"timestamp_ms"`
}

func newSegmentCatCommand(cli *cliOptions, blobURL *string) *cobra.Command {
	var (
		log, keyGroups string
		afterSQN, upTo uint64
	)
	cmd := &cobra.Command{
		Use:   "cat KEY",
		Short: "Decode a segment object's changes",
		Long: `Decode the changes of the segment object KEY (as "dstl segment ls" prints it;
the leading "segments/" may be left out), each log's in SQN order. Only the
blocks that intersect the filters are fetched. Every block is verified before
any of its changes is printed.

With --json it prints one object per line:
{"log", "sqn", "key_group", "state", "op", "key", "value", "timestamp_ms"}
with key and value base64.`,
		Example: `  dstl segment cat segments/3f9c2a7e1b4d5c60/00000000000000000007-5e1f0a9c.seg
  dstl segment cat 3f9c2a7e1b4d5c60/00000000000000000007-5e1f0a9c.seg --log orders/2 --after 100 --up-to 200`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			q := segments.Query{LogID: log, AfterSQN: afterSQN, UpToSQN: upTo}
			if keyGroups != "" {
				lo, hi, err := parseKeyGroupRange(keyGroups)
				if err != nil {
					return fmt.Errorf("--key-groups: %w", err)
				}
				q.KeyGroupLo, q.KeyGroupHi, q.KeyGroupsSet = lo, hi, true
			}
			if upTo != 0 && upTo <= afterSQN {
				return fmt.Errorf("--up-to %d is not above --after %d: nothing to show", upTo, afterSQN)
			}
			ctx, cancel := commandContext(cmd)
			defer cancel()
			store, err := openBlobStoreReadOnly(ctx, *blobURL)
			if err != nil {
				return err
			}
			defer store.Close()
			key := args[0]
			info, err := store.Stat(ctx, key)
			if errors.Is(err, upload.ErrNotFound) && !strings.HasPrefix(key, segmentPrefix) {
				key = segmentPrefix + key
				info, err = store.Stat(ctx, key)
			}
			if err != nil {
				return fmt.Errorf("segment %s: %w", args[0], err)
			}
			r, err := segments.Open(upload.ReaderAt(ctx, store, key, info.Size), info.Size, key)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			tw := newTable(out)
			if !cli.json {
				fmt.Fprintln(tw, "LOG\tSQN\tKEY GROUP\tSTATE\tOP\tKEY\tVALUE\tTIME")
			}
			enc := json.NewEncoder(out)
			for c, err := range r.Changes(q) {
				if err != nil {
					_ = tw.Flush()
					return err
				}
				if cli.json {
					if err := enc.Encode(changeJSON{Log: c.LogID, SQN: c.SQN, KeyGroup: c.KeyGroup, State: c.State, Op: c.Op.String(),
						Key: c.Key, Value: c.Value, TimestampMs: c.TimestampMs}); err != nil {
						return err
					}
					continue
				}
				val := display(c.Value)
				if c.Op == segments.OpDelete || (c.Op == segments.OpClear && len(c.Value) == 0) {
					val = "-"
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", c.LogID, c.SQN, c.KeyGroup, display([]byte(c.State)), c.Op,
					display(c.Key), val, formatTime(c.TimestampMs))
			}
			if cli.json {
				return nil
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.StringVar(&log, "log", "", "only this log (a writer id, <stream>/<epoch>)")
	f.Uint64Var(&afterSQN, "after", 0, "only changes with an SQN above this")
	f.Uint64Var(&upTo, "up-to", 0, "only changes with an SQN up to this (0: no bound)")
	f.StringVar(&keyGroups, "key-groups", "", "only these key groups, lo..hi inclusive")
	addTimeoutFlag(cmd, 0)
	return cmd
}
