package avatarforcing

import (
	"bytes"
	"container/list"
	"sync"
)

// avatarCacheSize is how many registered images a Client keeps for re-registration.
const avatarCacheSize = 64

// avatarCache keeps the images the Client registered, by avatar id, least recently used out
// first, so that a session naming an avatar a replica does not know can register it there.
type avatarCache struct {
	mu    sync.Mutex
	max   int
	order *list.List               // of *avatarEntry, most recently used first
	byID  map[string]*list.Element // avatar id -> element of order
}

type avatarEntry struct {
	id, name string
	image    []byte
}

func newAvatarCache(n int) *avatarCache {
	return &avatarCache{max: n, order: list.New(), byID: map[string]*list.Element{}}
}

func (a *avatarCache) put(id string, image []byte, name string) {
	if id == "" || len(image) == 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if e, ok := a.byID[id]; ok {
		ent := e.Value.(*avatarEntry)
		ent.image, ent.name = bytes.Clone(image), name
		a.order.MoveToFront(e)
		return
	}
	a.byID[id] = a.order.PushFront(&avatarEntry{id: id, name: name, image: bytes.Clone(image)})
	for a.order.Len() > a.max {
		last := a.order.Back()
		delete(a.byID, last.Value.(*avatarEntry).id)
		a.order.Remove(last)
	}
}

// get returns the image and name registered under id, if still kept.
func (a *avatarCache) get(id string) (image []byte, name string, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.byID[id]
	if !ok {
		return nil, "", false
	}
	a.order.MoveToFront(e)
	ent := e.Value.(*avatarEntry)
	return ent.image, ent.name, true
}

func (a *avatarCache) len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.order.Len()
}
