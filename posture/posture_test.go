package posture

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

const digestA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
const digestB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

func sample() *Facts {
	return &Facts{
		OS: "debian", Kernel: "6.1.0-18-amd64", AgentVersion: "v1.4.2", Uptime: 50 * time.Hour, Self: 100, ClockSkew: 2500 * time.Millisecond,
		Disks: []Disk{{Path: "/", Total: 8 << 30, Free: 300 << 20}},
		Processes: []Process{
			{PID: 100, Name: "bulkhead"},
			{PID: 200, Name: "wms-client", Exe: "/usr/bin/wms-client", SHA256: digestA},
			{PID: 300, Name: "sshd"},
		},
		Listeners: []Socket{
			{Protocol: "udp", Local: netip.MustParseAddrPort("0.0.0.0:51820"), PID: 100}, // the agent's own
			{Protocol: "tcp", Local: netip.MustParseAddrPort("127.0.0.1:631"), PID: 300}, // loopback only
			{Protocol: "tcp", Local: netip.MustParseAddrPort("0.0.0.0:22"), PID: 300},    // allowed below
			{Protocol: "tcp", Local: netip.MustParseAddrPort("[::]:8080"), PID: 200},     // not allowed
			{Protocol: "udp", Local: netip.MustParseAddrPort("0.0.0.0:68"), PID: 0},      // allowed below
		},
		Files: []File{{Path: "/etc/wms.conf", SHA256: digestA}, {Path: "/etc/gone", Error: "/etc/gone is missing"}},
	}
}

func TestJudge(t *testing.T) {
	ssh := []policy.Listener{{Protocol: policy.TCP, Ports: []policy.PortRange{{First: 22, Last: 22}}}, {Protocol: policy.UDP, Ports: []policy.PortRange{{First: 68, Last: 68}}}}
	for _, tc := range []struct {
		name     string
		check    policy.Check
		pass     bool
		observed string // a part of it
	}{
		{"kernel new enough", policy.Check{Kernel: &policy.VersionRange{Min: "5.10"}}, true, "6.1.0-18-amd64"},
		{"kernel too old", policy.Check{Kernel: &policy.VersionRange{Min: "6.6"}}, false, "6.1.0"},
		{"kernel at the bound", policy.Check{Kernel: &policy.VersionRange{Min: "6.1"}}, true, "6.1.0"},
		{"kernel below a cap", policy.Check{Kernel: &policy.VersionRange{Min: "5.4", Below: "6.1"}}, false, "6.1.0"},
		{"os allowed", policy.Check{OS: []string{"ubuntu", "debian"}}, true, "debian"},
		{"os not allowed", policy.Check{OS: []string{"ubuntu"}}, false, "debian"},
		{"agent new enough", policy.Check{AgentVersion: "v1.4.0"}, true, "v1.4.2"},
		{"agent too old", policy.Check{AgentVersion: "v1.10"}, false, "v1.4.2"},
		{"required process running", policy.Check{Process: &policy.ProcessMatch{Name: "wms-client"}}, true, "pid 200"},
		{"required process pinned", policy.Check{Process: &policy.ProcessMatch{Name: "wms-client", SHA256: digestA}}, true, "pid 200"},
		{"required process, other binary", policy.Check{Process: &policy.ProcessMatch{Name: "wms-client", SHA256: digestB}}, false, "running only as pid 200"},
		{"required process missing", policy.Check{Process: &policy.ProcessMatch{Name: "auditd"}}, false, "auditd not running"},
		{"forbidden process running", policy.Check{ForbiddenProcess: &policy.ProcessMatch{Name: "sshd"}}, false, "sshd running (pid 300)"},
		{"forbidden process absent", policy.Check{ForbiddenProcess: &policy.ProcessMatch{Name: "nc"}}, true, "not running"},
		{"unexpected listener", policy.Check{Listeners: ssh}, false, "tcp [::]:8080 (wms-client)"},
		{"listeners all allowed", policy.Check{Listeners: append(ssh, policy.Listener{Protocol: policy.TCP, Ports: []policy.PortRange{{First: 8000, Last: 8099}}})}, true, "no other listener"},
		{"file intact", policy.Check{File: &policy.FileDigest{Path: "/etc/wms.conf", SHA256: digestA}}, true, "aaaaaaaaaaaa"},
		{"file changed", policy.Check{File: &policy.FileDigest{Path: "/etc/wms.conf", SHA256: digestB}}, false, "sha256 aaaaaaaaaaaa"},
		{"file missing", policy.Check{File: &policy.FileDigest{Path: "/etc/gone", SHA256: digestB}}, false, "missing"},
		{"disk low", policy.Check{FreeDisk: &policy.FreeDisk{Path: "/", MinBytes: 1 << 30}}, false, "300.0 MiB free on /"},
		{"disk fine", policy.Check{FreeDisk: &policy.FreeDisk{Path: "/", MinBytes: 100 << 20}}, true, "300.0 MiB"},
		{"disk unmeasured", policy.Check{FreeDisk: &policy.FreeDisk{Path: "/data", MinBytes: 1}}, false, "could not be measured"},
		{"uptime too long", policy.Check{MaxUptime: policy.Duration(24 * time.Hour)}, false, "up 50h0m0s"},
		{"uptime fine", policy.Check{MaxUptime: policy.Duration(60 * time.Hour)}, true, "up 50h"},
		{"clock close enough", policy.Check{MaxClockSkew: policy.Duration(5 * time.Second)}, true, "clock 2.5s ahead of control's time"},
		{"clock too far ahead", policy.Check{MaxClockSkew: policy.Duration(time.Second)}, false, "clock 2.5s ahead"},
		{"table untouched", policy.Check{TableIntact: true}, true, "unchanged"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Judge(tc.check, sample())
			if r.Pass != tc.pass || !strings.Contains(r.Observed, tc.observed) || r.Expected == "" {
				t.Errorf("got %+v, want pass %v observing %q and an expectation", r, tc.pass, tc.observed)
			}
		})
	}
}

// A clock set back fails as surely as one set ahead; a table changed
// from outside fails the sample that follows, naming what changed.
func TestClockAndTable(t *testing.T) {
	f := sample()
	f.ClockSkew = -90 * time.Second
	if r := Judge(policy.Check{MaxClockSkew: policy.Duration(time.Minute)}, f); r.Pass || r.Observed != "clock 1m30s behind control's time" || r.Expected != "within 1m0s of control's time" {
		t.Errorf("a clock set back: %+v", r)
	}
	f.Tampered = []string{"rule \"wms\" missing from chain output"}
	if r := Judge(policy.Check{TableIntact: true}, f); r.Pass || !strings.Contains(r.Observed, `table changed from outside: rule "wms" missing`) {
		t.Errorf("a tampered table: %+v", r)
	}
	// Not known is not fine: before control's first answer there is no
	// time to compare with, and an unreadable table proves nothing.
	f.Unread = []string{"clock", "table"}
	f.ClockSkew, f.Tampered = 0, nil
	if r := Judge(policy.Check{MaxClockSkew: policy.Duration(time.Minute)}, f); r.Pass || r.Observed != "no time from control since the agent started" {
		t.Errorf("no time from control: %+v", r)
	}
	if r := Judge(policy.Check{TableIntact: true}, f); r.Pass || r.Observed != "the table could not be read back" {
		t.Errorf("an unreadable table: %+v", r)
	}
}

func TestUncomparableVersionsFail(t *testing.T) {
	f := sample()
	f.AgentVersion = "1ea56bf-dirty"
	if r := Judge(policy.Check{AgentVersion: "v1.0.0"}, f); r.Pass || !strings.Contains(r.Observed, "not a comparable version") {
		t.Errorf("a development build passed a version floor: %+v", r)
	}
}

// An empty list a sample could not read proves nothing: a forbidden
// process or an unexpected listener could be there.
func TestUnreadListsFailTheirChecks(t *testing.T) {
	f := sample()
	f.Processes, f.Listeners, f.Unread = nil, nil, []string{"processes", "sockets"}
	for _, c := range []policy.Check{
		{ForbiddenProcess: &policy.ProcessMatch{Name: "nc"}},
		{Process: &policy.ProcessMatch{Name: "wms-client"}},
		{Listeners: []policy.Listener{{Protocol: policy.TCP, Ports: []policy.PortRange{{First: 22, Last: 22}}}}},
	} {
		if r := Judge(c, f); r.Pass || !strings.Contains(r.Observed, "could not be read") {
			t.Errorf("%s on an unread list: %+v", c.Kind(), r)
		}
	}
	if r := Judge(policy.Check{OS: []string{"debian"}}, f); !r.Pass {
		t.Errorf("a check not reading those lists failed: %+v", r)
	}
}

func TestWant(t *testing.T) {
	w := Want([]policy.Check{
		{File: &policy.FileDigest{Path: "/etc/a"}},
		{FreeDisk: &policy.FreeDisk{Path: "/data"}},
		{Process: &policy.ProcessMatch{Name: "x", SHA256: digestA}},
		{Process: &policy.ProcessMatch{Name: "y"}},          // no digest: nothing to hash
		{ForbiddenProcess: &policy.ProcessMatch{Name: "z"}}, // nothing to wait for
	})
	if strings.Join(w.Files, ",") != "/etc/a" || strings.Join(w.Disks, ",") != "/data" || strings.Join(w.HashNames, ",") != "x" ||
		strings.Join(w.Required, ",") != "x,y" {
		t.Errorf("Want = %+v", w)
	}
}

// The hysteresis: a check fails after FailAfter failing samples in a row
// and recovers after RecoverAfter passing ones; a single disagreeing
// sample in between starts the count again.
func TestTrackerHysteresis(t *testing.T) {
	check := []policy.Check{{ID: "wms", Profile: "quarantine", FailAfter: 2, RecoverAfter: 3, Process: &policy.ProcessMatch{Name: "wms-client"}}}
	up, down := sample(), sample()
	down.Processes = down.Processes[:1]
	var tr Tracker
	for i, step := range []struct {
		f       *Facts
		failing bool
		changed bool
	}{
		{up, false, false},
		{down, false, false}, // one failure is not enough
		{up, false, false},   // and the count starts over
		{down, false, false},
		{down, true, true}, // two in a row
		{down, true, false},
		{up, true, false},
		{up, true, false},
		{down, true, false}, // a failure resets the recovery count
		{up, true, false},
		{up, true, false},
		{up, false, true}, // three passes in a row
	} {
		all, changed := tr.Observe(check, step.f)
		if len(all) != 1 || all[0].Failing != step.failing || (len(changed) == 1) != step.changed {
			t.Fatalf("sample %d: all %+v changed %+v; want failing %v, changed %v", i, all, changed, step.failing, step.changed)
		}
		if all[0].Profile != localpolicy.Quarantine || all[0].ID != "wms" || all[0].Expected != "wms-client running" {
			t.Fatalf("sample %d: %+v", i, all[0])
		}
	}
	// A check dropped from the policy is forgotten: back in, it starts
	// from passing again.
	tr.Observe(check, down)
	tr.Observe(check, down)
	tr.Observe(nil, down)
	if all, _ := tr.Observe(check, down); all[0].Failing {
		t.Errorf("a re-added check kept its old state: %+v", all[0])
	}
}

func TestProfileDefaultsToRestricted(t *testing.T) {
	if p := Profile(policy.Check{}); p != localpolicy.Restricted {
		t.Errorf("default profile %v", p)
	}
	if p := Profile(policy.Check{Profile: "diagnostic"}); p != localpolicy.Diagnostic {
		t.Errorf("diagnostic profile %v", p)
	}
}

func TestGatherReadsThisHost(t *testing.T) {
	f, err := Gather(t.Context(), "v1.0.0", Wants{Files: []string{"/proc/self/status", "/nonexistent"}, Disks: []string{"/"}, HashNames: []string{"posture.test"}})
	if err != nil {
		t.Fatal(err)
	}
	if f.Kernel == "" || f.OS == "" || f.Uptime <= 0 || f.MemTotal == 0 || len(f.Disks) != 1 || len(f.Interfaces) == 0 {
		t.Errorf("facts missing: %+v", f)
	}
	self := false
	for _, p := range f.Processes {
		if p.PID == f.Self {
			self = p.SHA256 != "" && p.Name == "posture.test"
		}
	}
	if !self {
		t.Errorf("this test process is not listed with its executable's digest")
	}
	if len(f.Files) != 2 || f.Files[0].SHA256 == "" || !strings.Contains(f.Files[1].Error, "missing") {
		t.Errorf("files: %+v", f.Files)
	}
}

// A traffic check judges what moved through its segment's tunnel within
// the sliding window: a burst fails it, and it passes again once the
// burst has left the window, even while the segment is closed (by the
// check's own profile); a counter reset (the peer set up again) is not a
// burst.
func TestTrafficWindow(t *testing.T) {
	checks := []policy.Check{{ID: "wms-volume", Profile: "quarantine", Traffic: &policy.TrafficLimit{Segment: "wms", MaxBytes: 1000, Window: policy.Duration(5 * time.Second)}}}
	t0 := time.Date(2026, 11, 24, 6, 0, 0, 0, time.UTC)
	steps := []struct {
		sec     int
		total   uint64
		closed  bool
		failing bool
		saw     string
	}{
		{0, 500, false, false, "0 bytes to segment wms in 0s"},
		{1, 900, false, false, "400 bytes to segment wms in 1s"},
		{2, 2500, false, true, "2000 bytes to segment wms in 2s"}, // the burst
		{5, 2600, false, true, "2100 bytes to segment wms in 5s"},
		{6, 2700, false, true, "1800 bytes to segment wms in 5s"},  // from sec 1: still in
		{8, 2800, false, false, "300 bytes to segment wms in 6s"},  // from sec 2 (the reading at or before 3)
		{9, 100, false, false, "0 bytes to segment wms in 0s"},     // reset: starts afresh
		{10, 5000, false, true, "4900 bytes to segment wms in 1s"}, // a burst
		{11, 0, true, true, "4900 bytes to segment wms in 2s"},     // closed by the profile: the burst stays
		{14, 0, true, true, "4900 bytes to segment wms in 5s"},
		{15, 0, true, false, "0 bytes to segment wms in 5s"}, // left the window
	}
	var tr Tracker
	for _, s := range steps {
		f := &Facts{Time: t0.Add(time.Duration(s.sec) * time.Second), Tunnel: map[string]uint64{"wms": s.total}}
		if s.closed {
			f.Tunnel = map[string]uint64{}
		}
		all, _ := tr.Observe(checks, f)
		if all[0].Failing != s.failing || all[0].Observed != s.saw {
			t.Errorf("at %ds: failing %v, observed %q; want %v, %q", s.sec, all[0].Failing, all[0].Observed, s.failing, s.saw)
		}
		if all[0].Failing && all[0].Profile != localpolicy.Quarantine {
			t.Errorf("at %ds: profile %s", s.sec, all[0].Profile)
		}
	}
	f := &Facts{Time: t0, Unread: []string{"tunnel"}}
	if all, _ := new(Tracker).Observe(checks, f); !all[0].Failing || !strings.Contains(all[0].Observed, "could not be read") {
		t.Errorf("unreadable counters pass a traffic check: %+v", all[0])
	}
}

// Geofences: a circle by great-circle distance, a polygon by ray casting;
// the latest fix is judged however old, and its age is its own check.
func TestLocation(t *testing.T) {
	// A depot yard in Joliet, IL: a 500 m circle and a square around it.
	yard := policy.Geofence{Circle: &policy.Circle{Lat: 41.5250, Lon: -88.0817, RadiusM: 500}}
	square := policy.Geofence{Polygon: [][2]float64{{41.52, -88.09}, {41.52, -88.07}, {41.53, -88.07}, {41.53, -88.09}}}
	if d := Distance(41.5250, -88.0817, 41.5250+0.0045, -88.0817); d < 495 || d > 505 {
		t.Errorf("0.0045 degrees of latitude = %.1f m, want about 500", d)
	}
	for _, tc := range []struct {
		name     string
		fence    policy.Geofence
		lat, lon float64
		in       bool
		observed string
	}{
		{"circle, at the centre", yard, 41.5250, -88.0817, true, "0 m from the centre"},
		{"circle, 400 m north", yard, 41.5286, -88.0817, true, "400 m from the centre"},
		{"circle, 600 m north", yard, 41.5304, -88.0817, false, "600 m from the centre"},
		{"polygon, inside", square, 41.525, -88.08, true, "inside the polygon"},
		{"polygon, east of it", square, 41.525, -88.06, false, "outside the polygon"},
		{"polygon, north of it", square, 41.535, -88.08, false, "outside the polygon"},
	} {
		f := sample()
		f.Location = &Fix{Lat: tc.lat, Lon: tc.lon, Age: 3 * time.Second, Source: "gpsd"}
		r := Judge(policy.Check{Geofence: &tc.fence}, f)
		if r.Pass != tc.in || !strings.Contains(r.Observed, tc.observed) || !strings.HasSuffix(r.Observed, "(fix 3s old)") {
			t.Errorf("%s: %+v", tc.name, r)
		}
	}
	f := sample()
	if r := Judge(policy.Check{Geofence: &yard}, f); r.Pass || r.Observed != "no position fix yet" {
		t.Errorf("no fix: %+v", r)
	}
	if r := Judge(policy.Check{MaxFixAge: policy.Duration(10 * time.Second)}, f); r.Pass || r.Observed != "no position fix yet" {
		t.Errorf("no fix, age: %+v", r)
	}
	f.Location = &Fix{Lat: 41.525, Lon: -88.0817, Age: 42 * time.Second, Source: "gpsd"}
	if r := Judge(policy.Check{MaxFixAge: policy.Duration(10 * time.Second)}, f); r.Pass || r.Observed != "fix from gpsd 42s old" {
		t.Errorf("stale fix: %+v", r)
	}
	if r := Judge(policy.Check{Geofence: &yard}, f); !r.Pass {
		t.Errorf("a stale fix inside the fence is still inside: %+v", r)
	}
	fences := Fences([]policy.Check{{Geofence: &yard}, {OS: []string{"debian"}}, {Geofence: &square}})
	if Sides(fences, 41.525, -88.08) != 0b11 || Sides(fences, 41.5304, -88.0817) != 0b00 || Sides(fences, 41.525, -88.0817) != 0b11 {
		t.Errorf("sides: %b %b", Sides(fences, 41.525, -88.08), Sides(fences, 41.5304, -88.0817))
	}
}
