package policy

import (
	"slices"
	"time"
)

// horizon is how many days ahead a schedule is searched for its next
// transition; a weekly schedule always has one within eight days.
const horizon = 8

// Active reports whether t falls inside one of the schedule's windows, and
// the next instant after t at which that may change (a window opening or
// closing). Windows are computed in the schedule's zone on the calendar, so
// a window across a daylight-saving change is as long as the wall clock says
// (22:00-06:00 is nine hours on the night clocks fall back). A wall-clock
// time that does not exist that day (skipped by a spring-forward change) is
// normalised the way time.Date does.
func (s Schedule) Active(t time.Time) (active bool, next time.Time) {
	loc := s.loc
	if loc == nil {
		loc = time.UTC
	}
	y, m, d := t.In(loc).Date()
	for off := -1; off <= horizon; off++ {
		day := time.Date(y, m, d+off, 0, 0, 0, 0, loc)
		if !slices.Contains(s.Days, Weekday(day.Weekday())) {
			continue
		}
		start := at(day, s.Start, loc)
		endDay := day
		if s.End <= s.Start {
			endDay = time.Date(y, m, d+off+1, 0, 0, 0, 0, loc)
		}
		end := at(endDay, s.End, loc)
		if !t.Before(start) && t.Before(end) {
			active = true
		}
		for _, edge := range [2]time.Time{start, end} {
			if edge.After(t) && (next.IsZero() || edge.Before(next)) {
				next = edge
			}
		}
	}
	return active, next
}

func at(day time.Time, c ClockTime, loc *time.Location) time.Time {
	y, m, d := day.Date()
	return time.Date(y, m, d, int(c)/60, int(c)%60, 0, 0, loc)
}
