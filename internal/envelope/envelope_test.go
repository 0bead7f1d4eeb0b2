package envelope

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

type sample struct {
	Name  string            `json:"name"`
	N     uint64            `json:"n"`
	Attrs map[string]string `json:"attrs,omitempty"`
}

func TestRoundTrip(t *testing.T) {
	in := sample{Name: "orders", N: 42, Attrs: map[string]string{"a": "b"}}
	data, err := Seal("sample", in)
	if err != nil {
		t.Fatal(err)
	}
	var out sample
	if err := Open("obj", data, "sample", &out); err != nil {
		t.Fatal(err)
	}
	if out.Name != in.Name || out.N != in.N || out.Attrs["a"] != "b" {
		t.Fatalf("got %+v, want %+v", out, in)
	}
}

func TestWrongKind(t *testing.T) {
	data, err := Seal("sample", sample{})
	if err != nil {
		t.Fatal(err)
	}
	var out sample
	if err := Open("obj", data, "other", &out); !errors.Is(err, ErrWrongKind) {
		t.Fatalf("got %v, want ErrWrongKind", err)
	}
}

// Every flipped byte and every truncation must be reported as an error that
// names the object; none may decode.
func TestEveryByteFlipAndTruncation(t *testing.T) {
	data, err := Seal("sample", sample{Name: "x", N: 7})
	if err != nil {
		t.Fatal(err)
	}
	for i := range data {
		for _, mask := range []byte{0x01, 0x80, 0xff} {
			bad := bytes.Clone(data)
			bad[i] ^= mask
			var out sample
			err := Open("obj-7", bad, "sample", &out)
			if err == nil {
				t.Fatalf("flip byte %d mask %#x: no error", i, mask)
			}
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnknownVersion) {
				t.Fatalf("flip byte %d: %v is not ErrCorrupt", i, err)
			}
			if !strings.Contains(err.Error(), "obj-7") {
				t.Fatalf("flip byte %d: error %q does not name the object", i, err)
			}
		}
	}
	for n := range len(data) {
		var out sample
		if err := Open("obj-7", data[:n], "sample", &out); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d: got %v, want ErrCorrupt", n, err)
		}
	}
}

func FuzzUnseal(f *testing.F) {
	good, err := Seal("journal-entry", sample{Name: "orders", N: 1})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte("DSTE"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		kind, body, err := Unseal("fuzz", data)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnknownVersion) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		// Whatever unseals is exactly the framing of its kind and body.
		if again := frame(kind, body); !bytes.Equal(again, data) {
			t.Fatalf("reframed %x, want %x", again, data)
		}
		var s sample
		_ = Open("fuzz", data, kind, &s) // must not panic on any body
	})
}
