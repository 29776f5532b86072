package agent

import (
	"crypto/ed25519"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/agentproc"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// gatewaySite is control with a tunnel pool, a Bulkhead segment gateway
// fronting wms and finance (partner acme-freight), with their hosts on
// its loopback, and a scanner whose tunnel goes to it. Everything runs as
// the real binaries.
type gatewaySite struct {
	ctl     *lab.Control
	opsKey  ed25519.PrivateKey
	opsPub  string
	gw, dev *agentproc.Agent
	gwKey   string
	// devLink is the scanner's uplink address toward the gateway.
	devLink netip.Addr
}

var (
	wmsOther  = netip.MustParseAddrPort("10.20.1.10:8080") // on a wms host, a port no rule opens
	gwOwnPort = netip.MustParseAddrPort("100.64.0.1:2222") // a service of the gateway itself, on its tunnel address
)

const gatewayEndpoint = "192.0.2.1:51820"

func newGatewaySite(t *testing.T) *gatewaySite {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go")
	s := &gatewaySite{devLink: netip.MustParseAddr("192.0.2.2")}
	dir := t.TempDir()
	s.opsKey = newOpsKey(t, dir)
	s.opsPub = filepath.Join(dir, "ops", opskey.PublicFile)
	ctlNS, gwNS, devNS := lab.NewNS(t, "ctl"), lab.NewNS(t, "gw"), lab.NewNS(t, "dev")
	lab.Link(t, gwNS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	lab.Link(t, devNS, "10.99.0.6/30", ctlNS, "10.99.0.5/30")
	devNS.MustRun(t, "ip", "route", "add", "10.99.0.1/32", "via", "10.99.0.5")
	lab.Link(t, devNS, "192.0.2.2/30", gwNS, "192.0.2.1/30")
	s.ctl = lab.StartControlWith(t, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"),
		lab.ControlOptions{OpsPub: []string{s.opsPub}, Args: []string{"--tunnel-pool", "100.64.0.0/24"}})
	for _, ap := range []netip.AddrPort{wmsHost, wmsOther, financeHost} {
		gwNS.MustRun(t, "ip", "addr", "replace", netip.PrefixFrom(ap.Addr(), 32).String(), "dev", "lo")
		lab.Echo(t, gwNS, ap)
	}

	s.gw = agentproc.New(t, gwNS, config.Config{Device: config.Device{Class: "segment-gateway"}, Trust: config.Trust{Keys: []string{s.opsPub}},
		Tunnel: config.TunnelConfig{ListenPort: 51820}, Gateway: &config.GatewayConfig{Segments: []string{"finance", "wms"}}})
	s.dev = agentproc.New(t, devNS, config.Config{Device: config.Device{Class: "scanner"}, Trust: config.Trust{Keys: []string{s.opsPub}}})
	s.gw.Start(t)
	s.gwKey = s.gw.Status(t).Tunnel.PublicKey
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 1, nil))
	tok := firstLine(s.ctl.MustCLI(t, "token", "create", "--role", "gateway", "--segment", "wms", "--segment", "finance"))
	if out, err := s.gw.Enroll(s.ctl.URL, tok, s.ctl.Fingerprint); err != nil {
		t.Fatalf("gateway enrolment: %v %s", err, out)
	}
	lab.WaitFor(t, "the gateway's tunnel address", longWait, func() bool { return slices.Contains(tunnelAddrs(t, s.gw), "100.64.0.1/24") })
	lab.Echo(t, gwNS, gwOwnPort)
	s.dev.Start(t)
	if out, err := s.dev.Enroll(s.ctl.URL, firstLine(s.ctl.MustCLI(t, "token", "create", "--class", "scanner")), s.ctl.Fingerprint); err != nil {
		t.Fatalf("scanner enrolment: %v %s", err, out)
	}
	for _, a := range []*agentproc.Agent{s.gw, s.dev} {
		lab.WaitFor(t, "policy v1 on "+a.NS.Name, longWait, func() bool { return a.Status(t).PolicyVersion == 1 })
	}
	return s
}

func firstLine(s string) string { return strings.TrimSpace(strings.Split(s, "\n")[0]) }

// bundle signs the site's policy as version v, for scanners and segment
// gateways: wms and finance through the Bulkhead gateway, both open to
// scanners on 443.
func (s *gatewaySite) bundle(t *testing.T, v uint64, change func(*policy.Document)) string {
	t.Helper()
	doc, err := policy.Parse([]byte(fmt.Sprintf(`{
  "schema": "bulkhead.policy/v1",
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "validity": {"max_offline": "72h"},
  "segments": [
    {"name": "wms", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443", "8080"]}],
     "gateway": {"public_key": %[1]q, "endpoint": %[2]q}},
    {"name": "finance", "data_class": "financial", "tier": 1, "partner": "acme-freight",
     "destinations": [{"cidr": "10.30.0.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": %[1]q, "endpoint": %[2]q}}
  ],
  "classes": {"scanner": {"rules": [{"segment": "wms", "ports": ["443"]}, {"segment": "finance"}]},
              "segment-gateway": {"rules": []}}
}`, s.gwKey, gatewayEndpoint)))
	if err != nil {
		t.Fatal(err)
	}
	if change != nil {
		change(doc)
		if err := doc.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(t.TempDir(), "policy.dsse")
	now := time.Now().UTC().Truncate(time.Second)
	raw, err := bundle.Sign(bundle.Payload{Version: v, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: []string{"scanner", "segment-gateway"}}, Policy: *doc}, s.opsKey)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, string(raw))
	return path
}

func (s *gatewaySite) opsKeyFile(t *testing.T) string {
	return filepath.Join(filepath.Dir(s.opsPub), opskey.PrivateFile)
}

// root plays root on the scanner: the agent killed, its table flushed,
// and its stolen WireGuard key in Debian's wireguard-go, routing all of
// 10/8 and the tunnel pool through the gateway.
func (s *gatewaySite) root(t *testing.T) {
	t.Helper()
	addr := tunnelAddrs(t, s.dev)
	s.dev.Kill()
	s.dev.NS.MustRun(t, "nft", "flush", "ruleset")
	if out := s.dev.NS.MustRun(t, "nft", "list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Fatalf("the scanner's table survived the flush: %s", out)
	}
	if len(addr) != 1 {
		t.Fatalf("the scanner had tunnel addresses %v, want the one control assigned", addr)
	}
	rogue := lab.StartGateway(t, s.dev.NS, lab.DebianWireGuard, s.devLink, 51899, addr[0])
	s.dev.NS.MustRun(t, "wg", "set", rogue.Iface, "private-key", filepath.Join(s.dev.Dir, "state", "wg.key"))
	rogue.RouteVia(t, s.gwKey, netip.MustParseAddrPort(gatewayEndpoint), "10.0.0.0/8", "100.64.0.0/24")
}

// The gateway is where the policy holds when the device is not: with
// the scanner's agent killed, its table flushed and its key in a
// WireGuard of root's own, routing everything through the gateway, the
// scanner reaches what its class opens and nothing else; a quarantine
// and a partner revocation each cut its live flow at the gateway, and
// lifting either takes the ops keys.
func TestGatewayHoldsTheMatrixWhenTheDeviceIsRooted(t *testing.T) {
	s := newGatewaySite(t)
	devID := s.dev.Status(t).DeviceID
	matrix := func(when string) {
		t.Helper()
		for ap, want := range map[netip.AddrPort]bool{wmsHost: true, financeHost: true, wmsOther: false, gwOwnPort: false} {
			reached := lab.Reaches(t, s.dev.NS, "tcp", ap)
			if want {
				reached = lab.ReachesWithin(t, s.dev.NS, "tcp", ap, lab.FirstContact)
			}
			if reached != want {
				t.Errorf("%s: %v reached %v, want %v", when, ap, reached, want)
			}
		}
	}
	matrix("agent running")
	s.root(t)
	matrix("rooted")

	cut := func(what string, conn net.Conn) {
		t.Helper()
		lab.WaitFor(t, what+" to cut the live flow at the gateway", longWait, func() bool { return !lab.RoundTrip(conn, 300*time.Millisecond) })
	}
	wms := lab.Conn(t, s.dev.NS, wmsHost)
	if !lab.RoundTrip(wms, lab.FirstContact) {
		t.Fatal("no round trip to wms through the rooted tunnel")
	}
	s.ctl.MustCLI(t, "quarantine", devID, "--reason", "INC-9 rooted scanner")
	cut("quarantine", wms)
	if lab.Reaches(t, s.dev.NS, "tcp", wmsHost) || lab.Reaches(t, s.dev.NS, "tcp", financeHost) {
		t.Error("a quarantined device reaches a segment through the gateway")
	}
	if out, err := s.ctl.CLI("release", devID, "--reason", "try"); err == nil {
		t.Errorf("a release without the ops keys was taken: %s", out)
	}
	s.ctl.MustCLI(t, "release", devID, "--reason", "reimaged", "--key", s.opsKeyFile(t))
	if !lab.ReachesWithin(t, s.dev.NS, "tcp", wmsHost, longWait) {
		t.Fatal("wms not reachable after the ops-signed release")
	}

	fin := lab.Conn(t, s.dev.NS, financeHost)
	if !lab.RoundTrip(fin, lab.FirstContact) {
		t.Fatal("no round trip to finance before the revocation")
	}
	s.ctl.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "partner breach")
	cut("partner revocation", fin)
	if !lab.Reaches(t, s.dev.NS, "tcp", wmsHost) {
		t.Error("wms lost with the partner's revocation")
	}
	s.ctl.MustCLI(t, "reinstate-partner", "acme-freight", "--reason", "cleared", "--key", s.opsKeyFile(t))
	if !lab.ReachesWithin(t, s.dev.NS, "tcp", financeHost, longWait) {
		t.Error("finance not reachable after reinstatement")
	}

	// Revoked for good: out of the roster, its flow cut.
	wms = lab.Conn(t, s.dev.NS, wmsHost)
	if !lab.RoundTrip(wms, lab.FirstContact) {
		t.Fatal("no round trip to wms before the revocation")
	}
	s.ctl.MustCLI(t, "device", "revoke", devID, "--reason", "INC-9 box stolen")
	cut("revocation", wms)
	if got := s.gw.Status(t).Tunnel.Peers; len(got) != 0 {
		t.Errorf("the gateway still has peers after the revocation: %+v", got)
	}
}

// A WireGuard client whose key is not enrolled gets no handshake from a
// Bulkhead gateway, so it reaches nothing behind it.
func TestUnenrolledKeyGetsNoHandshake(t *testing.T) {
	s := newGatewaySite(t)
	strangerNS := lab.NewNS(t, "strgr")
	lab.Link(t, strangerNS, "192.0.2.6/30", s.gw.NS, "192.0.2.5/30")
	stranger := lab.StartGateway(t, strangerNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.6"), 51899, "100.64.0.200/32")
	stranger.RouteVia(t, s.gwKey, netip.MustParseAddrPort("192.0.2.5:51820"), "10.0.0.0/8", "100.64.0.0/24")
	if lab.ReachesWithin(t, strangerNS, "tcp", wmsHost, lab.FirstContact) {
		t.Fatal("an unenrolled key reached wms through the gateway")
	}
	if !stranger.LatestHandshake(t, s.gwKey).IsZero() {
		t.Error("an unenrolled key completed a handshake with the gateway")
	}
	if !lab.ReachesWithin(t, s.dev.NS, "tcp", wmsHost, lab.FirstContact) {
		t.Error("the enrolled scanner does not reach wms: the test proves nothing")
	}
}

// A rotated device key reaches control, which binds it in a new
// certificate; the gateway learns it from the roster: the new key works
// and the old one, stolen before the rotation, opens nothing.
func TestRotatedKeyAtTheGateway(t *testing.T) {
	s := newGatewaySite(t)
	if !lab.ReachesWithin(t, s.dev.NS, "tcp", wmsHost, lab.FirstContact) {
		t.Fatal("wms unreachable before the rotation")
	}
	stolen := filepath.Join(t.TempDir(), "old.key")
	key, err := os.ReadFile(filepath.Join(s.dev.Dir, "state", "wg.key"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, stolen, string(key))
	addr := tunnelAddrs(t, s.dev)
	if out, err := s.dev.CLI("rotate-key"); err != nil {
		t.Fatalf("rotate-key: %v %s", err, out)
	}
	newKey := s.dev.Status(t).Tunnel.PublicKey
	// The gateway makes a peer for an admitted key at its first
	// initiation, so the new key shows there once it has opened wms.
	lab.WaitFor(t, "the rotated key to open wms at the gateway", longWait, func() bool {
		return lab.Reaches(t, s.dev.NS, "tcp", wmsHost)
	})
	if peers := s.gw.Status(t).Tunnel.Peers; len(peers) != 1 || peers[0].PublicKey != newKey {
		t.Fatalf("gateway peers %+v; want only the rotated key %s", peers, newKey)
	}
	// Root replays the old key from another box on the same link.
	thiefNS := lab.NewNS(t, "thief")
	lab.Link(t, thiefNS, "192.0.2.10/30", s.gw.NS, "192.0.2.9/30")
	thief := lab.StartGateway(t, thiefNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.10"), 51899, addr[0])
	thiefNS.MustRun(t, "wg", "set", thief.Iface, "private-key", stolen)
	thief.RouteVia(t, s.gwKey, netip.MustParseAddrPort("192.0.2.9:51820"), "10.0.0.0/8")
	if lab.ReachesWithin(t, thiefNS, "tcp", wmsHost, lab.FirstContact) {
		t.Error("the old key still opens wms after the rotation")
	}
}

// A schedule edge closes at the gateway: the scanner, rooted, holds a
// live wms flow when a policy gives its wms rule a window ending at the
// next full minute; the gateway, waking for the edge by itself, cuts the
// flow then and not before.
func TestScheduleEdgeClosesAtTheGateway(t *testing.T) {
	s := newGatewaySite(t)
	s.root(t)
	conn := lab.Conn(t, s.dev.NS, wmsHost)
	if !lab.RoundTrip(conn, lab.FirstContact) {
		t.Fatal("no round trip to wms through the rooted tunnel")
	}
	end := time.Now().Add(5 * time.Second).Truncate(time.Minute).Add(time.Minute)
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 2, func(doc *policy.Document) {
		doc.Schedules = map[string]policy.Schedule{"shift": {Zone: "UTC", Days: []policy.Weekday{0, 1, 2, 3, 4, 5, 6},
			Start: clock(end.Add(-2 * time.Hour).UTC()), End: clock(end.UTC())}}
		c := doc.Classes["scanner"]
		c.Rules[0].Schedule = "shift"
		doc.Classes["scanner"] = c
	}))
	lab.WaitFor(t, "policy v2 at the gateway", longWait, func() bool { return s.gw.Status(t).PolicyVersion == 2 })
	for time.Now().Before(end.Add(-time.Second)) {
		if !lab.RoundTrip(conn, 2*time.Second) {
			t.Fatalf("the flow stopped at %s, before the window's end %s", time.Now().UTC().Format(time.RFC3339), end.Format(time.RFC3339))
		}
		time.Sleep(200 * time.Millisecond)
	}
	lab.WaitFor(t, "the window's end to cut the flow at the gateway", longWait, func() bool { return !lab.RoundTrip(conn, 300*time.Millisecond) })
	if lab.Reaches(t, s.dev.NS, "tcp", wmsHost) {
		t.Error("wms reachable after the window closed")
	}
	if !lab.Reaches(t, s.dev.NS, "tcp", financeHost) {
		t.Error("finance (no schedule) lost at the window's end")
	}
}

// A gateway cut off from control, and restarted while cut off, enforces
// the roster, orders and policy in its cache: the scanner still reaches
// what its class opens and nothing else, and its quarantine, taken
// before the outage, still holds.
func TestGatewayEnforcesItsCacheOffline(t *testing.T) {
	s := newGatewaySite(t)
	s.ctl.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "breach")
	lab.WaitFor(t, "the gateway to take the revocation", longWait, func() bool {
		g := s.gw.Status(t).Gateway
		return g != nil && g.Orders == 1
	})
	s.ctl.Stop()
	s.gw.Kill()
	s.gw.Start(t)
	st := s.gw.Status(t)
	if c := st.Control; c != nil && c.Connected {
		t.Fatalf("the gateway says it is connected to a stopped control server: %+v", c)
	}
	if g := st.Gateway; g == nil || g.Roster != 1 || g.Admitted != 1 || g.Orders != 1 {
		t.Fatalf("after a restart offline the gateway holds %+v, want the scanner admitted and the order kept", g)
	}
	s.root(t)
	if !lab.ReachesWithin(t, s.dev.NS, "tcp", wmsHost, lab.FirstContact) {
		t.Error("wms unreachable through a gateway enforcing its cache")
	}
	for _, ap := range []netip.AddrPort{financeHost, wmsOther} {
		if lab.Reaches(t, s.dev.NS, "tcp", ap) {
			t.Errorf("%v reachable through a gateway enforcing its cache", ap)
		}
	}
}

// An inbound rule (a desk in wms reaching the scanners' port 2222) is
// the only way into a device: through the gateway, from the rule's
// hosts, to that port. The gateway holds it when the device is rooted
// and its own table is gone (its other port answers anyone who gets
// there), and a quarantine cuts a live inbound session.
func TestInboundReachesOnlyWhatThePolicyAccepts(t *testing.T) {
	s := newGatewaySite(t)
	devID := s.dev.Status(t).DeviceID
	s.ctl.MustCLI(t, "policy", "push", s.bundle(t, 2, func(doc *policy.Document) {
		c := doc.Classes["scanner"]
		c.Inbound = []policy.Rule{{Segment: "wms", Hosts: []netip.Prefix{netip.MustParsePrefix("10.20.1.48/30")},
			Protocol: policy.TCP, Ports: []policy.PortRange{{First: 2222, Last: 2222}}}}
		doc.Classes["scanner"] = c
	}))
	for _, a := range []*agentproc.Agent{s.gw, s.dev} {
		lab.WaitFor(t, "policy v2 on "+a.NS.Name, longWait, func() bool { return a.Status(t).PolicyVersion == 2 })
	}
	addr := netip.MustParsePrefix(tunnelAddrs(t, s.dev)[0]).Addr()
	ssh, other := netip.AddrPortFrom(addr, 2222), netip.AddrPortFrom(addr, 2223)
	lab.Echo(t, s.dev.NS, ssh)
	lab.Echo(t, s.dev.NS, other)
	desk := lab.NewNS(t, "desk")
	lab.Link(t, desk, "10.20.1.50/30", s.gw.NS, "10.20.1.49/30")
	desk.MustRun(t, "ip", "route", "add", "100.64.0.0/24", "via", "10.20.1.49")
	s.gw.NS.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	matrix := func(when string) {
		t.Helper()
		if !lab.ReachesWithin(t, desk, "tcp", ssh, lab.FirstContact) {
			t.Errorf("%s: the desk does not reach the device's port 2222", when)
		}
		if lab.Reaches(t, desk, "tcp", other) {
			t.Errorf("%s: the desk reaches the device's port 2223, which no rule accepts", when)
		}
		if lab.Reaches(t, s.gw.NS, "tcp", ssh) {
			t.Errorf("%s: the gateway's own address, outside the rule's hosts, reaches port 2222", when)
		}
	}
	matrix("agent running")
	s.root(t)
	// Root's WireGuard keeps no session alive by itself: its own
	// traffic brings one up, as any traffic of a rooted box would.
	if !lab.ReachesWithin(t, s.dev.NS, "tcp", wmsHost, lab.FirstContact) {
		t.Fatal("no session through the rooted tunnel")
	}
	matrix("rooted")
	conn := lab.Conn(t, desk, ssh)
	if !lab.RoundTrip(conn, lab.FirstContact) {
		t.Fatal("no round trip on the inbound session")
	}
	s.ctl.MustCLI(t, "quarantine", devID, "--reason", "INC-12")
	lab.WaitFor(t, "the quarantine to cut the inbound session", longWait, func() bool { return !lab.RoundTrip(conn, 300*time.Millisecond) })
	if lab.Reaches(t, desk, "tcp", ssh) {
		t.Error("the desk reaches a quarantined device")
	}
}
