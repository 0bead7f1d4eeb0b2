package dstl_test

import (
	"context"
	"fmt"
	"os"
	"strconv"

	dstl "github.com/dstl-dev/dstl/sdk/go"
	"github.com/dstl-dev/dstl/sdk/go/embedded"
)

// A counter service: it counts events per key in a ValueState, checkpoints,
// and after a restart of the embedded node on the same directory the counts
// are still there.
func ExampleValueState_counter() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "dstl-counter-*")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)

	// run starts the node, counts events, checkpoints and shuts down.
	run := func(events ...string) {
		node, err := embedded.Open(ctx, embedded.Options{Dir: dir})
		if err != nil {
			panic(err)
		}
		defer node.Close(ctx)
		c := node.Client()
		if _, err := c.EnsureStream(ctx, "counter", 16); err != nil {
			panic(err)
		}
		// Opens from the newest complete checkpoint.
		w, err := c.OpenWriter(ctx, "counter", dstl.WriterOptions{})
		if err != nil {
			panic(err)
		}
		counts := dstl.NewValueState(w, "count", dstl.JSON[int]())
		for _, key := range events {
			n, _, err := counts.Get(ctx, key) // flushes pending writes first
			if err != nil {
				panic(err)
			}
			if err := counts.Set(ctx, key, n+1); err != nil {
				panic(err)
			}
		}
		if _, err := w.Checkpoint(ctx, w.FromCheckpoint()+1, nil); err != nil {
			panic(err)
		}
		for i, key := range []string{"apple", "banana", "cherry"} {
			n, _, err := counts.Get(ctx, key)
			if err != nil {
				panic(err)
			}
			if i > 0 {
				fmt.Print(" ")
			}
			fmt.Printf("%s=%d", key, n)
		}
		fmt.Println()
		if err := w.Close(ctx); err != nil {
			panic(err)
		}
	}
	run("apple", "banana", "apple")
	run("cherry", "apple") // a restarted node: the counts survived
	// Output:
	// apple=2 banana=1 cherry=0
	// apple=3 banana=1 cherry=1
}

// A dedup operator: it forwards each id of its input once, remembering the
// ids it has seen in a ValueState. It checkpoints with the input offset as
// metadata; after a crash it reopens its writer from that checkpoint,
// reads the offset back from RestoredMetadata and resumes there. What the
// crashed attempt did after the checkpoint is not part of the restored
// state, so nothing is counted twice.
func Example_dedup() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "dstl-dedup-*")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	node, err := embedded.Open(ctx, embedded.Options{Dir: dir})
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	c := node.Client()
	if _, err := c.CreateStream(ctx, "dedup", 0); err != nil {
		panic(err)
	}

	input := []string{"a", "b", "a", "c", "b", "d", "a", "e", "d"}

	// process handles input[from:to] and returns how many ids it forwarded.
	process := func(w *dstl.Writer, from, to int) int {
		seen := dstl.NewValueState(w, "seen", dstl.JSON[bool]())
		total := dstl.NewValueState(w, "total", dstl.JSON[int]())
		forwarded := 0
		for _, id := range input[from:to] {
			if dup, _, err := seen.Get(ctx, id); err != nil {
				panic(err)
			} else if dup {
				continue
			}
			n, _, err := total.Get(ctx, "unique")
			if err != nil {
				panic(err)
			}
			if err := seen.Set(ctx, id, true); err != nil {
				panic(err)
			}
			if err := total.Set(ctx, "unique", n+1); err != nil {
				panic(err)
			}
			forwarded++
		}
		return forwarded
	}

	// First attempt: process 5 ids, checkpoint at offset 5, process 2
	// more, crash.
	w1, err := c.OpenWriter(ctx, "dedup", dstl.WriterOptions{})
	if err != nil {
		panic(err)
	}
	fmt.Println("forwarded before checkpoint:", process(w1, 0, 5))
	if _, err := w1.Checkpoint(ctx, 1, []byte("5")); err != nil {
		panic(err)
	}
	fmt.Println("forwarded before crash:", process(w1, 5, 7))
	w1.Abort() // crash: no close, no checkpoint

	// Recovery: a new writer from checkpoint 1 fences the crashed one.
	w2, err := c.OpenWriter(ctx, "dedup", dstl.WriterOptions{FromCheckpoint: 1})
	if err != nil {
		panic(err)
	}
	offset, err := strconv.Atoi(string(w2.RestoredMetadata()[0]))
	if err != nil {
		panic(err)
	}
	fmt.Println("restored offset:", offset)
	fmt.Println("forwarded after restart:", process(w2, offset, len(input)))
	total, _, err := dstl.NewValueState(w2, "total", dstl.JSON[int]()).Get(ctx, "unique")
	if err != nil {
		panic(err)
	}
	fmt.Println("unique ids:", total)
	if err := w2.Close(ctx); err != nil {
		panic(err)
	}
	// Output:
	// forwarded before checkpoint: 3
	// forwarded before crash: 1
	// restored offset: 5
	// forwarded after restart: 2
	// unique ids: 5
}
