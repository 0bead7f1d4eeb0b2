package keygroup

import (
	"errors"
	"strconv"
	"testing"
)

// TestVectors pins the key → key-group mapping. These values are a contract
// with stored data and with clients in other languages: if this test fails,
// the change is wrong, not the vectors.
func TestVectors(t *testing.T) {
	// The first three derive from XXH64's published reference values:
	// XXH64("")=0xEF46DB3751D8E999, XXH64("a")=0xD24EC4F1A98C6E5B,
	// XXH64("hello world")=0x45AB6734B21E6968. The rest pin our outputs.
	for _, tc := range []struct {
		key  string
		n    int
		want uint16
	}{
		{"", 128, 0xEF46DB3751D8E999 % 128},
		{"a", 128, 0xD24EC4F1A98C6E5B % 128},
		{"hello world", 1000, 0x45AB6734B21E6968 % 1000},
		{"hello world", 128, 104},
		{"user:000123", 128, 85},
		{"user:000123", 32768, 18389},
		{"user:000123", 1, 0},
	} {
		if got := OfString(tc.key, tc.n); got != tc.want {
			t.Errorf("OfString(%q, %d) = %d, want %d", tc.key, tc.n, got, tc.want)
		}
		if got := Of([]byte(tc.key), tc.n); got != tc.want {
			t.Errorf("Of(%q, %d) = %d, want %d", tc.key, tc.n, got, tc.want)
		}
	}
}

// Keys spread evenly: no key group gets more than twice its share.
func TestSpread(t *testing.T) {
	const n, keys = 128, 128 * 1000
	var counts [n]int
	for i := range keys {
		counts[OfString("user:"+strconv.Itoa(i), n)]++
	}
	for g, c := range counts {
		if c < keys/n/2 || c > 2*keys/n {
			t.Errorf("key group %d has %d keys, expected about %d", g, c, keys/n)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, n := range []int{0, -1, Max + 1} {
		if err := ValidateCount(n); !errors.Is(err, ErrInvalidCount) {
			t.Errorf("ValidateCount(%d) = %v", n, err)
		}
	}
	for _, n := range []int{1, Default, Max} {
		if err := ValidateCount(n); err != nil {
			t.Errorf("ValidateCount(%d) = %v", n, err)
		}
	}
	if err := (Range{Lo: 5, Hi: 4}).Validate(128); !errors.Is(err, ErrInvalidRange) {
		t.Errorf("empty range: %v", err)
	}
	if err := (Range{Lo: 0, Hi: 128}).Validate(128); !errors.Is(err, ErrInvalidRange) {
		t.Errorf("range past the end: %v", err)
	}
	if err := Full(Max).Validate(Max); err != nil {
		t.Errorf("full range: %v", err)
	}
	a, b := Range{0, 63}, Range{64, 127}
	if a.Overlaps(b) || !a.Overlaps(Range{63, 70}) || !Full(128).Covers(b) || b.Covers(a) {
		t.Error("range relations wrong")
	}
}
