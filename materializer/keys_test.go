package materializer

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func mustKey(t testing.TB, stream string, kg uint16, state string, key []byte) []byte {
	t.Helper()
	k, err := AppendDataKey(nil, stream, kg, state, key)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestDataKeyBytes(t *testing.T) {
	for _, tc := range []struct {
		stream string
		kg     uint16
		state  string
		key    string
		want   []byte
	}{
		{"s", 0, "", "", []byte{0x01, 1, 's', 0, 0, 0, 0}},
		{"s", 0x0102, "st", "k", []byte{0x01, 1, 's', 0x01, 0x02, 0, 2, 's', 't', 'k'}},
		{"ab", 0xFFFF, "", "\x00\xff", []byte{0x01, 2, 'a', 'b', 0xFF, 0xFF, 0, 0, 0x00, 0xFF}},
	} {
		got := mustKey(t, tc.stream, tc.kg, tc.state, []byte(tc.key))
		if !bytes.Equal(got, tc.want) {
			t.Errorf("key(%q,%d,%q,%q) = %x, want %x", tc.stream, tc.kg, tc.state, tc.key, got, tc.want)
		}
		dk, err := DecodeDataKey(got)
		if err != nil || dk.Stream != tc.stream || dk.KeyGroup != tc.kg || dk.State != tc.state || string(dk.Key) != tc.key {
			t.Errorf("decode %x = %+v, %v", got, dk, err)
		}
	}
	ak, err := AppliedKey("s", "s/7")
	if err != nil || !bytes.Equal(ak, []byte{0x00, 0x01, 1, 's', 's', '/', '7'}) {
		t.Errorf("AppliedKey = %x, %v", ak, err)
	}
	if st, log, err := DecodeAppliedKey(ak); err != nil || st != "s" || log != "s/7" {
		t.Errorf("DecodeAppliedKey = %q %q %v", st, log, err)
	}
}

func TestKeyErrors(t *testing.T) {
	if _, err := AppendDataKey(nil, "", 0, "", nil); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("empty stream: %v", err)
	}
	if _, err := AppendDataKey(nil, strings.Repeat("x", 256), 0, "", nil); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("long stream: %v", err)
	}
	if _, err := AppendDataKey(nil, "s", 0, strings.Repeat("x", 65536), nil); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("long state: %v", err)
	}
	if _, _, err := KeyGroupRangeBounds("s", 5, 4); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("inverted range: %v", err)
	}
	if _, err := AppliedKey("s", ""); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("empty log: %v", err)
	}
	for _, k := range [][]byte{nil, {0x00}, {0x01}, {0x01, 0}, {0x01, 3, 'a'}, {0x01, 1, 'a', 0, 0, 0}, {0x01, 1, 'a', 0, 0, 0, 5, 'x'}} {
		if _, err := DecodeDataKey(k); !errors.Is(err, ErrCorrupt) {
			t.Errorf("DecodeDataKey(%x) = %v, want ErrCorrupt", k, err)
		}
	}
	for _, k := range [][]byte{nil, {0x00, 0x01}, {0x00, 0x02, 1, 's', 'l'}, {0x00, 0x01, 1, 's'}, {0x00, 0x01, 0, 'l'}} {
		if _, _, err := DecodeAppliedKey(k); !errors.Is(err, ErrCorrupt) {
			t.Errorf("DecodeAppliedKey(%x) = %v, want ErrCorrupt", k, err)
		}
	}
}

// TestKeyOrder: keys sort by (stream, key group, state, user key), where
// streams and states compare by (length, bytes); metadata sorts first.
func TestKeyOrder(t *testing.T) {
	type tuple struct {
		stream string
		kg     uint16
		state  string
		key    string
	}
	ordered := []tuple{
		{"b", 0, "", ""},
		{"b", 0, "", "a"},
		{"b", 0, "", "b"},
		{"b", 0, "z", ""},
		{"b", 0, "z", "\xff"},
		{"b", 0, "aa", ""},
		{"b", 1, "", ""},
		{"b", 256, "", ""},
		{"b", 0xFFFF, "zz", "zz"},
		{"c", 0, "", ""},
		{"aa", 0, "", ""},
	}
	meta, _ := AppliedKey("zzz", "log")
	prev := meta
	for _, tc := range ordered {
		k := mustKey(t, tc.stream, tc.kg, tc.state, []byte(tc.key))
		if bytes.Compare(prev, k) >= 0 {
			t.Errorf("%x (%+v) does not sort after %x", k, tc, prev)
		}
		prev = k
	}
}

// checkBounds checks that the bounds of (stream, lo..hi) hold the key of
// (stream, kg, state, key) exactly when kg is in lo..hi, and that the state
// and stream bounds hold it.
func checkBounds(t testing.TB, stream string, kg uint16, state string, key []byte, lo, hi uint16) {
	k := mustKey(t, stream, kg, state, key)
	in := func(start, end []byte) bool {
		return bytes.Compare(start, k) <= 0 && (end == nil || bytes.Compare(k, end) < 0)
	}
	start, end, err := KeyGroupRangeBounds(stream, lo, hi)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := in(start, end), lo <= kg && kg <= hi; got != want {
		t.Fatalf("key %x in range %d..%d bounds [%x,%x) = %v, want %v", k, lo, hi, start, end, got, want)
	}
	if start, end, _ := StateBounds(stream, kg, state, nil); !in(start, end) {
		t.Fatalf("key %x outside its state bounds", k)
	}
	if len(key) > 0 {
		if start, end, _ := StateBounds(stream, kg, state, key[:len(key)/2+1]); !in(start, end) {
			t.Fatalf("key %x outside its prefix bounds", k)
		}
	}
	if start, end, _ := StreamBounds(stream); !in(start, end) {
		t.Fatalf("key %x outside its stream bounds", k)
	}
	// Another stream's and another state's keys are outside.
	other := mustKey(t, stream+"x", kg, state, key)
	if start, end, _ := StreamBounds(stream); bytes.Compare(start, other) <= 0 && bytes.Compare(other, end) < 0 {
		t.Fatalf("key %x of another stream inside the bounds of %q", other, stream)
	}
	other = mustKey(t, stream, kg, state+"x", key)
	if start, end, _ := StateBounds(stream, kg, state, nil); bytes.Compare(start, other) <= 0 && bytes.Compare(other, end) < 0 {
		t.Fatalf("key %x of another state inside the bounds of %q", other, state)
	}
}

func TestKeyGroupRangeBoundsRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	kgs := []uint16{0, 1, 2, 127, 128, 255, 256, 32767, 32768, 0xFFFE, 0xFFFF}
	for range 20000 {
		kg := kgs[rng.IntN(len(kgs))]
		a, b := kgs[rng.IntN(len(kgs))], kgs[rng.IntN(len(kgs))]
		lo, hi := min(a, b), max(a, b)
		key := make([]byte, rng.IntN(4))
		for i := range key {
			key[i] = []byte{0, 1, 0xFE, 0xFF}[rng.IntN(4)]
		}
		state := []string{"", "s", "\xff", "\xff\xff"}[rng.IntN(4)]
		stream := []string{"a", "\xff", "ab"}[rng.IntN(3)]
		checkBounds(t, stream, kg, state, key, lo, hi)
	}
}

func TestKeyGroupRangeIsOneRange(t *testing.T) {
	// Every key of key groups 3..5 of "s", whatever its state and key,
	// lies in one contiguous range, and sorting keeps key groups apart.
	var keys [][]byte
	for kg := uint16(0); kg < 8; kg++ {
		for _, st := range []string{"", "a", "bb"} {
			for _, k := range []string{"", "\x00", "\xff\xff"} {
				keys = append(keys, mustKey(t, "s", kg, st, []byte(k)))
			}
		}
	}
	slices.SortFunc(keys, bytes.Compare)
	start, end, _ := KeyGroupRangeBounds("s", 3, 5)
	var inside []uint16
	for _, k := range keys {
		dk, _ := DecodeDataKey(k)
		if bytes.Compare(start, k) <= 0 && bytes.Compare(k, end) < 0 {
			inside = append(inside, dk.KeyGroup)
		}
	}
	if len(inside) != 27 || inside[0] != 3 || inside[26] != 5 || !slices.IsSorted(inside) {
		t.Fatalf("inside = %v", inside)
	}
}

func FuzzDataKey(f *testing.F) {
	f.Add("s", uint16(0), "", []byte(nil), uint16(0), uint16(0))
	f.Add("stream", uint16(0xFFFF), "\xff", []byte{0xFF, 0xFF}, uint16(5), uint16(0xFFFF))
	f.Add("a", uint16(7), "st", []byte("key"), uint16(0), uint16(6))
	f.Fuzz(func(t *testing.T, stream string, kg uint16, state string, key []byte, lo, hi uint16) {
		k, err := AppendDataKey(nil, stream, kg, state, key)
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		dk, err := DecodeDataKey(k)
		if err != nil || dk.Stream != stream || dk.KeyGroup != kg || dk.State != state || !bytes.Equal(dk.Key, key) {
			t.Fatalf("round trip of %x: %+v, %v", k, dk, err)
		}
		if lo > hi {
			lo, hi = hi, lo
		}
		if len(stream) < MaxStreamLen && len(state) < MaxStateLen {
			checkBounds(t, stream, kg, state, key, lo, hi)
		}
	})
}

func FuzzDecodeKey(f *testing.F) {
	f.Add([]byte{0x01, 1, 's', 0, 1, 0, 1, 'a', 'k'})
	f.Add([]byte{0x00, 0x01, 1, 's', 'l'})
	f.Add([]byte{0x01, 0xFF})
	f.Fuzz(func(t *testing.T, k []byte) {
		if dk, err := DecodeDataKey(k); err == nil {
			again := mustKey(t, dk.Stream, dk.KeyGroup, dk.State, dk.Key)
			if !bytes.Equal(again, k) {
				t.Fatalf("decode(%x) re-encodes as %x", k, again)
			}
		} else if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("decode(%x): %v", k, err)
		}
		if stream, log, err := DecodeAppliedKey(k); err == nil {
			again, aerr := AppliedKey(stream, log)
			if aerr != nil || !bytes.Equal(again, k) {
				t.Fatalf("applied key %x re-encodes as %x, %v", k, again, aerr)
			}
		}
	})
}
