package agent

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// Orders are state at control: they reach devices that were away longer
// than a delivery lasts, devices enrolled after them, and devices whose
// cache was restored from before them. These tests run the real server
// and agents; each failed on the code where an order was a message with a
// short expiry, sent to the devices enrolled at the moment behind a
// cursor.

// A truck out of coverage for longer than the server's command lifetime
// is quarantined on its first sync back.
func TestOrderOutlivesItsDeliveries(t *testing.T) {
	s := newControlSite(t, "--command-lifetime", "2s")
	devA := s.enrolledOnV1(t)
	s.linkA(t, false)
	out, err := s.ctl.CLI("quarantine", devA, "--reason", "INC-40 truck stolen", "--wait", "2s")
	if err == nil || !strings.Contains(out, devA) || !strings.Contains(out, "pending") {
		t.Errorf("--wait with the device cut off: err %v, output %q; want a failure naming it pending", err, out)
	}
	time.Sleep(5 * time.Second) // more than twice the lifetime of a delivery
	if m := s.a.Status(t).Mode; m == "quarantine" {
		t.Fatal("quarantined while cut off from control")
	}
	s.linkA(t, true)
	lab.WaitFor(t, "the quarantine to land after the outage", afterOutage, func() bool { return s.a.Status(t).Mode == "quarantine" })
	lab.WaitFor(t, "control to see it applied", longWait, func() bool {
		out, err := s.ctl.CLI("orders")
		return err == nil && strings.Contains(out, devA) && strings.Contains(out, "applied")
	})
}

// A release reaches a device that was away when it was issued, after the
// release's own expiry; it lifts only what came before it.
func TestReleaseReachesADeviceThatWasAway(t *testing.T) {
	s := newControlSite(t)
	devA := s.enrolledOnV1(t)
	s.ctl.MustCLI(t, "quarantine", devA, "--reason", "INC-41", "--wait", "20s")
	s.linkA(t, false)
	key := filepath.Join(filepath.Dir(s.opsPub), opskey.PrivateFile)
	s.ctl.MustCLI(t, "release", devA, "--reason", "INC-41 closed", "--key", key, "--valid-for", "3s")
	time.Sleep(4 * time.Second) // the release has expired
	s.linkA(t, true)
	lab.WaitFor(t, "the expired release to lift the quarantine", afterOutage, func() bool { return s.a.Status(t).Mode == "normal" })
	if !lab.ReachesWithin(t, s.a.NS, "tcp", wmsHost, lab.FirstContact) {
		t.Error("wms not reachable after the release")
	}
}

// A device enrolled after a partner's revocation never holds a tunnel to
// that partner's segment.
func TestEnrolledAfterARevocation(t *testing.T) {
	s := newControlSite(t)
	s.enrolledOnV1(t)
	s.ctl.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "INC-42 carrier breach", "--wait", "20s")

	// b reaches both gateways, as a reaches them: only its policy and
	// the revocation decide what it gets.
	lab.Link(t, s.b.NS, "192.0.2.9/30", s.gw1.NS, "192.0.2.10/30")
	lab.Link(t, s.b.NS, "192.0.2.13/30", s.gw2.NS, "192.0.2.14/30")
	s.b.NS.MustRun(t, "ip", "route", "add", "192.0.2.1/32", "via", "192.0.2.10")
	s.b.NS.MustRun(t, "ip", "route", "add", "192.0.2.5/32", "via", "192.0.2.14")
	s.b.Start(t)
	if out, err := s.b.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	pub := s.b.Status(t).Tunnel.PublicKey
	s.gw1.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.3/32")
	s.gw2.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.3/32")
	lab.WaitFor(t, "policy v1 on the new device", longWait, func() bool { return s.b.Status(t).PolicyVersion == 1 })
	if !lab.ReachesWithin(t, s.b.NS, "tcp", wmsHost, lab.FirstContact) {
		t.Error("the new device does not reach wms")
	}
	if lab.Reaches(t, s.b.NS, "tcp", financeHost) {
		t.Error("the new device reaches the revoked partner's finance segment")
	}
	// The agent logs every change of its tunnel's peers; its policy has
	// two gateways, wms's and the revoked partner's.
	log, err := os.ReadFile(filepath.Join(s.b.Dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	changes := 0
	for _, line := range strings.Split(string(log), "\n") {
		if !strings.Contains(line, `msg="tunnel peers"`) {
			continue
		}
		changes++
		if !strings.HasSuffix(strings.TrimSpace(line), "peers=1") {
			t.Errorf("the new device held more than wms's gateway as a peer: %s", line)
		}
	}
	if changes == 0 {
		t.Error("the agent's log shows no change of tunnel peers; the check saw nothing")
	}
	if !revoked(t, s.b) {
		t.Error("the new device's decisions do not show the revocation")
	}
	if hs := s.gw2.LatestHandshake(t, pub); !hs.IsZero() {
		t.Errorf("the revoked partner's gateway saw a handshake from the new device at %v", hs)
	}
}

// A device whose cache is restored from before a revocation gets the
// revocation on its first sync.
func TestRestoredCacheGetsTheRevocation(t *testing.T) {
	s := newControlSite(t)
	s.enrolledOnV1(t)
	state := filepath.Join(s.a.Dir, "state")
	backup := filepath.Join(t.TempDir(), "state")
	s.a.Kill()
	if out, err := exec.Command("cp", "-a", state, backup).CombinedOutput(); err != nil {
		t.Fatalf("backup: %v %s", err, out)
	}
	s.a.Start(t)
	lab.WaitFor(t, "reconnect", longWait, func() bool { c := s.a.Status(t).Control; return c != nil && c.Connected })
	s.ctl.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "INC-43 carrier breach", "--wait", "20s")
	s.a.Kill()
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", backup, state).CombinedOutput(); err != nil {
		t.Fatalf("restore: %v %s", err, out)
	}
	s.a.Start(t)
	lab.WaitFor(t, "the revocation on the restored device", longWait, func() bool { return revoked(t, s.a) })
	if lab.Reaches(t, s.a.NS, "tcp", financeHost) {
		t.Error("the restored device reaches the revoked partner")
	}
}

// Each mistake in a name or a flag is an error that says what was meant,
// exits non-zero, and changes nothing: no order, no audit row.
func TestNameMistakesChangeNothing(t *testing.T) {
	s := newControlSite(t)
	devA := s.enrolledOnV1(t)
	audit := s.ctl.MustCLI(t, "audit")
	key := filepath.Join(filepath.Dir(s.opsPub), opskey.PrivateFile)
	doc := filepath.Join(t.TempDir(), "policy.json")
	raw, err := json.Marshal(s.policyWith(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, doc, string(raw))
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"revoke-partner", "acme", "--reason", "INC-231"}, []string{`no partner is named "acme"`, "acme-freight"}},
		{[]string{"quarantine", "--class", "scaner", "--reason", "x"}, []string{`no class is named "scaner"`, "scanner"}},
		{[]string{"quarantine", devA + "x", "--reason", "x"}, []string{"no device is named", devA}},
		{[]string{"quarantine", devA, "--reason", "x", "--valid-for", "2h"}, []string{"--valid-for", "needs --key"}},
		{[]string{"release", devA, "--reason", "x", "--key", key}, []string{"would lift nothing"}},
		{[]string{"token", "create", "--class", "scaner"}, []string{`no class is named "scaner"`, "--allow-unknown-class"}},
		{[]string{"policy", "sign", "--key", key, "--key", key, "--in", doc, "--version", "9", "--target", "scanner", "--valid-for", "24h", "--out", filepath.Join(t.TempDir(), "b.dsse")}, []string{"same key"}},
	} {
		out, err := s.ctl.CLI(tc.args...)
		if err == nil {
			t.Errorf("%v: exit 0: %s", tc.args, out)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("%v: output %q does not say %q", tc.args, out, w)
			}
		}
	}
	if after := s.ctl.MustCLI(t, "audit"); after != audit {
		t.Errorf("the mistakes changed the audit log:\nbefore:\n%s\nafter:\n%s", audit, after)
	}
	if out := s.ctl.MustCLI(t, "orders", "--all"); !strings.Contains(out, "no orders") {
		t.Errorf("the mistakes left orders: %s", out)
	}
	// --dry-run names the devices and changes nothing either.
	out := s.ctl.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "drill", "--dry-run")
	if !strings.Contains(out, devA) || !strings.Contains(out, "nothing was ordered") {
		t.Errorf("dry run said %q", out)
	}
	if after := s.ctl.MustCLI(t, "audit"); after != audit {
		t.Error("the dry run changed the audit log")
	}
}
