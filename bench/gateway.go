package bench

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/agentproc"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/admit"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// gatewayCases measure the segment gateway.
func gatewayCases() []Case {
	return []Case{
		{Name: "gateway roster apply, 10,000 devices", Privileged: true, Target: 100 * time.Millisecond,
			Run:  func(b B) { benchRosterApply(b, 10000) },
			Note: "a gateway's first roster: the decision for 10,000 devices of 3 classes (one evaluation per group), the table (two hash maps keyed by device address, the groups' sets) applied through netlink, and the 10,000 keys admitted to the tunnel (each gets its WireGuard peer at its first handshake), from a gateway that admitted none"},
		{Name: "gateway decision, 10,000 devices", Run: func(b B) { benchGatewayDecide(b, 10000) },
			Note: "admit.Decide alone: the orders folded per device, the evaluator run once per group"},
		{Name: "TCP through a Bulkhead gateway: 1,000 devices enrolled, 10,000 destinations", Privileged: true, Unit: "Gbit/s", MinRatio: 0.95,
			Reference: "the same agent and policy through a bare tailscale/wireguard-go gateway",
			Run:       benchGatewayThroughput,
			Note:      "iperf3 -t 3, 7 interleaved rounds; the Bulkhead gateway admits 1,000 enrolled scanners (999 from `bulkhead-lab crowd`, which make no WireGuard peer: a peer is made at a device's first handshake), and the segment's 10,000 destinations in the scanners' group set; both clients are the agent enforcing the same 10,000-destination policy"},
		{Name: "gateway kill-switch latency: quarantine to the last packet of a rooted device", Privileged: true, Unit: "ms-p99", Also: []string{"ms-p50"}, Max: 250,
			Run:  benchGatewayKillSwitch,
			Note: "100 trials: the scanner's agent killed and its table flushed, its key in Debian's wireguard-go sending a 1 ms UDP flow through a Bulkhead gateway; from starting `bulkhead-control quarantine ID` to the last packet reaching the segment host (the gateway's held sync, verified order, one apply); an ops-signed `release` between trials"},
	}
}

// rosterInput is a gateway of wms and diagnostics with n devices of the
// example site's three classes, in the scanners' shift.
func rosterInput(b B, n int) admit.Input {
	doc := policy.Document{Schema: policy.Schema,
		Control:  []policy.Endpoint{{Address: netip.MustParseAddr("10.99.0.1"), Port: 8443}},
		Validity: policy.Validity{MaxOffline: policy.Duration(72 * time.Hour)},
		Segments: []policy.Segment{{Name: "wms", DataClass: "operational",
			Destinations: []policy.Destination{{CIDR: netip.MustParsePrefix("10.20.1.0/24"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}, {First: 8000, Last: 8099}}}},
			Gateway:      policy.Gateway{PublicKey: policy.Key{1}, Endpoint: "192.0.2.1:51820"}}},
		Classes: map[string]policy.Class{
			"scanner":      {Rules: []policy.Rule{{Segment: "wms", Ports: []policy.PortRange{{First: 443, Last: 443}}}}},
			"dock-gateway": {Rules: []policy.Rule{{Segment: "wms"}}},
			"telematics":   {},
		}}
	now := time.Now()
	if err := doc.Validate(); err != nil {
		b.Fatal(err)
	}
	in := admit.Input{Bundle: &bundle.Payload{Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour), Policy: doc},
		Segments: []string{"wms"}, Now: now, LastContact: now}
	classes := []string{"scanner", "dock-gateway", "telematics"}
	for i := range n {
		var k policy.Key
		k[0], k[1], k[2] = byte(i), byte(i>>8), 1
		in.Roster = append(in.Roster, admit.Member{ID: fmt.Sprintf("dev-%05d", i), Class: classes[i%3], Key: k,
			Address: netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})})
	}
	return in
}

func benchGatewayDecide(b B, n int) {
	in := rosterInput(b, n)
	b.ResetTimer()
	for range b.N {
		admit.Decide(in)
	}
}

// benchRosterApply times what a gateway does when control's roster
// arrives: decide, build, apply the table, set the peers.
func benchRosterApply(b B, n int) {
	lab.RequirePrivileged(b, "nft")
	ns := lab.NewNS(b, "roster")
	e := nft.NewEnforcer(nft.WithNetNS(ns.FD()))
	var tun *tunnel.Tunnel
	if err := ns.Do(func() (err error) {
		tun, err = tunnel.Open(tunnel.Config{Interface: "bh-roster", Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/16")},
			ListenPort: 51820, KeyFile: filepath.Join(b.TempDir(), "wg.key")})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tun.Close() })
	in := rosterInput(b, n)
	self := localpolicy.Desired{Mode: localpolicy.Normal}
	opt := nft.Options{Tunnel: tun.Name(), ListenPort: tun.ListenPort()}
	empty := admit.Desired{}
	admitted := 0
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		opt.Gateway = &empty
		if _, err := e.Apply(nft.Build(self, opt)); err != nil {
			b.Fatal(err)
		}
		if _, _, err := tun.Apply(nil); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		d := admit.Decide(in)
		opt.Gateway = &d
		if _, err := e.Apply(nft.Build(self, opt)); err != nil {
			b.Fatal(err)
		}
		if _, _, err := tun.Apply(tunnel.Wanted(d.Peers)); err != nil {
			b.Fatal(err)
		}
		admitted = d.Admitted()
	}
	b.StopTimer()
	if admitted < n/2 {
		b.Fatalf("only %d of %d devices admitted: the case measures too little", admitted, n)
	}
}

// gwSite is control with a tunnel pool, a Bulkhead gateway fronting wms
// (the flow and iperf3 host on its loopback), and a scanner enrolled
// with it.
type gwSite struct {
	ctl          *lab.Control
	ctlNS        *lab.NS
	ops          *opsKeys
	gw, dev      *agentProc
	gwKey, devID string
	gwNS, devNS  *lab.NS
	// rogue is root's WireGuard on the scanner, once rooted.
	rogue *lab.Gateway
}

func newGWSite(b B, extra func(*policy.Document)) *gwSite {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go")
	s := &gwSite{}
	ctlNS := lab.NewNS(b, "ctl")
	s.ctlNS, s.gwNS, s.devNS = ctlNS, lab.NewNS(b, "gw"), lab.NewNS(b, "dev")
	lab.Link(b, s.gwNS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	lab.Link(b, s.devNS, "10.99.0.6/30", ctlNS, "10.99.0.5/30")
	s.devNS.MustRun(b, "ip", "route", "add", "10.99.0.1/32", "via", "10.99.0.5")
	lab.Link(b, s.devNS, "192.0.2.2/30", s.gwNS, "192.0.2.1/30")
	s.gwNS.MustRun(b, "ip", "addr", "add", iperfHost.String()+"/32", "dev", "lo")
	s.ops = newOpsKeys(b, b.TempDir())
	s.ctl = lab.StartControlWith(b, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"),
		lab.ControlOptions{OpsPub: []string{s.ops.pubFile}, Args: []string{"--tunnel-pool", "100.64.0.0/16"}})

	s.gw = &agentProc{class: "segment-gateway", ops: *s.ops, Agent: agentproc.New(b, s.gwNS, config.Config{
		Device: config.Device{Class: "segment-gateway"}, Trust: config.Trust{Keys: []string{s.ops.pubFile}},
		Tunnel: config.TunnelConfig{ListenPort: 51820}, Gateway: &config.GatewayConfig{Segments: []string{"wms"}}})}
	s.gw.Start(b)
	s.gwKey = s.gw.status(b).Tunnel.PublicKey
	doc := flowPolicy(b, &lab.Gateway{PublicKey: s.gwKey, Endpoint: netip.MustParseAddrPort("192.0.2.1:51820")})
	doc.Segments[0].Destinations = append(doc.Segments[0].Destinations, policy.Destination{CIDR: netip.PrefixFrom(iperfHost, 32),
		Protocol: policy.TCP, Ports: []policy.PortRange{{First: echoPort, Last: echoPort}, {First: iperfPort, Last: iperfPort}}})
	doc.Classes["segment-gateway"] = policy.Class{}
	if extra != nil {
		extra(&doc)
	}
	s.ctl.MustCLI(b, "policy", "push", s.ops.signFile(b, 1, doc, "scanner", "segment-gateway"))
	tok := strings.Fields(s.ctl.MustCLI(b, "token", "create", "--role", "gateway", "--segment", "wms"))[0]
	if out, err := s.gw.Enroll(s.ctl.URL, tok, s.ctl.Fingerprint); err != nil {
		b.Fatalf("gateway enrolment: %v %s", err, out)
	}
	dev := &agentProc{class: "scanner", ops: *s.ops, Agent: agentproc.New(b, s.devNS, config.Config{
		Device: config.Device{Class: "scanner"}, Trust: config.Trust{Keys: []string{s.ops.pubFile}}})}
	dev.Start(b)
	tok = strings.Fields(s.ctl.MustCLI(b, "token", "create", "--class", "scanner"))[0]
	if out, err := dev.Enroll(s.ctl.URL, tok, s.ctl.Fingerprint); err != nil {
		b.Fatalf("scanner enrolment: %v %s", err, out)
	}
	s.dev, s.devID = dev, dev.status(b).DeviceID
	lab.WaitFor(b, "the gateway to admit the scanner", 30*time.Second, func() bool { return s.admitted(b) == 1 })
	return s
}

// root plays root on the scanner: the agent killed, the table flushed,
// the scanner's key in Debian's wireguard-go routing the segment through
// the gateway.
func (s *gwSite) root(b B) {
	dev := s.dev
	addr := strings.Fields(s.devNS.MustRun(b, "ip", "-o", "-4", "addr", "show", "dev", dev.Iface))[3]
	dev.Kill()
	s.devNS.MustRun(b, "nft", "flush", "ruleset")
	rogue := lab.StartGateway(b, s.devNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.2"), 51899, addr)
	s.devNS.MustRun(b, "wg", "set", rogue.Iface, "private-key", filepath.Join(dev.Dir, "state", "wg.key"))
	s.rogue = rogue
	s.rejoin(b)
}

// rejoin (re)configures root's WireGuard peer for the gateway: a fresh
// session at once, where Debian's wireguard-go, whose peer the gateway
// dropped, would keep sending on its dead one until its own rekey timer
// (about 15 s) runs out.
func (s *gwSite) rejoin(b B) {
	s.devNS.MustRun(b, "wg", "set", s.rogue.Iface, "peer", s.gwKey, "remove")
	s.rogue.RouteVia(b, s.gwKey, netip.MustParseAddrPort("192.0.2.1:51820"), "10.20.1.0/24")
}

// admitted is how many devices the gateway admits now.
func (s *gwSite) admitted(b testing.TB) int {
	st := s.gw.status(b)
	if st.Gateway == nil {
		return -1
	}
	return st.Gateway.Admitted
}

// benchGatewayKillSwitch times a quarantine from the CLI to the last
// packet of the rooted scanner's flow through the gateway: the device
// takes no part in it.
func benchGatewayKillSwitch(b B) {
	s := newGWSite(b, nil)
	s.root(b)
	flow := startFlows(b, s.gwNS, []*lab.NS{s.devNS})
	trials := 100
	if Quick {
		trials = 1
	}
	quarantineTrials(b, trials, flow,
		func() bool { return s.admitted(b) == 1 },
		func() { s.ctl.MustCLI(b, "quarantine", s.devID, "--reason", "bench") },
		func() bool { return s.admitted(b) == 0 },
		func() {
			s.ctl.MustCLI(b, "release", s.devID, "--reason", "bench", "--key", s.ops.privFile)
			lab.WaitFor(b, "the gateway to admit the scanner again", 20*time.Second, func() bool { return s.admitted(b) == 1 })
			s.rejoin(b)
		})
}

// benchGatewayThroughput runs iperf3 through a Bulkhead gateway holding
// 1,000 enrolled devices and 10,000 destinations, and alternately through
// a bare-library gateway, each from the agent with the same policy.
func benchGatewayThroughput(b B) {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go", "iperf3")
	s := newGWSite(b, withDestinations(9998))
	lab.Iperf3Server(b, s.gwNS, netip.AddrPortFrom(iperfHost, iperfPort))
	lab.Echo(b, s.gwNS, netip.AddrPortFrom(iperfHost, echoPort))
	crowd := 999
	if Quick {
		crowd = 20
	}
	startCrowdOf(b, s.ctlNS, s.ctl, crowd, "scanner")
	lab.WaitFor(b, "the gateway to admit the crowd", 3*time.Minute, func() bool { return s.admitted(b) == crowd+1 })

	// The reference: the same agent and policy, through the bare
	// library as a hand-configured gateway.
	bareNS, refNS := lab.NewNS(b, "bare"), lab.NewNS(b, "ref")
	lab.Link(b, refNS, "192.0.2.6/30", bareNS, "192.0.2.5/30")
	bare := lab.StartGateway(b, bareNS, impl(b, "bare"), netip.MustParseAddr("192.0.2.5"), 51820, "100.64.0.1/16")
	bareNS.MustRun(b, "ip", "addr", "add", iperfHost.String()+"/32", "dev", "lo")
	lab.Iperf3Server(b, bareNS, netip.AddrPortFrom(iperfHost, iperfPort))
	lab.Echo(b, bareNS, netip.AddrPortFrom(iperfHost, echoPort))
	ref := runAgent(b, refNS, "scanner", "100.64.200.2/32", 51820, s.ops)
	bare.AllowPeer(b, ref.PublicKey, netip.MustParseAddrPort("192.0.2.6:51820"), "100.64.200.2/32")
	doc := flowPolicy(b, bare)
	doc.Segments[0].Gateway.Endpoint = "192.0.2.5:51820"
	doc.Segments[0].Destinations = append(doc.Segments[0].Destinations, policy.Destination{CIDR: netip.PrefixFrom(iperfHost, 32),
		Protocol: policy.TCP, Ports: []policy.PortRange{{First: echoPort, Last: echoPort}, {First: iperfPort, Last: iperfPort}}})
	withDestinations(9998)(&doc)
	ref.apply(b, 1, doc)
	interleaved(b, client{ns: s.devNS, name: "Bulkhead gateway"}, client{ns: refNS, name: "bare-library gateway"})
}

// withDestinations adds n more /32 destinations to the first segment:
// the gateway's group set holds them all.
func withDestinations(n int) func(*policy.Document) {
	return func(doc *policy.Document) {
		seg := &doc.Segments[0]
		for i := range n {
			seg.Destinations = append(seg.Destinations, policy.Destination{
				CIDR:     netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 21, byte(i / 250), byte(i%250 + 1)}), 32),
				Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}}})
		}
	}
}
