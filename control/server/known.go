package server

import (
	"sync"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

// knownForget is how long a device record nobody asked for stays known:
// a device that moved to another replica, or went away, falls out within
// two of these.
const knownForget = 10 * time.Minute

// known keeps the records of the devices that call this replica, so a
// poll does not read the store to learn who is calling. Only what a
// device's enrolment says is used from it (class, role, binding,
// revocation); the desk reads the store. A record is forgotten when the
// device's enrolment changes, here (forget, at the write) or on another
// replica (forget, at its change in the feed), and all of them when the
// feed was lost (clear). A read that raced with a forget is not kept.
type known struct {
	db  store.Store
	now func() time.Time

	mu       sync.Mutex
	gen      uint64 // counts forgets
	cur, old map[string]controlapi.Device
	turned   time.Time // when cur became cur
}

func newKnown(db store.Store) *known {
	return &known{db: db, now: time.Now, cur: map[string]controlapi.Device{}, old: map[string]controlapi.Device{}}
}

// device is device id's record.
func (k *known) device(id string) (controlapi.Device, error) {
	k.mu.Lock()
	if t := k.now(); t.Sub(k.turned) > knownForget {
		// Records unused since the last turn are dropped.
		k.old, k.cur, k.turned = k.cur, map[string]controlapi.Device{}, t
	}
	dev, ok := k.cur[id]
	if !ok {
		if dev, ok = k.old[id]; ok {
			k.cur[id] = dev
		}
	}
	gen := k.gen
	k.mu.Unlock()
	if ok {
		return dev, nil
	}
	dev, err := k.db.Device(id)
	if err != nil {
		return dev, err
	}
	k.mu.Lock()
	if k.gen == gen {
		k.cur[id] = dev
	}
	k.mu.Unlock()
	return dev, nil
}

// forget drops device id's record.
func (k *known) forget(id string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.gen++
	delete(k.cur, id)
	delete(k.old, id)
}

// clear drops every record.
func (k *known) clear() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.gen++
	k.cur, k.old = map[string]controlapi.Device{}, map[string]controlapi.Device{}
}
