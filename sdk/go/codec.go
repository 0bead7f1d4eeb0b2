package dstl

import (
	"encoding/json"
	"fmt"

	"google.golang.org/protobuf/proto"
)

// Codec turns values of T into bytes and back. Codecs must be
// deterministic when used for map keys (equal keys, equal bytes).
type Codec[T any] interface {
	Encode(v T) ([]byte, error)
	Decode(b []byte) (T, error)
}

type jsonCodec[T any] struct{}

// JSON encodes values with encoding/json. It is the default codec.
func JSON[T any]() Codec[T] { return jsonCodec[T]{} }

func (jsonCodec[T]) Encode(v T) ([]byte, error) { return json.Marshal(v) }

func (jsonCodec[T]) Decode(b []byte) (T, error) {
	var v T
	err := json.Unmarshal(b, &v)
	return v, err
}

type protoCodec[T proto.Message] struct{}

// Proto encodes protobuf messages in their binary wire format
// (deterministic marshalling, so messages may serve as map keys). T is a
// generated message pointer type, e.g. Proto[*pb.Event]().
func Proto[T proto.Message]() Codec[T] { return protoCodec[T]{} }

func (protoCodec[T]) Encode(v T) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(v)
}

func (protoCodec[T]) Decode(b []byte) (T, error) {
	var zero T
	m, ok := zero.ProtoReflect().Type().New().Interface().(T)
	if !ok {
		return zero, fmt.Errorf("dstl: proto codec: cannot make a %T", zero)
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return zero, err
	}
	return m, nil
}

type bytesCodec struct{}

// Bytes stores byte slices as they are.
func Bytes() Codec[[]byte] { return bytesCodec{} }

func (bytesCodec) Encode(v []byte) ([]byte, error) { return v, nil }
func (bytesCodec) Decode(b []byte) ([]byte, error) { return append([]byte(nil), b...), nil }

type stringCodec struct{}

// String stores strings as their raw bytes.
func String() Codec[string] { return stringCodec{} }

func (stringCodec) Encode(v string) ([]byte, error) { return []byte(v), nil }
func (stringCodec) Decode(b []byte) (string, error) { return string(b), nil }

// defaultCodec returns the raw codec for string and []byte, JSON otherwise.
func defaultCodec[T any]() Codec[T] {
	var zero T
	switch any(zero).(type) {
	case string:
		return any(String()).(Codec[T])
	case []byte:
		return any(Bytes()).(Codec[T])
	}
	return JSON[T]()
}
