package main

import (
	"bufio"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// addConfigFlag adds --config to a command whose flags a file may set.
func addConfigFlag(cmd *cobra.Command) {
	cmd.Flags().String("config", "", "config file: lines of \"flag-name: value\" (# starts a comment); flags and DSTL_* variables win over it")
}

// bindSettings fills the flags the user did not give on the command line:
// first from DSTL_* environment variables (--data-dir reads DSTL_DATA_DIR),
// then from the --config file. Command-line flags win over the
// environment, which wins over the file, which wins over defaults.
func bindSettings(cmd *cobra.Command) error {
	fromEnv := map[string]bool{}
	var firstErr error
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if f.Changed || firstErr != nil || !envFlag(cmd, f.Name) {
			return
		}
		name := "DSTL_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v, ok := os.LookupEnv(name)
		if !ok {
			return
		}
		if err := f.Value.Set(v); err != nil {
			firstErr = fmt.Errorf("environment %s=%q: %w", name, v, err)
		}
		fromEnv[f.Name] = true
	})
	if firstErr != nil {
		return firstErr
	}
	cf := cmd.Flags().Lookup("config")
	if cf == nil || cf.Value.String() == "" {
		return nil
	}
	return applyConfigFile(cmd.Flags(), cf.Value.String(), fromEnv)
}

// envFlag says which flags read DSTL_* variables: every setting of serve
// (a daemon is configured by its environment), and for the client commands
// only where to find the node or blob store and how long to wait. One-off
// flags of client commands (--key-groups, --state, --json…) never do: the
// same name means different things to different commands.
func envFlag(cmd *cobra.Command, name string) bool {
	if (cmd.Name() == "serve" || cmd.Name() == "materialize") && name != "json" && name != "server" {
		return true
	}
	switch name {
	case "server", "blob", "timeout":
		return true
	}
	return false
}

func applyConfigFile(flags *pflag.FlagSet, path string, skip map[string]bool) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			return fmt.Errorf("config %s:%d: want \"name: value\", got %q", path, n, line)
		}
		name, value = strings.TrimSpace(name), strings.Trim(strings.TrimSpace(value), `"'`)
		fl := flags.Lookup(name)
		if fl == nil || name == "config" {
			return fmt.Errorf("config %s:%d: unknown setting %q", path, n, name)
		}
		if fl.Changed || skip[name] {
			continue
		}
		if err := fl.Value.Set(value); err != nil {
			return fmt.Errorf("config %s:%d: %s: %w", path, n, name, err)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// redactURL hides credentials a blob URL may carry, for logs.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	return u.Redacted()
}
