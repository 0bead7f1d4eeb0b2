package changelog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/dstl-dev/dstl/internal/envelope"
	"github.com/dstl-dev/dstl/upload"
)

// Stream definitions live at catalog/<name>, apart from the streams/ tree,
// so that listing streams reads only definitions.
const catalogPrefix = "catalog/"

const streamConfigKind = "stream-config"

func catalogKey(name string) string { return catalogPrefix + name }

// createStream records a new stream's definition create-only: of two
// racing creators of one name exactly one succeeds.
func createStream(ctx context.Context, store upload.BlobStore, cfg StreamConfig) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	data, err := envelope.Seal(streamConfigKind, cfg)
	if err != nil {
		return fmt.Errorf("stream %s: %w", cfg.Name, err)
	}
	for attempt := range maxCreateAttempts {
		err = tryCreateStream(ctx, store, cfg, data, attempt > 0)
		if err == nil || !upload.IsTransient(err) || ctx.Err() != nil {
			break
		}
	}
	if err != nil && !errors.Is(err, ErrStreamExists) && !errors.Is(err, ErrStreamBusy) {
		return fmt.Errorf("stream %s: create: %w", cfg.Name, err)
	}
	return err
}

// tryCreateStream makes one attempt at creating a stream. retry says an
// earlier attempt failed in a way that may hide a put that landed.
func tryCreateStream(ctx context.Context, store upload.BlobStore, cfg StreamConfig, data []byte, retry bool) error {
	// An existing stream is ALREADY_EXISTS, whatever objects it has; only
	// for a missing definition do leftover objects mean an unfinished delete.
	old, err := getStream(ctx, store, cfg.Name)
	switch {
	case err == nil && retry && old == cfg:
		return nil // an earlier attempt landed without its acknowledgement
	case err == nil:
		return fmt.Errorf("stream %s: %w", cfg.Name, ErrStreamExists)
	case !errors.Is(err, ErrStreamNotFound):
		return err
	}
	if err := checkNoLeftovers(ctx, store, cfg.Name); err != nil {
		return err
	}
	err = store.PutIfAbsent(ctx, catalogKey(cfg.Name), bytes.NewReader(data), int64(len(data)))
	if errors.Is(err, upload.ErrAlreadyExists) {
		// A racing creator won, or an earlier attempt of ours whose put
		// failed landed after all (late): the incarnation nonce tells.
		old, gerr := getStream(ctx, store, cfg.Name)
		switch {
		case gerr != nil:
			return gerr
		case old == cfg:
			return nil
		}
		return fmt.Errorf("stream %s: %w", cfg.Name, ErrStreamExists)
	}
	return err
}

// maxCreateAttempts bounds the retries of a stream creation on transient
// errors (the S3 SDK retries underneath as well).
const maxCreateAttempts = 5

// getStream reads a stream's definition.
func getStream(ctx context.Context, store upload.BlobStore, name string) (StreamConfig, error) {
	if err := ValidateStreamName(name); err != nil {
		return StreamConfig{}, err
	}
	data, err := readAll(ctx, store, catalogKey(name))
	if errors.Is(err, upload.ErrNotFound) {
		return StreamConfig{}, fmt.Errorf("stream %s: %w", name, ErrStreamNotFound)
	}
	if err != nil {
		return StreamConfig{}, fmt.Errorf("stream %s: read definition: %w", name, err)
	}
	var cfg StreamConfig
	if err := envelope.Open(catalogKey(name), data, streamConfigKind, &cfg); err != nil {
		return StreamConfig{}, fmt.Errorf("stream %s: %w", name, err)
	}
	if cfg.Name != name {
		return StreamConfig{}, fmt.Errorf("stream %s: definition names %q: %w", name, cfg.Name, envelope.ErrCorrupt)
	}
	if err := cfg.Validate(); err != nil {
		return StreamConfig{}, fmt.Errorf("stream %s: stored definition: %v: %w", name, err, envelope.ErrCorrupt)
	}
	return cfg, nil
}

// listStreams returns the names of every stream, in order.
func listStreams(ctx context.Context, store upload.BlobStore) ([]string, error) {
	var names []string
	for o, err := range upload.Walk(ctx, store, catalogPrefix, "") {
		if err != nil {
			return nil, fmt.Errorf("list streams: %w", err)
		}
		names = append(names, strings.TrimPrefix(o.Key, catalogPrefix))
	}
	return names, nil
}
