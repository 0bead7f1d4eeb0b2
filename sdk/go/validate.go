package dstl

import (
	"unicode/utf8"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// maxStreamNameLen is the server's limit (changelog.MaxStreamNameLen).
const maxStreamNameLen = 128

// validStream checks a stream name by the server's rule (1..128 characters
// of [A-Za-z0-9._-], not starting with '.' or '-'), so that a bad name is
// ErrInvalidArgument before anything is sent: a name that is not UTF-8
// could not even be marshalled (that failure would be INTERNAL).
func validStream(op, name string) error {
	if len(name) == 0 || len(name) > maxStreamNameLen {
		return invalid(op, "stream name %q: must be 1..%d characters", name, maxStreamNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' ||
			(i > 0 && (c == '.' || c == '-'))
		if !ok {
			return invalid(op, "stream name %q: character %q at %d: want [A-Za-z0-9._-], not leading '.' or '-'", name, c, i)
		}
	}
	return nil
}

// validName checks a state name (or another string the SDK sends): proto
// strings must be valid UTF-8.
func validName(op, what, s string) error {
	if !utf8.ValidString(s) {
		return invalid(op, "%s %q is not valid UTF-8", what, s)
	}
	return nil
}

// validRequest is the catch-all of call: every string field of req must be
// valid UTF-8, or marshalling would fail with INTERNAL. Append requests are
// not walked (Apply checked each change's state name already).
func validRequest(op string, req any) error {
	if _, ok := req.(*dstlv1.AppendRequest); ok {
		return nil
	}
	m, ok := req.(proto.Message)
	if !ok {
		return nil
	}
	return validStrings(op, m.ProtoReflect())
}

func validStrings(op string, m protoreflect.Message) error {
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Kind() == protoreflect.StringKind && !fd.IsList() && !fd.IsMap():
			err = validName(op, string(fd.Name()), v.String())
		case fd.Kind() == protoreflect.StringKind && fd.IsList():
			for i, l := 0, v.List(); i < l.Len() && err == nil; i++ {
				err = validName(op, string(fd.Name()), l.Get(i).String())
			}
		case fd.Kind() == protoreflect.MessageKind && !fd.IsList() && !fd.IsMap():
			err = validStrings(op, v.Message())
		case fd.Kind() == protoreflect.MessageKind && fd.IsList():
			for i, l := 0, v.List(); i < l.Len() && err == nil; i++ {
				err = validStrings(op, l.Get(i).Message())
			}
		}
		return err == nil
	})
	return err
}
