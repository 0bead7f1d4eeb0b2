package changelog

import (
	"errors"
	"testing"

	"github.com/dstl-dev/dstl/internal/envelope"
)

// FuzzDecodeSubscription: any bytes decode to a record of the name its key
// says, or to an error wrapping one of envelope's sentinels; never a panic.
func FuzzDecodeSubscription(f *testing.F) {
	ns := streamNS{name: "s", incarnation: "0123456789abcdef01234567"}
	key := subscriptionKey(ns, "orders", 3)
	seal := func(rec SubscriptionRecord) []byte {
		data, err := envelope.Seal(subscriptionKind, rec)
		if err != nil {
			f.Fatal(err)
		}
		return data
	}
	valid := seal(SubscriptionRecord{Name: "orders", Token: []byte{1, 2, 3}, Hold: 7, CreatedAtMs: 1, UpdatedAtMs: 2, Nonce: "n"})
	f.Add(valid)
	f.Add(valid[:len(valid)/2])
	f.Add(seal(SubscriptionRecord{Name: "other", Nonce: "n"}))
	f.Add(seal(SubscriptionRecord{Name: "../x", Nonce: "n"}))
	f.Add([]byte("{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		rec, err := decodeSubscription(key, data)
		if err != nil {
			if !errors.Is(err, envelope.ErrCorrupt) && !errors.Is(err, envelope.ErrUnknownVersion) && !errors.Is(err, envelope.ErrWrongKind) {
				t.Fatalf("error %v wraps no envelope sentinel", err)
			}
			return
		}
		if rec.Name != "orders" || rec.Seq != 3 {
			t.Fatalf("decoded %+v from the record of orders #3", rec)
		}
	})
}
