package trustedtime

import (
	"testing"
	"time"
)

type fakeWall struct{ t time.Time }

func (f *fakeWall) now() time.Time { return f.t }

func TestClockSetBackwards(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	w := &fakeWall{start}
	c := New(start, w.now)

	w.t = start.Add(time.Hour)
	if got := c.Now(); !got.Equal(start.Add(time.Hour)) {
		t.Fatalf("Now = %v, want wall time %v", got, w.t)
	}
	// Someone sets the clock back ten days: trusted time must not follow.
	w.t = start.Add(-10 * 24 * time.Hour)
	if got := c.Now(); got.Before(start) {
		t.Fatalf("Now = %v after the clock was set back, want no earlier than %v", got, start)
	}
}

func TestRestartWithClockSetBack(t *testing.T) {
	persisted := time.Date(2026, 12, 20, 0, 0, 0, 0, time.UTC)
	w := &fakeWall{time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	c := New(persisted, w.now)
	if got := c.Now(); got.Before(persisted) {
		t.Fatalf("Now = %v, want no earlier than the persisted floor %v", got, persisted)
	}
}

func TestMonotonicCarriesTheFloor(t *testing.T) {
	floor := time.Now().Add(24 * time.Hour) // a trusted time ahead of this machine's clock
	c := New(floor, time.Now)
	time.Sleep(10 * time.Millisecond)
	if got := c.Now(); !got.After(floor) {
		t.Fatalf("Now = %v, want the floor %v advanced by elapsed monotonic time", got, floor)
	}
}

func TestObserve(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	w := &fakeWall{start}
	c := New(start, w.now)
	if c.Observe(start.Add(-time.Minute)) {
		t.Error("Observe(earlier) raised the floor")
	}
	if !c.Observe(start.Add(time.Hour)) {
		t.Error("Observe(later) did not raise the floor")
	}
	if got := c.Now(); !got.Equal(start.Add(time.Hour)) {
		t.Errorf("Now = %v, want %v", got, start.Add(time.Hour))
	}
}
