package dstl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

func roundTrip[T any](t *testing.T, c Codec[T], v T, eq func(a, b T) bool) {
	t.Helper()
	b, err := c.Encode(v)
	if err != nil {
		t.Fatalf("encode %v: %v", v, err)
	}
	got, err := c.Decode(b)
	if err != nil {
		t.Fatalf("decode %x: %v", b, err)
	}
	if !eq(got, v) {
		t.Fatalf("round trip of %v gave %v", v, got)
	}
}

func TestCodecs(t *testing.T) {
	type point struct{ X, Y int }
	roundTrip(t, JSON[point](), point{1, -2}, func(a, b point) bool { return a == b })
	roundTrip(t, JSON[map[string]int](), map[string]int{"a": 1}, func(a, b map[string]int) bool { return fmt.Sprint(a) == fmt.Sprint(b) })
	roundTrip(t, String(), "héllo\x00", func(a, b string) bool { return a == b })
	roundTrip(t, Bytes(), []byte{0, 1, 255}, bytes.Equal)
	roundTrip(t, Proto[*dstlv1.Stream](), &dstlv1.Stream{Name: "s", KeyGroups: 7, CreatedAtMs: 42},
		func(a, b *dstlv1.Stream) bool {
			return a.GetName() == b.GetName() && a.GetKeyGroups() == b.GetKeyGroups() && a.GetCreatedAtMs() == b.GetCreatedAtMs()
		})

	if _, err := JSON[int]().Decode([]byte("not json")); err == nil {
		t.Fatal("JSON decoded garbage")
	}
	if _, err := Proto[*dstlv1.Stream]().Decode([]byte{0xff, 0xff}); err == nil {
		t.Fatal("Proto decoded garbage")
	}
	// Bytes().Decode copies: the caller may reuse the buffer.
	in := []byte("abc")
	out, _ := Bytes().Decode(in)
	in[0] = 'x'
	if string(out) != "abc" {
		t.Fatal("Bytes().Decode aliases its input")
	}
	// Defaults: raw for string and []byte, JSON otherwise.
	if b, _ := defaultCodec[string]().Encode("x"); string(b) != "x" {
		t.Fatalf("default string codec encoded %q", b)
	}
	if b, _ := defaultCodec[[]byte]().Encode([]byte("x")); string(b) != "x" {
		t.Fatalf("default []byte codec encoded %q", b)
	}
	if b, _ := defaultCodec[int]().Encode(5); string(b) != "5" {
		t.Fatalf("default int codec encoded %q", b)
	}
}

func TestCompositeKey(t *testing.T) {
	cases := []struct {
		user string
		key  []byte
	}{{"", nil}, {"a", []byte("bc")}, {"ab", []byte("c")}, {strings.Repeat("u", 300), []byte{0, 1}}}
	seen := map[string]bool{}
	for _, c := range cases {
		b := CompositeKey(c.user, c.key)
		if seen[string(b)] {
			t.Fatalf("CompositeKey(%q, %q) collides", c.user, c.key)
		}
		seen[string(b)] = true
		u, k, err := SplitCompositeKey(b)
		if err != nil || u != c.user || !bytes.Equal(k, c.key) {
			t.Fatalf("split %x = %q %q %v, want %q %q", b, u, k, err, c.user, c.key)
		}
		if !bytes.HasPrefix(b, CompositeKey(c.user, nil)) {
			t.Fatalf("CompositeKey(%q, nil) is not a prefix of its entries", c.user)
		}
	}
	// "a"+"bc" and "ab"+"c" must not share the prefix of either user key.
	if bytes.HasPrefix(CompositeKey("ab", []byte("c")), CompositeKey("a", nil)) {
		t.Fatal("the prefix of user key a matches an entry of user key ab")
	}
	for _, bad := range [][]byte{nil, {0x05, 'a'}, {0xff}} {
		if _, _, err := SplitCompositeKey(bad); err == nil {
			t.Fatalf("SplitCompositeKey(%x) accepted a malformed key", bad)
		}
	}
}

func TestListElements(t *testing.T) {
	var b []byte
	want := [][]byte{[]byte("one"), {}, bytes.Repeat([]byte{7}, 200)}
	for _, el := range want {
		b = AppendElement(b, el)
	}
	for i := range want {
		var el []byte
		var err error
		el, b, err = NextElement(b)
		if err != nil || !bytes.Equal(el, want[i]) {
			t.Fatalf("element %d = %x %v, want %x", i, el, err, want[i])
		}
	}
	if len(b) != 0 {
		t.Fatalf("%d bytes left", len(b))
	}
	if _, _, err := NextElement([]byte{0x03, 'a'}); err == nil {
		t.Fatal("NextElement accepted a truncated element")
	}
}

func TestErrorMapping(t *testing.T) {
	cases := []struct {
		code connect.Code
		want error
	}{
		{connect.CodeNotFound, ErrNotFound},
		{connect.CodeAlreadyExists, ErrAlreadyExists},
		{connect.CodeFailedPrecondition, ErrFenced},
		{connect.CodeInvalidArgument, ErrInvalidArgument},
		{connect.CodeUnavailable, ErrUnavailable},
		{connect.CodeResourceExhausted, ErrBackpressure},
		{connect.CodeDeadlineExceeded, context.DeadlineExceeded},
		{connect.CodeCanceled, context.Canceled},
	}
	all := []error{ErrNotFound, ErrAlreadyExists, ErrFenced, ErrInvalidArgument, ErrUnavailable, ErrBackpressure}
	for _, c := range cases {
		err := wrapErr("Op", connect.NewError(c.code, errors.New("the server's words")))
		if !errors.Is(err, c.want) {
			t.Errorf("%v: errors.Is(%v) = false", c.code, c.want)
		}
		for _, other := range all {
			if other != c.want && errors.Is(err, other) {
				t.Errorf("%v also matches %v", c.code, other)
			}
		}
		if !strings.Contains(err.Error(), "the server's words") {
			t.Errorf("%v: message lost: %v", c.code, err)
		}
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != c.code {
			t.Errorf("%v: does not unwrap to its *connect.Error", c.code)
		}
		var e *Error
		if !errors.As(fmt.Errorf("wrapped: %w", err), &e) || e.Code != c.code {
			t.Errorf("%v: *Error lost through wrapping", c.code)
		}
	}
	if errors.Is(wrapErr("Op", connect.NewError(connect.CodeInternal, errors.New("x"))), ErrUnavailable) {
		t.Error("INTERNAL matches ErrUnavailable")
	}
}

func TestRetryable(t *testing.T) {
	wire := func(c connect.Code) error { return connect.NewWireError(c, errors.New("x")) }
	local := func(c connect.Code) error { return connect.NewError(c, errors.New("x")) }
	for _, tc := range []struct {
		err        error
		idempotent bool
		answered   bool // in-process: the node's own answer
		want       bool
	}{
		{wire(connect.CodeUnavailable), false, false, true},
		{wire(connect.CodeResourceExhausted), false, false, true},
		{local(connect.CodeUnavailable), false, false, false}, // broken connection: maybe applied
		{local(connect.CodeUnavailable), true, false, true},
		{local(connect.CodeResourceExhausted), false, true, true}, // in-process: refused as a whole
		{local(connect.CodeDeadlineExceeded), false, true, false},
		{wire(connect.CodeDeadlineExceeded), false, false, false},
		{wire(connect.CodeDeadlineExceeded), true, false, true},
		{wire(connect.CodeFailedPrecondition), true, false, false},
		{wire(connect.CodeInternal), true, false, false},
		{errors.New("plain"), true, false, false},
	} {
		if got := retryable(tc.err, tc.idempotent, tc.answered); got != tc.want {
			t.Errorf("retryable(%v, idempotent=%v, answered=%v) = %v", tc.err, tc.idempotent, tc.answered, got)
		}
	}
}

func TestBackoff(t *testing.T) {
	for attempt := range 10 {
		ceil := min(50*time.Millisecond<<attempt, time.Second)
		for range 100 {
			d := backoff(50*time.Millisecond, time.Second, attempt)
			if d < ceil/2 || d > ceil {
				t.Fatalf("attempt %d: backoff %v outside [%v, %v]", attempt, d, ceil/2, ceil)
			}
		}
	}
}

func TestDialURL(t *testing.T) {
	ctx := context.Background()
	for _, bad := range []string{"localhost:7600", "ftp://x", "http://", "::"} {
		if _, err := Dial(ctx, bad); err == nil {
			t.Errorf("Dial(%q) accepted a bad URL", bad)
		}
	}
	for _, good := range []string{"http://127.0.0.1:7600", "https://dstl.example:443/"} {
		c, err := Dial(ctx, good)
		if err != nil {
			t.Errorf("Dial(%q): %v", good, err)
			continue
		}
		c.Close()
	}
}
