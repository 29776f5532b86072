package trustedtime

import (
	"testing"
	"time"
)

// fakeWall is a wall clock the test sets; its monotonic clock stands
// still unless the test moves it.
type fakeWall struct {
	t       time.Time
	elapsed time.Duration
}

func (f *fakeWall) now() time.Time               { return f.t }
func (f *fakeWall) mono() time.Duration          { return f.elapsed }
func (f *fakeWall) clock(floor time.Time) *Clock { return NewWithMonotonic(floor, f.now, f.mono) }

func TestClockSetBackwards(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	w := &fakeWall{t: start}
	c := w.clock(start)

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
	w := &fakeWall{t: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	c := w.clock(persisted)
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
	w := &fakeWall{t: start}
	c := w.clock(start)
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

// A wall clock pushed a year ahead (an unauthenticated NTP answer) moves
// Now while it is wrong, but never the floor that is persisted: once the
// clock is corrected, a clock started from that floor is back to the
// real time.
func TestWallClockAheadIsNeverPersisted(t *testing.T) {
	start := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	w := &fakeWall{t: start}
	c := w.clock(start)
	w.t = start.Add(365 * 24 * time.Hour)
	if got := c.Now(); !got.Equal(w.t) {
		t.Fatalf("Now = %v, want the wall clock %v while it is ahead", got, w.t)
	}
	if got := c.Floor(); got.After(start.Add(time.Minute)) {
		t.Fatalf("Floor = %v with the wall clock a year ahead, want about %v", got, start)
	}
	w.t = start.Add(time.Hour) // corrected
	restarted := w.clock(c.Floor())
	if got := restarted.Now(); !got.Equal(w.t) {
		t.Fatalf("after the correction and a restart Now = %v, want %v", got, w.t)
	}
}
