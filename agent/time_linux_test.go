package agent

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// scheduledWMS is a policy change: wms open only inside a window from
// open to close (UTC, whole minutes).
func scheduledWMS(open, close time.Time) func(*policy.Document) {
	return func(doc *policy.Document) {
		doc.Schedules = map[string]policy.Schedule{"shift": {Zone: "UTC", Days: []policy.Weekday{0, 1, 2, 3, 4, 5, 6},
			Start: clock(open), End: clock(close)}}
		doc.Classes["scanner"] = policy.Class{Rules: []policy.Rule{{Segment: "wms", Schedule: "shift"}}}
	}
}

// within reports whether got lies within a minute of want.
func within(got, want time.Time) bool { return got.Sub(want).Abs() < time.Minute }

// A control server whose clock runs ahead moves no trusted time. Five
// hours ahead it cannot open a segment outside its signed schedule
// window (it did: the device took the server's time as its own); 400
// days ahead it cannot put the device offline and make it refuse every
// later bundle as expired, across a restart (it did, for good). Control
// checks what it is pushed at its own clock, so the bundle pushed while it
// runs ahead is valid for a day, and the next one waits for its clock to
// be put right.
func TestControlsClockMovesNoTrustedTime(t *testing.T) {
	s := newControlSite(t, "--clock-offset", "5h")
	s.a.Start(t)
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	// A window open at the server's time and closed at the real one.
	ahead := time.Now().UTC().Add(5 * time.Hour)
	v1 := filepath.Join(t.TempDir(), "v1.dsse")
	writeFile(t, v1, string(signValidFor(t, 1, s.policyWith(t, scheduledWMS(ahead.Add(-time.Hour), ahead.Add(time.Hour))), s.opsKey, 24*time.Hour)))
	s.ctl.MustCLI(t, "policy", "push", v1)
	lab.WaitFor(t, "policy v1 from control", longWait, func() bool { return s.a.Status(t).PolicyVersion == 1 })
	lab.WaitFor(t, "a sync after v1", longWait, func() bool { c := s.a.Status(t).Control; return c != nil && c.Connected })
	st := s.a.Status(t)
	if len(st.Open) != 0 || !within(st.TrustedTime, time.Now()) {
		t.Fatalf("with control 5 h ahead: open %v, trusted time %s (now %s); want nothing open, trusted time now",
			st.Open, st.TrustedTime, time.Now().UTC())
	}
	if table := s.a.NS.MustRun(t, "nft", "list", "table", "inet", "bulkhead"); strings.Contains(table, "10.20.1.0/24") {
		t.Fatalf("wms is in the table outside its window:\n%s", table)
	}

	// Idle syncs are answered every second, so one comes soon.
	o := s.ctl.Options()
	o.Args, o.KeepAlive = []string{"--clock-offset", fmt.Sprint(400 * 24 * time.Hour)}, time.Second
	s.ctl.RestartWith(t, o)
	restarted := time.Now()
	lab.WaitFor(t, "a sync with control 400 days ahead", longWait, func() bool {
		c := s.a.Status(t).Control
		return c != nil && c.Connected && c.LastSync.After(restarted)
	})
	s.a.Kill()
	s.a.Start(t)
	st = s.a.Status(t)
	if st.Mode != "normal" || st.PolicyVersion != 1 || !within(st.TrustedTime, time.Now()) {
		t.Fatalf("after control ran 400 days ahead and a restart: mode %s (%v), v%d, trusted time %s; want normal, v1, now",
			st.Mode, st.Why, st.PolicyVersion, st.TrustedTime)
	}
	o.Args, o.KeepAlive = nil, 0
	s.ctl.RestartWith(t, o)
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 2))
	lab.WaitFor(t, "policy v2 once control's clock is right", longWait, func() bool { return s.a.Status(t).PolicyVersion == 2 })
	if st := s.a.Status(t); st.Mode != "normal" {
		t.Fatalf("on v2: mode %s (%v)", st.Mode, st.Why)
	}
}

// The device's own wall clock, pushed a year ahead (an unauthenticated
// NTP answer), is believed while it is wrong: the bundle looks expired
// and the device goes offline, which opens nothing. Corrected, it leaves
// nothing behind: after a restart the device is back on its policy, and
// takes a new bundle.
func TestWallClockAheadThenCorrectedBricksNothing(t *testing.T) {
	e := newEnv(t)
	now := time.Now().UTC().Truncate(time.Second)
	ahead := func() time.Time { return time.Now().Add(365 * 24 * time.Hour) }
	e.start()
	if resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, now)}); resp.Error != "" {
		t.Fatalf("apply v1: %s", resp.Error)
	}
	e.stop()
	e.wall = ahead
	e.start()
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if st.Mode == "normal" || len(st.Open) != 0 {
		t.Fatalf("with the clock a year ahead: mode %s, open %v; want the bundle expired and nothing open", st.Mode, st.Open)
	}
	e.stop()
	e.wall = nil // corrected
	e.start()
	st = e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if st.Mode != "normal" || !within(st.TrustedTime, time.Now()) {
		t.Fatalf("after the clock was corrected: mode %s (%v), trusted time %s; want normal, now", st.Mode, st.Why, st.TrustedTime)
	}
	if resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(2, time.Now().UTC().Truncate(time.Second))}); resp.Error != "" {
		t.Fatalf("a new bundle after the correction: %s", resp.Error)
	}
}

// Contact with control extends max_offline. A device connected for longer
// than max_offline stays normal (it did not: nothing recorded contact, so
// it went offline while syncing). Cut off, it goes offline at its last
// contact plus max_offline, not before; the apply that takes it offline
// is stamped no earlier; a control server whose clock runs an hour ahead
// does not hold it off. A restart while cut off does not move the
// deadline later.
func TestContactExtendsMaxOffline(t *testing.T) {
	const maxOffline = 10 * time.Second
	// Control's clock runs an hour ahead: the contacts it answers are
	// dated by the device's clock, or it would hold off the deadline.
	s := newControlSite(t, "--keepalive", "2s", "--clock-offset", "1h")
	s.a.Start(t)
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	issued := time.Now()
	v1 := filepath.Join(t.TempDir(), "v1.dsse")
	writeFile(t, v1, string(signValidFor(t, 1, s.policyWith(t, func(doc *policy.Document) { doc.Validity.MaxOffline = policy.Duration(maxOffline) }), s.opsKey, 24*time.Hour)))
	s.ctl.MustCLI(t, "policy", "push", v1)
	lab.WaitFor(t, "policy v1 from control", longWait, func() bool { return s.a.Status(t).PolicyVersion == 1 })
	for time.Since(issued) < maxOffline+5*time.Second { // longer than max_offline, connected throughout
		if st := s.a.Status(t); st.Mode != "normal" {
			t.Fatalf("connected to control %s after v1 (max_offline %s): mode %s: %v", time.Since(issued).Round(time.Second), maxOffline, st.Mode, st.Why)
		}
		time.Sleep(500 * time.Millisecond)
	}

	s.ctl.Stop()
	var st *adminapi.Status
	lab.WaitFor(t, "the offline profile once control is gone", longWait, func() bool { st = s.a.Status(t); return st.Mode == "offline" })
	contact := lastContactIn(t, st)
	if time.Since(contact) > maxOffline+30*time.Second || contact.Before(issued) {
		t.Fatalf("last contact %s: not the contact before the cut (v1 issued %s)", contact, issued.UTC())
	}
	if st.LastApply.Before(contact.Add(maxOffline)) {
		t.Errorf("offline applied at %s, before last contact %s plus max_offline %s", st.LastApply, contact, maxOffline)
	}

	// A restart while cut off: the device comes back offline, naming a
	// contact no later than before.
	s.a.Kill()
	s.a.Start(t)
	st = s.a.Status(t)
	if st.Mode != "offline" {
		t.Fatalf("restarted while cut off past the deadline: mode %s (%v), want offline", st.Mode, st.Why)
	}
	if after := lastContactIn(t, st); after.After(contact) {
		t.Errorf("the restart moved the last contact from %s to %s", contact, after)
	}
}

// lastContactIn is the last contact an offline device's status names.
func lastContactIn(t *testing.T, st *adminapi.Status) time.Time {
	t.Helper()
	why := strings.Join(st.Why, "; ")
	_, rest, ok := strings.Cut(why, "no contact with control since ")
	if !ok {
		t.Fatalf("offline for another reason: %v", st.Why)
	}
	contact, err := time.Parse(time.RFC3339, strings.Fields(rest)[0])
	if err != nil {
		t.Fatalf("the reason names no contact time: %q", why)
	}
	return contact
}
