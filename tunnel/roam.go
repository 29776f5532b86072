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
// hex). Its packets go where that key was last authenticated from: the
// source of its latest decrypted transport packet (wireguard-go reports
// the sender of every packet it authenticated, conn.PeerAwareEndpoint).
// A handshake response goes to the source of the initiation it answers
// (conn.InitiationAwareEndpoint names the claimed key before
// verification; wireguard-go answers only an initiation that verified,
// so an unverified claim can steer nothing but a response to a genuine
// initiation that races it, which the device retries).
//
// That report comes for every packet received, so noting it takes no
// lock: each admitted key's whereabouts are atomics in the table entry,
// written only when the address changes.

// roamPrefix marks a roaming peer's endpoint in UAPI text.
const roamPrefix = "roam:"

// noEndpoint is what a roaming peer not heard from yet shows as its
// endpoint: an address wg(8) can print.
const noEndpoint = "0.0.0.0:0"

type roamingBind struct {
	conn.Bind
	// admitted is the roaming peers allowed now. The map is replaced
	// whole, never modified, and read without a lock; an entry lives on
	// into the next table while its key stays admitted.
	admitted atomic.Pointer[map[[32]byte]*roamer]

	mu sync.Mutex
	// roaming are the keys whose live peer has a roaming endpoint.
	roaming map[[32]byte]bool
}

// roamer is one admitted key: its allowed IPs, and where it was last
// heard from (authenticated) and claimed from (an initiation naming it).
type roamer struct {
	ips            []netip.Prefix
	heard, claimed atomic.Pointer[endpoint]
}

// endpoint boxes a conn.Endpoint for an atomic pointer.
type endpoint struct{ conn.Endpoint }

// note records that ep is where the key was last seen, unless it is
// already: the common case, a packet from where the last one came from,
// writes nothing.
func note(at *atomic.Pointer[endpoint], ep conn.Endpoint) {
	if cur := at.Load(); cur != nil && sameDestination(cur.Endpoint, ep) {
		return
	}
	at.Store(&endpoint{ep})
}

// sameDestination compares where two endpoints send to. The standard
// bind makes a new endpoint per datagram, so pointers alone rarely match.
func sameDestination(a, b conn.Endpoint) bool {
	if a == b {
		return true
	}
	x, ok1 := a.(*conn.StdNetEndpoint)
	y, ok2 := b.(*conn.StdNetEndpoint)
	return ok1 && ok2 && x.AddrPort == y.AddrPort
}

func newRoamingBind(inner conn.Bind) *roamingBind {
	b := &roamingBind{Bind: inner, roaming: map[[32]byte]bool{}}
	b.admitted.Store(&map[[32]byte]*roamer{})
	return b
}

// admit replaces the admitted table with peers (all roaming) and reports
// whether it changed. A key admitted before keeps what was learned of it.
func (b *roamingBind) admit(peers []Peer) bool {
	old := *b.admitted.Load()
	next := make(map[[32]byte]*roamer, len(peers))
	changed := len(old) != len(peers)
	for _, p := range peers {
		r, ok := old[p.PublicKey]
		switch {
		case !ok:
			r, changed = &roamer{ips: p.AllowedIPs}, true
		case !slices.Equal(r.ips, p.AllowedIPs):
			moved := &roamer{ips: p.AllowedIPs}
			moved.heard.Store(r.heard.Load())
			moved.claimed.Store(r.claimed.Load())
			r, changed = moved, true
		}
		next[p.PublicKey] = r
	}
	b.admitted.Store(&next)
	if changed {
		b.mu.Lock()
		for k := range b.roaming {
			if _, ok := next[k]; !ok {
				delete(b.roaming, k)
			}
		}
		b.mu.Unlock()
	}
	return changed
}

func (b *roamingBind) find(pk [32]byte) *roamer { return (*b.admitted.Load())[pk] }

// lookup is wireguard-go's PeerLookupFunc: an initiation from a key with
// no peer makes one only if the key is admitted.
func (b *roamingBind) lookup(pk device.NoisePublicKey) (*device.NewPeerConfig, bool) {
	r := b.find(pk)
	if r == nil {
		return nil, false
	}
	b.mu.Lock()
	b.roaming[pk] = true
	b.mu.Unlock()
	return &device.NewPeerConfig{AllowedIPs: r.ips, Endpoint: &roamEndpoint{key: pk, b: b}}, true
}

// stray reports a live roaming peer whose key is no longer admitted: one
// made from the table an Apply was replacing, after that Apply read the
// device's peers. The session-state hook removes it.
func (b *roamingBind) stray(pk [32]byte) bool {
	b.mu.Lock()
	roams := b.roaming[pk]
	b.mu.Unlock()
	return roams && b.find(pk) == nil
}

// arrival is the endpoint a packet arrived from: the inner bind's, and
// what wireguard-go learns about who sent it.
type arrival struct {
	conn.Endpoint
	b *roamingBind
}

func (a *arrival) InitiationMessagePublicKey(pk [32]byte) {
	if r := a.b.find(pk); r != nil {
		note(&r.claimed, a.Endpoint)
	}
}

func (a *arrival) FromPeer(pk [32]byte) {
	if r := a.b.find(pk); r != nil {
		note(&r.heard, a.Endpoint)
	}
}

// roamEndpoint is a roaming peer's endpoint.
type roamEndpoint struct {
	key [32]byte
	b   *roamingBind
}

func (e *roamEndpoint) current(handshake bool) conn.Endpoint {
	r := e.b.find(e.key)
	if r == nil {
		return nil
	}
	heard, claimed := r.heard.Load(), r.claimed.Load()
	if handshake && claimed != nil || heard == nil {
		heard = claimed
	}
	if heard == nil {
		return nil
	}
	return heard.Endpoint
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
			// One allocation per batch, not per packet: wireguard-go
			// may keep an endpoint past this call, which keeps the
			// batch's few bytes alive with it.
			arrived := make([]arrival, n)
			for j := range n {
				arrived[j] = arrival{Endpoint: packets[j].Endpoint, b: b}
				packets[j].Endpoint = &arrived[j]
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

// roams reports whether key's live peer roams.
func (b *roamingBind) roams(key [32]byte) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.roaming[key]
}
