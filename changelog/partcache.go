package changelog

import (
	"container/list"
	"sync"
)

// partCache is a least-recently-used cache of checkpoint parts bounded by
// their estimated in-memory size (issue 9 S3: it used to keep every part
// ever read). Parts are immutable, so a cached part is never stale; an
// evicted one is read again from the blob store.
type partCache struct {
	mu    sync.Mutex
	limit int64
	size  int64
	order *list.List // front: most recently used; values are *partEntry
	byKey map[string]*list.Element
}

type partEntry struct {
	key  string
	part Part
	size int64
}

func newPartCache(limit int64) *partCache {
	return &partCache{limit: limit, order: list.New(), byKey: map[string]*list.Element{}}
}

// partSize estimates the memory a cached part holds.
func partSize(key string, p Part) int64 {
	size := int64(256 + len(key) + len(p.Stream) + len(p.LogID) + len(p.Metadata))
	for _, s := range p.Segments {
		size += int64(64 + len(s.Key) + 32*len(s.Blocks))
	}
	return size
}

func (c *partCache) get(key string) (Part, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.byKey[key]
	if !ok {
		return Part{}, false
	}
	c.order.MoveToFront(e)
	return e.Value.(*partEntry).part, true
}

// add caches p unless it alone exceeds the bound, evicting the least
// recently used parts to stay within it.
func (c *partCache) add(key string, p Part) {
	size := partSize(key, p)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.byKey[key]; ok || size > c.limit {
		return
	}
	c.byKey[key] = c.order.PushFront(&partEntry{key: key, part: p, size: size})
	c.size += size
	for c.size > c.limit {
		c.removeLocked(c.order.Back())
	}
}

func (c *partCache) removeLocked(e *list.Element) {
	pe := e.Value.(*partEntry)
	c.order.Remove(e)
	delete(c.byKey, pe.key)
	c.size -= pe.size
}

// dropStream forgets every part of a stream (it was deleted).
func (c *partCache) dropStream(stream string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.byKey {
		if e.Value.(*partEntry).part.Stream == stream {
			c.removeLocked(e)
		}
	}
}

// stats returns the number of cached parts and their estimated size.
func (c *partCache) stats() (n int, bytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.byKey), c.size
}
