package posture

import (
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Tracker applies each check's hysteresis across samples: a check starts
// passing, fails after FailAfter failing samples in a row, and recovers
// after RecoverAfter passing samples in a row. It is pure state; the agent
// feeds it one sample at a time.
type Tracker struct {
	state map[string]*streak
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
	keep := make(map[string]*streak, len(checks))
	for _, c := range checks {
		s := t.state[c.ID]
		if s == nil {
			s = &streak{}
		}
		keep[c.ID] = s
		r := Judge(c, f)
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
