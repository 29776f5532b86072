package policy

import (
	"testing"
	"time"
)

func mustSchedule(t *testing.T, zone string, days []Weekday, start, end string) Schedule {
	t.Helper()
	s := Schedule{Zone: zone, Days: days}
	if err := s.Start.UnmarshalText([]byte(start)); err != nil {
		t.Fatal(err)
	}
	if err := s.End.UnmarshalText([]byte(end)); err != nil {
		t.Fatal(err)
	}
	v := &validator{}
	v.checkSchedule("s", "s", &s)
	if len(v.problems) > 0 {
		t.Fatal(v.problems)
	}
	return s
}

func utc(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

var everyDay = []Weekday{0, 1, 2, 3, 4, 5, 6}

func TestScheduleActive(t *testing.T) {
	chicagoNight := mustSchedule(t, "America/Chicago", everyDay, "22:00", "06:00")
	chicagoEarly := mustSchedule(t, "America/Chicago", everyDay, "01:00", "03:00")
	berlinNight := mustSchedule(t, "Europe/Berlin", everyDay, "22:00", "06:00")
	mondayNight := mustSchedule(t, "UTC", []Weekday{1}, "22:00", "06:00")
	toMidnight := mustSchedule(t, "UTC", []Weekday{5}, "18:00", "24:00")
	tests := []struct {
		name       string
		s          Schedule
		at         string
		wantActive bool
		wantNext   string
	}{
		// 2026-11-01: US clocks fall back at 02:00 CDT to 01:00 CST. The
		// night shift from Saturday 22:00 CDT (03:00Z) to Sunday 06:00 CST
		// (12:00Z) lasts nine hours.
		{"fall back: start of night", chicagoNight, "2026-11-01T03:00:00Z", true, "2026-11-01T12:00:00Z"},
		{"fall back: in the repeated hour", chicagoNight, "2026-11-01T07:30:00Z", true, "2026-11-01T12:00:00Z"},
		{"fall back: last minute", chicagoNight, "2026-11-01T11:59:00Z", true, "2026-11-01T12:00:00Z"},
		{"fall back: shift over", chicagoNight, "2026-11-01T12:00:00Z", false, "2026-11-02T04:00:00Z"},
		// 2026-03-08: US clocks spring forward at 02:00 CST to 03:00 CDT; a
		// 01:00-03:00 window that night lasts one hour (07:00Z-08:00Z).
		{"spring forward: before", chicagoEarly, "2026-03-08T06:59:00Z", false, "2026-03-08T07:00:00Z"},
		{"spring forward: open", chicagoEarly, "2026-03-08T07:30:00Z", true, "2026-03-08T08:00:00Z"},
		{"spring forward: closed at 03:00 CDT", chicagoEarly, "2026-03-08T08:00:00Z", false, "2026-03-09T06:00:00Z"},
		// 2026-10-25: Europe falls back at 03:00 CEST to 02:00 CET; the night
		// from Saturday 22:00 CEST (20:00Z) to Sunday 06:00 CET (05:00Z).
		{"berlin fall back: open", berlinNight, "2026-10-24T20:00:00Z", true, "2026-10-25T05:00:00Z"},
		{"berlin fall back: closed", berlinNight, "2026-10-25T05:00:00Z", false, "2026-10-25T21:00:00Z"},
		// Days name the day a window starts: Monday night runs into Tuesday.
		{"across midnight: tuesday 05:00", mondayNight, "2026-11-24T05:00:00Z", true, "2026-11-24T06:00:00Z"},
		{"across midnight: tuesday 22:30", mondayNight, "2026-11-24T22:30:00Z", false, "2026-11-30T22:00:00Z"},
		{"across midnight: monday 21:59", mondayNight, "2026-11-23T21:59:00Z", false, "2026-11-23T22:00:00Z"},
		{"end at 24:00", toMidnight, "2026-11-27T23:59:59Z", true, "2026-11-28T00:00:00Z"},
		{"after 24:00 end", toMidnight, "2026-11-28T00:00:00Z", false, "2026-12-04T18:00:00Z"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			active, next := tt.s.Active(utc(tt.at))
			if active != tt.wantActive {
				t.Errorf("Active(%s) = %v, want %v", tt.at, active, tt.wantActive)
			}
			if !next.Equal(utc(tt.wantNext)) {
				t.Errorf("next change after %s = %s, want %s", tt.at, next.UTC().Format(time.RFC3339), tt.wantNext)
			}
		})
	}
}
