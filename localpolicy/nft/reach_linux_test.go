package nft

import (
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

type probe struct {
	proto string
	to    string
}

// site builds an agent namespace and a namespace standing for every
// segment of the example policy, with echo servers on each probed port. The
// one link between them stands in for the tunnel (its name is returned, for
// Options.Tunnel); package tunnel tests the real one.
func site(t *testing.T, probes []probe) (agent *lab.NS, link string) {
	t.Helper()
	agent, remote := lab.NewNS(t, "agent"), lab.NewNS(t, "site")
	link, _ = lab.Link(t, agent, "10.10.0.2/24,fd00:10::2/64", remote, "10.10.0.1/24,fd00:10::1/64")
	agent.MustRun(t, "ip", "route", "add", "default", "via", "10.10.0.1")
	agent.MustRun(t, "ip", "-6", "route", "add", "default", "via", "fd00:10::1")
	seen := map[netip.AddrPort]bool{}
	for _, p := range probes {
		ap := netip.MustParseAddrPort(p.to)
		if !seen[netip.AddrPortFrom(ap.Addr(), 0)] {
			bits := 32
			if ap.Addr().Is6() {
				bits = 128
			}
			remote.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(ap.Addr(), bits).String(), "dev", "lo")
			seen[netip.AddrPortFrom(ap.Addr(), 0)] = true
		}
		if !seen[ap] {
			lab.Echo(t, remote, ap)
			seen[ap] = true
		}
	}
	// Every probe must answer before any table exists, or a "denied"
	// result later would prove nothing. IPv6 needs a moment for the
	// link-local addresses that neighbour discovery uses.
	deadline := time.Now().Add(5 * time.Second)
	for {
		var missing []probe
		for p, ok := range reach(t, agent, probes) {
			if !ok {
				missing = append(missing, p)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("without a table %v do not answer; the site is broken", missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return agent, link
}

func reach(t *testing.T, ns *lab.NS, probes []probe) map[probe]bool {
	t.Helper()
	got := make(map[probe]bool, len(probes))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, p := range probes {
		wg.Go(func() {
			ok, err := lab.Reachable(ns, p.proto, netip.MustParseAddrPort(p.to), 300*time.Millisecond)
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			got[p] = ok
			mu.Unlock()
		})
	}
	wg.Wait()
	return got
}

// Reachability from the device matches the policy exactly, for every class
// of the example: each allowed (destination, port, protocol) answers, each
// other one does not, and no scanner ever reaches finance.
func TestReachabilityMatchesPolicy(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	type want map[probe]bool
	all := []probe{
		{"tcp", "10.99.0.1:8443"}, {"tcp", "[fd00:99::1]:8443"}, // control
		{"tcp", "10.20.1.10:443"}, {"tcp", "10.20.1.10:8050"}, {"tcp", "10.20.1.10:22"}, {"tcp", "[fd00:20:1::10]:443"}, // wms
		{"tcp", "10.20.2.10:443"}, {"udp", "10.20.2.10:5683"}, // dock-scheduling
		{"tcp", "10.30.0.10:443"},                                                          // finance
		{"udp", "10.40.0.10:4789"}, {"tcp", "10.40.0.10:8883"}, {"udp", "10.40.0.10:4790"}, // telemetry
		{"tcp", "10.50.0.5:22"}, {"tcp", "10.50.0.20:22"}, // diagnostics (/28) and just outside it
		{"tcp", "10.60.0.10:443"}, {"tcp", "10.60.0.10:4080"}, // carrier-edi
		{"tcp", "10.70.0.10:443"}, {"tcp", "10.70.0.11:443"}, // broker-portal (/32)
		{"tcp", "10.80.0.10:443"}, // no segment at all
	}
	expect := map[string][]probe{
		"dock-gateway": {{"tcp", "10.99.0.1:8443"}, {"tcp", "[fd00:99::1]:8443"}, {"tcp", "10.20.1.10:443"}, {"tcp", "10.20.1.10:8050"},
			{"tcp", "[fd00:20:1::10]:443"}, {"tcp", "10.20.2.10:443"}, {"udp", "10.20.2.10:5683"}, {"tcp", "10.30.0.10:443"},
			{"tcp", "10.50.0.5:22"}, {"tcp", "10.60.0.10:443"}, {"tcp", "10.60.0.10:4080"}, {"tcp", "10.70.0.10:443"}},
		"scanner": {{"tcp", "10.99.0.1:8443"}, {"tcp", "[fd00:99::1]:8443"}, {"tcp", "10.20.1.10:443"}, {"tcp", "[fd00:20:1::10]:443"},
			{"tcp", "10.50.0.5:22"}},
		"telematics": {{"tcp", "10.99.0.1:8443"}, {"tcp", "[fd00:99::1]:8443"}, {"udp", "10.40.0.10:4789"}, {"tcp", "10.40.0.10:8883"},
			{"tcp", "10.50.0.5:22"}, {"tcp", "10.60.0.10:443"}},
	}
	// The same policy grown past one segments map reaches the same
	// hosts, through the shards.
	expect["sharded"] = expect["dock-gateway"]
	agent, link := site(t, all)
	e := NewEnforcer(WithNetNS(agent.FD()))
	// Classes in a fixed order: each apply starts from the table the
	// previous one left, and that path must not change from run to run.
	for _, class := range slices.Sorted(maps.Keys(expect)) {
		allowed := expect[class]
		w := want{}
		for _, p := range allowed {
			w[p] = true
		}
		if _, err := e.Apply(Build(desired(t, class, localpolicy.Sticky{}), Options{Tunnel: link})); err != nil {
			t.Fatal(err)
		}
		for p, ok := range reach(t, agent, all) {
			if ok != w[p] {
				t.Errorf("%s: %s %s reachable = %v, want %v", class, p.proto, p.to, ok, w[p])
			}
		}
	}
}

// A quarantine applied while a connection to finance is open stops that
// connection, not only new ones; the control channel keeps working.
func TestRevocationStopsEstablishedFlows(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	finance, control := probe{"tcp", "10.30.0.10:443"}, probe{"tcp", "10.99.0.1:8443"}
	agent, link := site(t, []probe{finance, control})
	e := NewEnforcer(WithNetNS(agent.FD()))
	if _, err := e.Apply(Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{Tunnel: link})); err != nil {
		t.Fatal(err)
	}
	conn := lab.Conn(t, agent, netip.MustParseAddrPort(finance.to))
	if !lab.RoundTrip(conn, time.Second) {
		t.Fatal("no data over the open finance connection before quarantine")
	}
	ctl := lab.Conn(t, agent, netip.MustParseAddrPort(control.to))
	if _, err := e.Apply(Build(desired(t, "dock-gateway", localpolicy.Sticky{Mode: localpolicy.Quarantine}), Options{Tunnel: link})); err != nil {
		t.Fatal(err)
	}
	if lab.RoundTrip(conn, 500*time.Millisecond) {
		t.Error("the established finance connection still carries data after quarantine")
	}
	if !lab.RoundTrip(ctl, time.Second) {
		t.Error("the established control connection stopped in quarantine")
	}
}

// With no valid policy at all (first boot, tampered cache) the device is in
// lockdown: its safety floor and control still answer, nothing else does.
func TestLockdownKeepsTheSafetyFloor(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	plc, ctl, wms := probe{"tcp", "192.168.50.3:502"}, probe{"tcp", "10.99.0.1:8443"}, probe{"tcp", "10.20.1.10:443"}
	agent, link := site(t, []probe{plc, ctl, wms})
	d := localpolicy.Evaluate(localpolicy.Input{
		NoPolicy: "cached policy rejected", Now: now,
		Floor:   desired(t, "scanner", localpolicy.Sticky{}).Floor,
		Control: []policy.Endpoint{{Address: netip.MustParseAddr("10.99.0.1"), Port: 8443}},
	})
	if d.Mode != localpolicy.Lockdown {
		t.Fatalf("mode %v, want lockdown", d.Mode)
	}
	if _, err := NewEnforcer(WithNetNS(agent.FD())).Apply(Build(d, Options{Tunnel: link})); err != nil {
		t.Fatal(err)
	}
	got := reach(t, agent, []probe{plc, ctl, wms})
	if !got[plc] || !got[ctl] || got[wms] {
		t.Errorf("lockdown reachability: floor %v, control %v, wms %v; want true, true, false", got[plc], got[ctl], got[wms])
	}
}

// A segment is open only through the tunnel. The same destination reached
// over another interface (the plain uplink) is a policy violation and is
// dropped, while the floor and control, which need no tunnel, still pass
// over that interface.
func TestSegmentsOnlyThroughTheTunnel(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	wms, ctl := probe{"tcp", "10.20.1.10:443"}, probe{"tcp", "10.99.0.1:8443"}
	agent, remote := lab.NewNS(t, "agent"), lab.NewNS(t, "site")
	tun, _ := lab.Link(t, agent, "10.10.0.2/24", remote, "10.10.0.1/24")
	uplink, _ := lab.Link(t, agent, "10.11.0.2/24", remote, "10.11.0.1/24")
	for _, p := range []probe{wms, ctl} {
		ap := netip.MustParseAddrPort(p.to)
		remote.MustRun(t, "ip", "addr", "add", ap.Addr().String()+"/32", "dev", "lo")
		lab.Echo(t, remote, ap)
	}
	via := func(link string) {
		agent.MustRun(t, "ip", "route", "replace", "10.20.1.10/32", "dev", link)
		agent.MustRun(t, "ip", "route", "replace", "10.99.0.1/32", "dev", link)
	}
	e := NewEnforcer(WithNetNS(agent.FD()))
	if _, err := e.Apply(Build(desired(t, "scanner", localpolicy.Sticky{}), Options{Tunnel: tun})); err != nil {
		t.Fatal(err)
	}
	via(tun)
	if got := reach(t, agent, []probe{wms, ctl}); !got[wms] || !got[ctl] {
		t.Fatalf("through the tunnel: wms %v, control %v; want both reachable", got[wms], got[ctl])
	}
	via(uplink)
	if got := reach(t, agent, []probe{wms, ctl}); got[wms] || !got[ctl] {
		t.Errorf("over the uplink: wms %v, control %v; want wms dropped, control reachable", got[wms], got[ctl])
	}
	// Without a tunnel interface no segment is open anywhere.
	if _, err := e.Apply(Build(desired(t, "scanner", localpolicy.Sticky{}), Options{})); err != nil {
		t.Fatal(err)
	}
	via(tun)
	if got := reach(t, agent, []probe{wms}); got[wms] {
		t.Error("with no tunnel configured a segment is still reachable")
	}
}

// Replacing the ruleset is invisible to traffic the old and the new one
// both allow: a UDP stream to the safety floor loses no packet while the
// table is replaced again and again.
func TestReplacingTheTableDropsNothing(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ctl := probe{"udp", "192.168.50.3:502"}
	agent, link := site(t, []probe{ctl})
	e := NewEnforcer(WithNetNS(agent.FD()))
	rs := [2]Ruleset{
		Build(desired(t, "scanner", localpolicy.Sticky{}), Options{Tunnel: link}),
		Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{Tunnel: link}),
	}
	if _, err := e.Apply(rs[0]); err != nil {
		t.Fatal(err)
	}
	stop := lab.Stream(t, agent, netip.MustParseAddrPort(ctl.to), time.Millisecond)
	for i := range 100 {
		if _, err := e.Apply(rs[(i+1)%2]); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if sent, lost := stop(); sent < 300 || lost != 0 {
		t.Errorf("across 100 table replacements: %d sent, %d lost; want none lost", sent, lost)
	}
}

// forwarder is a device forwarding between a truck's floor network and
// an uplink: floor host 192.168.50.3 (a PLC on tcp 502) and .4 and .5
// (other floor hosts, free to use port 502 as a source), the device at
// 192.168.50.1 and 10.10.0.2, an uplink host at 10.10.0.1 (echo on tcp
// 9000).
func forwarder(t *testing.T) (device, floor, uplink *lab.NS) {
	t.Helper()
	device, floor, uplink = lab.NewNS(t, "dev"), lab.NewNS(t, "floor"), lab.NewNS(t, "up")
	lab.Link(t, floor, "192.168.50.3/29,192.168.50.4/29,192.168.50.5/29", device, "192.168.50.1/29")
	lab.Link(t, device, "10.10.0.2/24", uplink, "10.10.0.1/24")
	device.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	floor.MustRun(t, "ip", "route", "add", "default", "via", "192.168.50.1")
	uplink.MustRun(t, "ip", "route", "add", "192.168.50.0/29", "via", "10.10.0.2")
	lab.Echo(t, floor, netip.MustParseAddrPort("192.168.50.3:502"))
	lab.Echo(t, uplink, netip.MustParseAddrPort("10.10.0.1:9000"))
	return device, floor, uplink
}

// The safety floor is forwarded one way: new connections toward the
// floor's hosts and ports, and their replies. A floor host starts nothing
// through the device that the floor does not name, not even with the
// floor's port as its source port: it did (the forward rules accepted
// any packet whose source or destination matched the floor), in
// quarantine too.
func TestFloorIsForwardedOneWay(t *testing.T) {
	lab.RequirePrivileged(t, "nft", "sysctl")
	device, floor, uplink := forwarder(t)
	plc, exfil := netip.MustParseAddrPort("192.168.50.3:502"), netip.MustParseAddrPort("10.10.0.1:9000")
	for i, sticky := range []localpolicy.Sticky{{}, {Mode: localpolicy.Quarantine}} {
		// A fresh source per mode: the same four-tuple again would wait
		// out TIME_WAIT and prove nothing.
		fromPLCPort := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 168, 50, byte(4 + i)}), 502)
		d := desired(t, "telematics", sticky)
		d.Floor = []localpolicy.FloorRule{{Name: "plc", Destination: policy.Destination{CIDR: netip.MustParsePrefix("192.168.50.0/29"), Protocol: policy.TCP,
			Ports: []policy.PortRange{{First: 502, Last: 502}}}}}
		if _, err := NewEnforcer(WithNetNS(device.FD())).Apply(Build(d, Options{Tunnel: "bh0", ListenPort: 51820})); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			what      string
			from      *lab.NS
			local, to netip.AddrPort
			want      bool
		}{
			{"the uplink to the PLC (toward the floor)", uplink, netip.AddrPort{}, plc, true},
			{"a floor host to an uplink host", floor, netip.AddrPort{}, exfil, false},
			{"a floor host to an uplink host, from source port 502", floor, fromPLCPort, exfil, false},
		} {
			got, err := lab.ReachableFrom(c.from, "tcp", c.local, c.to, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Errorf("mode %s: %s: reachable %v, want %v", sticky.Mode, c.what, got, c.want)
			}
		}
	}
}

// A packet from a gateway's address and WireGuard port reaches the
// tunnel's port and nothing else on the device: it reached any local UDP
// port (the inbound rule matched the source address and port only, which
// anyone on the path can spoof).
func TestGatewayReachesOnlyTheTunnelPort(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	device, gw := lab.NewNS(t, "dev"), lab.NewNS(t, "gw")
	lab.Link(t, device, "10.10.0.2/24", gw, "10.10.0.21/24")
	tunnelPort, other := netip.MustParseAddrPort("10.10.0.2:51820"), netip.MustParseAddrPort("10.10.0.2:9999")
	lab.Echo(t, device, tunnelPort)
	lab.Echo(t, device, other)
	d := desired(t, "dock-gateway", localpolicy.Sticky{}) // holds a tunnel to 10.10.0.21:51820
	if _, err := NewEnforcer(WithNetNS(device.FD())).Apply(Build(d, Options{Tunnel: "bh0", ListenPort: 51820})); err != nil {
		t.Fatal(err)
	}
	fromGateway := netip.MustParseAddrPort("10.10.0.21:51820")
	for _, c := range []struct {
		to   netip.AddrPort
		want bool
	}{{tunnelPort, true}, {other, false}} {
		got, err := lab.ReachableFrom(gw, "udp", fromGateway, c.to, 500*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if got != c.want {
			t.Errorf("udp from the gateway's 10.10.0.21:51820 to %s: reachable %v, want %v", c.to, got, c.want)
		}
	}
}
