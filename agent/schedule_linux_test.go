package agent

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// A shift window closes access at its end instant, with no control server
// at all: the agent wakes for the edge itself, with no contact and no
// polling, and the same transaction stops the connection that was open.
// It closes at the end, never before: the apply that closes the segment is
// stamped at or after the end. Status says which schedule closed it and
// until when. (How soon after the end is a `make bench` figure, never an
// assertion here.)
func TestShiftWindowClosesOffline(t *testing.T) {
	s := newTunnelSite(t)
	s.start()
	s.gw1.AllowPeer(t, s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey, netip.AddrPort{}, "100.64.0.2/32")
	// The connection opens under a policy with no schedule, however long
	// that takes; the window is added once it is open. Schedules have
	// minute resolution: the window ends at the next full minute at least
	// 5 s away (applying the second bundle takes milliseconds), in a zone
	// with a half-hour offset so a zone applied wrongly shows. Every day
	// is listed, so a window that started before local midnight counts.
	s.apply(t, s.policy(t, 1, "wms"))
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, 10*time.Second) {
		t.Fatal("wms unreachable through its tunnel")
	}
	conn := lab.Conn(t, s.ns, wmsHost)
	const zone = "America/St_Johns"
	loc, err := time.LoadLocation(zone)
	if err != nil {
		t.Fatalf("time zone data: %v", err)
	}
	end := time.Now().Add(5 * time.Second).Truncate(time.Minute).Add(time.Minute)
	start := end.Add(-2 * time.Hour)
	doc := s.doc(t, "wms")
	doc.Schedules = map[string]policy.Schedule{"shift": {Zone: zone,
		Days:  []policy.Weekday{0, 1, 2, 3, 4, 5, 6},
		Start: clock(start.In(loc)), End: clock(end.In(loc))}}
	doc.Classes["scanner"] = policy.Class{Rules: []policy.Rule{{Segment: "wms", Schedule: "shift"}}}
	if st := s.apply(t, signFor(t, 2, doc, s.key)); !st.NextChange.Equal(end) || !slices.Contains(st.Open, "wms") {
		t.Fatalf("inside the window: open %v, next change %s; want wms open until %s", st.Open, st.NextChange, end)
	}
	if !lab.RoundTrip(conn, 5*time.Second) {
		t.Fatal("the connection stopped when the window was added, inside it")
	}
	// The connection carries data for as long as the agent keeps wms
	// open; once it has closed it, the apply is stamped no earlier than
	// the end.
	var st *adminapi.Status
	for {
		st = s.call(adminapi.Request{Op: adminapi.OpStatus}).Status
		if !slices.Contains(st.Open, "wms") {
			break
		}
		if time.Since(end) > time.Minute {
			t.Fatalf("wms still open a minute after the window's end %s", end)
		}
		lab.RoundTrip(conn, time.Second) // keeps the flow live; a trip across the edge may fail
		time.Sleep(100 * time.Millisecond)
	}
	if st.LastApply.Before(end) {
		t.Errorf("wms closed at %s, before the window's end %s", st.LastApply.Format(time.StampMilli), end.Format(time.StampMilli))
	}
	if lab.RoundTrip(conn, time.Second) {
		t.Error("the open connection still carries data after the window's end")
	}
	if lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("a new connection to wms succeeds after the window's end")
	}
	i := slices.IndexFunc(st.Decisions, func(d localpolicy.Decision) bool { return d.Segment == "wms" })
	if i < 0 || st.Decisions[i].Allowed || !strings.Contains(st.Decisions[i].Reason, "schedule shift is closed until") {
		t.Errorf("status after the end: open %v, decisions %+v", st.Open, st.Decisions)
	}
	if st.Control != nil {
		t.Errorf("the agent has a control channel: %+v", st.Control)
	}
}

func clock(t time.Time) policy.ClockTime { return policy.ClockTime(t.Hour()*60 + t.Minute()) }
