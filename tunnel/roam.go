package tunnel

import (
	"encoding/hex"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/tailscale/wireguard-go/conn"
	"github.com/tailscale/wireguard-go/device"
)

// tailscale/wireguard-go never moves a peer's endpoint to where its
// packets come from (Tailscale's own transport tracks peers itself), so a
// peer with no configured endpoint could never be answered. A segment
// gateway's peers are devices behind cellular NAT whose address nobody
// knows in advance: roamingBind gives them what kernel WireGuard does.
//
// Roaming peers are made lazily. A gateway admits thousands of devices
// and hears from a few at a time; a wireguard-go peer costs tens of
// kilobytes of queues and three goroutines, so configuring every admitted
// device would cost hundreds of megabytes and most of a second per roster.
// Instead the bind holds the admitted table (key → allowed IPs), swapped
// whole by Apply, and wireguard-go asks it (its PeerLookupFunc) when an
// initiation arrives from a key it has no peer for: an admitted key gets
// a peer, any other key gets no handshake. wireguard-go drops such a peer
// again when its session has been idle for RejectAfterTime×3 (9 minutes).
//
// A roaming peer's endpoint is a roamEndpoint ("roam:KEY" in UAPI text,
// hex). Its packets
// go where that key was last authenticated from: the source of its
// latest decrypted transport packet (wireguard-go reports the sender of
// every batch it authenticated, conn.PeerAwareEndpoint). A handshake
// response goes to the source of the initiation it answers
// (conn.InitiationAwareEndpoint names the claimed key before
// verification; wireguard-go answers only an initiation that verified,
// so an unverified claim can steer nothing but a response to a genuine
// initiation that races it, which the device retries).

// roamPrefix marks a roaming peer's endpoint in UAPI text.
const roamPrefix = "roam:"

// noEndpoint is what a roaming peer not heard from yet shows as its
// endpoint: an address wg(8) can print.
const noEndpoint = "0.0.0.0:0"

type roamingBind struct {
	conn.Bind
	// admitted is the roaming peers allowed now: key → allowed IPs.
	// Replaced whole, never modified; read without a lock per initiation.
	admitted atomic.Pointer[map[[32]byte][]netip.Prefix]

	mu sync.Mutex
	// heard is where each admitted key was last authenticated from;
	// claimed where an initiation naming it last came from.
	heard, claimed map[[32]byte]conn.Endpoint
	// roaming are the keys whose live peer has a roaming endpoint.
	roaming map[[32]byte]bool
}

func newRoamingBind(inner conn.Bind) *roamingBind {
	b := &roamingBind{Bind: inner, heard: map[[32]byte]conn.Endpoint{}, claimed: map[[32]byte]conn.Endpoint{}, roaming: map[[32]byte]bool{}}
	b.admitted.Store(&map[[32]byte][]netip.Prefix{})
	return b
}

// admit replaces the admitted table with peers (all roaming) and reports
// whether it changed.
func (b *roamingBind) admit(peers []Peer) bool {
	old := *b.admitted.Load()
	next := make(map[[32]byte][]netip.Prefix, len(peers))
	changed := len(old) != len(peers)
	for _, p := range peers {
		next[p.PublicKey] = p.AllowedIPs
		if ips, ok := old[p.PublicKey]; !changed && (!ok || !slices.Equal(ips, p.AllowedIPs)) {
			changed = true
		}
	}
	b.admitted.Store(&next)
	return changed
}

func (b *roamingBind) isAdmitted(pk [32]byte) bool {
	_, ok := (*b.admitted.Load())[pk]
	return ok
}

// lookup is wireguard-go's PeerLookupFunc: an initiation from a key with
// no peer makes one only if the key is admitted.
func (b *roamingBind) lookup(pk device.NoisePublicKey) (*device.NewPeerConfig, bool) {
	ips, ok := (*b.admitted.Load())[pk]
	if !ok {
		return nil, false
	}
	b.mu.Lock()
	b.roaming[pk] = true
	b.mu.Unlock()
	return &device.NewPeerConfig{AllowedIPs: ips, Endpoint: &roamEndpoint{key: pk, b: b}}, true
}

// stray reports a live roaming peer whose key is no longer admitted: one
// made from the table an Apply was replacing, after that Apply read the
// device's peers. The session-state hook removes it.
func (b *roamingBind) stray(pk [32]byte) bool {
	b.mu.Lock()
	roams := b.roaming[pk]
	b.mu.Unlock()
	return roams && !b.isAdmitted(pk)
}

// arrival is the endpoint a packet arrived from: the inner bind's, and
// what wireguard-go learns about who sent it.
type arrival struct {
	conn.Endpoint
	b *roamingBind
}

func (a *arrival) InitiationMessagePublicKey(pk [32]byte) { a.b.note(a.b.claimed, pk, a.Endpoint) }
func (a *arrival) FromPeer(pk [32]byte)                   { a.b.note(a.b.heard, pk, a.Endpoint) }

func (b *roamingBind) note(m map[[32]byte]conn.Endpoint, pk [32]byte, ep conn.Endpoint) {
	if !b.isAdmitted(pk) {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	m[pk] = ep
}

// roamEndpoint is a roaming peer's endpoint.
type roamEndpoint struct {
	key [32]byte
	b   *roamingBind
}

func (e *roamEndpoint) current(handshake bool) conn.Endpoint {
	e.b.mu.Lock()
	defer e.b.mu.Unlock()
	heard, claimed := e.b.heard[e.key], e.b.claimed[e.key]
	if handshake && claimed != nil || heard == nil {
		return claimed
	}
	return heard
}

func (e *roamEndpoint) ClearSrc() {}

func (e *roamEndpoint) SrcToString() string { return "" }

func (e *roamEndpoint) DstToString() string {
	if ep := e.current(false); ep != nil {
		return ep.DstToString()
	}
	return noEndpoint
}

func (e *roamEndpoint) DstToBytes() []byte {
	if ep := e.current(false); ep != nil {
		return ep.DstToBytes()
	}
	return nil
}

func (e *roamEndpoint) DstIP() netip.Addr {
	if ep := e.current(false); ep != nil {
		return ep.DstIP()
	}
	return netip.Addr{}
}

func (e *roamEndpoint) SrcIP() netip.Addr { return netip.Addr{} }

func (b *roamingBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	for i, fn := range fns {
		fns[i] = func(slab []byte, packets []conn.ReceivedPacket) (int, error) {
			n, err := fn(slab, packets)
			for j := range n {
				packets[j].Endpoint = &arrival{Endpoint: packets[j].Endpoint, b: b}
			}
			return n, err
		}
	}
	return fns, actual, err
}

// messageResponse is WireGuard's handshake response type (the first
// byte of the message).
const messageResponse = 2

var errNotHeard = errors.New("roaming peer not heard from yet")

func (b *roamingBind) Send(bufs [][]byte, ep conn.Endpoint, offset int) error {
	switch e := ep.(type) {
	case *arrival: // a cookie reply, to where the packet came from
		ep = e.Endpoint
	case *roamEndpoint:
		handshake := len(bufs) == 1 && len(bufs[0]) > offset && bufs[0][offset] == messageResponse
		if ep = e.current(handshake); ep == nil {
			return errNotHeard
		}
	}
	return b.Bind.Send(bufs, ep, offset)
}

func (b *roamingBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	rest, ok := strings.CutPrefix(s, roamPrefix)
	if !ok {
		return b.Bind.ParseEndpoint(s)
	}
	raw, err := hex.DecodeString(rest)
	if err != nil || len(raw) != 32 {
		return nil, errors.New("roaming endpoint: not a hex public key")
	}
	e := &roamEndpoint{b: b}
	copy(e.key[:], raw)
	b.mu.Lock()
	b.roaming[e.key] = true
	b.mu.Unlock()
	return e, nil
}

// forget drops what is known of keys no longer admitted.
func (b *roamingBind) forget() {
	admitted := *b.admitted.Load()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range []map[[32]byte]conn.Endpoint{b.heard, b.claimed} {
		for k := range m {
			if _, ok := admitted[k]; !ok {
				delete(m, k)
			}
		}
	}
	for k := range b.roaming {
		if _, ok := admitted[k]; !ok {
			delete(b.roaming, k)
		}
	}
}

// roams reports whether key was set roaming.
func (b *roamingBind) roams(key [32]byte) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.roaming[key]
}
