package dstl

import (
	"encoding/binary"
)

// readCache is a Writer's cache of the values of its own key groups, so
// that a read of a key the writer wrote or read before is answered in the
// client, without flushing or asking the node.
//
// Why it is correct: a writer's key groups change only through the writer
// (a newer writer of any of them fences it), so the state of a key is the
// value the writer last gave it, or the node's value if the writer never
// touched it since the node answered. Every change added to the writer
// updates the cache in the order of the writer's changes (under Writer.mu):
//
//   - Put and Delete set the entry (Delete to "absent");
//   - Merge on a cached entry appends to it (as the node does); on a key not
//     cached, the result is unknown here;
//   - Clear drops every entry of the state in the key group: the node's
//     answer for them is unknown until the clear is sent.
//
// Each unknown (a merge of an uncached key, a clear, and the eviction of an
// entry whose change may not be acknowledged yet) raises the writer's
// unsureUpTo to the change's index: a read that misses the cache must
// flush at least up to it before asking the node (Writer.getKG), and a
// value read from the node is cached only if no change touched the key
// meanwhile (the entry is still absent and unsureUpTo did not move).
//
// The cache is bounded in bytes (least recently used out first). A cached
// value's bytes are never modified: reads return copies.
type readCache struct {
	max, size int
	entries   map[string]*cacheEntry
	head      cacheEntry // sentinel of the LRU list: head.next is the newest
	kbuf      []byte     // lookups build their key here (no allocation)
}

type cacheEntry struct {
	key        string
	value      []byte
	found      bool
	added      uint64 // index of the newest change that set it; 0: read from the node
	kg         int
	state      string
	prev, next *cacheEntry
}

// cacheEntryOverhead approximates what an entry costs beyond its key and
// value: the map slot, the entry and its list links.
const cacheEntryOverhead = 128

func newReadCache(maxBytes int) *readCache {
	c := &readCache{max: maxBytes, entries: map[string]*cacheEntry{}}
	c.head.prev, c.head.next = &c.head, &c.head
	return c
}

// keyOf encodes (kg, state, key) unambiguously into c.kbuf.
func (c *readCache) keyOf(kg int, state string, key []byte) []byte {
	b := binary.AppendUvarint(c.kbuf[:0], uint64(kg))
	b = binary.AppendUvarint(b, uint64(len(state)))
	b = append(b, state...)
	b = append(b, key...)
	c.kbuf = b
	return b
}

// get returns the entry of key, or nil, and marks it recently used.
func (c *readCache) get(kg int, state string, key []byte) *cacheEntry {
	e := c.entries[string(c.keyOf(kg, state, key))]
	if e != nil {
		c.unlink(e)
		c.pushFront(e)
	}
	return e
}

// set stores key's value (found=false: absent) as of change index added
// (0: read from the node), and returns the highest change index of the
// entries it evicted (0: none).
func (c *readCache) set(kg int, state string, key, value []byte, found bool, added uint64) (evicted uint64) {
	k := c.keyOf(kg, state, key)
	if e := c.entries[string(k)]; e != nil {
		c.size += len(value) - len(e.value)
		e.value, e.found, e.added = value, found, added
		c.unlink(e)
		c.pushFront(e)
	} else {
		e := &cacheEntry{key: string(k), value: value, found: found, added: added, kg: kg, state: state}
		c.entries[e.key] = e
		c.size += len(e.key) + len(value) + cacheEntryOverhead
		c.pushFront(e)
	}
	for c.size > c.max && c.head.prev != &c.head {
		old := c.head.prev
		evicted = max(evicted, old.added)
		c.remove(old)
	}
	return evicted
}

// clear drops every entry of state in key group kg.
func (c *readCache) clear(kg int, state string) {
	for _, e := range c.entries {
		if e.kg == kg && e.state == state {
			c.remove(e)
		}
	}
}

// reset drops everything.
func (c *readCache) reset() {
	clear(c.entries)
	c.size = 0
	c.head.prev, c.head.next = &c.head, &c.head
}

func (c *readCache) remove(e *cacheEntry) {
	c.unlink(e)
	delete(c.entries, e.key)
	c.size -= len(e.key) + len(e.value) + cacheEntryOverhead
}

func (c *readCache) unlink(e *cacheEntry) {
	e.prev.next, e.next.prev = e.next, e.prev
}

func (c *readCache) pushFront(e *cacheEntry) {
	e.prev, e.next = &c.head, c.head.next
	c.head.next.prev = e
	c.head.next = e
}
