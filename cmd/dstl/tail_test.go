package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"
)

func tailLines(t *testing.T, out string) []tailEvent {
	t.Helper()
	var evs []tailEvent
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var e tailEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if e.Token == "" {
			t.Fatalf("line without a token: %q", line)
		}
		evs = append(evs, e)
	}
	return evs
}

func showTail(evs []tailEvent) []string {
	var out []string
	for _, e := range evs {
		s := e.Kind + " " + string(rune('0'+e.Checkpoint))
		if e.KeyGroup != nil {
			s += " " + string(e.Key) + "=" + string(e.Value)
		}
		out = append(out, s)
	}
	return out
}

func TestTail(t *testing.T) {
	n := startCLINode(t)
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "4")
	n.mustCLI(t, "put", "s", "a", "1")   // checkpoint 1
	n.mustCLI(t, "put", "s", "b", "x y") // 2
	n.mustCLI(t, "put", "s", "a", "2")   // 3
	n.mustCLI(t, "del", "s", "b")        // 4

	all := tailLines(t, n.mustCLI(t, "tail", "s", "--no-follow", "--format", "json"))
	want := []string{"PUT 1 a=1", "CHECKPOINT 1", "PUT 2 b=x y", "CHECKPOINT 2", "PUT 3 a=2", "CHECKPOINT 3", "-D 4 b=", "CHECKPOINT 4"}
	if got := showTail(all); !slices.Equal(got, want) {
		t.Fatalf("tail --format json: %q, want %q", got, want)
	}
	if all[0].State != "default" || all[0].TimestampMs == 0 || all[1].KeyGroup != nil {
		t.Fatalf("json fields: %+v, %+v", all[0], all[1])
	}
	// Resuming by hand from any printed token gives exactly the rest.
	for i, e := range all {
		rest := n.mustCLI(t, "tail", "s", "--no-follow", "--json", "--from", e.Token)
		if i == len(all)-1 {
			if strings.TrimSpace(rest) != "" {
				t.Fatalf("from the last token: %q", rest)
			}
			continue
		}
		if got := showTail(tailLines(t, rest)); !slices.Equal(got, want[i+1:]) {
			t.Fatalf("--from the token of %q: %q, want %q", want[i], got, want[i+1:])
		}
	}

	// The table, retract form.
	out := n.mustCLI(t, "tail", "s", "--no-follow", "--retract")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 1+9 || !strings.HasPrefix(lines[0], "KIND") {
		t.Fatalf("table: %q", out)
	}
	for i, prefix := range []string{"+I", "CHECKPOINT", "+I", "CHECKPOINT", "-U", "+U", "CHECKPOINT", "-D", "CHECKPOINT"} {
		if f := strings.Fields(lines[i+1]); f[0] != prefix {
			t.Fatalf("line %d: %q, want %s", i+1, lines[i+1], prefix)
		}
	}
	if !strings.Contains(lines[3], `"x y"`) && !strings.Contains(lines[3], "x y") {
		t.Fatalf("value: %q", lines[3])
	}

	t.Logf("dstl tail s --no-follow --retract:\n%s", out)

	// A snapshot start prints a reset.
	out = n.mustCLI(t, "tail", "s", "--no-follow", "--snapshot")
	if f := strings.Fields(strings.Split(out, "\n")[1]); f[0] != "RESET" || f[1] != "4" {
		t.Fatalf("snapshot: %q", out)
	}

	// A follow ends cleanly when its --timeout is up.
	start := time.Now()
	out = n.mustCLI(t, "tail", "s", "--latest", "--timeout", "500ms")
	if strings.TrimSpace(out) != strings.TrimSpace(lines[0]) || time.Since(start) < 500*time.Millisecond {
		t.Fatalf("follow with --timeout: %q after %v", out, time.Since(start))
	}

	_, err := n.cli(t, "tail", "s", "--from", "garbage")
	wantCLIErr(t, err, "--from", "token")
	_, err = n.cli(t, "tail", "other", "--no-follow", "--from", all[0].Token)
	wantCLIErr(t, err, "token", "stream")
	_, err = n.cli(t, "tail", "nope", "--no-follow")
	wantCLIErr(t, err, "not_found")
	_, err = n.cli(t, "tail", "s", "--snapshot", "--latest")
	wantCLIErr(t, err, "exclude")
	_, err = n.cli(t, "tail", "s", "--commit")
	wantCLIErr(t, err, "--subscription")
}

func TestSubscriptionCommands(t *testing.T) {
	n := startCLINode(t)
	n.mustCLI(t, "stream", "create", "s", "--key-groups", "4")
	n.mustCLI(t, "put", "s", "a", "1")
	n.mustCLI(t, "put", "s", "b", "2")
	out, err := n.cli(t, "subscription", "create", "s", "billing")
	if err != nil || !strings.Contains(out, "billing") {
		t.Fatalf("create: %q, %v", out, err)
	}
	// Tail with --commit: checkpoints 1 and 2 are committed.
	evs := tailLines(t, n.mustCLI(t, "tail", "s", "--subscription", "billing", "--commit", "--no-follow", "--json"))
	if len(evs) != 4 {
		t.Fatalf("tail --subscription: %+v", evs)
	}
	out = n.mustCLI(t, "subscription", "get", "s", "billing")
	if !strings.Contains(out, evs[3].Token) {
		t.Fatalf("get after commit: %q, want token %s", out, evs[3].Token)
	}
	n.mustCLI(t, "put", "s", "c", "3")
	if got := showTail(tailLines(t, n.mustCLI(t, "tail", "s", "--subscription", "billing", "--no-follow", "--json"))); !slices.Equal(got, []string{"PUT 3 c=3", "CHECKPOINT 3"}) {
		t.Fatalf("tail after commit: %q", got)
	}
	n.mustCLI(t, "subscription", "commit", "s", "billing", evs[1].Token)
	if out := n.mustCLI(t, "subscription", "list", "s"); !strings.Contains(out, evs[1].Token) {
		t.Fatalf("list: %q", out)
	}
	n.mustCLI(t, "subscription", "delete", "s", "billing")
	_, err = n.cli(t, "subscription", "get", "s", "billing")
	wantCLIErr(t, err, "not_found")
	_, err = n.cli(t, "subscription", "commit", "s", "billing", "garbage")
	wantCLIErr(t, err, "token")
}
