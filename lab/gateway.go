package lab

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// WireGuardImpl is how a lab gateway runs WireGuard.
type WireGuardImpl struct {
	// Name says which implementation it is, for messages and reports.
	Name string
	// Argv starts the daemon for an interface name in the foreground; it
	// must serve the UAPI socket that `wg` configures.
	Argv func(iface string) []string
}

// DebianWireGuard is Debian's wireguard-go package: an implementation
// independent of ours, configured with Debian's `wg`.
var DebianWireGuard = WireGuardImpl{Name: "debian wireguard-go", Argv: func(iface string) []string {
	return []string{"wireguard-go", "-f", iface}
}}

// Gateway is a segment gateway in its own namespace: a WireGuard interface
// configured with `wg`, and the segment's hosts behind it (addresses on the
// namespace's loopback, with echo services on them).
type Gateway struct {
	NS    *NS
	Iface string
	// PublicKey is the gateway's key, base64 as wg prints it.
	PublicKey string
	// Endpoint is where devices reach it (its uplink address and port).
	Endpoint netip.AddrPort
	cmd      *exec.Cmd
}

// StartGateway runs impl in ns on UDP port, with the tunnel address tunAddr
// (such as 100.64.0.1/24) on its interface. The interface is named after
// the namespace, because the UAPI socket (/var/run/wireguard/NAME.sock) is
// shared by all namespaces.
func StartGateway(t T, ns *NS, impl WireGuardImpl, uplink netip.Addr, port uint16, tunAddr string) *Gateway {
	t.Helper()
	RequirePrivileged(t, "wg")
	g := &Gateway{NS: ns, Iface: "wg-" + ns.Name[len(ns.Name)-6:], Endpoint: netip.AddrPortFrom(uplink, port)}
	argv := impl.Argv(g.Iface)
	g.cmd = ns.Command(argv...)
	g.cmd.Env = append(os.Environ(), "WG_PROCESS_FOREGROUND=1", "LOG_LEVEL=error")
	logf, err := os.Create(filepath.Join(t.TempDir(), "wireguard.log"))
	if err != nil {
		t.Fatal(err)
	}
	g.cmd.Stdout, g.cmd.Stderr = logf, logf
	if err := g.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", impl.Name, err)
	}
	t.Cleanup(func() {
		g.cmd.Process.Kill()
		g.cmd.Wait()
		if l, _ := os.ReadFile(logf.Name()); len(l) > 0 { // shown when the test fails
			t.Logf("%s log:\n%s", g.Iface, l)
		}
		logf.Close()
		os.Remove("/var/run/wireguard/" + g.Iface + ".sock")
	})
	sock := "/var/run/wireguard/" + g.Iface + ".sock"
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("%s made no socket %s: %s", impl.Name, sock, log)
		}
		time.Sleep(10 * time.Millisecond)
	}
	key := filepath.Join(t.TempDir(), "gw.key")
	priv := strings.TrimSpace(ns.MustRun(t, "wg", "genkey"))
	if err := os.WriteFile(key, []byte(priv+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pub := ns.Command("wg", "pubkey")
	pub.Stdin = strings.NewReader(priv)
	out, err := pub.Output()
	if err != nil {
		t.Fatalf("wg pubkey: %v", err)
	}
	g.PublicKey = strings.TrimSpace(string(out))
	ns.MustRun(t, "wg", "set", g.Iface, "private-key", key, "listen-port", fmt.Sprint(port))
	ns.MustRun(t, "ip", "addr", "add", tunAddr, "dev", g.Iface)
	ns.MustRun(t, "ip", "link", "set", g.Iface, "up")
	return g
}

// Stop ends the WireGuard daemon, and with it its interface.
func (g *Gateway) Stop() {
	g.cmd.Process.Kill()
	g.cmd.Wait()
}

// Serve puts a segment host address on the gateway's loopback with TCP
// and UDP echo services on each port.
func (g *Gateway) Serve(t T, addr netip.Addr, ports ...uint16) {
	t.Helper()
	g.NS.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(addr, addr.BitLen()).String(), "dev", "lo")
	for _, p := range ports {
		Echo(t, g.NS, netip.AddrPortFrom(addr, p))
	}
}

// AllowPeer lets a device key in, routing allowedIPs (its tunnel address)
// back to it. With a zero endpoint the gateway learns it from the device's
// first handshake, as kernel WireGuard and Debian's wireguard-go do for
// devices behind NAT; tailscale/wireguard-go does not roam, so a gateway
// built on it must be given the device's endpoint.
func (g *Gateway) AllowPeer(t T, publicKey string, endpoint netip.AddrPort, allowedIPs ...string) {
	t.Helper()
	argv := []string{"wg", "set", g.Iface, "peer", publicKey, "allowed-ips", strings.Join(allowedIPs, ",")}
	if endpoint.IsValid() {
		argv = append(argv, "endpoint", endpoint.String())
	}
	g.NS.MustRun(t, argv...)
}

// RemovePeer forgets a device key.
func (g *Gateway) RemovePeer(t T, publicKey string) {
	t.Helper()
	g.NS.MustRun(t, "wg", "set", g.Iface, "peer", publicKey, "remove")
}

// LatestHandshake is when the gateway last completed a handshake with the
// device key (zero if never), as `wg show latest-handshakes` says.
func (g *Gateway) LatestHandshake(t T, publicKey string) time.Time {
	t.Helper()
	for _, line := range strings.Split(g.NS.MustRun(t, "wg", "show", g.Iface, "latest-handshakes"), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == publicKey {
			var sec int64
			fmt.Sscan(f[1], &sec)
			if sec == 0 {
				return time.Time{}
			}
			return time.Unix(sec, 0)
		}
	}
	return time.Time{}
}

// BareWireGuard is the bare tailscale/wireguard-go library as a daemon
// (`bulkhead-lab wireguard`, built at bin): the same library the agent
// uses, without the agent.
func BareWireGuard(bin string) WireGuardImpl {
	return WireGuardImpl{Name: "bare tailscale/wireguard-go", Argv: func(iface string) []string {
		return []string{bin, "wireguard", iface}
	}}
}

// RouteVia makes g a client of another node: the peer publicKey at
// endpoint carries prefixes, and routes for them go through g's interface.
func (g *Gateway) RouteVia(t T, publicKey string, endpoint netip.AddrPort, prefixes ...string) {
	t.Helper()
	g.NS.MustRun(t, "wg", "set", g.Iface, "peer", publicKey, "endpoint", endpoint.String(), "allowed-ips", strings.Join(prefixes, ","))
	for _, p := range prefixes {
		g.NS.MustRun(t, "ip", "route", "replace", p, "dev", g.Iface)
	}
}
