package locallog

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	crashDirEnv  = "LOCALLOG_CRASH_DIR"
	crashVLen    = 100
	crashWriters = 8
)

// TestHelperProcess is the child of TestCrash, not a test of its own: it
// appends in a loop and prints "ack <log> <sqn>" after each Append returned,
// until it is killed.
func TestHelperProcess(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		t.Skip("child process of TestCrash only")
	}
	l, rec, err := Open(Options{Dir: dir, FileSize: 256 << 10})
	if err != nil {
		fmt.Printf("err open: %v\n", err)
		os.Exit(1)
	}
	var out sync.Mutex
	say := func(format string, args ...any) {
		out.Lock()
		defer out.Unlock()
		os.Stdout.WriteString(fmt.Sprintf(format, args...)) // one write(2) per line
	}
	var wg sync.WaitGroup
	for g := range crashWriters {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), uint64(time.Now().UnixNano())))
			logs := []string{fmt.Sprintf("w%d-a", g), fmt.Sprintf("w%d-b", g)}
			next := map[string]uint64{}
			for _, log := range logs {
				next[log] = 1
				if rl := rec.Logs[log]; rl != nil {
					next[log] = rl.Uploaded + 1
					if n := len(rl.Changes); n > 0 {
						next[log] = rl.Changes[n-1].SQN + 1
					}
				}
				if err := l.SetMeta(context.Background(), log, []byte("meta-"+log)); err != nil {
					say("err meta: %v\n", err)
					os.Exit(1)
				}
			}
			for i := 0; ; i++ {
				log := logs[rng.IntN(len(logs))]
				n := 1 + rng.IntN(50)
				if err := l.Append(context.Background(), log, batchOf(log, next[log], n, crashVLen)); err != nil {
					say("err append: %v\n", err)
					os.Exit(1)
				}
				next[log] += uint64(n)
				say("ack %s %d\n", log, next[log]-1)
				if i%20 == 19 && next[log] > 200 {
					l.MarkUploaded(log, next[log]-200)
				}
			}
		})
	}
	wg.Wait()
}

// TestCrash kills a child process that appends with SIGKILL at a random
// moment, several times over the same directory: every change the child
// reported as acknowledged is recovered, once, with its value, and the
// child continues the logs from what was recovered.
func TestCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	acked := map[string]uint64{} // log → highest acknowledged SQN, over all rounds
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	for round := range 5 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
		cmd.Env = append(os.Environ(), crashDirEnv+"="+dir)
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		started := make(chan struct{})
		lines := make(chan []string)
		go func() {
			var got []string
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if len(got) == 0 {
					close(started)
				}
				got = append(got, sc.Text())
			}
			if len(got) == 0 {
				close(started)
			}
			lines <- got
		}()
		<-started
		time.Sleep(time.Duration(20+rng.IntN(400)) * time.Millisecond)
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		got := <-lines // the pipe still holds everything written before the kill
		if err := cmd.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("round %d: child did not die by the kill: %v (output %q)", round, err, got)
		}
		acks := 0
		for _, line := range got {
			var log string
			var sqn uint64
			if _, err := fmt.Sscanf(line, "ack %s %d", &log, &sqn); err != nil {
				t.Fatalf("round %d: child said %q", round, line)
			}
			acked[log] = max(acked[log], sqn)
			acks++
		}

		l, rec, err := Open(Options{Dir: dir})
		if err != nil {
			t.Fatalf("round %d: reopen after kill: %v", round, err)
		}
		total := 0
		for log, high := range acked {
			rl := rec.Logs[log]
			if rl == nil {
				t.Fatalf("round %d: log %s (acked up to %d) lost", round, log, high)
			}
			if rl.Uploaded > high {
				t.Fatalf("round %d: log %s marked uploaded to %d, above the acked %d", round, log, rl.Uploaded, high)
			}
			// Contiguous from the mark on, every acked SQN present, each once.
			for i, c := range rl.Changes {
				if want := rl.Uploaded + 1 + uint64(i); c.SQN != want || string(c.Value) != string(value(log, c.SQN, crashVLen)) {
					t.Fatalf("round %d: log %s change %d has SQN %d, want %d (or a wrong value)", round, log, i, c.SQN, want)
				}
			}
			if n := len(rl.Changes); rl.Uploaded+uint64(n) < high {
				t.Fatalf("round %d: log %s recovered up to %d, acked %d", round, log, rl.Uploaded+uint64(n), high)
			}
			if string(rl.Meta) != "meta-"+log {
				t.Fatalf("round %d: log %s meta %q", round, log, rl.Meta)
			}
			total += len(rl.Changes)
		}
		t.Logf("round %d: %d acks, %d logs, %d changes recovered, %d records in %d files, torn tail %d bytes",
			round, acks, len(acked), total, rec.Records, rec.Files, rec.TruncatedBytes)
		mustClose(t, l)
	}
	if len(acked) == 0 {
		t.Fatal("the child never acknowledged anything")
	}
}
