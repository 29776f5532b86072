package tunnel

import (
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// site is a device namespace joined to two segment gateways running
// Debian's wireguard-go (not our code), each with a TCP and UDP echo
// service on a host of its segment.
type site struct {
	dev      *lab.NS
	tun      *Tunnel
	gw1, gw2 *lab.Gateway
	// Hosts of the two segments, and the peers that route to them.
	host1, host2 netip.AddrPort
	peer1, peer2 Peer
}

const deviceAddr = "100.64.0.2/32"

func newSite(t *testing.T) *site {
	t.Helper()
	lab.RequirePrivileged(t, "wg", "wireguard-go")
	s := &site{dev: lab.NewNS(t, "dev")}
	n1, n2 := lab.NewNS(t, "gw1"), lab.NewNS(t, "gw2")
	lab.Link(t, s.dev, "192.0.2.2/30", n1, "192.0.2.1/30")
	lab.Link(t, s.dev, "192.0.2.6/30", n2, "192.0.2.5/30")
	s.gw1 = lab.StartGateway(t, n1, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	s.gw2 = lab.StartGateway(t, n2, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.5"), 51821, "100.64.0.1/24")
	s.host1, s.host2 = netip.MustParseAddrPort("10.20.1.10:443"), netip.MustParseAddrPort("10.30.0.10:443")
	s.gw1.Serve(t, s.host1.Addr(), s.host1.Port())
	s.gw2.Serve(t, s.host2.Addr(), s.host2.Port())
	s.peer1 = Peer{PublicKey: key(t, s.gw1.PublicKey), Endpoint: s.gw1.Endpoint, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.20.1.0/24")}}
	s.peer2 = Peer{PublicKey: key(t, s.gw2.PublicKey), Endpoint: s.gw2.Endpoint, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.30.0.0/24")}}

	cfg := Config{Interface: "bh-" + s.dev.Name[len(s.dev.Name)-6:], Addresses: []netip.Prefix{netip.MustParsePrefix(deviceAddr)},
		KeyFile: filepath.Join(t.TempDir(), "wg.key")}
	if err := s.dev.Do(func() error {
		var err error
		s.tun, err = Open(cfg)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.tun.Close() })
	for _, g := range []*lab.Gateway{s.gw1, s.gw2} {
		g.AllowPeer(t, s.tun.PublicKey().String(), netip.AddrPort{}, deviceAddr)
	}
	return s
}

func key(t *testing.T, s string) policy.Key {
	t.Helper()
	var k policy.Key
	if err := k.UnmarshalText([]byte(s)); err != nil {
		t.Fatal(err)
	}
	return k
}

func (s *site) apply(t *testing.T, peers ...Peer) {
	t.Helper()
	if _, _, err := s.tun.Apply(peers); err != nil {
		t.Fatalf("Apply: %v", err)
	}
}

// Handshake and data through the tunnel to an independent implementation,
// over TCP and UDP; both sides see the handshake; `wg show` against our
// UAPI socket lists the peer, its endpoint and allowed IPs.
func TestHandshakeAndDataWithDebianWireGuard(t *testing.T) {
	s := newSite(t)
	if lab.Reaches(t, s.dev, "tcp", s.host1) {
		t.Fatal("segment host reachable before any peer: the test proves nothing")
	}
	s.apply(t, s.peer1)
	for _, proto := range []string{"tcp", "udp"} {
		if !lab.ReachesWithin(t, s.dev, proto, s.host1, lab.FirstContact) {
			t.Fatalf("%s to %s through the tunnel failed", proto, s.host1)
		}
	}
	if s.gw1.LatestHandshake(t, s.tun.PublicKey().String()).IsZero() {
		t.Error("the gateway records no handshake with the device")
	}
	st, err := s.tun.State()
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || st[0].PublicKey != s.peer1.PublicKey || st[0].LastHandshake.IsZero() || st[0].RxBytes == 0 || st[0].TxBytes == 0 || st[0].Endpoint != s.gw1.Endpoint {
		t.Errorf("state %+v: want one peer with a handshake, traffic both ways and endpoint %s", st, s.gw1.Endpoint)
	}
	show := s.dev.MustRun(t, "wg", "show", s.tun.Name(), "dump")
	lines := strings.Split(strings.TrimSpace(show), "\n")
	if len(lines) != 2 {
		t.Fatalf("wg show dump: %d lines, want device + 1 peer:\n%s", len(lines), show)
	}
	f := strings.Split(lines[1], "\t")
	if f[0] != s.gw1.PublicKey || f[2] != s.gw1.Endpoint.String() || f[3] != "10.20.1.0/24" {
		t.Errorf("wg show peer line %q: want key %s endpoint %s allowed 10.20.1.0/24", lines[1], s.gw1.PublicKey, s.gw1.Endpoint)
	}
	if dev := strings.Split(lines[0], "\t"); len(dev) < 2 || dev[1] != s.tun.PublicKey().String() {
		t.Errorf("wg show device line: public key field is not ours (%s)", s.tun.PublicKey())
	}
	if got := s.dev.MustRun(t, "ip", "route", "show", "proto", "98"); !strings.Contains(got, "10.20.1.0/24 dev "+s.tun.Name()) {
		t.Errorf("routes of proto 98: %q, want 10.20.1.0/24 through %s", got, s.tun.Name())
	}
	if _, changed, err := s.tun.Apply([]Peer{s.peer1}); err != nil || changed {
		t.Errorf("second Apply of the same peers: changed %v, err %v; want a no-op", changed, err)
	}
}

// Adding a second gateway does not touch the first: a UDP stream through
// the first peer loses not one packet across the change, and its session
// is not renegotiated.
func TestAddingAPeerLeavesTheOthersAlone(t *testing.T) {
	s := newSite(t)
	s.apply(t, s.peer1)
	if !lab.ReachesWithin(t, s.dev, "udp", s.host1, lab.FirstContact) {
		t.Fatal("first segment unreachable")
	}
	before, _ := s.tun.State()
	stop := lab.Stream(t, s.dev, s.host1, 2*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	s.apply(t, s.peer1, s.peer2)
	if !lab.ReachesWithin(t, s.dev, "tcp", s.host2, lab.FirstContact) {
		t.Error("second segment unreachable after it was added")
	}
	time.Sleep(200 * time.Millisecond)
	sent, lost := stop()
	if sent < 100 || lost != 0 {
		t.Errorf("stream through the first peer: %d sent, %d lost; want none lost", sent, lost)
	}
	after, _ := s.tun.State()
	if len(before) != 1 || len(after) != 2 || !after[slices.IndexFunc(after, func(p PeerState) bool { return p.PublicKey == s.peer1.PublicKey })].LastHandshake.Equal(before[0].LastHandshake) {
		t.Errorf("first peer's handshake changed: before %+v after %+v", before, after)
	}
}

// Removing a peer stops its traffic at once, established connections
// included, and leaves the other peer working.
func TestRemovingAPeerStopsItsFlows(t *testing.T) {
	s := newSite(t)
	s.apply(t, s.peer1, s.peer2)
	c := lab.Conn(t, s.dev, s.host2)
	if !lab.RoundTrip(c, 2*time.Second) {
		t.Fatal("no data over the second segment before removal")
	}
	s.apply(t, s.peer1)
	if lab.RoundTrip(c, 500*time.Millisecond) {
		t.Error("an established connection through the removed peer still carries data")
	}
	if !lab.ReachesWithin(t, s.dev, "tcp", s.host1, lab.FirstContact) {
		t.Error("the remaining segment stopped working")
	}
	if got := s.dev.MustRun(t, "ip", "route", "show", "proto", "98"); strings.Contains(got, "10.30.0.0/24") {
		t.Errorf("route of the removed peer remains: %q", got)
	}
}

// A peer removed behind the agent's back (wg set ... remove) is restored
// by the next Apply, because Apply diffs against the device.
func TestApplyRepairsHandEdits(t *testing.T) {
	s := newSite(t)
	s.apply(t, s.peer1)
	s.dev.MustRun(t, "wg", "set", s.tun.Name(), "peer", s.gw1.PublicKey, "remove")
	if _, changed, err := s.tun.Apply([]Peer{s.peer1}); err != nil || !changed {
		t.Fatalf("Apply after a hand edit: changed %v, err %v; want a repair", changed, err)
	}
	if !lab.ReachesWithin(t, s.dev, "tcp", s.host1, lab.FirstContact) {
		t.Error("segment unreachable after repair")
	}
}

// After a key rotation the old key stops working: a gateway that still
// knows only the old key gets no traffic through. Once it is given the new
// key, a new handshake carries traffic again.
func TestRotateKey(t *testing.T) {
	s := newSite(t)
	s.apply(t, s.peer1)
	if !lab.ReachesWithin(t, s.dev, "tcp", s.host1, lab.FirstContact) {
		t.Fatal("segment unreachable before rotation")
	}
	old := s.tun.PublicKey()
	pub, err := s.tun.RotateKey()
	if err != nil {
		t.Fatal(err)
	}
	if pub == old || s.tun.PublicKey() != pub {
		t.Fatalf("RotateKey returned %s (old %s, now %s)", pub, old, s.tun.PublicKey())
	}
	if lab.Reaches(t, s.dev, "tcp", s.host1) {
		t.Error("traffic still flows to a gateway that knows only the old key")
	}
	s.gw1.RemovePeer(t, old.String())
	s.gw1.AllowPeer(t, pub.String(), netip.AddrPort{}, deviceAddr)
	if !lab.ReachesWithin(t, s.dev, "tcp", s.host1, 15*time.Second) {
		t.Fatal("no traffic after the gateway learned the new key")
	}
	if s.gw1.LatestHandshake(t, pub.String()).IsZero() {
		t.Error("the gateway has no handshake with the new key")
	}
	reread, _, err := LoadOrCreateKey(s.tun.cfg.KeyFile)
	if err != nil || reread.Public() != pub {
		t.Errorf("key file after rotation holds %v (err %v), want the new key", reread.Public(), err)
	}
}

// A peer with no endpoint (a device behind NAT, at a segment gateway) is
// answered where it was authenticated from, as kernel WireGuard does:
// Debian's wireguard-go initiates to our tunnel and reaches a host behind
// it. A client whose key is not a peer gets no handshake at all. The
// devices on the tunnel's own prefix need no route each.
func TestRoamingPeersAreAnsweredWhereTheyAre(t *testing.T) {
	lab.RequirePrivileged(t, "wg", "wireguard-go")
	gw, dev, stranger := lab.NewNS(t, "gw"), lab.NewNS(t, "dev"), lab.NewNS(t, "strgr")
	lab.Link(t, dev, "192.0.2.2/30", gw, "192.0.2.1/30")
	lab.Link(t, stranger, "192.0.2.6/30", gw, "192.0.2.5/30")
	host := netip.MustParseAddrPort("10.20.1.10:443")
	gw.MustRun(t, "ip", "addr", "add", "10.20.1.10/32", "dev", "lo")
	lab.Echo(t, gw, host)
	cfg := Config{Interface: "bh-" + gw.Name[len(gw.Name)-6:], Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/24")},
		ListenPort: 51820, KeyFile: filepath.Join(t.TempDir(), "wg.key")}
	var tun *Tunnel
	if err := gw.Do(func() error {
		var err error
		tun, err = Open(cfg)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tun.Close() })
	device := lab.StartGateway(t, dev, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.2"), 51830, "100.64.0.2/32")
	device.RouteVia(t, tun.PublicKey().String(), netip.MustParseAddrPort("192.0.2.1:51820"), "10.20.1.0/24")
	outsider := lab.StartGateway(t, stranger, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.6"), 51830, "100.64.0.3/32")
	outsider.RouteVia(t, tun.PublicKey().String(), netip.MustParseAddrPort("192.0.2.5:51820"), "10.20.1.0/24")

	want := []Peer{{PublicKey: key(t, device.PublicKey), Roams: true, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32")}}}
	if st, _, err := tun.Apply(want); err != nil || len(st) != 0 {
		t.Fatalf("Apply: state %+v, err %v; want no peer until the device is heard from", st, err)
	}
	if !lab.ReachesWithin(t, dev, "tcp", host, lab.FirstContact) {
		t.Fatalf("the roaming device does not reach %s through the tunnel", host)
	}
	st, err := tun.State()
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || !st[0].Roams || st[0].Endpoint != netip.MustParseAddrPort("192.0.2.2:51830") || st[0].LastHandshake.IsZero() {
		t.Errorf("state %+v: want the roaming device, heard from 192.0.2.2:51830", st)
	}
	if _, changed, err := tun.Apply(want); err != nil || changed {
		t.Errorf("second Apply: changed %v, err %v; want a no-op (a learned endpoint is not a change)", changed, err)
	}
	if got := gw.MustRun(t, "ip", "route", "show", "proto", "98"); strings.Contains(got, "100.64.0.2") {
		t.Errorf("a route was made for a device on the tunnel's own prefix: %q", got)
	}
	if lab.ReachesWithin(t, stranger, "tcp", host, lab.FirstContact) {
		t.Fatal("a key that is not a peer reached the host")
	}
	if !outsider.LatestHandshake(t, tun.PublicKey().String()).IsZero() {
		t.Error("a key that is not a peer completed a handshake")
	}

	// Dropped from the roster: its live peer goes in the same Apply, and
	// its key makes no new one.
	if st, changed, err := tun.Apply(nil); err != nil || !changed || len(st) != 0 {
		t.Fatalf("Apply(nil): state %+v, changed %v, err %v; want the live peer removed", st, changed, err)
	}
	if lab.ReachesWithin(t, dev, "tcp", host, lab.FirstContact) {
		t.Error("a device no longer admitted still reaches the host")
	}
	if st, err := tun.State(); err != nil || len(st) != 0 {
		t.Errorf("state %+v, err %v: a key no longer admitted got a peer again", st, err)
	}
	if _, _, err := tun.Apply(want); err != nil {
		t.Fatal(err)
	}
	if !lab.ReachesWithin(t, dev, "tcp", host, lab.FirstContact) {
		t.Error("the device, admitted again, does not reach the host")
	}
}
