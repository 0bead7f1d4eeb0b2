package dstl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dstl-dev/dstl/changelog/keygroup"
)

// Typed keyed state. Every state type writes through a Writer and reads
// from the node's StateService. Reads flush the writer's buffered changes
// first, so a read always sees every write made before it through the
// same Writer (read-your-writes); the node serves the writer's view: the
// checkpoint it started from plus everything it appended. Every key of a
// state lives in the key group of its user key, so all state of one key
// (values, map entries, list elements) moves together on rescale.

// ValueState is one value of type T per key, stored under state name.
type ValueState[T any] struct {
	w     *Writer
	name  string
	codec Codec[T]
}

// NewValueState returns the value state name of w's stream. A nil codec
// means JSON (raw bytes for string and []byte).
func NewValueState[T any](w *Writer, name string, codec Codec[T]) *ValueState[T] {
	if codec == nil {
		codec = defaultCodec[T]()
	}
	return &ValueState[T]{w: w, name: name, codec: codec}
}

// Get returns key's value and whether it is set.
func (s *ValueState[T]) Get(ctx context.Context, key string) (T, bool, error) {
	var zero T
	b, ok, err := s.w.getKG(ctx, s.name, []byte(key), s.kg(key))
	if err != nil || !ok {
		return zero, false, err
	}
	v, err := s.codec.Decode(b)
	if err != nil {
		return zero, false, fmt.Errorf("dstl: state %s key %q: decode: %w", s.name, key, err)
	}
	return v, true, nil
}

// Set sets key's value.
func (s *ValueState[T]) Set(ctx context.Context, key string, v T) error {
	b, err := s.codec.Encode(v)
	if err != nil {
		return fmt.Errorf("dstl: state %s key %q: encode: %w", s.name, key, err)
	}
	return s.w.Apply(ctx, Change{KeyGroup: s.kg(key), State: s.name, Op: OpPut, Key: []byte(key), Value: b})
}

// Delete removes key's value.
func (s *ValueState[T]) Delete(ctx context.Context, key string) error {
	return s.w.Apply(ctx, Change{KeyGroup: s.kg(key), State: s.name, Op: OpDelete, Key: []byte(key)})
}

func (s *ValueState[T]) kg(key string) int { return int(keygroup.OfString(key, s.w.kgCount)) }

// MapState is a map K → V per user key. Each entry is its own key of state
// name: CompositeKey(userKey, encoded map key), in the key group of userKey
// alone, so that Entries is one prefix scan of one key group.
type MapState[K comparable, V any] struct {
	w      *Writer
	name   string
	keys   Codec[K]
	values Codec[V]
}

// NewMapState returns the map state name of w's stream. Nil codecs mean
// the defaults (raw bytes for string and []byte, JSON otherwise). The key
// codec must be deterministic.
func NewMapState[K comparable, V any](w *Writer, name string, keys Codec[K], values Codec[V]) *MapState[K, V] {
	if keys == nil {
		keys = defaultCodec[K]()
	}
	if values == nil {
		values = defaultCodec[V]()
	}
	return &MapState[K, V]{w: w, name: name, keys: keys, values: values}
}

// CompositeKey is the stored key of map entry mapKey of userKey: the user
// key's length as a uvarint, the user key, then mapKey. The length prefix
// makes the encoding unambiguous and makes CompositeKey(userKey, nil) a
// prefix of exactly userKey's entries.
func CompositeKey(userKey string, mapKey []byte) []byte {
	b := make([]byte, 0, binary.MaxVarintLen64+len(userKey)+len(mapKey))
	b = binary.AppendUvarint(b, uint64(len(userKey)))
	b = append(b, userKey...)
	return append(b, mapKey...)
}

// errBadCompositeKey: a stored key that is not a composite key.
var errBadCompositeKey = errors.New("dstl: malformed composite key")

// SplitCompositeKey is the inverse of CompositeKey.
func SplitCompositeKey(b []byte) (userKey string, mapKey []byte, err error) {
	n, l := binary.Uvarint(b)
	if l <= 0 || n > uint64(len(b)-l) {
		return "", nil, errBadCompositeKey
	}
	b = b[l:]
	return string(b[:n]), b[n:], nil
}

func (s *MapState[K, V]) kg(userKey string) int {
	return int(keygroup.OfString(userKey, s.w.kgCount))
}

func (s *MapState[K, V]) key(userKey string, mapKey K) ([]byte, error) {
	mk, err := s.keys.Encode(mapKey)
	if err != nil {
		return nil, fmt.Errorf("dstl: map state %s key %q: encode map key: %w", s.name, userKey, err)
	}
	return CompositeKey(userKey, mk), nil
}

// Get returns the value of mapKey in userKey's map and whether it is set.
func (s *MapState[K, V]) Get(ctx context.Context, userKey string, mapKey K) (V, bool, error) {
	var zero V
	k, err := s.key(userKey, mapKey)
	if err != nil {
		return zero, false, err
	}
	b, ok, err := s.w.getKG(ctx, s.name, k, s.kg(userKey))
	if err != nil || !ok {
		return zero, false, err
	}
	v, err := s.values.Decode(b)
	if err != nil {
		return zero, false, fmt.Errorf("dstl: map state %s key %q: decode: %w", s.name, userKey, err)
	}
	return v, true, nil
}

// Put sets mapKey to v in userKey's map.
func (s *MapState[K, V]) Put(ctx context.Context, userKey string, mapKey K, v V) error {
	k, err := s.key(userKey, mapKey)
	if err != nil {
		return err
	}
	b, err := s.values.Encode(v)
	if err != nil {
		return fmt.Errorf("dstl: map state %s key %q: encode: %w", s.name, userKey, err)
	}
	return s.w.Apply(ctx, Change{KeyGroup: s.kg(userKey), State: s.name, Op: OpPut, Key: k, Value: b})
}

// Delete removes mapKey from userKey's map.
func (s *MapState[K, V]) Delete(ctx context.Context, userKey string, mapKey K) error {
	k, err := s.key(userKey, mapKey)
	if err != nil {
		return err
	}
	return s.w.Apply(ctx, Change{KeyGroup: s.kg(userKey), State: s.name, Op: OpDelete, Key: k})
}

// Entries returns userKey's whole map (one prefix scan of its key group).
func (s *MapState[K, V]) Entries(ctx context.Context, userKey string) (map[K]V, error) {
	kg := s.kg(userKey)
	out := map[K]V{}
	for kv, err := range s.w.Scan(ctx, s.name, CompositeKey(userKey, nil), &kg) {
		if err != nil {
			return nil, err
		}
		uk, mk, err := SplitCompositeKey(kv.Key)
		if err != nil || uk != userKey {
			return nil, fmt.Errorf("dstl: map state %s key %q: stored key %x: %w", s.name, userKey, kv.Key, errBadCompositeKey)
		}
		k, err := s.keys.Decode(mk)
		if err != nil {
			return nil, fmt.Errorf("dstl: map state %s key %q: decode map key: %w", s.name, userKey, err)
		}
		v, err := s.values.Decode(kv.Value)
		if err != nil {
			return nil, fmt.Errorf("dstl: map state %s key %q: decode: %w", s.name, userKey, err)
		}
		out[k] = v
	}
	return out, nil
}

// Clear removes every entry of userKey's map.
func (s *MapState[K, V]) Clear(ctx context.Context, userKey string) error {
	kg := s.kg(userKey)
	var keys [][]byte
	for kv, err := range s.w.Scan(ctx, s.name, CompositeKey(userKey, nil), &kg) {
		if err != nil {
			return err
		}
		keys = append(keys, kv.Key)
	}
	for _, k := range keys {
		if err := s.w.Apply(ctx, Change{KeyGroup: kg, State: s.name, Op: OpDelete, Key: k}); err != nil {
			return err
		}
	}
	return nil
}

// ListState is a list of T per key. Append is one OP_MERGE change carrying
// the element encoded and length-prefixed (a uvarint), so the stored value
// is the concatenation of every appended element: appends never read.
type ListState[T any] struct {
	w     *Writer
	name  string
	codec Codec[T]
}

// NewListState returns the list state name of w's stream. A nil codec
// means JSON (raw bytes for string and []byte).
func NewListState[T any](w *Writer, name string, codec Codec[T]) *ListState[T] {
	if codec == nil {
		codec = defaultCodec[T]()
	}
	return &ListState[T]{w: w, name: name, codec: codec}
}

func (s *ListState[T]) kg(key string) int { return int(keygroup.OfString(key, s.w.kgCount)) }

// Append adds v to the end of key's list.
func (s *ListState[T]) Append(ctx context.Context, key string, v T) error {
	b, err := s.codec.Encode(v)
	if err != nil {
		return fmt.Errorf("dstl: list state %s key %q: encode: %w", s.name, key, err)
	}
	return s.w.Apply(ctx, Change{KeyGroup: s.kg(key), State: s.name, Op: OpMerge, Key: []byte(key), Value: AppendElement(nil, b)})
}

// Get returns key's list (nil if empty).
func (s *ListState[T]) Get(ctx context.Context, key string) ([]T, error) {
	b, ok, err := s.w.getKG(ctx, s.name, []byte(key), s.kg(key))
	if err != nil || !ok {
		return nil, err
	}
	var out []T
	for len(b) > 0 {
		var el []byte
		if el, b, err = NextElement(b); err != nil {
			return nil, fmt.Errorf("dstl: list state %s key %q: %w", s.name, key, err)
		}
		v, err := s.codec.Decode(el)
		if err != nil {
			return nil, fmt.Errorf("dstl: list state %s key %q: decode element %d: %w", s.name, key, len(out), err)
		}
		out = append(out, v)
	}
	return out, nil
}

// Clear empties key's list.
func (s *ListState[T]) Clear(ctx context.Context, key string) error {
	return s.w.Apply(ctx, Change{KeyGroup: s.kg(key), State: s.name, Op: OpDelete, Key: []byte(key)})
}

// AppendElement appends el to b framed as a list element: its length as a
// uvarint, then its bytes.
func AppendElement(b, el []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(el)))
	return append(b, el...)
}

// errBadList: a stored list value that is not a sequence of elements.
var errBadList = errors.New("dstl: malformed list value")

// NextElement splits the first element off a list value.
func NextElement(b []byte) (el, rest []byte, err error) {
	n, l := binary.Uvarint(b)
	if l <= 0 || n > uint64(len(b)-l) {
		return nil, nil, errBadList
	}
	b = b[l:]
	return b[:n], b[n:], nil
}
