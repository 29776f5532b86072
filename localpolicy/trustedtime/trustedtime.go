// Package trustedtime owns the device's idea of "now" for policy decisions.
// The wall clock of a truck's box can be set backwards by anyone with a
// shell or a GPS spoofer; a clock set back must not revive an expired bundle.
// So "now" is never earlier than the latest time the device trusts (a signed
// issue time, control's signed time, or an instant it already acted on),
// carried forward by the monotonic clock between observations.
package trustedtime

import "time"

// Clock gives trusted time. It is not safe for concurrent use; the agent's
// event loop owns it.
type Clock struct {
	wall  func() time.Time
	floor time.Time // latest trusted instant
	at    time.Time // wall() reading, with its monotonic part, when floor was set
}

// New starts a clock from the persisted floor. wall is time.Now in
// production; readings carry Go's monotonic clock, which is what advances
// the floor between observations.
func New(floor time.Time, wall func() time.Time) *Clock {
	return &Clock{wall: wall, floor: floor, at: wall()}
}

// Now is the latest of the wall clock, the floor, and the floor advanced by
// the monotonic time elapsed since it was set. It never goes below the floor,
// even on a platform whose readings carry no monotonic clock.
func (c *Clock) Now() time.Time {
	w := c.wall()
	now := c.floor
	if carried := c.floor.Add(w.Sub(c.at)); carried.After(now) {
		now = carried
	}
	if w.After(now) {
		now = w
	}
	return now
}

// Observe raises the floor to t if t is later than Now, and reports whether
// it did; the caller persists the floor when it changes.
func (c *Clock) Observe(t time.Time) bool {
	if !t.After(c.Now()) {
		return false
	}
	c.floor, c.at = t, c.wall()
	return true
}

// Floor is the value to persist: Now, so that a restart with a clock set
// back still starts no earlier than this instant.
func (c *Clock) Floor() time.Time { return c.Now() }
