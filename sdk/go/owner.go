package dstl

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"connectrpc.com/connect"

	dstlv1 "github.com/dstl-dev/dstl/api/dstl/v1/dstlv1"
)

// MaxOwnerRedirects bounds how many NotOwner answers OpenWriter follows
// before it gives up with ErrNotOwner. One is enough when the nodes' views
// agree; more cover a membership change in flight.
const MaxOwnerRedirects = 3

// notOwnerOf returns the NotOwner detail of err, if it has one: the
// answer of a node that does not own the writer (docs/cluster.md,
// "Ownership").
func notOwnerOf(err error) (*dstlv1.NotOwner, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return nil, false
	}
	for _, d := range ce.Details() {
		v, derr := d.Value()
		if derr != nil {
			continue
		}
		if no, ok := v.(*dstlv1.NotOwner); ok {
			return no, true
		}
	}
	return nil, false
}

// node returns a client of the cluster member at rawURL with c's options:
// c itself for c's own URL, else one cached on c (Close closes it). It
// shares c's HTTP client, unless c made its own transport and rawURL has
// another scheme (then it makes one of its own for that scheme).
func (c *Client) node(rawURL string) (*Client, error) {
	u := strings.TrimRight(rawURL, "/")
	if u == c.baseURL {
		return c, nil
	}
	c.nodesMu.Lock()
	defer c.nodesMu.Unlock()
	if n, ok := c.nodes[u]; ok {
		return n, nil
	}
	o := c.opts
	if c.transport != nil && !strings.HasPrefix(u, c.scheme+"://") {
		o.httpClient = nil // c's transport speaks the other scheme
	}
	n, err := dial(u, o)
	if err != nil {
		return nil, err
	}
	if c.nodes == nil {
		c.nodes = map[string]*Client{}
	}
	c.nodes[u] = n
	return n, nil
}

// openWriter sends req to c's node and follows NotOwner answers to the
// owner, at most MaxOwnerRedirects times. It returns the answer and the
// client of the node that opened the writer, which serves all the
// writer's calls.
func (c *Client) openWriter(ctx context.Context, req *dstlv1.OpenWriterRequest) (*dstlv1.OpenWriterResponse, *Client, error) {
	target := c
	path := []string{c.baseURL}
	for redirects := 0; ; redirects++ {
		// A retried open after a lost answer opens one more epoch, which
		// only fences the orphaned one: safe.
		res, err := call(ctx, target, "OpenWriter", false, target.writers.OpenWriter, req)
		if err == nil {
			return res, target, nil
		}
		no, ok := notOwnerOf(err)
		if !ok {
			return nil, nil, err
		}
		switch {
		case c.gate != nil:
			// An in-process client reaches only its own node (an embedded
			// node has no cluster, so this does not happen there).
			return nil, nil, notOwnerErr(err, "an in-process client cannot follow the owner")
		case no.GetOwnerRpc() == "":
			return nil, nil, notOwnerErr(err, fmt.Sprintf("owner %s has no RPC URL", no.GetOwnerNode()))
		case redirects >= MaxOwnerRedirects:
			return nil, nil, notOwnerErr(err, fmt.Sprintf("still not the owner after %d redirects (%s): the nodes' membership views disagree",
				redirects, strings.Join(path, " -> ")))
		}
		next, derr := c.node(no.GetOwnerRpc())
		if derr != nil {
			return nil, nil, notOwnerErr(err, fmt.Sprintf("cannot dial owner %s: %v", no.GetOwnerNode(), derr))
		}
		target = next
		path = append(path, target.baseURL)
	}
}

// notOwnerErr is err (an *Error of a NotOwner answer) matching ErrNotOwner
// too, its message prefixed with why it was not followed.
func notOwnerErr(err error, why string) error {
	var e *Error
	if !errors.As(err, &e) {
		return fmt.Errorf("%s: %w", why, errors.Join(err, ErrNotOwner))
	}
	c := *e
	c.also = ErrNotOwner
	c.Message = why + ": " + e.Message
	return &c
}
