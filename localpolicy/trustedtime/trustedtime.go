// Package trustedtime owns the device's idea of "now" for policy decisions.
//
// Sources of time, and what each may do:
//   - Ops-signed times (a bundle's, an ops-signed command's, a trust-root
//     rotation's issue time) raise the floor: the device can trust it is
//     at least that late. Each is bounded by its own check: a bundle or
//     command issued more than the allowed skew after the device's time
//     is refused, so one signed time moves the floor at most that far past
//     "now".
//   - The monotonic clock carries the floor forward while the agent runs:
//     elapsed time is the device's own stopwatch, which nothing on the
//     network can push.
//   - The wall clock moves "now" forward when it is ahead of the carried
//     floor, but is never persisted. Anyone on the site network can push
//     it (an unauthenticated NTP answer); while it is a year ahead the
//     device believes it (its bundle looks expired: it goes offline, which
//     opens nothing), and once it is corrected nothing of it remains.
//   - Control's time moves nothing here. A compromised control server
//     may only tighten; its time is compared with the wall clock by the
//     clock-skew check, and dates the last contact, never the floor.
//
// A wall clock set back cannot revive an expired bundle: "now" never goes
// below the floor, which is persisted and only rises.
package trustedtime

import "time"

// Clock gives trusted time. It is not safe for concurrent use; the agent's
// event loop owns it.
type Clock struct {
	wall  func() time.Time
	mono  func() time.Duration // time elapsed on a clock nothing can set
	floor time.Time            // latest ops-signed (or persisted) instant
	at    time.Duration        // mono() when floor was set
}

// New starts a clock from the persisted floor. wall is the wall clock
// (time.Now in production); the floor is carried forward by Go's
// monotonic clock, which setting the wall clock does not move.
func New(floor time.Time, wall func() time.Time) *Clock {
	start := time.Now()
	return NewWithMonotonic(floor, wall, func() time.Duration { return time.Since(start) })
}

// NewWithMonotonic is New with the monotonic clock given: mono reports
// the time elapsed since any fixed instant (tests set both clocks).
func NewWithMonotonic(floor time.Time, wall func() time.Time, mono func() time.Duration) *Clock {
	return &Clock{wall: wall, mono: mono, floor: floor, at: mono()}
}

// Now is the later of the wall clock and the floor carried forward by the
// monotonic time elapsed since it was set. It never goes below the floor.
func (c *Clock) Now() time.Time {
	now := c.Floor()
	if w := c.wall(); w.After(now) {
		now = w
	}
	return now
}

// Observe raises the floor to t, an ops-signed time, if t is later than
// Now, and reports whether it did; the caller persists Floor when it
// changes. Nothing unsigned may be observed: not the wall clock, not
// control's time.
func (c *Clock) Observe(t time.Time) bool {
	if !t.After(c.Now()) {
		return false
	}
	c.floor, c.at = t, c.mono()
	return true
}

// Floor is the value to persist: the floor carried forward by the
// monotonic clock, without the wall clock, so a restart with the clock set
// back starts no earlier than this instant, and a wall clock pushed ahead
// leaves nothing behind.
func (c *Clock) Floor() time.Time {
	if elapsed := c.mono() - c.at; elapsed > 0 {
		return c.floor.Add(elapsed)
	}
	return c.floor
}
