package materializer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dstl-dev/dstl/changelog"
	"github.com/dstl-dev/dstl/internal/clock"
	"github.com/dstl-dev/dstl/upload"
)

// A round lease protects the files of one materializer round from every
// materializer's CollectFiles while the round uploads them, however long
// that takes (a large base export on a slow link outlasts GCGrace).
//
// A round names its files <SnapshotFilePrefix><round>-<name>, round being
// "<checkpoint>-<nonce>". Before it uploads the first one it stores a lease
// object <SnapshotLeasePrefix><round>.<seq>.<ttl ms> and stores a new one
// (seq+1) every ttl/3 while it runs: objects are create-only, so a
// refresh is a new object. CollectFiles (any materializer, whatever its own
// configuration: the ttl is in the key) keeps every file of a round that
// has a lease younger than its ttl (by the blob store's ModTime), and
// deletes expired leases.
//
// Invariant (brief invariant 5, with the changelog's publication check):
// a round publishes only while its protection holds: before
// validUntil - ttl/4 (validUntil is when the newest lease whose write was
// confirmed started, plus ttl; the quarter is the allowance for clock skew
// between this node, the blob store and other collectors), and the
// publication itself must finish by then. A round whose refreshes failed
// for that long does not publish (ErrLeaseLapsed). The changelog then
// Stats every file before it writes the record, and again before any log
// is truncated below it, so even a record that lands late (a write whose
// outcome was unknown) is never relied on if a file is gone.
//
// The same machinery keeps a lazily opened Store's file references
// (sst-refs, see refs.go): a lease whose body also lists the files the
// store still reads from the blob store (files returns them at each
// renewal).
type roundLease struct {
	blob  upload.BlobStore
	clock clock.Clock
	ttl   time.Duration
	base  string // <SnapshotLeasePrefix><round>. or <SnapshotRefPrefix><holder>.
	log   *slog.Logger
	// files, if set, lists the files the lease protects (written into
	// each lease object's body).
	files func() []string
	// failed, if set, is told of each failed refresh (it is not fatal by
	// itself: the owner checks validUntil where it matters), and renewed
	// of each successful one. They run on the refresh goroutine and must
	// not wait for anything that waits for release.
	failed  func(error)
	renewed func()

	// renewMu serializes renewals with the deletion of the leases they
	// supersede, so a renewal in flight is never the only lease deleted.
	renewMu    sync.Mutex
	mu         sync.Mutex
	seq        int
	keys       []string  // every lease written (or maybe written), oldest first
	validUntil time.Time // start of the newest confirmed lease write + ttl

	stop context.CancelFunc
	done chan struct{}
}

// roundName names a round's files and leases.
func roundName(checkpoint uint64, nonce string) string {
	return fmt.Sprintf("%020d-%s", checkpoint, nonce)
}

// roundOfFile returns the round a snapshot-file key belongs to
// (<prefix><checkpoint>-<nonce>-<name>).
func roundOfFile(stream, inc, key string) (string, bool) {
	rest, ok := strings.CutPrefix(key, changelog.SnapshotFilePrefix(stream, inc))
	if !ok {
		return "", false
	}
	cp, tail, ok := strings.Cut(rest, "-")
	if !ok {
		return "", false
	}
	nonce, _, ok := strings.Cut(tail, "-")
	if !ok || cp == "" || nonce == "" {
		return "", false
	}
	return cp + "-" + nonce, true
}

// parseLeaseKey splits <SnapshotLeasePrefix><round>.<seq>.<ttl ms>.
func parseLeaseKey(stream, inc, key string) (round string, ttl time.Duration, ok bool) {
	return parseLeaseKeyUnder(changelog.SnapshotLeasePrefix(stream, inc), key)
}

// parseLeaseKeyUnder splits <prefix><holder>.<seq>.<ttl ms>.
func parseLeaseKeyUnder(prefix, key string) (holder string, ttl time.Duration, ok bool) {
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return "", 0, false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 3 || parts[0] == "" {
		return "", 0, false
	}
	if _, err := strconv.ParseUint(parts[1], 10, 64); err != nil {
		return "", 0, false
	}
	ms, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil || ms <= 0 {
		return "", 0, false
	}
	return parts[0], time.Duration(ms) * time.Millisecond, true
}

// startLease stores the round's first lease (it must be confirmed before
// any file is uploaded) and starts refreshing it until release.
func (m *Materializer) startLease(ctx context.Context, stream, inc, round string) (*roundLease, error) {
	l := &roundLease{
		blob:  m.blob,
		clock: m.cfg.Clock,
		ttl:   m.cfg.RoundLease,
		base:  changelog.SnapshotLeasePrefix(stream, inc) + round + ".",
		log:   m.cfg.Logger,
	}
	if err := l.start(ctx); err != nil {
		return nil, fmt.Errorf("stream %s: %w", stream, err)
	}
	return l, nil
}

// start stores the first lease (confirmed) and starts the refreshes, which
// run until release.
func (l *roundLease) start(ctx context.Context) error {
	l.done = make(chan struct{})
	if err := l.renew(ctx); err != nil {
		l.deleteAll(ctx)
		return err
	}
	lctx, stop := context.WithCancel(ctx)
	l.stop = stop
	go l.refresh(lctx)
	return nil
}

// leaseBody is the JSON body of a lease object. Files is set only for a
// store's file references (sst-refs).
type leaseBody struct {
	TTLMs     int64     `json:"ttl_ms"`
	CreatedAt time.Time `json:"created_at"`
	Files     []string  `json:"files,omitempty"`
}

// renew stores the next lease object. A write whose outcome is unknown is
// resolved by a Stat; only a confirmed lease extends validUntil.
func (l *roundLease) renew(ctx context.Context) error {
	l.mu.Lock()
	l.seq++
	key := fmt.Sprintf("%s%010d.%d", l.base, l.seq, l.ttl.Milliseconds())
	l.keys = append(l.keys, key)
	l.mu.Unlock()
	start := l.clock.Now()
	lb := leaseBody{TTLMs: l.ttl.Milliseconds(), CreatedAt: start.UTC()}
	if l.files != nil {
		lb.Files = l.files()
	}
	body, err := json.Marshal(lb)
	if err != nil {
		return err
	}
	if err := l.blob.PutIfAbsent(ctx, key, bytes.NewReader(body), int64(len(body))); err != nil {
		if _, serr := l.blob.Stat(ctx, key); serr != nil {
			return fmt.Errorf("round lease %s: %w", key, errors.Join(err, serr))
		}
	}
	l.mu.Lock()
	// The store stamps the object no earlier than start: protection lasts
	// at least until start + ttl.
	l.validUntil = start.Add(l.ttl)
	l.mu.Unlock()
	return nil
}

// refresh renews the lease every ttl/3 and deletes the leases the new one
// supersedes. It is owned by the round: release stops it.
func (l *roundLease) refresh(ctx context.Context) {
	defer close(l.done)
	for {
		if err := clock.Sleep(ctx, l.clock, l.ttl/3); err != nil {
			return
		}
		if err := l.renewNow(ctx); err != nil {
			if ctx.Err() == nil {
				// Not fatal by itself: the round checks validUntil before
				// it publishes.
				if l.failed != nil {
					l.failed(err)
				} else {
					l.log.Warn("materializer: lease refresh failed", "lease", l.base, "err", err)
				}
			}
			continue
		}
		if l.renewed != nil {
			l.renewed()
		}
	}
}

// renewNow stores the next lease and, once it is confirmed, deletes the
// ones it supersedes.
func (l *roundLease) renewNow(ctx context.Context) error {
	l.renewMu.Lock()
	defer l.renewMu.Unlock()
	if err := l.renew(ctx); err != nil {
		return err
	}
	l.mu.Lock()
	old := l.keys[:len(l.keys)-1]
	l.keys = l.keys[len(l.keys)-1:]
	l.mu.Unlock()
	for _, k := range old {
		// A lease left behind expires and CollectFiles deletes it.
		_ = l.blob.Delete(ctx, k)
	}
	return nil
}

// publishWithin is how long the round may still take to publish: until
// its protection ends less the clock-skew allowance (≤ 0: lapsed).
func (l *roundLease) publishWithin() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.validUntil.Add(-l.ttl / 4).Sub(l.clock.Now())
}

// release stops the refreshes and deletes the round's leases: after a
// publication its files are referenced by the record, after a failure they
// are garbage. A lease whose deletion fails expires and is collected.
func (l *roundLease) release(ctx context.Context) {
	l.stop()
	<-l.done
	l.deleteAll(ctx)
}

func (l *roundLease) deleteAll(ctx context.Context) {
	// Also when the round's context ended (shutdown): bounded, detached.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseDeleteTimeout)
	defer cancel()
	l.mu.Lock()
	keys := l.keys
	l.keys = nil
	l.mu.Unlock()
	for _, k := range keys {
		if err := l.blob.Delete(ctx, k); err != nil {
			l.log.Info("materializer: round lease not deleted; it is collected once expired", "lease", k, "err", err)
		}
	}
}

const leaseDeleteTimeout = 10 * time.Second

// liveRounds lists the stream's round leases: the rounds with a lease
// younger than its ttl, and the expired leases (to delete).
func (m *Materializer) liveRounds(ctx context.Context, stream, inc string, now time.Time) (live map[string]bool, expired []upload.ObjectInfo, err error) {
	live = map[string]bool{}
	for o, err := range upload.Walk(ctx, m.blob, changelog.SnapshotLeasePrefix(stream, inc), "") {
		if err != nil {
			return nil, nil, fmt.Errorf("stream %s: list round leases: %w", stream, err)
		}
		round, ttl, ok := parseLeaseKey(stream, inc, o.Key)
		if !ok {
			continue // not a lease this code writes: leave it alone
		}
		if now.Sub(o.ModTime) < ttl {
			live[round] = true
		} else {
			expired = append(expired, o)
		}
	}
	return live, expired, nil
}
