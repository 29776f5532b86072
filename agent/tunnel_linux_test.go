package agent

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
)

// tunnelSite is the agent's namespace joined to two segment gateways
// running Debian's wireguard-go: wms (10.20.1.0/24) behind gw1, finance
// (10.30.0.0/24) behind gw2.
type tunnelSite struct {
	*env
	gw1, gw2 *lab.Gateway
}

var (
	wmsHost     = netip.MustParseAddrPort("10.20.1.10:443")
	financeHost = netip.MustParseAddrPort("10.30.0.10:443")
	// financeSide is a finance host the device has a plain route to over
	// its uplink, bypassing the tunnel.
	financeSide = netip.MustParseAddrPort("10.30.0.20:443")
)

func newTunnelSite(t *testing.T) *tunnelSite {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go")
	s := &tunnelSite{env: newEnv(t)}
	n1, n2 := lab.NewNS(t, "gw1"), lab.NewNS(t, "gw2")
	lab.Link(t, s.ns, "192.0.2.2/30", n1, "192.0.2.1/30")
	lab.Link(t, s.ns, "192.0.2.6/30", n2, "192.0.2.5/30")
	s.gw1 = lab.StartGateway(t, n1, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	s.gw2 = lab.StartGateway(t, n2, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.5"), 51820, "100.64.0.1/24")
	s.gw1.Serve(t, wmsHost.Addr(), wmsHost.Port())
	s.gw2.Serve(t, financeHost.Addr(), financeHost.Port())
	s.gw2.Serve(t, financeSide.Addr(), financeSide.Port())
	s.ns.MustRun(t, "ip", "route", "add", financeSide.Addr().String()+"/32", "via", "192.0.2.5")
	if !lab.Reaches(t, s.ns, "tcp", financeSide) {
		t.Fatal("without the agent the finance host does not answer over the uplink; the test would prove nothing")
	}
	return s
}

// policy is a bundle opening the named segments to scanners.
func (s *tunnelSite) policy(t *testing.T, version uint64, segments ...string) []byte {
	t.Helper()
	return signFor(t, version, s.doc(t, segments...), s.key)
}

// doc is the policy opening the named segments to scanners.
func (s *tunnelSite) doc(t *testing.T, segments ...string) *policy.Document {
	t.Helper()
	var rules []string
	for _, seg := range segments {
		rules = append(rules, fmt.Sprintf(`{"segment": %q}`, seg))
	}
	doc, err := policy.Parse([]byte(fmt.Sprintf(`{
  "schema": "bulkhead.policy/v1",
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "validity": {"max_offline": "72h"},
  "segments": [
    {"name": "wms", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}, {"cidr": "10.20.1.0/24", "protocol": "udp", "ports": ["443"]}],
     "gateway": {"public_key": %q, "endpoint": %q}},
    {"name": "finance", "data_class": "financial", "tier": 0,
     "destinations": [{"cidr": "10.30.0.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": %q, "endpoint": %q}}
  ],
  "classes": {"scanner": {"rules": [%s]}}
}`, s.gw1.PublicKey, s.gw1.Endpoint, s.gw2.PublicKey, s.gw2.Endpoint, strings.Join(rules, ", "))))
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func (s *tunnelSite) apply(t *testing.T, raw []byte) *adminapi.Status {
	t.Helper()
	resp := s.call(adminapi.Request{Op: adminapi.OpApply, Bundle: raw})
	if resp.Error != "" {
		t.Fatalf("apply: %s", resp.Error)
	}
	return resp.Status
}

// wgPeers is what `wg show IFACE peers`, the administrator's tool talking
// to our UAPI socket, lists.
func (s *tunnelSite) wgPeers(t *testing.T) []string {
	t.Helper()
	out := strings.Fields(s.ns.MustRun(t, "wg", "show", s.iface, "peers"))
	slices.Sort(out)
	return out
}

func sorted(keys ...string) []string {
	slices.Sort(keys)
	return keys
}

// The acceptance, driven by signed bundles through a running
// agent against two independent gateways: data through the tunnel; a
// second segment added without a single lost packet on the first; segment
// traffic over the plain uplink dropped; `wg show` listing exactly the
// authorized gateways; a removed segment's established flow stopped.
func TestSegmentsFollowBundlesThroughTunnels(t *testing.T) {
	s := newTunnelSite(t)
	s.start()
	st := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if st.Tunnel.PublicKey == "" || st.Tunnel.Error != "" || len(st.Tunnel.Peers) != 0 {
		t.Fatalf("tunnel status at boot (lockdown) = %+v, want up with no peers", st.Tunnel)
	}
	pub := st.Tunnel.PublicKey
	s.gw1.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")
	s.gw2.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")

	// v1: wms only.
	s.apply(t, s.policy(t, 1, "wms"))
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, lab.FirstContact) || !lab.ReachesWithin(t, s.ns, "udp", wmsHost, lab.FirstContact) {
		t.Fatal("wms unreachable through its tunnel")
	}
	if lab.Reaches(t, s.ns, "tcp", financeHost) {
		t.Error("finance reachable while no bundle authorizes it")
	}
	if got, want := s.wgPeers(t), []string{s.gw1.PublicKey}; !slices.Equal(got, want) {
		t.Errorf("wg show peers = %v, want %v", got, want)
	}

	// v2 adds finance while a UDP stream and a TCP connection run on wms.
	conn := lab.Conn(t, s.ns, wmsHost)
	stop := lab.Stream(t, s.ns, wmsHost, 2*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	s.apply(t, s.policy(t, 2, "wms", "finance"))
	if !lab.ReachesWithin(t, s.ns, "tcp", financeHost, lab.FirstContact) {
		t.Error("finance unreachable after v2 authorized it")
	}
	time.Sleep(200 * time.Millisecond)
	if sent, lost := stop(); sent < 100 || lost != 0 {
		t.Errorf("stream on wms across the v2 apply: %d sent, %d lost; want none lost", sent, lost)
	}
	if !lab.RoundTrip(conn, time.Second) {
		t.Error("the TCP connection to wms broke across the v2 apply")
	}
	if got, want := s.wgPeers(t), sorted(s.gw1.PublicKey, s.gw2.PublicKey); !slices.Equal(got, want) {
		t.Errorf("wg show peers = %v, want %v", got, want)
	}
	// Finance is authorized, but only through its tunnel: the same segment
	// over the plain uplink is a policy violation.
	if lab.Reaches(t, s.ns, "tcp", financeSide) {
		t.Error("a finance host answered over the plain uplink, outside the tunnel")
	}
	st = s.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if len(st.Tunnel.Peers) != 2 {
		t.Errorf("status lists %d tunnel peers, want 2", len(st.Tunnel.Peers))
	}
	for _, p := range st.Tunnel.Peers {
		if p.HandshakeAge < 0 || p.RxBytes == 0 || len(p.Segments) != 1 {
			t.Errorf("status peer %+v: want a handshake, traffic and its segment", p)
		}
	}

	// v3 removes finance: an established finance connection stops.
	fin := lab.Conn(t, s.ns, financeHost)
	if !lab.RoundTrip(fin, time.Second) {
		t.Fatal("no data to finance before v3")
	}
	s.apply(t, s.policy(t, 3, "wms"))
	if lab.RoundTrip(fin, 500*time.Millisecond) {
		t.Error("an established finance connection still carries data after v3 removed the segment")
	}
	if got, want := s.wgPeers(t), []string{s.gw1.PublicKey}; !slices.Equal(got, want) {
		t.Errorf("wg show peers after v3 = %v, want %v", got, want)
	}
	if !lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("wms stopped working when finance was removed")
	}
}

// `bulkhead rotate-key` through the CLI: the old key stops working at
// once; once the gateway knows the new key, a fresh handshake carries
// traffic; the rotation is audited, and the key file holds the new key.
func TestRotateKeyReHandshakes(t *testing.T) {
	s := newTunnelSite(t)
	bin := lab.Binary(t, "cmd/bulkhead")
	s.start()
	old := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey
	s.gw1.AllowPeer(t, old, netip.AddrPort{}, "100.64.0.2/32")
	s.apply(t, s.policy(t, 1, "wms"))
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, lab.FirstContact) {
		t.Fatal("wms unreachable before rotation")
	}
	out, err := exec.Command(bin, "rotate-key", "--socket", filepath.Join(s.dir, "run", "admin.sock")).CombinedOutput()
	if err != nil {
		t.Fatalf("bulkhead rotate-key: %v: %s", err, out)
	}
	pub := strings.TrimPrefix(strings.TrimSpace(string(out)), "new public key ")
	if pub == old || s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey != pub {
		t.Fatalf("rotate-key printed %q; old %s", out, old)
	}
	if lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("traffic still flows with the old key")
	}
	s.gw1.RemovePeer(t, old)
	s.gw1.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, 15*time.Second) {
		t.Fatal("no traffic after the gateway learned the new key")
	}
	if s.gw1.LatestHandshake(t, pub).IsZero() {
		t.Error("the gateway records no handshake with the new key")
	}
	s.stop()
	events := s.auditLog()
	if !slices.ContainsFunc(events, func(e store.Event) bool { return e.Kind == "wireguard-key-rotated" && strings.Contains(e.Detail, pub) }) {
		t.Errorf("no audited rotation to %s in %+v", pub, events)
	}
	// A restarted agent keeps the rotated key.
	s.start()
	if got := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey; got != pub {
		t.Errorf("after restart the public key is %s, want the rotated %s", got, pub)
	}
}

// A segment's rate limit holds against iperf3 in both directions, and it
// is the limit that slows the transfer: the same transfer under the bundle
// before, without it, runs many times faster.
// iperfSite is a tunnel site whose wms segment also opens an iperf3
// server behind its gateway; doc is the policy, with the changes
// applied, that the agent enforces as version 1.
func iperfSite(t *testing.T, change func(*policy.Document)) (s *tunnelSite, server netip.AddrPort, doc *policy.Document) {
	lab.RequirePrivileged(t, "iperf3")
	s = newTunnelSite(t)
	server = netip.AddrPortFrom(wmsHost.Addr(), 5201)
	lab.Iperf3Server(t, s.gw1.NS, server)
	s.start()
	s.gw1.AllowPeer(t, s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey, netip.AddrPort{}, "100.64.0.2/32")
	doc = s.doc(t, "wms")
	doc.Segments[0].Destinations = append(doc.Segments[0].Destinations,
		policy.Destination{CIDR: netip.MustParsePrefix("10.20.1.0/24"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 5201, Last: 5201}}})
	if change != nil {
		change(doc)
	}
	s.apply(t, signFor(t, 1, doc, s.key))
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, 10*time.Second) {
		t.Fatal("wms unreachable through its tunnel")
	}
	return s, server, doc
}

func TestRateLimitHolds(t *testing.T) {
	s, server, doc := iperfSite(t, nil)
	// iperf3 leaves out the first two seconds (-O 2), which spend the
	// bucket. In the three after them a correct token bucket passes at
	// most the rate for three seconds plus one burst: that is the bound.
	// (A flat 5% over the rate, the bound before, is not a property of a
	// token bucket, and -R once measured 8.48 Mbit/s against it.)
	const secs = 3
	run := func(extra ...string) float64 {
		return lab.Iperf3(t, s.ns, server, secs, append([]string{"-O", "2"}, extra...)...)
	}
	free := run()
	limit := &policy.RateLimit{BytesPerSecond: 1_000_000, BurstBytes: 256 << 10}
	most := 8 * float64(limit.BytesPerSecond*secs+limit.BurstBytes) / secs
	if free < 10*most {
		t.Fatalf("without a limit the tunnel carries only %.1f Mbit/s; a cap of %.1f cannot be told apart", free/1e6, most/1e6)
	}
	doc.Segments[0].RateLimit = limit
	s.apply(t, signFor(t, 2, doc, s.key))
	for _, dir := range [][]string{nil, {"-R"}} {
		got := run(dir...)
		t.Logf("%v: %.2f Mbit/s under a cap of %.2f (without it: %.0f)", dir, got/1e6, most/1e6, free/1e6)
		if got > most || got < most/4 {
			t.Errorf("iperf3 %v: %.2f Mbit/s through a %d B/s limit; want at most %.2f and, to show it slows rather than shuts, at least a quarter of that",
				dir, got/1e6, limit.BytesPerSecond, most/1e6)
		}
	}
	// Both directions' policers are in the table and counted drops.
	var table struct {
		Nftables []struct {
			Rule *struct {
				Comment string           `json:"comment"`
				Expr    []map[string]any `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(s.ns.MustRun(t, "nft", "-j", "list", "table", "inet", "bulkhead")), &table); err != nil {
		t.Fatal(err)
	}
	dropped := map[string]float64{}
	for _, it := range table.Nftables {
		if it.Rule == nil || !strings.HasSuffix(it.Rule.Comment, " over rate") {
			continue
		}
		for _, e := range it.Rule.Expr {
			if c, ok := e["counter"].(map[string]any); ok {
				dropped[it.Rule.Comment], _ = c["packets"].(float64)
			}
		}
	}
	if dropped["segment wms over rate"] == 0 || dropped["segment wms replies over rate"] == 0 {
		t.Errorf("over-rate drops counted: %v, want some in each direction", dropped)
	}
}

// A burst above a traffic check's threshold applies the check's profile
// within a sample or two, names the check in status, and cuts the segment
// (the restricted profile here keeps nothing open); once the burst has
// left the window, the device recovers.
func TestTrafficBurstAppliesProfile(t *testing.T) {
	s, server, _ := iperfSite(t, func(doc *policy.Document) {
		class := doc.Classes["scanner"]
		class.Checks = []policy.Check{{ID: "wms-volume", Traffic: &policy.TrafficLimit{Segment: "wms", MaxBytes: 20 << 20, Window: policy.Duration(5 * time.Second)}}}
		doc.Classes["scanner"] = class
	})
	check := func() (string, localpolicy.Check) {
		st := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status
		for _, c := range st.Checks {
			if c.ID == "wms-volume" {
				return st.Mode, c
			}
		}
		return st.Mode, localpolicy.Check{}
	}
	lab.WaitFor(t, "the traffic check judged and passing", longWait, func() bool { m, c := check(); return m == "normal" && c.ID != "" && !c.Failing })
	// Ordinary use (echo round trips) stays far below 20 MiB in 5 s.
	for range 20 {
		if !lab.Reaches(t, s.ns, "tcp", wmsHost) {
			t.Fatal("wms stopped answering under ordinary use")
		}
	}
	if m, c := check(); m != "normal" || c.Failing {
		t.Fatalf("ordinary use tripped the check: %s %+v", m, c)
	}
	// A burst: iperf3 moves hundreds of MiB a second through the tunnel
	// until the check cuts it (it then stalls; it is stopped below).
	burst := s.ns.Command("iperf3", "-c", server.Addr().String(), "-p", "5201", "-t", "10")
	if err := burst.Start(); err != nil {
		t.Fatal(err)
	}
	stopBurst := sync.OnceFunc(func() { burst.Process.Kill(); burst.Wait() })
	defer stopBurst()
	lab.WaitFor(t, "restricted mode after the burst", longWait, func() bool { m, c := check(); return m == "restricted" && c.Failing })
	stopBurst()
	_, c := check()
	if !strings.Contains(c.Observed, "bytes to segment wms in") || c.Expected != "at most 20971520 bytes in 5s" {
		t.Errorf("the failing check says %q, expected %q", c.Observed, c.Expected)
	}
	if why := strings.Join(s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Why, "; "); !strings.Contains(why, "check wms-volume failed") {
		t.Errorf("status does not name the check: %q", why)
	}
	if lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("wms still reachable in restricted mode")
	}
	lab.WaitFor(t, "normal mode once the burst left the window", longWait, func() bool { m, c := check(); return m == "normal" && !c.Failing })
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, 10*time.Second) {
		t.Error("wms closed after recovery")
	}
}
