package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Killing a required process restricts the device within a sampling
// interval plus the check's hysteresis; status, explain and the audit log
// name the check with what was seen and what was expected; starting the process
// again restores normal mode.
func TestRequiredProcessDeathRestricts(t *testing.T) {
	e := newEnv(t)
	// A process name no other test or host process uses (at most 15).
	name := "edr-" + e.ns.Name[len(e.ns.Name)-6:]
	bin := filepath.Join(e.dir, name)
	sleep, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, sleep, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func() *exec.Cmd {
		cmd := exec.Command(bin, "600")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	sensor := run()
	scanner := e.doc.Classes["scanner"]
	scanner.Checks = []policy.Check{{ID: "edr-running", Process: &policy.ProcessMatch{Name: name}, FailAfter: 2, RecoverAfter: 1}}
	e.doc.Classes["scanner"] = scanner
	e.start()
	if resp := e.call(Request{Op: "apply", Bundle: e.bundle(1, time.Now().UTC().Truncate(time.Second))}); resp.Error != "" {
		t.Fatal(resp.Error)
	}
	check := func() (mode string, failing bool, observed string) {
		st := e.call(Request{Op: "status"}).Status
		for _, c := range st.Checks {
			if c.ID == "edr-running" {
				return st.Mode, c.Failing, c.Observed
			}
		}
		return st.Mode, false, ""
	}
	// The interval is 1s and two failures are needed: a few seconds at
	// most (the bound here is generous; speed is not what is tested).
	waitLong(t, "the check passing", func() bool { m, f, o := check(); return m == "normal" && !f && strings.Contains(o, "running (pid") })

	sensor.Process.Kill()
	sensor.Wait()
	waitLong(t, "restricted mode after the sensor died", func() bool { m, f, _ := check(); return m == "restricted" && f })
	st := e.call(Request{Op: "status"}).Status
	why := strings.Join(st.Why, "; ")
	if !strings.Contains(why, "check edr-running failed: observed "+name+" not running, expected "+name+" running") {
		t.Errorf("status does not name the check: %q", why)
	}
	// explain answers a denial with the check that caused it.
	if v := e.call(Request{Op: "explain", To: "10.50.0.5:22/tcp"}).Verdict; v == nil || v.Allowed || !strings.Contains(v.Reason, "check edr-running failed: observed "+name+" not running") {
		t.Errorf("explain does not name the check: %+v", v)
	}
	// Restricted keeps the profile's segments only (wms for scanners).
	if slices.Contains(st.Open, "diagnostics") {
		t.Errorf("restricted mode left diagnostics open: %v", st.Open)
	}

	run()
	waitLong(t, "normal mode after the sensor came back", func() bool { m, f, _ := check(); return m == "normal" && !f })
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
