package avatarforcing

import (
	"fmt"
	"testing"
)

func TestAvatarCacheLRU(t *testing.T) {
	a := newAvatarCache(3)
	for i := 0; i < 3; i++ {
		a.put(fmt.Sprint("av", i), []byte{byte(i)}, "")
	}
	if _, _, ok := a.get("av0"); !ok { // av0 is now the most recently used
		t.Fatal("av0 missing")
	}
	a.put("av3", []byte{3}, "n3") // evicts av1, the least recently used
	if _, _, ok := a.get("av1"); ok {
		t.Error("av1 was kept beyond the bound")
	}
	for _, id := range []string{"av0", "av2", "av3"} {
		if _, _, ok := a.get(id); !ok {
			t.Errorf("%s missing", id)
		}
	}
	img := []byte{9}
	a.put("av3", img, "again")
	img[0] = 0 // the cache keeps its own copy
	if got, name, _ := a.get("av3"); got[0] != 9 || name != "again" || a.len() != 3 {
		t.Errorf("av3 = %v %q, len %d", got, name, a.len())
	}
	a.put("", []byte{1}, "")
	a.put("empty", nil, "")
	if a.len() != 3 {
		t.Errorf("empty ids or images were kept: len %d", a.len())
	}
}
