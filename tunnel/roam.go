package tunnel

import (
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"sync"

	"github.com/tailscale/wireguard-go/conn"
)

// tailscale/wireguard-go never moves a peer's endpoint to where its
// packets come from (Tailscale's own transport tracks peers itself), so a
// peer with no configured endpoint could never be answered. A segment
// gateway's peers are devices behind cellular NAT whose address nobody
// knows in advance: roamingBind gives them what kernel WireGuard does.
//
// A roaming peer is set with the endpoint "roam:KEY" (hex). Its packets
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
	mu sync.Mutex
	// heard is where each roaming key was last authenticated from;
	// claimed where an initiation naming it last came from.
	heard, claimed map[[32]byte]conn.Endpoint
	// roaming are the keys set with a roaming endpoint.
	roaming map[[32]byte]bool
}

func newRoamingBind(inner conn.Bind) *roamingBind {
	return &roamingBind{Bind: inner, heard: map[[32]byte]conn.Endpoint{}, claimed: map[[32]byte]conn.Endpoint{}, roaming: map[[32]byte]bool{}}
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
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.roaming[pk] {
		m[pk] = ep
	}
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

// forget drops what is known of keys no longer peers.
func (b *roamingBind) forget(keep func([32]byte) bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k := range b.roaming {
		if !keep(k) {
			delete(b.roaming, k)
			delete(b.heard, k)
			delete(b.claimed, k)
		}
	}
}

// roams reports whether key was set roaming.
func (b *roamingBind) roams(key [32]byte) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.roaming[key]
}
