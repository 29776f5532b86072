package agent

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Killing a required process restricts the device within a sampling
// interval plus the check's hysteresis; status, explain and the audit log
// name the check with what was seen and what was expected; starting the process
// again restores normal mode.
func TestRequiredProcessDeathRestricts(t *testing.T) {
	e := newEnv(t)
	name, run := lab.Sensor(t, e.ns)
	sensor := run()
	e.startWithChecks(policy.Check{ID: "edr-running", Process: &policy.ProcessMatch{Name: name}, FailAfter: 2, RecoverAfter: 1})
	check := func() (string, bool, string) { return e.check("edr-running") }
	// The interval is 1s and two failures are needed: a few seconds at
	// most (the bound here is generous; speed is not what is tested).
	lab.WaitFor(t, "the check passing", longWait, func() bool { m, f, o := check(); return m == "normal" && !f && strings.Contains(o, "running (pid") })

	sensor.Process.Kill()
	sensor.Wait()
	lab.WaitFor(t, "restricted mode after the sensor died", longWait, func() bool { m, f, _ := check(); return m == "restricted" && f })
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	why := strings.Join(st.Why, "; ")
	if !strings.Contains(why, "check edr-running failed: observed "+name+" not running, expected "+name+" running") {
		t.Errorf("status does not name the check: %q", why)
	}
	// explain answers a denial with the check that caused it.
	if v := e.call(adminapi.Request{Op: adminapi.OpExplain, To: "10.50.0.5:22/tcp"}).Verdict; v == nil || v.Allowed || !strings.Contains(v.Reason, "check edr-running failed: observed "+name+" not running") {
		t.Errorf("explain does not name the check: %+v", v)
	}
	// Restricted keeps the profile's segments only (wms for scanners).
	if slices.Contains(st.Open, "diagnostics") {
		t.Errorf("restricted mode left diagnostics open: %v", st.Open)
	}

	run()
	lab.WaitFor(t, "normal mode after the sensor came back", longWait, func() bool { m, f, _ := check(); return m == "normal" && !f })
	e.stop()
	var failed, recovered bool
	for _, ev := range e.auditLog() {
		failed = failed || ev.Kind == "check-failed" && strings.Contains(ev.Detail, "edr-running (profile restricted): observed "+name+" not running")
		recovered = recovered || ev.Kind == "check-recovered" && strings.HasPrefix(ev.Detail, "edr-running")
	}
	if !failed || !recovered {
		t.Errorf("audit log lacks the check's failure (%v) or recovery (%v)", failed, recovered)
	}
}

// startWithChecks starts the agent and applies the environment's policy
// with checks as the scanner's posture checks.
func (e *env) startWithChecks(checks ...policy.Check) {
	e.t.Helper()
	scanner := e.doc.Classes["scanner"]
	scanner.Checks = checks
	e.doc.Classes["scanner"] = scanner
	e.start()
	if resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, time.Now().UTC().Truncate(time.Second))}); resp.Error != "" {
		e.t.Fatal(resp.Error)
	}
}

// check is the device's mode and one check's state, from status (an
// empty observation: not judged yet).
func (e *env) check(id string) (mode string, failing bool, observed string) {
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	for _, c := range st.Checks {
		if c.ID == id {
			return st.Mode, c.Failing, c.Observed
		}
	}
	return st.Mode, false, ""
}

// A required process's exit and a pinned file's change are judged at once,
// not at the next timed sample: with an hour between samples, the device
// still follows each change within seconds.
func TestPostureFollowsChanges(t *testing.T) {
	e := newEnv(t)
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.cfg, strings.Replace(string(cfg), `"interval": "1s"`, `"interval": "1h"`, 1))
	name, run := lab.Sensor(t, e.ns)
	sensor := run()
	conf := filepath.Join(e.dir, "edr.conf")
	writeFile(t, conf, "mode=block\n")
	e.startWithChecks(
		policy.Check{ID: "edr-running", Process: &policy.ProcessMatch{Name: name}},
		policy.Check{ID: "edr-config", File: &policy.FileDigest{Path: conf, SHA256: fmt.Sprintf("%x", sha256.Sum256([]byte("mode=block\n")))}},
	)
	lab.WaitFor(t, "both checks judged and passing", longWait, func() bool {
		m, f1, o1 := e.check("edr-running")
		_, f2, o2 := e.check("edr-config")
		return m == "normal" && o1 != "" && o2 != "" && !f1 && !f2
	})

	sensor.Process.Kill()
	sensor.Wait()
	lab.WaitFor(t, "restricted mode after the sensor died", longWait, func() bool { m, f, _ := e.check("edr-running"); return m == "restricted" && f })

	// The sensor comes back (not watched: a start has no event to wait
	// for), then its configuration is rewritten: that sample sees both.
	run()
	writeFile(t, conf, "mode=detect\n")
	lab.WaitFor(t, "the config check failing", longWait, func() bool {
		_, f1, _ := e.check("edr-running")
		m, f2, _ := e.check("edr-config")
		return m == "restricted" && !f1 && f2
	})
	writeFile(t, conf, "mode=block\n")
	lab.WaitFor(t, "normal mode with the config restored", longWait, func() bool { m, f, _ := e.check("edr-config"); return m == "normal" && !f })
}

// A table_intact check makes tampering with the table cost the device its
// access, not only a repair: the sample after an outside change fails it
// with what changed, and it clears after recover_after clean samples. A
// clock check on a device that has never heard from control fails: there
// is no time to compare with.
func TestTableAndClockChecksOffline(t *testing.T) {
	e := newEnv(t)
	e.startWithChecks(
		policy.Check{ID: "table", Profile: "quarantine", TableIntact: true, RecoverAfter: 2},
		policy.Check{ID: "clock", Profile: "diagnostic", MaxClockSkew: policy.Duration(time.Minute)},
	)
	lab.WaitFor(t, "the clock check failing for want of control's time", longWait, func() bool {
		_, f, o := e.check("clock")
		return f && o == "no time from control since the agent started"
	})
	lab.WaitFor(t, "the table check judged and passing", longWait, func() bool { _, f, o := e.check("table"); return o != "" && !f })
	e.ns.MustRun(t, "nft", "delete", "chain", "inet", nft.Table, "forward")
	lab.WaitFor(t, "quarantine after the table was changed", longWait, func() bool {
		m, f, o := e.check("table")
		return m == "quarantine" && f && strings.Contains(o, "table changed from outside: ")
	})
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if why := strings.Join(st.Why, "; "); !strings.Contains(why, "check table failed: observed table changed from outside") {
		t.Errorf("status does not name the check: %q", why)
	}
	lab.WaitFor(t, "the table check clearing after clean samples", longWait, func() bool { m, f, _ := e.check("table"); return m != "quarantine" && !f })
}

// Against the real control server over TLS, a clock check compares the
// device's wall clock with the time in control's answers: on this machine
// both read the same clock, so the skew is the answer's transit time.
func TestClockCheckAgainstControl(t *testing.T) {
	s := newControlSite(t)
	s.a.Start(t)
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	s.ctl.MustCLI(t, "policy", "push", s.bundleWith(t, 1, func(doc *policy.Document) {
		scanner := doc.Classes["scanner"]
		scanner.Checks = []policy.Check{{ID: "clock", MaxClockSkew: policy.Duration(2 * time.Second)}}
		doc.Classes["scanner"] = scanner
	}))
	lab.WaitFor(t, "the clock check judged", longWait, func() bool {
		for _, c := range s.a.Status(t).Checks {
			if c.ID == "clock" {
				return c.Observed != ""
			}
		}
		return false
	})
	st := s.a.Status(t)
	for _, c := range st.Checks {
		if c.ID == "clock" {
			t.Logf("%s: %s", c.ID, c.Observed)
		}
		if c.ID == "clock" && (c.Failing || !strings.HasSuffix(c.Observed, " control's time") || c.Expected != "within 2s of control's time") {
			t.Errorf("clock check against control: %+v", c)
		}
	}
	if st.Mode != "normal" {
		t.Errorf("mode %s with a synchronised clock: %v", st.Mode, st.Why)
	}
}

// A truck leaves its yard's geofence and comes back, its receiver read
// through a real gpsd: the device is restricted while outside and normal
// again inside; when the receiver falls silent its fix grows stale, which
// is its own state with its own profile. Posture samples are an hour
// apart: each transition is judged when the fix crosses the fence, or
// when it grows too old. The test moves the receiver only once the device
// has judged where it was, so no step races the device's start.
func TestGeofenceWithGPSD(t *testing.T) {
	e := newEnv(t)
	yard := lab.Point{Lat: 41.5250, Lon: -88.0817}
	gps := lab.StartGPS(t, nil, 0, lab.Point{Lat: yard.Lat + 0.0003, Lon: yard.Lon}, 250*time.Millisecond) // 33 m from the centre
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.cfg, strings.Replace(string(cfg), `"posture": {"interval": "1s"}`, `"posture": {"interval": "1h"}, "location": {"gpsd": "`+gps.Addr+`"}`, 1))
	e.startWithChecks(
		policy.Check{ID: "yard", Geofence: &policy.Geofence{Circle: &policy.Circle{Lat: yard.Lat, Lon: yard.Lon, RadiusM: 500}}},
		policy.Check{ID: "fix-fresh", Profile: "diagnostic", MaxFixAge: policy.Duration(3 * time.Second)},
	)
	lab.WaitFor(t, "the truck judged inside its yard", longWait, func() bool {
		m, f, o := e.check("yard")
		return m == "normal" && !f && strings.Contains(o, "m from the centre")
	})
	gps.Move(lab.Point{Lat: yard.Lat + 0.007, Lon: yard.Lon}) // 778 m north: out of the yard
	lab.WaitFor(t, "restricted once out of the yard", longWait, func() bool { m, f, _ := e.check("yard"); return m == "restricted" && f })
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if why := strings.Join(st.Why, "; "); !strings.Contains(why, "check yard failed: observed (41.53200, -88.08170), 778 m from the centre") {
		t.Errorf("status does not name the geofence check with the position: %q", why)
	}
	gps.Move(yard)
	lab.WaitFor(t, "normal back in the yard", longWait, func() bool { m, f, _ := e.check("yard"); return m == "normal" && !f })
	gps.Silence()
	lab.WaitFor(t, "diagnostic once the fix is stale", longWait, func() bool {
		m, f, o := e.check("fix-fresh")
		return m == "diagnostic" && f && strings.HasPrefix(o, "fix from gpsd ")
	})
	if _, f, o := e.check("yard"); f {
		t.Errorf("a stale fix inside the yard failed the geofence (%s): the last position still counts", o)
	}
}

// A fixed site gives its position in the configuration: geofence checks
// judge it, and a fix-age check never finds it stale.
func TestStaticLocation(t *testing.T) {
	e := newEnv(t)
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, e.cfg, strings.Replace(string(cfg), `"posture": {"interval": "1s"}`, `"posture": {"interval": "1s"}, "location": {"static": {"lat": 41.5304, "lon": -88.0817}}`, 1))
	e.startWithChecks(
		policy.Check{ID: "yard", Geofence: &policy.Geofence{Circle: &policy.Circle{Lat: 41.5250, Lon: -88.0817, RadiusM: 500}}},
		policy.Check{ID: "fix-fresh", Profile: "diagnostic", MaxFixAge: policy.Duration(time.Second)},
	)
	lab.WaitFor(t, "the site judged outside the fence", longWait, func() bool {
		m, f, o := e.check("yard")
		return m == "restricted" && f && o == "(41.53040, -88.08170), 600 m from the centre"
	})
	if _, f, o := e.check("fix-fresh"); f || o != "fix from static 0s old" {
		t.Errorf("a static position is never stale: failing %v, observed %q", f, o)
	}
}
