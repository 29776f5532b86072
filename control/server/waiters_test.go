package server

import (
	"testing"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

func fired(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func woke(k wake) bool {
	return fired(k.device) || fired(k.class) || fired(k.gateways) || fired(k.all)
}

// A change wakes the polls it concerns and no other: an order for one
// device wakes that device and the gateways, a class's bundle that
// class, a roster change the gateways and the device it is about, and a
// trust-root rotation everyone.
func TestChangesWakeOnlyThePollsTheyConcern(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*waiters)
		want   []string // which of a1, a2, b1, gw wake
	}{
		{"order for one device", func(w *waiters) { w.order(command.Target{Devices: []string{"a1"}}) }, []string{"a1", "gw"}},
		{"order for a class", func(w *waiters) { w.order(command.Target{Classes: []string{"scanner"}}) }, []string{"a1", "a2", "gw"}},
		{"order for all", func(w *waiters) { w.order(command.Target{All: true}) }, []string{"a1", "a2", "b1", "gw"}},
		{"bundle for a class", func(w *waiters) { w.bundle(bundle.Target{Classes: []string{"telematics"}}) }, []string{"b1"}},
		{"bundle for a device", func(w *waiters) { w.bundle(bundle.Target{Devices: []string{"a2"}}) }, []string{"a2"}},
		{"roster change", func(w *waiters) { w.roster("b1") }, []string{"b1", "gw"}},
		{"trust-root rotation", func(w *waiters) { w.everyone() }, []string{"a1", "a2", "b1", "gw"}},
	} {
		w := newWaiters()
		polls := map[string]wake{
			"a1": w.wait("a1", "scanner", false), "a2": w.wait("a2", "scanner", false),
			"b1": w.wait("b1", "telematics", false), "gw": w.wait("gw", "segment-gateway", true),
		}
		tc.change(w)
		for _, name := range []string{"a1", "a2", "b1", "gw"} {
			want := false
			for _, n := range tc.want {
				want = want || n == name
			}
			if got := woke(polls[name]); got != want {
				t.Errorf("%s: poll %s woken %v, want %v", tc.name, name, got, want)
			}
		}
		// Once fired, a concern is new for the next wait: nothing stale
		// wakes a poll that came after the change.
		if woke(w.wait("a1", "scanner", false)) {
			t.Errorf("%s: a fresh wait is already woken", tc.name)
		}
	}
}
