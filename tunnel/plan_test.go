package tunnel

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

func testKey(b byte) policy.Key {
	var k policy.Key
	for i := range k {
		k[i] = b
	}
	return k
}

// equateAddrs compares netip values by ==.
var equateAddrs = cmp.Options{cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })}

func peer(b byte, ep string, ips ...string) Peer {
	p := Peer{PublicKey: testKey(b), Endpoint: netip.MustParseAddrPort(ep)}
	for _, ip := range ips {
		p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix(ip))
	}
	return p
}

func TestDiff(t *testing.T) {
	hexKey := func(b byte) string {
		return strings.Repeat(string("0123456789abcdef"[b>>4])+string("0123456789abcdef"[b&15]), 32)
	}
	a := peer(1, "192.0.2.1:51820", "10.20.1.0/24")
	b := peer(2, "192.0.2.5:51820", "10.30.0.0/24")
	for _, tc := range []struct {
		name       string
		have, want []Peer
		diff       string
	}{
		{"nothing", nil, nil, ""},
		{"unchanged peers are not mentioned", []Peer{a, b}, []Peer{a, b}, ""},
		{"add", []Peer{a}, []Peer{a, b}, "public_key=" + hexKey(2) + "\nendpoint=192.0.2.5:51820\nreplace_allowed_ips=true\nallowed_ip=10.30.0.0/24\n"},
		{"remove", []Peer{a, b}, []Peer{b}, "public_key=" + hexKey(1) + "\nremove=true\n"},
		{"new endpoint only", []Peer{a}, []Peer{peer(1, "192.0.2.9:51820", "10.20.1.0/24")}, "public_key=" + hexKey(1) + "\nupdate_only=true\nendpoint=192.0.2.9:51820\n"},
		{"new allowed IPs only", []Peer{a}, []Peer{peer(1, "192.0.2.1:51820", "10.20.1.0/24", "10.20.2.0/24")},
			"public_key=" + hexKey(1) + "\nupdate_only=true\nreplace_allowed_ips=true\nallowed_ip=10.20.1.0/24\nallowed_ip=10.20.2.0/24\n"},
		{"keepalive set on a peer", []Peer{a}, []Peer{func() Peer { k := a; k.Keepalive = KeepaliveInterval; return k }()},
			"public_key=" + hexKey(1) + "\nupdate_only=true\npersistent_keepalive_interval=25\n"},
		{"everything removed", []Peer{a, b}, nil, "public_key=" + hexKey(1) + "\nremove=true\npublic_key=" + hexKey(2) + "\nremove=true\n"},
	} {
		if got := Diff(tc.have, tc.want); got != tc.diff {
			t.Errorf("%s: Diff =\n%s\nwant\n%s", tc.name, got, tc.diff)
		}
	}
}

// A gateway's admitted devices are peers only while live: Live keeps
// the fixed peers, and of the roaming ones those both admitted and live.
func TestLiveKeepsAdmittedPeersThatAreLive(t *testing.T) {
	gw := peer(1, "192.0.2.1:51820", "10.20.1.0/24")
	roam := func(b byte, ip string) Peer {
		return Peer{PublicKey: testKey(b), Roams: true, AllowedIPs: []netip.Prefix{netip.MustParsePrefix(ip)}}
	}
	live, idle, dropped := roam(2, "100.64.0.2/32"), roam(3, "100.64.0.3/32"), roam(4, "100.64.0.4/32")
	moved := roam(5, "100.64.0.9/32")
	have := []PeerState{{Peer: gw}, {Peer: live}, {Peer: dropped}, {Peer: roam(5, "100.64.0.5/32")}}
	got := Live(have, []Peer{gw}, []Peer{live, idle, moved})
	want := []Peer{gw, live, moved}
	if diff := cmp.Diff(want, got, equateAddrs); diff != "" {
		t.Errorf("Live (-want +got):\n%s", diff)
	}
	// What Apply sets from it: the dropped device's peer removed, the
	// moved one's address replaced, the idle one not made.
	d := Diff(Peers(have), got)
	for _, w := range []string{"remove=true", "allowed_ip=100.64.0.9/32"} {
		if !strings.Contains(d, w) {
			t.Errorf("Diff lacks %q:\n%s", w, d)
		}
	}
	if strings.Contains(d, "100.64.0.3") || strings.Count(d, "public_key=") != 2 {
		t.Errorf("Diff touches more than the dropped and the moved peer:\n%s", d)
	}
}

func TestWantedAndRoutes(t *testing.T) {
	got := Wanted([]localpolicy.Peer{
		{PublicKey: testKey(1), Endpoint: "192.0.2.1:51820", AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.20.1.7/24"), netip.MustParsePrefix("10.20.0.0/24")}},
		{PublicKey: testKey(2), Endpoint: "gateway.example:51820"}, // not IP:port: left out
		{PublicKey: testKey(3), Endpoint: "[::ffff:192.0.2.5]:51820", AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.20.0.0/24")}},
	})
	want := []Peer{peer(1, "192.0.2.1:51820", "10.20.0.0/24", "10.20.1.0/24"), peer(3, "192.0.2.5:51820", "10.20.0.0/24")}
	if d := cmp.Diff(want, got, equateAddrs); d != "" {
		t.Errorf("Wanted (-want +got):\n%s", d)
	}
	routes := Routes(got)
	if len(routes) != 2 || routes[0].String() != "10.20.0.0/24" || routes[1].String() != "10.20.1.0/24" {
		t.Errorf("Routes = %v, want 10.20.0.0/24 and 10.20.1.0/24 once each", routes)
	}
	add, del := RouteDiff([]netip.Prefix{netip.MustParsePrefix("10.9.0.0/16"), netip.MustParsePrefix("10.20.0.0/24")}, routes)
	if len(add) != 1 || add[0].String() != "10.20.1.0/24" || len(del) != 1 || del[0].String() != "10.9.0.0/16" {
		t.Errorf("RouteDiff: add %v del %v", add, del)
	}
}

func TestParseState(t *testing.T) {
	text := "private_key=" + strings.Repeat("ab", 32) + "\nlisten_port=51820\n" +
		"public_key=" + strings.Repeat("02", 32) + "\npreshared_key=" + strings.Repeat("00", 32) + "\nprotocol_version=1\n" +
		"endpoint=192.0.2.5:51821\nlast_handshake_time_sec=1764000000\nlast_handshake_time_nsec=5\ntx_bytes=100\nrx_bytes=200\n" +
		"persistent_keepalive_interval=0\nallowed_ip=10.30.0.0/24\n" +
		"public_key=" + strings.Repeat("01", 32) + "\nendpoint=192.0.2.1:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n" +
		"tx_bytes=0\nrx_bytes=0\nallowed_ip=10.20.1.0/24\nallowed_ip=10.20.0.0/24\n"
	got, err := ParseState(text)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("%d peers, want 2", len(got))
	}
	p1, p2 := got[0], got[1]
	if p1.PublicKey != testKey(1) || !p1.LastHandshake.IsZero() || p1.AllowedIPs[0].String() != "10.20.0.0/24" {
		t.Errorf("peer 1: %+v", p1)
	}
	if p2.PublicKey != testKey(2) || !p2.LastHandshake.Equal(time.Unix(1764000000, 5)) || p2.RxBytes != 200 || p2.TxBytes != 100 || p2.Endpoint.String() != "192.0.2.5:51821" {
		t.Errorf("peer 2: %+v", p2)
	}
	for _, bad := range []string{"public_key=zz\n", "garbage\n", "public_key=" + strings.Repeat("01", 32) + "\nrx_bytes=-1\n"} {
		if _, err := ParseState(bad); err == nil {
			t.Errorf("ParseState(%q) accepted", bad)
		}
	}
}

func TestKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "wg.key")
	k, created, err := LoadOrCreateKey(path)
	if err != nil || !created {
		t.Fatalf("first start: created %v, err %v", created, err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v (err %v), want 0600", fi.Mode().Perm(), err)
	}
	again, created, err := LoadOrCreateKey(path)
	if err != nil || created || again.Public() != k.Public() {
		t.Fatalf("second start: created %v, err %v, same key %v", created, err, again.Public() == k.Public())
	}
	for _, s := range []string{k.String(), k.GoString()} {
		if !strings.Contains(s, "hidden") {
			t.Errorf("key prints as %q", s)
		}
	}
	os.Chmod(path, 0o644)
	if _, _, err := LoadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("world-readable key: err %v, want a refusal naming chmod 600", err)
	}
	os.Chmod(path, 0o600)
	os.WriteFile(path, []byte("not a key\n"), 0o600)
	if _, _, err := LoadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), "wg genkey") {
		t.Errorf("garbage key file: err %v", err)
	}
}

func TestConfigCheck(t *testing.T) {
	bad := Config{Interface: "a-name-far-too-long", MTU: 100, Buffers: 10, KeyFile: ""}
	err := bad.Check()
	for _, want := range []string{"tunnel.interface", "tunnel.mtu", "tunnel.buffers", "key file"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Check() = %v, want it to name %s", err, want)
		}
	}
	if err := (Config{KeyFile: "/x"}).withDefaults().Check(); err != nil {
		t.Errorf("defaults: %v", err)
	}
}

func TestListenPortOf(t *testing.T) {
	if got, err := ListenPortOf("private_key=ab\nlisten_port=51820\npublic_key=cd\n"); err != nil || got != 51820 {
		t.Errorf("ListenPortOf = %d, %v; want 51820", got, err)
	}
	for _, bad := range []string{"", "private_key=ab\n", "listen_port=0\n", "listen_port=70000\n"} {
		if _, err := ListenPortOf(bad); err == nil {
			t.Errorf("ListenPortOf(%q) has no error", bad)
		}
	}
}

// Peers inside the tunnel's own prefix need no route each; others do,
// and a host address (a device's /32) covers nothing.
func TestOffLink(t *testing.T) {
	p := netip.MustParsePrefix
	routes := []netip.Prefix{p("100.64.0.5/32"), p("100.64.3.9/32"), p("10.20.1.0/24"), p("100.64.0.0/15")}
	got := OffLink(routes, []netip.Prefix{p("100.64.0.1/16"), p("100.99.0.1/32")})
	want := []netip.Prefix{p("10.20.1.0/24"), p("100.64.0.0/15")}
	if !slices.Equal(got, want) {
		t.Errorf("OffLink = %v, want %v", got, want)
	}
	if got := OffLink(routes, []netip.Prefix{p("100.64.0.5/32")}); len(got) != len(routes) {
		t.Errorf("a host address took routes: %v", got)
	}
}
