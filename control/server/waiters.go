package server

import (
	"sync"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

// waiters wakes held long-polls by what a change concerns, so a change
// wakes only the polls it may answer: an order for one device wakes that
// device's poll (and the gateways', which enforce every order), not the
// fleet's. Each concern is a channel closed and forgotten when it fires;
// a poll takes its channels before it looks at the store, so a change
// that lands between the look and the wait still wakes it.
type waiters struct {
	mu       sync.Mutex
	devices  map[string]chan struct{}
	classes  map[string]chan struct{}
	gateways chan struct{}
	all      chan struct{}
}

// wake is the channels one poll waits on; a nil one never fires.
type wake struct {
	device, class, gateways, all <-chan struct{}
}

func newWaiters() *waiters {
	return &waiters{devices: map[string]chan struct{}{}, classes: map[string]chan struct{}{}}
}

// wait returns the channels closed at the next change concerning the
// device id of class, or the gateways when gateway is set, or everyone.
func (w *waiters) wait(id, class string, gateway bool) wake {
	w.mu.Lock()
	defer w.mu.Unlock()
	k := wake{device: entry(w.devices, id), class: entry(w.classes, class), all: lazy(&w.all)}
	if gateway {
		k.gateways = lazy(&w.gateways)
	}
	return k
}

func entry(m map[string]chan struct{}, k string) chan struct{} {
	c, ok := m[k]
	if !ok {
		c = make(chan struct{})
		m[k] = c
	}
	return c
}

func lazy(c *chan struct{}) chan struct{} {
	if *c == nil {
		*c = make(chan struct{})
	}
	return *c
}

func fire(c *chan struct{}) {
	if *c != nil {
		close(*c)
		*c = nil
	}
}

func fireKey(m map[string]chan struct{}, k string) {
	if c, ok := m[k]; ok {
		close(c)
		delete(m, k)
	}
}

// everyone wakes every poll: a trust-root rotation, which every device
// takes.
func (w *waiters) everyone() {
	w.mu.Lock()
	defer w.mu.Unlock()
	fire(&w.all)
}

// roster wakes the gateways, and the device whose enrolment changed
// (a revoked one's poll ends).
func (w *waiters) roster(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	fire(&w.gateways)
	fireKey(w.devices, id)
}

// bundle wakes the devices a bundle is for.
func (w *waiters) bundle(t bundle.Target) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.targets(t.Classes, t.Devices)
}

// order wakes the devices an order names and every gateway.
func (w *waiters) order(t command.Target) {
	w.mu.Lock()
	defer w.mu.Unlock()
	fire(&w.gateways)
	if t.All {
		fire(&w.all)
		return
	}
	w.targets(t.Classes, t.Devices)
}

func (w *waiters) targets(classes, devices []string) {
	for _, c := range classes {
		fireKey(w.classes, c)
	}
	for _, d := range devices {
		fireKey(w.devices, d)
	}
}
