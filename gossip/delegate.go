package gossip

import (
	"sync"

	"github.com/hashicorp/memberlist"
)

// metaDelegate is the memberlist Delegate: it hands memberlist this node's
// encoded metadata. dstl sends no user messages over gossip (yet).
type metaDelegate struct {
	mu      sync.Mutex
	meta    wireMeta
	encoded []byte
}

var _ memberlist.Delegate = (*metaDelegate)(nil)

// update changes the metadata under the lock (validated: it must encode
// within MaxMetaSize, else nothing changes).
func (d *metaDelegate) update(f func(*wireMeta)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.meta
	f(&w)
	b, err := encodeMeta(w)
	if err != nil {
		return err
	}
	d.meta, d.encoded = w, b
	return nil
}

func (d *metaDelegate) get() wireMeta {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.meta
}

// NodeMeta returns a copy of the encoded metadata (≤ MaxMetaSize, which
// is memberlist's limit: set refuses more).
func (d *metaDelegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.encoded) > limit {
		return nil // not reached: limit is memberlist.MetaMaxSize = MaxMetaSize
	}
	return append([]byte(nil), d.encoded...)
}

func (d *metaDelegate) NotifyMsg([]byte)                       {}
func (d *metaDelegate) GetBroadcasts(int, int) [][]byte        { return nil }
func (d *metaDelegate) LocalState(bool) []byte                 { return nil }
func (d *metaDelegate) MergeRemoteState(buf []byte, join bool) {}
