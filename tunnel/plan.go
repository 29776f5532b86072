package tunnel

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Peer is one peer as the device holds it: what Apply sets and what the
// device reports back.
type Peer struct {
	PublicKey policy.Key
	Endpoint  netip.AddrPort
	// Roams is a peer with no configured endpoint (a device behind NAT,
	// at a segment gateway): it is answered where it was last
	// authenticated from, and Endpoint is only what was learned.
	Roams      bool
	AllowedIPs []netip.Prefix
	// Keepalive is the persistent keepalive in seconds (0: none): a
	// gateway that must reach the device (inbound connections) keeps
	// its session and the NAT's mapping alive.
	Keepalive uint16
}

// KeepaliveInterval is the keepalive set toward a gateway that carries
// inbound connections: WireGuard's customary value, under the shortest
// common NAT UDP timeout.
const KeepaliveInterval = 25

// PeerState is a peer and its live counters, for status and for the
// evaluator's behaviour context.
type PeerState struct {
	Peer
	// LastHandshake is zero when no handshake has completed.
	LastHandshake time.Time
	RxBytes       uint64
	TxBytes       uint64
}

// Wanted converts the Desired state's peers. A peer with no endpoint
// roams (a device at a gateway); one whose endpoint is not an IP:port (the
// policy validator refuses those) is left out rather than guessed at.
func Wanted(peers []localpolicy.Peer) []Peer {
	out := make([]Peer, 0, len(peers))
	for _, p := range peers {
		ep, err := netip.ParseAddrPort(p.Endpoint)
		roams := p.Endpoint == ""
		if err != nil && !roams {
			continue
		}
		ips := make([]netip.Prefix, len(p.AllowedIPs))
		for i, ip := range p.AllowedIPs {
			ips[i] = ip.Masked() // as the device reports them
		}
		sortPrefixes(ips)
		ips = slices.Compact(ips)
		w := Peer{PublicKey: p.PublicKey, Roams: roams, AllowedIPs: ips}
		if p.Keepalive {
			w.Keepalive = KeepaliveInterval
		}
		if !roams {
			w.Endpoint = netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())
		}
		out = append(out, w)
	}
	return out
}

// splitRoaming separates the peers set up front (a device's gateways)
// from the roaming ones, which are only admitted.
func splitRoaming(want []Peer) (fixed, roaming []Peer) {
	for _, p := range want {
		if p.Roams {
			roaming = append(roaming, p)
		} else {
			fixed = append(fixed, p)
		}
	}
	return fixed, roaming
}

// Live is what the device's peers must be: every fixed peer, and the
// roaming peers that are both admitted and live now (made at their first
// initiation). An admitted device not heard from has no peer yet, and
// needs none.
func Live(have []PeerState, fixed, roaming []Peer) []Peer {
	admitted := make(map[policy.Key]Peer, len(roaming))
	for _, p := range roaming {
		admitted[p.PublicKey] = p
	}
	out := slices.Clone(fixed)
	for _, h := range have {
		if p, ok := admitted[h.PublicKey]; ok {
			out = append(out, p)
		}
	}
	return out
}

// Diff is the WireGuard UAPI "set" text that turns the device's peers have
// into want: new peers added, changed ones updated in place, unwanted ones
// removed. Peers equal in both are not mentioned at all, so their sessions
// and queued packets are untouched. Empty means nothing to do.
func Diff(have, want []Peer) string {
	old := make(map[policy.Key]Peer, len(have))
	for _, p := range have {
		old[p.PublicKey] = p
	}
	var b strings.Builder
	keep := make(map[policy.Key]bool, len(want))
	for _, w := range want {
		keep[w.PublicKey] = true
		h, exists := old[w.PublicKey]
		sameEndpoint := h.Roams == w.Roams && (w.Roams || h.Endpoint == w.Endpoint)
		if exists && sameEndpoint && slices.Equal(h.AllowedIPs, w.AllowedIPs) && h.Keepalive == w.Keepalive {
			continue
		}
		fmt.Fprintf(&b, "public_key=%s\n", hex.EncodeToString(w.PublicKey[:]))
		if exists {
			b.WriteString("update_only=true\n")
		}
		switch {
		case exists && sameEndpoint:
		case w.Roams:
			fmt.Fprintf(&b, "endpoint=%s%s\n", roamPrefix, hex.EncodeToString(w.PublicKey[:]))
		default:
			fmt.Fprintf(&b, "endpoint=%s\n", w.Endpoint)
		}
		if h.Keepalive != w.Keepalive {
			fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", w.Keepalive)
		}
		if !exists || !slices.Equal(h.AllowedIPs, w.AllowedIPs) {
			b.WriteString("replace_allowed_ips=true\n")
			for _, ip := range w.AllowedIPs {
				fmt.Fprintf(&b, "allowed_ip=%s\n", ip)
			}
		}
	}
	for _, h := range have {
		if !keep[h.PublicKey] {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", hex.EncodeToString(h.PublicKey[:]))
		}
	}
	return b.String()
}

// Routes are the prefixes that must go through the tunnel: every allowed IP
// of every peer, sorted and without duplicates.
func Routes(peers []Peer) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range peers {
		out = append(out, p.AllowedIPs...)
	}
	sortPrefixes(out)
	return slices.Compact(out)
}

// OffLink is routes less those inside the prefix of one of the
// interface's own addresses: the kernel's route for that prefix already
// sends them through the tunnel. A segment gateway with thousands of
// device peers on the tunnel pool routes none of them one by one.
func OffLink(routes, addrs []netip.Prefix) []netip.Prefix {
	return slices.DeleteFunc(slices.Clone(routes), func(r netip.Prefix) bool {
		return slices.ContainsFunc(addrs, func(a netip.Prefix) bool {
			return a.Bits() < a.Addr().BitLen() && a.Bits() <= r.Bits() && a.Masked().Contains(r.Addr())
		})
	})
}

// RouteDiff says which routes to add and which to delete to go from have
// to want. A large policy routes thousands of prefixes, so it is linear.
func RouteDiff(have, want []netip.Prefix) (add, del []netip.Prefix) {
	in := make(map[netip.Prefix]bool, len(have))
	for _, h := range have {
		in[h] = true
	}
	for _, w := range want {
		if !in[w] {
			add = append(add, w)
		}
		delete(in, w)
	}
	for _, h := range have {
		if in[h] {
			del = append(del, h)
		}
	}
	return add, del
}

func sortPrefixes(p []netip.Prefix) {
	slices.SortFunc(p, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
}

// ParseState reads the UAPI "get" text into peer states. The device's own
// private key, which that text carries, is skipped and never stored.
func ParseState(text string) ([]PeerState, error) {
	var out []PeerState
	var cur *PeerState
	var sec, nsec int64
	flush := func() {
		if cur != nil {
			if sec != 0 || nsec != 0 {
				cur.LastHandshake = time.Unix(sec, nsec)
			}
			sortPrefixes(cur.AllowedIPs)
			out = append(out, *cur)
		}
		sec, nsec = 0, 0
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("wireguard state line %d: %q is not key=value", n, line)
		}
		if key == "public_key" {
			flush()
			raw, err := hex.DecodeString(value)
			if err != nil || len(raw) != 32 {
				return nil, fmt.Errorf("wireguard state line %d: bad public key", n)
			}
			cur = &PeerState{}
			copy(cur.PublicKey[:], raw)
			continue
		}
		if cur == nil {
			continue // device lines: private_key, listen_port, fwmark
		}
		var err error
		switch key {
		case "endpoint":
			if value != noEndpoint {
				cur.Endpoint, err = netip.ParseAddrPort(value)
			}
		case "allowed_ip":
			var p netip.Prefix
			if p, err = netip.ParsePrefix(value); err == nil {
				cur.AllowedIPs = append(cur.AllowedIPs, p)
			}
		case "last_handshake_time_sec":
			sec, err = strconv.ParseInt(value, 10, 64)
		case "last_handshake_time_nsec":
			nsec, err = strconv.ParseInt(value, 10, 64)
		case "persistent_keepalive_interval":
			var n uint64
			n, err = strconv.ParseUint(value, 10, 16)
			cur.Keepalive = uint16(n)
		case "rx_bytes":
			cur.RxBytes, err = strconv.ParseUint(value, 10, 64)
		case "tx_bytes":
			cur.TxBytes, err = strconv.ParseUint(value, 10, 64)
		}
		if err != nil {
			return nil, fmt.Errorf("wireguard state line %d: %s: %w", n, key, err)
		}
	}
	flush()
	slices.SortFunc(out, func(a, b PeerState) int { return strings.Compare(a.PublicKey.String(), b.PublicKey.String()) })
	return out, sc.Err()
}

// Peers drops the counters.
func Peers(states []PeerState) []Peer {
	out := make([]Peer, len(states))
	for i, s := range states {
		out[i] = s.Peer
	}
	return out
}

// ListenPortOf reads the device's listen_port from a UAPI get answer.
func ListenPortOf(uapi string) (uint16, error) {
	for line := range strings.Lines(uapi) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			n, err := strconv.ParseUint(v, 10, 16)
			if err != nil || n == 0 {
				return 0, fmt.Errorf("listen_port %q", v)
			}
			return uint16(n), nil
		}
	}
	return 0, errors.New("no listen_port in the device's state")
}
