package gossip

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestMetaRoundTrip(t *testing.T) {
	for _, m := range []Meta{
		{},
		{RPC: "http://127.0.0.1:7600", Zone: "eu-west-1a", Load: 42},
		{RPC: "https://node-7.dstl.internal:7600", Zone: "zone ü", Load: 1<<64 - 1},
	} {
		for _, leaving := range []bool{false, true} {
			w := wireMeta{Meta: m, Incarnation: 1_700_000_000_000, Leaving: leaving}
			b, err := encodeMeta(w)
			if err != nil {
				t.Fatalf("encode %+v: %v", w, err)
			}
			got, err := decodeMeta(b)
			if err != nil || got != w {
				t.Fatalf("round trip of %+v: %+v %v", w, got, err)
			}
		}
	}
}

func TestMetaLimits(t *testing.T) {
	if _, err := encodeMeta(wireMeta{Meta: Meta{RPC: strings.Repeat("x", MaxMetaSize)}}); !errors.Is(err, ErrMeta) {
		t.Fatalf("oversized metadata: %v", err)
	}
	if _, err := encodeMeta(wireMeta{Meta: Meta{Zone: "\xff"}}); !errors.Is(err, ErrMeta) {
		t.Fatalf("non-UTF-8 zone: %v", err)
	}
	// The largest that fits.
	b, err := encodeMeta(wireMeta{Meta: Meta{RPC: strings.Repeat("x", 400), Zone: strings.Repeat("z", 80), Load: 1<<64 - 1}, Incarnation: 1<<64 - 1, Leaving: true})
	if err != nil || len(b) > MaxMetaSize {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
}

// A newer version's appended fields are ignored; version 1 must be exact.
func TestMetaVersions(t *testing.T) {
	b, _ := encodeMeta(wireMeta{Meta: Meta{RPC: "http://a:1", Zone: "z", Load: 3}, Incarnation: 9})
	newer := append(bytes.Clone(b), 0x05, 0x01) // a future field
	newer[0] = 2
	newer[len(b)-1] = 0x03 // leaving, and a future flag
	w, err := decodeMeta(newer)
	if err != nil || w.RPC != "http://a:1" || w.Zone != "z" || w.Load != 3 || w.Incarnation != 9 || !w.Leaving {
		t.Fatalf("version 2: %+v %v", w, err)
	}
	if _, err := decodeMeta(append(bytes.Clone(b), 0)); !errors.Is(err, ErrMeta) {
		t.Fatalf("trailing byte in version 1: %v", err)
	}
	zero := bytes.Clone(b)
	zero[0] = 0
	if _, err := decodeMeta(zero); !errors.Is(err, ErrMeta) {
		t.Fatalf("version 0: %v", err)
	}
	for i := range len(b) {
		if _, err := decodeMeta(b[:i]); !errors.Is(err, ErrMeta) {
			t.Fatalf("truncated to %d bytes: %v", i, err)
		}
	}
}

// FuzzDecodeMeta: any bytes decode to metadata or an ErrMeta, never a
// panic, and what decodes re-encodes to an equivalent value.
func FuzzDecodeMeta(f *testing.F) {
	for _, m := range []Meta{{}, {RPC: "http://127.0.0.1:7600", Zone: "a", Load: 7}, {RPC: strings.Repeat("r", 300)}} {
		b, err := encodeMeta(wireMeta{Meta: m, Incarnation: 1234})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{0})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte{2, 0, 0, 0, 0, 1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		w, err := decodeMeta(b)
		if err != nil {
			if !errors.Is(err, ErrMeta) {
				t.Fatalf("error not ErrMeta: %v", err)
			}
			return
		}
		again, err := encodeMeta(w)
		if err != nil {
			t.Fatalf("decoded %+v does not encode: %v", w, err)
		}
		w2, err := decodeMeta(again)
		if err != nil || w2 != w {
			t.Fatalf("re-encoding changed %+v into %+v (%v)", w, w2, err)
		}
	})
}
