package agent

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// A shift window closes access at its end instant with the control server
// unreachable: the agent wakes for the edge itself, with no contact and no
// polling, and the same transaction stops the connection that was open.
// Status says which schedule closed the segment and until when.
func TestShiftWindowClosesOffline(t *testing.T) {
	s := newControlSite(t)
	s.a.start(t)
	if out, err := s.a.enroll(t, s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	s.gw1.AllowPeer(t, s.a.status(t).Tunnel.PublicKey, netip.AddrPort{}, "100.64.0.2/32")

	// Schedules have minute resolution: the window ends at the next full
	// minute at least 15 s away (time for the set-up below), in a zone
	// with a half-hour offset so a zone applied wrongly shows. Every day
	// is listed, so a window that started before local midnight counts.
	const zone = "America/St_Johns"
	loc, err := time.LoadLocation(zone)
	if err != nil {
		t.Fatalf("time zone data: %v", err)
	}
	end := time.Now().Add(15 * time.Second).Truncate(time.Minute).Add(time.Minute)
	start := end.Add(-2 * time.Hour)
	path := s.bundleWith(t, 1, func(doc *policy.Document) {
		doc.Schedules = map[string]policy.Schedule{"shift": {Zone: zone,
			Days:  []policy.Weekday{0, 1, 2, 3, 4, 5, 6},
			Start: clock(start.In(loc)), End: clock(end.In(loc))}}
		doc.Classes["scanner"] = policy.Class{Rules: []policy.Rule{{Segment: "wms", Schedule: "shift"}}}
	})
	s.ctl.MustCLI(t, "policy", "push", path)
	waitLong(t, "policy v1 from control", func() bool { return s.a.status(t).PolicyVersion == 1 })
	if st := s.a.status(t); !st.NextChange.Equal(end) {
		t.Fatalf("next change %s, want the window's end %s", st.NextChange, end)
	}
	if !lab.ReachesWithin(t, s.a.ns, "tcp", wmsHost, 10*time.Second) {
		t.Fatal("wms is closed inside its shift window")
	}
	conn := lab.Conn(t, s.a.ns, wmsHost)

	s.ctl.Stop()
	waitLong(t, "the agent to notice control is gone", func() bool { c := s.a.status(t).Control; return c != nil && !c.Connected })
	if time.Until(end) < 2*time.Second {
		t.Fatalf("set-up ran past the window's end (%s left); the test proves nothing", time.Until(end))
	}
	// Open until the end: the connection carries data up to a second
	// before it (a round trip may take up to a second).
	for time.Until(end) > time.Second {
		if !lab.RoundTrip(conn, time.Second) {
			t.Fatalf("the connection stopped %s before the window's end", time.Until(end))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Closed from the end: half a second after it, the open connection
	// and new ones are refused.
	time.Sleep(time.Until(end) + 500*time.Millisecond)
	if lab.RoundTrip(conn, time.Second) {
		t.Error("the open connection still carries data after the window's end")
	}
	if lab.Reaches(t, s.a.ns, "tcp", wmsHost) {
		t.Error("a new connection to wms succeeds after the window's end")
	}
	st := s.a.status(t)
	i := slices.IndexFunc(st.Decisions, func(d localpolicy.Decision) bool { return d.Segment == "wms" })
	if i < 0 || st.Decisions[i].Allowed || !strings.Contains(st.Decisions[i].Reason, "schedule shift is closed until") {
		t.Errorf("status after the end: open %v, decisions %+v", st.Open, st.Decisions)
	}
	if c := st.Control; c == nil || c.Connected {
		t.Errorf("control came back during the test: %+v", c)
	}
}

func clock(t time.Time) policy.ClockTime { return policy.ClockTime(t.Hour()*60 + t.Minute()) }
