package posture

import (
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Tracker applies each check's hysteresis across samples: a check starts
// passing, fails after FailAfter failing samples in a row, and recovers
// after RecoverAfter passing samples in a row. It is pure state; the agent
// feeds it one sample at a time.
type Tracker struct {
	state map[string]*streak
	meter map[string][]reading // by segment, oldest first
}

// reading is a segment's tunnel counter at one sample.
type reading struct {
	at    time.Time
	total uint64
}

type streak struct {
	failing bool
	run     int // samples in a row that disagree with failing
}

// Observe judges checks on f and returns every check's state after this
// sample, in policy order, and the checks that changed state on it.
// Checks no longer in the policy are forgotten.
func (t *Tracker) Observe(checks []policy.Check, f *Facts) (all, changed []localpolicy.Check) {
	if t.state == nil {
		t.state = map[string]*streak{}
	}
	t.read(checks, f)
	keep := make(map[string]*streak, len(checks))
	for _, c := range checks {
		s := t.state[c.ID]
		if s == nil {
			s = &streak{}
		}
		keep[c.ID] = s
		r := t.judge(c, f)
		was := s.failing
		if r.Pass == !s.failing {
			s.run = 0 // agrees with the state it is in
		} else if s.run++; s.run >= need(c, s.failing) {
			s.failing, s.run = !s.failing, 0
		}
		lc := localpolicy.Check{ID: c.ID, Failing: s.failing, Profile: Profile(c), Observed: r.Observed, Expected: r.Expected}
		all = append(all, lc)
		if s.failing != was {
			changed = append(changed, lc)
		}
	}
	t.state = keep
	return all, changed
}

// judge decides c on f; a traffic check on the readings of its window.
func (t *Tracker) judge(c policy.Check, f *Facts) Result {
	l := c.Traffic
	if l == nil {
		return Judge(c, f)
	}
	if r, unread := unreadFor(c, f); unread {
		return r
	}
	rs := t.meter[l.Segment]
	if len(rs) == 0 {
		// Closed since before any reading: nothing has moved.
		return judgeTraffic(*l, 0, 0)
	}
	// The window's start is the latest reading at or before now-window,
	// or the oldest one while the samples cover less than the window.
	now, from := rs[len(rs)-1], rs[0]
	for _, r := range rs {
		if r.at.After(f.Time.Add(-time.Duration(l.Window))) {
			break
		}
		from = r
	}
	return judgeTraffic(*l, now.total-from.total, now.at.Sub(from.at))
}

// read adds f's tunnel counters to the readings of the segments traffic
// checks watch, and drops readings older than the longest window needs. A
// counter that went down (the peer was set up again) starts afresh; a
// closed segment reads as its last counter.
func (t *Tracker) read(checks []policy.Check, f *Facts) {
	windows := map[string]time.Duration{}
	for _, c := range checks {
		if c.Traffic != nil {
			windows[c.Traffic.Segment] = max(windows[c.Traffic.Segment], time.Duration(c.Traffic.Window))
		}
	}
	meter := make(map[string][]reading, len(windows))
	for seg, w := range windows {
		rs := t.meter[seg]
		total, open := f.Tunnel[seg]
		switch n := len(rs); {
		case !open && n == 0:
			continue
		case !open:
			// Closed (perhaps by this very check's profile): nothing
			// moves now, and what moved before stays in the window, so
			// a burst keeps the device in its profile until it has left.
			total = rs[n-1].total
		case n > 0 && rs[n-1].total > total:
			rs = nil
		}
		rs = append(rs, reading{f.Time, total})
		// Keep one reading at or before the window's start.
		for len(rs) > 1 && !rs[1].at.After(f.Time.Add(-w)) {
			rs = rs[1:]
		}
		meter[seg] = rs
	}
	t.meter = meter
}

// need is how many disagreeing samples in a row flip a check.
func need(c policy.Check, failing bool) int {
	n := c.FailAfter
	if failing {
		n = c.RecoverAfter
	}
	return max(n, 1)
}

// Profile is the mode a failing c imposes.
func Profile(c policy.Check) localpolicy.Mode {
	m, err := localpolicy.ParseMode(c.Profile)
	if c.Profile == "" || err != nil {
		return localpolicy.Restricted
	}
	return m
}
