package agent

import (
	"crypto/ed25519"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/agentproc"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// controlSite is the control server, a scanner agent holding tunnels to a
// wms gateway and a finance gateway run by partner acme-freight, a vehicle
// safety controller reachable only through the scanner's safety floor,
// and a second agent that only talks to control. Everything runs as the
// real binaries.
type controlSite struct {
	ctl      *lab.Control
	opsKey   ed25519.PrivateKey
	opsPub   string
	gw1, gw2 *lab.Gateway
	a, b     *agentproc.Agent
	safety   netip.AddrPort
	// aLink is agent a's end of its link to control.
	aLink string
}

// newControlSite builds the site; serve are further flags for the control
// server, which publishes the site's ops key.
func newControlSite(t *testing.T, serve ...string) *controlSite {
	return newControlSiteWith(t, "100.64.0.2/32", serve...)
}

// newControlSiteWith builds the site with aTun as agent a's configured
// tunnel address ("": none, control assigns one).
func newControlSiteWith(t *testing.T, aTun string, serve ...string) *controlSite {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go")
	s := &controlSite{}
	dir := t.TempDir()
	s.opsKey, s.opsPub = newOpsKey(t, dir), filepath.Join(dir, "ops", opskey.PublicFile)

	ctlNS, nsA := lab.NewNS(t, "ctl"), lab.NewNS(t, "agent")
	truck := lab.StartTelematics(t, nsA, netip.MustParsePrefix("192.168.50.0/29"))
	s.safety = truck.Controller
	s.a, s.b = s.newAgent(t, nsA, aTun, truck.Floor()), s.newAgent(t, lab.NewNS(t, "agent"), "100.64.0.3/32", truck.Floor())
	s.aLink, _ = lab.Link(t, s.a.NS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	lab.Link(t, s.b.NS, "10.99.0.6/30", ctlNS, "10.99.0.5/30")
	s.b.NS.MustRun(t, "ip", "route", "add", "10.99.0.1/32", "via", "10.99.0.5")
	s.ctl = lab.StartControlWith(t, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"), lab.ControlOptions{OpsPub: []string{s.opsPub}, Args: serve})

	n1, n2 := lab.NewNS(t, "gw1"), lab.NewNS(t, "gw2")
	lab.Link(t, s.a.NS, "192.0.2.2/30", n1, "192.0.2.1/30")
	lab.Link(t, s.a.NS, "192.0.2.6/30", n2, "192.0.2.5/30")
	s.gw1 = lab.StartGateway(t, n1, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	s.gw2 = lab.StartGateway(t, n2, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.5"), 51820, "100.64.0.1/24")
	s.gw1.Serve(t, wmsHost.Addr(), wmsHost.Port())
	s.gw2.Serve(t, financeHost.Addr(), financeHost.Port())
	return s
}

// newAgent configures an agent in ns with the safety floor entry floor
// and tunAddr as its tunnel address ("": none).
func (s *controlSite) newAgent(t *testing.T, ns *lab.NS, tunAddr string, floor localpolicy.FloorRule) *agentproc.Agent {
	cfg := config.Config{
		Device:      config.Device{Class: "scanner"},
		Trust:       config.Trust{Keys: []string{s.opsPub}},
		SafetyFloor: []localpolicy.FloorRule{floor},
	}
	if tunAddr != "" {
		cfg.Tunnel.Addresses = []netip.Prefix{netip.MustParsePrefix(tunAddr)}
	}
	return agentproc.New(t, ns, cfg)
}

func (s *controlSite) token(t *testing.T, class, ttl string) string {
	t.Helper()
	out := s.ctl.MustCLI(t, "token", "create", "--allow-unknown-class", "--class", class, "--ttl", ttl)
	return strings.TrimSpace(strings.Split(out, "\n")[0])
}

// bundle is a signed bundle opening wms and finance (acme-freight's) to
// scanners, with the control server as the control endpoint.
func (s *controlSite) bundle(t *testing.T, version uint64) string {
	t.Helper()
	return s.bundleWith(t, version, nil)
}

// bundleWith is bundle with change made to the policy before signing.
func (s *controlSite) bundleWith(t *testing.T, version uint64, change func(*policy.Document)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.dsse")
	if err := os.WriteFile(path, signFor(t, version, s.policyWith(t, change), s.opsKey), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// policyWith is the policy bundle signs, with change made to it.
func (s *controlSite) policyWith(t *testing.T, change func(*policy.Document)) *policy.Document {
	t.Helper()
	doc, err := policy.Parse([]byte(fmt.Sprintf(`{
  "schema": "bulkhead.policy/v1",
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "validity": {"max_offline": "72h"},
  "segments": [
    {"name": "wms", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": %q, "endpoint": %q}},
    {"name": "finance", "data_class": "financial", "tier": 1, "partner": "acme-freight",
     "destinations": [{"cidr": "10.30.0.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": %q, "endpoint": %q}}
  ],
  "classes": {"scanner": {"rules": [{"segment": "wms"}, {"segment": "finance"}]}}
}`, s.gw1.PublicKey, s.gw1.Endpoint, s.gw2.PublicKey, s.gw2.Endpoint)))
	if err != nil {
		t.Fatal(err)
	}
	if change != nil {
		change(doc)
		if err := doc.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	return doc
}

// signed gives control a command signed with key, as an ops laptop does,
// and fails the test if control refuses it.
func (s *controlSite) signed(t *testing.T, c command.Command, key ed25519.PrivateKey) []byte {
	t.Helper()
	raw := sign(t, c, key)
	if err := s.ctl.Deliver(t, raw); err != nil {
		t.Fatalf("control refused %s: %v", c.ID, err)
	}
	return raw
}

func (s *controlSite) controlKey(t *testing.T) ed25519.PrivateKey {
	k, err := pki.ReadKey(filepath.Join(s.ctl.Data, server.CommandKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return k.(ed25519.PrivateKey)
}

// enrolledOnV1 starts and enrols agent a, admits it at the wms gateway,
// pushes policy v1 and waits for it; it returns the device id.
func (s *controlSite) enrolledOnV1(t *testing.T) string {
	t.Helper()
	s.a.Start(t)
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	s.gw1.AllowPeer(t, s.a.Status(t).Tunnel.PublicKey, netip.AddrPort{}, "100.64.0.2/32")
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 1))
	lab.WaitFor(t, "policy v1", longWait, func() bool { return s.a.Status(t).PolicyVersion == 1 })
	return s.a.Status(t).DeviceID
}

// linkA cuts or restores agent a's link to control: a truck out of
// coverage.
func (s *controlSite) linkA(t *testing.T, up bool) {
	t.Helper()
	s.a.NS.MustRun(t, "ip", "link", "set", s.aLink, map[bool]string{true: "up", false: "down"}[up])
}

func releaseCmd(id, dev string) command.Command {
	now := time.Now().UTC()
	return command.Command{ID: id, Kind: command.Release, Target: command.Target{Devices: []string{dev}},
		Reason: "incident closed", IssuedAt: now, ExpiresAt: now.Add(10 * time.Minute)}
}

// afterOutage bounds a reconnection: the agent's backoff may be waiting
// up to 1.5 times its one-minute cap when control returns.
const afterOutage = 100 * time.Second

func TestEnrolmentRefusals(t *testing.T) {
	s := newControlSite(t)
	s.a.Start(t)
	s.b.Start(t)
	good := s.token(t, "scanner", "1h")

	wrongFP := "SHA256:" + strings.Repeat("ab", 32)
	if out, err := s.a.Enroll(s.ctl.URL, good, wrongFP); err == nil || !strings.Contains(out, "not the pinned") {
		t.Errorf("wrong CA fingerprint: err %v, output %q", err, out)
	}
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "truck", "1h"), s.ctl.Fingerprint); err == nil || !strings.Contains(out, "another class") {
		t.Errorf("wrong-class token: err %v, output %q", err, out)
	}
	short := s.token(t, "scanner", "1s")
	time.Sleep(1100 * time.Millisecond)
	if out, err := s.a.Enroll(s.ctl.URL, short, s.ctl.Fingerprint); err == nil || !strings.Contains(out, "expired") {
		t.Errorf("expired token: err %v, output %q", err, out)
	}
	if out, err := s.a.Enroll(s.ctl.URL, "bht_"+strings.Repeat("0", 40), s.ctl.Fingerprint); err == nil || !strings.Contains(out, "unknown") {
		t.Errorf("made-up token: err %v, output %q", err, out)
	}
	// None of that left anything behind.
	if st := s.a.Status(t); st.Control != nil {
		t.Fatalf("after refusals the agent reports control %+v", st.Control)
	}
	if _, err := os.Stat(filepath.Join(s.a.Dir, "state", "enrolment.json")); err == nil {
		t.Fatal("a refused enrolment left a record")
	}

	out, err := s.a.Enroll(s.ctl.URL, good, strings.ToUpper(s.ctl.Fingerprint[7:9])+s.ctl.Fingerprint[9:])
	if err == nil {
		t.Fatalf("a fingerprint without SHA256: was accepted: %s", out)
	}
	if out, err := s.a.Enroll(s.ctl.URL, good, s.ctl.Fingerprint); err != nil || !strings.Contains(out, "enrolled as dev-") {
		t.Fatalf("enrolment: %v %s", err, out)
	}
	if out, err := s.b.Enroll(s.ctl.URL, good, s.ctl.Fingerprint); err == nil || !strings.Contains(out, "already used") {
		t.Errorf("reused token: err %v, output %q", err, out)
	}
	st := s.a.Status(t)
	lab.WaitFor(t, "the first sync", longWait, func() bool { c := s.a.Status(t).Control; return c != nil && c.Connected })
	for _, f := range []string{"identity.key", "device.crt", "enrolment.json"} {
		info, err := os.Stat(filepath.Join(s.a.Dir, "state", f))
		if err != nil || info.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v mode %v, want 0600", f, err, info.Mode().Perm())
		}
	}
	devs := s.ctl.MustCLI(t, "devices")
	if !strings.Contains(devs, st.DeviceID) || strings.Count(devs, "dev-") != 1 {
		t.Errorf("devices lists:\n%s\nwant exactly %s", devs, st.DeviceID)
	}
	// Refusals are audited as one summary row a window, written at the
	// latest when the server stops.
	s.ctl.RestartWith(t, s.ctl.Options())
	audit := s.ctl.MustCLI(t, "audit")
	for _, want := range []string{"enrolment-refused", "another class: 1", "expired: 1", "already used: 1", "unknown: 1", "enrolled"} {
		if !strings.Contains(audit, want) {
			t.Errorf("server audit log lacks %q:\n%s", want, audit)
		}
	}
	// A batch: one token per line, each enrolling a device of its own.
	lines := strings.Split(s.ctl.MustCLI(t, "token", "create", "--allow-unknown-class", "--class", "scanner", "--count", "2"), "\n")
	if len(lines) < 3 || !strings.HasPrefix(lines[0], "bht_") || !strings.HasPrefix(lines[1], "bht_") || lines[0] == lines[1] ||
		!strings.Contains(lines[2], "2 tokens for class scanner") {
		t.Fatalf("token create --count 2 printed %q", lines)
	}
	if out, err := s.b.Enroll(s.ctl.URL, lines[1], s.ctl.Fingerprint); err != nil {
		t.Errorf("enrolment with a batch token: %v %s", err, out)
	}
	if out, err := s.ctl.CLI("token", "create", "--allow-unknown-class", "--class", "scanner", "--count", "0"); err == nil || !strings.Contains(out, "--count 0 is outside 1-10000") {
		t.Errorf("token create --count 0: err %v, output %q", err, out)
	}
	// The admin API gives an unauthenticated caller nothing.
	out, _ = s.ctl.NS.Run("curl", "-sk", s.ctl.URL+controlapi.PathAdminDevices)
	if strings.Contains(out, "dev-") || !strings.Contains(out, "operator certificate is required") {
		t.Errorf("unauthenticated admin call answered %q", out)
	}
}

// The kill-switch end to end: quarantine cuts a running transfer and keeps
// the safety controller and the control channel; forged and replayed
// releases are refused; an ops-signed release restores access. Partner
// revocation reaches every agent and survives agent and control restarts.
func TestQuarantineAndPartnerRevocation(t *testing.T) {
	s := newControlSite(t)
	s.a.Start(t)
	s.b.Start(t)
	for _, a := range []*agentproc.Agent{s.a, s.b} {
		if out, err := a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
			t.Fatalf("enroll: %v %s", err, out)
		}
	}
	devA, devB := s.a.Status(t).DeviceID, s.b.Status(t).DeviceID
	s.gw1.AllowPeer(t, s.a.Status(t).Tunnel.PublicKey, netip.AddrPort{}, "100.64.0.2/32")
	s.gw2.AllowPeer(t, s.a.Status(t).Tunnel.PublicKey, netip.AddrPort{}, "100.64.0.2/32")
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 1))
	for _, a := range []*agentproc.Agent{s.a, s.b} {
		lab.WaitFor(t, "policy v1 from control", longWait, func() bool { return a.Status(t).PolicyVersion == 1 })
	}
	if !lab.ReachesWithin(t, s.a.NS, "tcp", wmsHost, 10*time.Second) || !lab.ReachesWithin(t, s.a.NS, "tcp", financeHost, 10*time.Second) {
		t.Fatal("policy v1 does not open wms and finance through the tunnels")
	}
	if !lab.Reaches(t, s.a.NS, "tcp", s.safety) {
		t.Fatal("the safety controller is not reachable through the floor")
	}

	// Quarantine, signed by the control server's key.
	conn := lab.Conn(t, s.a.NS, wmsHost)
	if !lab.RoundTrip(conn, time.Second) {
		t.Fatal("no round trip on the established wms connection before quarantine")
	}
	s.ctl.MustCLI(t, "quarantine", devA, "--reason", "INC-7 scanner compromised")
	lab.WaitFor(t, "quarantine", longWait, func() bool { return s.a.Status(t).Mode == "quarantine" })
	if lab.RoundTrip(conn, time.Second) {
		t.Error("the established wms connection still carries data in quarantine")
	}
	if lab.Reaches(t, s.a.NS, "tcp", wmsHost) {
		t.Error("wms reachable in quarantine")
	}
	if !lab.Reaches(t, s.a.NS, "tcp", s.safety) {
		t.Error("the safety controller is unreachable in quarantine")
	}
	st := s.a.Status(t)
	if !strings.Contains(strings.Join(st.Why, " "), "INC-7") || len(st.Tunnel.Peers) != 0 {
		t.Errorf("quarantined status: why %q, %d peers", st.Why, len(st.Tunnel.Peers))
	}
	lab.WaitFor(t, "devices to show the quarantine", longWait, func() bool {
		out := s.ctl.MustCLI(t, "devices")
		return strings.Contains(out, "quarantine") && strings.Contains(out, "INC-7")
	})
	if c := s.a.Status(t).Control; c == nil || !c.Connected {
		t.Errorf("control channel in quarantine: %+v", c)
	}

	// Release signed only by the control key: refused at the server...
	if out, err := s.ctl.CLI("release", devA, "--reason", "try"); err == nil || !strings.Contains(out, "--key") {
		t.Errorf("release without ops keys: %v %s", err, out)
	}
	// ...signed with the control key and given to control: refused as
	// devices would refuse it...
	forged := sign(t, releaseCmd("forged-release-1", devA), s.controlKey(t))
	if err := s.ctl.Deliver(t, forged); err == nil || !strings.Contains(err.Error(), "devices would refuse it") {
		t.Errorf("control took a release signed by its own key: %v", err)
	}
	// ...and at the device, if someone holding that key gets one through.
	if s.a.Drop(t, "forged-release", forged, longWait) {
		t.Error("the agent took a release signed by the control key")
	}
	lab.WaitFor(t, "the forged release to be refused", longWait, func() bool { return auditHas(t, s, devA, "command-rejected", "ops keys") })
	if s.a.Status(t).Mode != "quarantine" {
		t.Fatal("a control-signed release lifted the quarantine")
	}
	// An ops-signed release restores access.
	r1 := s.signed(t, releaseCmd("ops-release-1", devA), s.opsKey)
	lab.WaitFor(t, "release", longWait, func() bool { return s.a.Status(t).Mode == "normal" })
	if !lab.ReachesWithin(t, s.a.NS, "tcp", wmsHost, 10*time.Second) {
		t.Error("wms not reachable after release")
	}
	// Quarantined again, the old release replayed is refused: by control
	// (given once), and by the device (the quarantine came after it).
	s.ctl.MustCLI(t, "quarantine", devA, "--reason", "INC-8")
	lab.WaitFor(t, "second quarantine", longWait, func() bool { return s.a.Status(t).Mode == "quarantine" })
	if err := s.ctl.Deliver(t, r1); err == nil || !strings.Contains(err.Error(), "already given") {
		t.Errorf("control took a replayed release: %v", err)
	}
	if s.a.Drop(t, "replayed-release", r1, longWait) {
		t.Error("the agent took a replayed release")
	}
	lab.WaitFor(t, "the replayed release to be refused", longWait, func() bool { return auditHas(t, s, devA, "command-rejected", "imposed after") })
	if s.a.Status(t).Mode != "quarantine" {
		t.Fatal("a replayed release lifted the quarantine")
	}
	s.signed(t, releaseCmd("ops-release-2", devA), s.opsKey)
	lab.WaitFor(t, "second release", longWait, func() bool { return s.a.Status(t).Mode == "normal" })

	// Partner revocation, fleet-wide.
	if !lab.ReachesWithin(t, s.a.NS, "tcp", financeHost, 10*time.Second) {
		t.Fatal("finance not reachable before revocation")
	}
	fin := lab.Conn(t, s.a.NS, financeHost)
	out := s.ctl.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "partner breach")
	if !strings.Contains(out, devA) || !strings.Contains(out, devB) {
		t.Errorf("revoke-partner reached %q, want both devices", out)
	}
	for _, a := range []*agentproc.Agent{s.a, s.b} {
		lab.WaitFor(t, "revocation on every agent", longWait, func() bool { return a.Status(t).Mode == "normal" && revoked(t, a) })
	}
	if lab.RoundTrip(fin, time.Second) || lab.Reaches(t, s.a.NS, "tcp", financeHost) {
		t.Error("finance still reachable after the partner was revoked")
	}
	if !lab.Reaches(t, s.a.NS, "tcp", wmsHost) {
		t.Error("wms lost with the partner's revocation")
	}
	// It holds across an agent restart and a control restart.
	s.a.Kill()
	s.ctl.Stop()
	s.a.Start(t)
	if !revoked(t, s.a) || lab.Reaches(t, s.a.NS, "tcp", financeHost) {
		t.Error("revocation lost across an agent restart with control down")
	}
	s.ctl.Start(t)
	lab.WaitFor(t, "reconnect", afterOutage, func() bool { c := s.a.Status(t).Control; return c != nil && c.Connected })
	if !revoked(t, s.a) || lab.Reaches(t, s.a.NS, "tcp", financeHost) {
		t.Error("revocation lost across a control restart")
	}
	s.ctl.MustCLI(t, "reinstate-partner", "acme-freight", "--reason", "cleared", "--key", filepath.Join(filepath.Dir(s.opsPub), opskey.PrivateFile))
	lab.WaitFor(t, "reinstatement", longWait, func() bool { return !revoked(t, s.a) })
	if !lab.ReachesWithin(t, s.a.NS, "tcp", financeHost, 10*time.Second) {
		t.Error("finance not reachable after reinstatement")
	}
}

func revoked(t *testing.T, a *agentproc.Agent) bool {
	st := a.Status(t)
	for _, d := range st.Decisions {
		if d.Segment == "finance" && strings.Contains(d.Reason, "revoked") {
			return true
		}
	}
	return false
}

// auditHas reports whether the device reported an event of kind whose
// detail contains text (reports travel through the outbox to control).
func auditHas(t *testing.T, s *controlSite, dev, kind, text string) bool {
	out, err := s.ctl.CLI("device", "show", dev)
	if err != nil {
		return false
	}
	var d controlapi.Device
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("device show: %v: %s", err, out)
	}
	for _, e := range d.Reports {
		if e.Kind == kind && strings.Contains(e.Detail, text) {
			return true
		}
	}
	return false
}

// A bundle signed by a key the device does not trust, handed out by a
// compromised control server, is refused and audited once: the device
// names it in its syncs and the server stops offering it, instead of the
// two trading it back and forth, each refusal audited, until the outbox
// overflows and drops the evidence. A valid bundle after it still lands.
// A control server taken over by an attacker (its configuration names the
// attacker's key as the ops key, so it takes the attacker's pushes)
// offers a forged bundle. The device refuses it once, audits it once, and
// does not refuse it again after a restart; once the server is restored
// it no longer offers what it cannot verify, and a valid newer bundle
// lands.
func TestForgedBundleIsRefusedOnce(t *testing.T) {
	s := newControlSite(t)
	dev := s.enrolledOnV1(t)

	dir := t.TempDir()
	attacker := newOpsKey(t, dir)
	honest := s.ctl.Options()
	taken := honest
	taken.OpsPub = []string{filepath.Join(dir, "ops", opskey.PublicFile)}
	s.ctl.RestartWith(t, taken)
	forged := filepath.Join(t.TempDir(), "forged.dsse")
	writeFile(t, forged, string(signFor(t, 2, s.policyWith(t, nil), attacker)))
	s.ctl.MustCLI(t, "policy", "push", forged)
	lab.WaitFor(t, "the forged bundle's refusal at control", longWait, func() bool { return auditHas(t, s, dev, "bundle-rejected", "not a trusted ops key") })
	s.a.Kill() // a restart forgets nothing it refused
	s.a.Start(t)
	time.Sleep(3 * time.Second) // a loop would audit thousands meanwhile
	var d controlapi.Device
	if err := json.Unmarshal([]byte(s.ctl.MustCLI(t, "device", "show", dev)), &d); err != nil {
		t.Fatal(err)
	}
	refusals := 0
	for _, e := range d.Reports {
		if e.Kind == "bundle-rejected" {
			refusals++
		}
	}
	if refusals != 1 || s.a.Status(t).PolicyVersion != 1 {
		t.Errorf("forged bundle: %d refusals audited (want 1), device on v%d (want 1)", refusals, s.a.Status(t).PolicyVersion)
	}
	s.ctl.RestartWith(t, honest)
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 3))
	lab.WaitFor(t, "a valid v3 after the forged v2", longWait, func() bool { return s.a.Status(t).PolicyVersion == 3 })
}

// The ops keys are rotated through control: the rotation (signed by the
// old key and the new) reaches the device, which from then on trusts only
// the new key for what it is sent, across a restart, while the policy it
// accepted before keeps running; a replay of the rotation is refused.
func TestTrustRootRotationThroughControl(t *testing.T) {
	s := newControlSite(t)
	dev := s.enrolledOnV1(t)
	dir := t.TempDir()
	newKey := newOpsKey(t, dir)
	next, err := opskey.NewRoots(1, newKey.Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := bundle.SignRoots(bundle.NewRootSet(2, next), s.opsKey, newKey)
	if err != nil {
		t.Fatal(err)
	}
	rotation := filepath.Join(dir, "roots-v2.dsse")
	writeFile(t, rotation, string(raw))
	if out := s.ctl.MustCLI(t, "policy", "push", rotation); !strings.Contains(out, "pushed trust-root rotation version 2") {
		t.Fatalf("push of a rotation printed %q", out)
	}
	lab.WaitFor(t, "the rotation on the device", longWait, func() bool { return s.a.Status(t).RootsVersion == 2 })
	lab.WaitFor(t, "the rotation audited at control", longWait, func() bool { return auditHas(t, s, dev, "roots-rotated", "1 keys") })
	// Restarted before any bundle from the new keys, the device still
	// runs the policy it accepted under the old ones.
	s.a.Kill()
	s.a.Start(t)
	if st := s.a.Status(t); st.RootsVersion != 2 || st.PolicyVersion != 1 || st.Mode != "normal" {
		t.Fatalf("restarted after the rotation: roots v%d, policy v%d, mode %s (%v); want roots v2, policy v1, normal", st.RootsVersion, st.PolicyVersion, st.Mode, st.Why)
	}

	old := filepath.Join(dir, "old-key-v2.dsse")
	writeFile(t, old, string(signFor(t, 2, s.policyWith(t, nil), s.opsKey)))
	// Control follows the rotation and refuses the old key's bundle; the
	// device, handed it directly, refuses it too.
	if out, err := s.ctl.CLI("policy", "push", old); err == nil || !strings.Contains(out, "not a trusted ops key") {
		t.Fatalf("control took a bundle of the rotated-out key: %v %s", err, out)
	}
	if out, err := s.a.NS.Command(lab.Binary(t, "cmd/bulkhead"), "policy", "apply", "--socket", s.a.Socket, old).CombinedOutput(); err == nil || !strings.Contains(string(out), "not a trusted ops key") {
		t.Fatalf("the device took a bundle of the rotated-out key: %v %s", err, out)
	}
	fresh := filepath.Join(dir, "new-key-v3.dsse")
	writeFile(t, fresh, string(signFor(t, 3, s.policyWith(t, nil), newKey)))
	s.ctl.MustCLI(t, "policy", "push", fresh)
	lab.WaitFor(t, "the new key's bundle", longWait, func() bool { return s.a.Status(t).PolicyVersion == 3 })

	s.a.Kill()
	s.a.Start(t)
	if st := s.a.Status(t); st.RootsVersion != 2 || st.PolicyVersion != 3 || st.Mode != "normal" {
		t.Errorf("after a restart: roots v%d, policy v%d, mode %s; want roots v2, policy v3, normal", st.RootsVersion, st.PolicyVersion, st.Mode)
	}
	out, err := s.a.NS.Command(lab.Binary(t, "cmd/bulkhead"), "policy", "apply", "--socket", s.a.Socket, rotation).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "root set version 2 is not above the current 2") {
		t.Errorf("a replayed rotation: %v %s", err, out)
	}
}

// With control down the agent restarts into its cached bundle, and what
// it reports meanwhile reaches control after the outage: every event
// once, in order.
func TestOutageLosesNoReports(t *testing.T) {
	s := newControlSite(t)
	dev := s.enrolledOnV1(t)

	s.ctl.Stop()
	s.a.Kill()
	s.a.Start(t)
	if st := s.a.Status(t); st.PolicyVersion != 1 || st.Mode != "normal" || !lab.ReachesWithin(t, s.a.NS, "tcp", wmsHost, 10*time.Second) {
		t.Fatalf("after a restart with control down: v%d %s", st.PolicyVersion, st.Mode)
	}
	// Events during the outage: three drift repairs.
	for i := range 3 {
		s.a.NS.MustRun(t, "nft", "flush", "ruleset")
		lab.WaitFor(t, "drift repair", longWait, func() bool { return s.a.Status(t).DriftRepairs == i+1 })
	}
	if c := s.a.Status(t).Control; c == nil || c.Connected {
		t.Errorf("control status during the outage: %+v", c)
	}
	s.ctl.Start(t)
	lab.WaitFor(t, "the outage's reports", afterOutage, func() bool {
		out, err := s.ctl.CLI("device", "show", dev)
		return err == nil && strings.Count(out, `"drift-repaired"`) >= 3
	})
	var d controlapi.Device
	if err := json.Unmarshal([]byte(s.ctl.MustCLI(t, "device", "show", dev)), &d); err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	drift := 0
	for i, e := range d.Reports {
		if seen[e.Seq] || (i > 0 && e.Seq <= d.Reports[i-1].Seq) {
			t.Errorf("report %d (seq %d) duplicated or out of order", i, e.Seq)
		}
		seen[e.Seq] = true
		if e.Kind == "drift-repaired" {
			drift++
		}
	}
	if drift != 3 || d.Reports[0].Kind != "enrolled" || d.ReportsDropped != 0 {
		t.Errorf("reports after the outage: %d drift repairs (want 3), first %q, %d dropped: %+v", drift, d.Reports[0].Kind, d.ReportsDropped, d.Reports)
	}
}

// tunnelAddrs are the addresses on agent a's tunnel interface (the
// kernel's link-local one aside).
func (s *controlSite) tunnelAddrs(t *testing.T) []string {
	t.Helper()
	return tunnelAddrs(t, s.a)
}

// tunnelAddrs are the addresses on agent a's tunnel interface.
func tunnelAddrs(t *testing.T, a *agentproc.Agent) []string {
	t.Helper()
	var links []struct {
		AddrInfo []struct {
			Local     string `json:"local"`
			PrefixLen int    `json:"prefixlen"`
			Scope     string `json:"scope"`
		} `json:"addr_info"`
	}
	out := a.NS.MustRun(t, "ip", "-j", "addr", "show", "dev", a.Status(t).Tunnel.Interface)
	if err := json.Unmarshal([]byte(out), &links); err != nil {
		t.Fatalf("ip -j addr: %v: %s", err, out)
	}
	var addrs []string
	for _, l := range links {
		for _, a := range l.AddrInfo {
			if a.Scope != "link" {
				addrs = append(addrs, fmt.Sprintf("%s/%d", a.Local, a.PrefixLen))
			}
		}
	}
	return addrs
}

// An agent whose configuration names no tunnel address takes the one
// control assigns at enrolment: it is on the tunnel at once, a gateway
// admitting the device by that address carries its traffic, and it is
// there again after a restart.
func TestTheTunnelAddressControlAssigns(t *testing.T) {
	s := newControlSiteWith(t, "", "--tunnel-pool", "100.64.0.64/26")
	s.a.Start(t)
	if got := s.tunnelAddrs(t); len(got) != 0 {
		t.Fatalf("before enrolment the tunnel has addresses %v, want none", got)
	}
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	const assigned = "100.64.0.65/32" // the pool's first
	if got := s.tunnelAddrs(t); !slices.Equal(got, []string{assigned}) {
		t.Fatalf("after enrolment the tunnel has %v, want %s", got, assigned)
	}
	s.gw1.AllowPeer(t, s.a.Status(t).Tunnel.PublicKey, netip.AddrPort{}, assigned)
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 1))
	lab.WaitFor(t, "policy v1", longWait, func() bool { return s.a.Status(t).PolicyVersion == 1 })
	if !lab.ReachesWithin(t, s.a.NS, "tcp", wmsHost, 10*time.Second) {
		t.Fatal("wms unreachable through the gateway from the assigned address")
	}
	s.a.Kill()
	s.a.Start(t)
	if got := s.tunnelAddrs(t); !slices.Equal(got, []string{assigned}) {
		t.Fatalf("after a restart the tunnel has %v, want %s", got, assigned)
	}
	if !lab.ReachesWithin(t, s.a.NS, "tcp", wmsHost, 10*time.Second) {
		t.Fatal("wms unreachable after a restart")
	}

	// A rotated key reaches control, which binds it in a new certificate
	// the device presents from then on: an order still arrives.
	id := s.a.Status(t).DeviceID
	newKey, err := s.a.CLI("rotate-key")
	if err != nil {
		t.Fatalf("rotate-key: %v: %s", err, newKey)
	}
	newKey = s.a.Status(t).Tunnel.PublicKey
	lab.WaitFor(t, "control to record the new key", longWait, func() bool {
		var d controlapi.Device
		return json.Unmarshal([]byte(s.ctl.MustCLI(t, "device", "show", id)), &d) == nil && d.WireGuardKey == newKey
	})
	lab.WaitFor(t, "the device to present a certificate binding it", longWait, func() bool {
		raw, err := os.ReadFile(filepath.Join(s.a.Dir, "state", controlclient.CertFile))
		block, _ := pem.Decode(raw)
		if err != nil || block == nil {
			return false
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return false
		}
		b, bound, err := controlapi.BindingOf(cert)
		return err == nil && bound && b.Key.String() == newKey && b.Address.String()+"/32" == assigned
	})
	s.ctl.MustCLI(t, "quarantine", id, "--reason", "INC-9 after a key rotation")
	lab.WaitFor(t, "the order after the rotation", longWait, func() bool { return s.a.Status(t).Mode == "quarantine" })
}
