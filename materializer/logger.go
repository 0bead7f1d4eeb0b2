package materializer

import (
	"fmt"
	"log/slog"

	"github.com/cockroachdb/pebble/v2"
)

// SlogLogger sends Pebble's messages to log: its routine messages (WAL
// replay, compactions) at debug level, its errors at error level. Open
// uses slog.Default() when Options.Logger is nil.
func SlogLogger(log *slog.Logger) pebble.Logger { return slogLogger{log} }

type slogLogger struct{ log *slog.Logger }

func (l slogLogger) Infof(format string, args ...any) {
	l.log.Debug(fmt.Sprintf(format, args...))
}

func (l slogLogger) Errorf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...))
}

// Fatalf is called by Pebble on an unrecoverable internal error; Pebble
// expects it not to return.
func (l slogLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	l.log.Error(msg)
	panic("pebble: " + msg)
}
