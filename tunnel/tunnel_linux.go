package tunnel

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/tailscale/wireguard-go/conn"
	"github.com/tailscale/wireguard-go/device"
	"github.com/tailscale/wireguard-go/ipc"
	"github.com/tailscale/wireguard-go/tun"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// routeProtocol marks the routes this package owns (rtm_protocol), so that
// a reconcile finds exactly its own routes and never touches an
// administrator's. `ip route show proto 98` lists them.
const routeProtocol = 98

// Tunnel is the running WireGuard device. Its methods are safe for
// concurrent use; Apply and RotateKey are serialised.
type Tunnel struct {
	cfg  Config
	log  *slog.Logger
	dev  *device.Device
	bind *roamingBind
	uapi net.Listener
	rt   *rtnetlink.Conn
	link uint32 // ifindex of the TUN interface
	port uint16 // the UDP port the device listens on, as bound at Open

	mu  sync.Mutex // guards key and addrs, and orders Apply against RotateKey
	key PrivateKey
	// addrs are the interface's own addresses: a peer address inside one
	// of their prefixes is on the link and needs no route of its own.
	addrs []netip.Prefix

	done sync.WaitGroup // the UAPI accept loop
}

// Open creates the TUN interface and the WireGuard device on it, with the
// key from cfg.KeyFile (made on first start), the interface addresses, and
// the UAPI socket `wg` talks to. It has no peers until Apply.
//
// The interface, its UDP socket and the route socket are made in the
// network namespace of the calling thread.
func Open(cfg Config) (*Tunnel, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Check(); err != nil {
		return nil, err
	}
	key, created, err := LoadOrCreateKey(cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	t := &Tunnel{cfg: cfg, log: cfg.Logger, key: key}
	if created {
		t.log.Info("created wireguard key", "file", cfg.KeyFile, "public_key", key.Public().String())
	}
	tdev, err := tun.CreateTUN(cfg.Interface, cfg.MTU)
	if err != nil {
		return nil, tunError(cfg.Interface, err)
	}
	opts := []device.Option{device.WithPreallocatedBuffersPerPool(cfg.Buffers)}
	t.bind = newRoamingBind(conn.NewDefaultBind())
	t.dev = device.NewDevice(tdev, t.bind, &device.Logger{
		Verbosef: func(string, ...any) {},
		Errorf:   func(format string, args ...any) { t.log.Warn("wireguard: " + fmt.Sprintf(format, args...)) },
	}, opts...)
	t.dev.SetPeerLookupFunc(t.bind.lookup)
	t.dev.SetSessionStateFunc(func(pk device.NoisePublicKey, s device.PeerSessionState) {
		if s != device.PeerSessionNone && t.bind.stray(pk) {
			go t.dev.RemovePeer(pk) // not from the hook, which holds the peer's locks
		}
	})
	fail := func(err error) (*Tunnel, error) {
		t.Close()
		return nil, err
	}
	if err := t.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=%d\n", key.uapiHex(), cfg.ListenPort)); err != nil {
		return fail(fmt.Errorf("tunnel %s: listen on udp port %d: %w", cfg.Interface, cfg.ListenPort, err))
	}
	if err := t.dev.Up(); err != nil {
		return fail(fmt.Errorf("tunnel %s: up: %w", cfg.Interface, err))
	}
	// The port bound (a free one when the configuration says 0): the
	// table lets gateways reach this port and no other.
	text, err := t.dev.IpcGet()
	if err == nil {
		t.port, err = ListenPortOf(text)
	}
	if err != nil {
		return fail(fmt.Errorf("tunnel %s: listen port: %w", cfg.Interface, err))
	}
	if t.rt, err = rtnetlink.Dial(nil); err != nil {
		return fail(fmt.Errorf("tunnel %s: route socket: %w", cfg.Interface, err))
	}
	ifc, err := net.InterfaceByName(cfg.Interface)
	if err != nil {
		return fail(fmt.Errorf("tunnel %s: %w", cfg.Interface, err))
	}
	t.link = uint32(ifc.Index)
	for _, a := range cfg.Addresses {
		if err := t.addAddress(a); err != nil {
			return fail(err)
		}
	}
	t.addrs = slices.Clone(cfg.Addresses)
	if err := t.rt.Link.Set(&rtnetlink.LinkMessage{Family: unix.AF_UNSPEC, Index: t.link, Flags: unix.IFF_UP, Change: unix.IFF_UP}); err != nil {
		return fail(fmt.Errorf("tunnel %s: set up: %w", cfg.Interface, err))
	}
	if err := t.serveUAPI(); err != nil {
		return fail(err)
	}
	return t, nil
}

func tunError(name string, err error) error {
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("tunnel %s: the interface is in use by another process (is another agent running?): %w", name, err)
	case errors.Is(err, os.ErrNotExist), strings.Contains(err.Error(), "does not exist"):
		return fmt.Errorf("tunnel %s: no TUN device (/dev/net/tun); load the tun module (modprobe tun) or give the container access to it: %w", name, err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("tunnel %s: creating a TUN interface needs CAP_NET_ADMIN: %w", name, err)
	}
	return fmt.Errorf("tunnel %s: %w", name, err)
}

// AddAddress puts p on the interface (an address control assigned after
// the tunnel came up); one already there is no error.
func (t *Tunnel) AddAddress(p netip.Prefix) error {
	if err := t.addAddress(p); err != nil {
		return err
	}
	t.mu.Lock()
	t.addrs = append(t.addrs, p)
	t.mu.Unlock()
	return nil
}

func (t *Tunnel) addAddress(p netip.Prefix) error {
	fam := uint8(unix.AF_INET)
	if p.Addr().Is6() {
		fam = unix.AF_INET6
	}
	ip := net.IP(p.Addr().AsSlice())
	err := t.rt.Address.New(&rtnetlink.AddressMessage{
		Family: fam, PrefixLength: uint8(p.Bits()), Index: t.link,
		Flags:      unix.IFA_F_NODAD,
		Attributes: &rtnetlink.AddressAttributes{Address: ip, Local: ip},
	})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("tunnel %s: address %s: %w", t.cfg.Interface, p, err)
	}
	return nil
}

// serveUAPI answers the standard WireGuard configuration socket
// (/var/run/wireguard/NAME.sock, root only), so `wg show NAME` works.
func (t *Tunnel) serveUAPI() error {
	f, err := ipc.UAPIOpen(t.cfg.Interface)
	if err != nil {
		return fmt.Errorf("tunnel %s: wireguard socket: %w", t.cfg.Interface, err)
	}
	l, err := ipc.UAPIListen(t.cfg.Interface, f)
	f.Close()
	if err != nil {
		return fmt.Errorf("tunnel %s: wireguard socket: %w", t.cfg.Interface, err)
	}
	t.uapi = l
	t.done.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go t.dev.IpcHandle(c)
		}
	})
	return nil
}

// Name is the interface name.
func (t *Tunnel) Name() string { return t.cfg.Interface }

// ListenPort is the UDP port the device listens on.
func (t *Tunnel) ListenPort() uint16 { return t.port }

// PublicKey is what gateways and enrolment know the device by.
func (t *Tunnel) PublicKey() policy.Key {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.key.Public()
}

// State reads the device's peers and their counters.
func (t *Tunnel) State() ([]PeerState, error) {
	text, err := t.dev.IpcGet()
	if err != nil {
		return nil, fmt.Errorf("tunnel %s: %w", t.cfg.Interface, err)
	}
	state, err := ParseState(text)
	for i := range state {
		state[i].Roams = t.bind.roams(state[i].PublicKey)
	}
	return state, err
}

// Apply makes the device's peers and the tunnel routes exactly want.
// Unchanged peers are not touched; it reports whether anything changed,
// and returns the peers' state (handshakes, counters) as the device reports
// it afterwards. Peers are diffed against what the device reports, not
// what was last set, so a peer removed by hand with `wg set` comes back.
//
// Roaming peers (a gateway's devices) are admitted rather than made: the
// device gets a peer when it first sends an initiation (see roam.go), and
// State lists it only from then on. A live peer no longer admitted is
// removed here, its sessions with it.
func (t *Tunnel) Apply(want []Peer) (state []PeerState, changed bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fixed, roaming := splitRoaming(want)
	// The table first: from here no initiation makes a peer the new
	// roster does not admit, and the state read next sees every peer the
	// old one made (a straggler is the session hook's).
	if t.bind.admit(roaming) {
		changed = true
	}
	state, err = t.State()
	if err != nil {
		return nil, changed, err
	}
	if diff := Diff(Peers(state), Live(state, fixed, roaming)); diff != "" {
		if err := t.dev.IpcSet(diff); err != nil {
			return state, changed, fmt.Errorf("tunnel %s: set peers: %w", t.cfg.Interface, err)
		}
		changed = true
		if state, err = t.State(); err != nil {
			return nil, true, err
		}
	}
	routes, err := t.routes()
	if err != nil {
		return state, changed, err
	}
	add, del := RouteDiff(routes, OffLink(Routes(want), t.addrs))
	for _, p := range add {
		if err := t.rt.Route.Replace(t.routeMessage(p)); err != nil {
			return state, changed, fmt.Errorf("tunnel %s: route %s: %w", t.cfg.Interface, p, err)
		}
	}
	for _, p := range del {
		if err := t.rt.Route.Delete(t.routeMessage(p)); err != nil && !errors.Is(err, unix.ESRCH) {
			return state, changed, fmt.Errorf("tunnel %s: delete route %s: %w", t.cfg.Interface, p, err)
		}
	}
	return state, changed || len(add)+len(del) > 0, nil
}

func (t *Tunnel) routeMessage(p netip.Prefix) *rtnetlink.RouteMessage {
	m := &rtnetlink.RouteMessage{
		Family: unix.AF_INET, DstLength: uint8(p.Bits()), Table: unix.RT_TABLE_MAIN,
		Protocol: routeProtocol, Scope: unix.RT_SCOPE_LINK, Type: unix.RTN_UNICAST,
		Attributes: rtnetlink.RouteAttributes{Dst: net.IP(p.Addr().AsSlice()), OutIface: t.link},
	}
	if p.Addr().Is6() {
		m.Family, m.Scope = unix.AF_INET6, unix.RT_SCOPE_UNIVERSE
	}
	return m
}

// routes lists the routes this package made on the interface.
func (t *Tunnel) routes() ([]netip.Prefix, error) {
	msgs, err := t.rt.Route.List()
	if err != nil {
		return nil, fmt.Errorf("tunnel %s: list routes: %w", t.cfg.Interface, err)
	}
	var out []netip.Prefix
	for _, m := range msgs {
		if m.Protocol != routeProtocol || m.Attributes.OutIface != t.link {
			continue
		}
		a, ok := netip.AddrFromSlice(m.Attributes.Dst)
		if !ok {
			a = netip.IPv4Unspecified()
			if m.Family == unix.AF_INET6 {
				a = netip.IPv6Unspecified()
			}
		}
		if m.Family == unix.AF_INET {
			a = a.Unmap()
		}
		out = append(out, netip.PrefixFrom(a, int(m.DstLength)))
	}
	sortPrefixes(out)
	return out, nil
}

// RotateKey replaces the device key: the new key is written to the key
// file first (so a crash keeps it), then set on the device, which drops
// every session so peers must handshake again with the new key. The old
// key stops working at once. It returns the new public key, which the
// gateways must be told (by control, or by hand).
func (t *Tunnel) RotateKey() (policy.Key, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k, err := GenerateKey()
	if err != nil {
		return policy.Key{}, err
	}
	if err := WriteKey(t.cfg.KeyFile, k); err != nil {
		return policy.Key{}, err
	}
	if err := t.dev.IpcSet("private_key=" + k.uapiHex() + "\n"); err != nil {
		return policy.Key{}, fmt.Errorf("tunnel %s: set key: %w", t.cfg.Interface, err)
	}
	t.key = k
	return k.Public(), nil
}

// Close stops the device and removes the interface (and with it the
// routes) and the UAPI socket. Segment traffic then has no path: the
// nftables table, which stays, drops it on every other interface.
func (t *Tunnel) Close() error {
	if t.uapi != nil {
		t.uapi.Close()
		t.done.Wait()
	}
	if t.dev != nil {
		t.dev.Close()
	}
	if t.rt != nil {
		t.rt.Close()
	}
	return nil
}
