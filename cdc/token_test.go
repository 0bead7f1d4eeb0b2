package cdc

import (
	"bytes"
	"errors"
	"testing"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

func TestTokenRoundTrip(t *testing.T) {
	for _, tok := range []Token{
		{Stream: "s", Incarnation: "i1", KeyGroups: keygroup.Range{Lo: 0, Hi: 127}, Form: FormUpsert},
		{Stream: "orders", Incarnation: "abc", KeyGroups: keygroup.Range{Lo: 3, Hi: 9}, Form: FormRetract, After: 7, Checkpoint: 9, Ordinal: 123456},
		{Stream: "orders", Incarnation: "abc", KeyGroups: keygroup.Range{Lo: 0, Hi: keygroup.Max - 1}, Form: FormRetract, Snapshot: true, Checkpoint: 1 << 60, Ordinal: 1},
	} {
		got, err := DecodeToken(tok.Encode())
		if err != nil || got != tok {
			t.Fatalf("DecodeToken(Encode(%+v)) = %+v, %v", tok, got, err)
		}
		got, err = ParseToken(tok.String())
		if err != nil || got != tok {
			t.Fatalf("ParseToken(String(%+v)) = %+v, %v", tok, got, err)
		}
	}
}

func TestTokenRejects(t *testing.T) {
	good := Token{Stream: "s", Incarnation: "i", KeyGroups: keygroup.Range{Hi: 3}, Form: FormUpsert, After: 1, Checkpoint: 2, Ordinal: 5}
	enc := good.Encode()
	flipped := bytes.Clone(enc)
	flipped[3] ^= 1
	cases := map[string][]byte{
		"empty":                 nil,
		"short":                 enc[:4],
		"truncated":             enc[:len(enc)-1],
		"corrupt":               flipped,
		"boundary with ordinal": Token{Stream: "s", Incarnation: "i", Form: FormUpsert, After: 1, Ordinal: 2}.Encode(),
		"checkpoint not after":  Token{Stream: "s", Incarnation: "i", Form: FormUpsert, After: 3, Checkpoint: 3}.Encode(),
		"no form":               Token{Stream: "s", Incarnation: "i"}.Encode(),
		"range reversed":        Token{Stream: "s", Incarnation: "i", Form: FormUpsert, KeyGroups: keygroup.Range{Lo: 5, Hi: 4}}.Encode(),
		"no stream":             Token{Incarnation: "i", Form: FormUpsert}.Encode(),
	}
	for name, b := range cases {
		if _, err := DecodeToken(b); !errors.Is(err, ErrBadToken) {
			t.Errorf("%s: err = %v, want ErrBadToken", name, err)
		}
	}
	if _, err := ParseToken("!!!"); !errors.Is(err, ErrBadToken) {
		t.Errorf("ParseToken(!!!) = %v", err)
	}
}

// FuzzDecodeToken: any bytes decode to a token that survives a round trip,
// or to ErrBadToken; never a panic.
func FuzzDecodeToken(f *testing.F) {
	f.Add(Token{Stream: "s", Incarnation: "i", Form: FormUpsert}.Encode())
	f.Add(Token{Stream: "orders", Incarnation: "x", KeyGroups: keygroup.Range{Lo: 1, Hi: 9}, Form: FormRetract, After: 4, Checkpoint: 5, Ordinal: 77}.Encode())
	f.Add(Token{Stream: "o", Incarnation: "x", Form: FormRetract, Snapshot: true, Checkpoint: 5, Ordinal: 1}.Encode())
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		tok, err := DecodeToken(b)
		if err != nil {
			if !errors.Is(err, ErrBadToken) {
				t.Fatalf("error %v does not wrap ErrBadToken", err)
			}
			return
		}
		if again, err := DecodeToken(tok.Encode()); err != nil || again != tok {
			t.Fatalf("decoded %+v does not survive a round trip: %+v, %v", tok, again, err)
		}
	})
}
