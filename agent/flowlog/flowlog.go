// Package flowlog reads what the agent's table logs to NFLOG
// (nft.LogGroup): a monitored segment's new connections (the discovery
// half of monitor mode) and the connections the table refused. It
// aggregates them into flows (segment or direction, protocol, remote
// address and port) with counts. Parse and Log are pure; Open and Read
// are the netlink edge.
package flowlog

import (
	"cmp"
	"encoding/binary"
	"net/netip"
	"slices"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// nfnetlink_log's attributes of a logged packet (linux/netfilter/nfnetlink_log.h).
const (
	attrPayload = 9  // NFULA_PAYLOAD: the packet from its network header
	attrPrefix  = 10 // NFULA_PREFIX: the rule's log prefix, NUL-terminated
)

// Parse reads one NFLOG packet message (the body after the netlink
// header: struct nfgenmsg, then attributes) as the flow it starts: the
// prefix names the segment (or, nft.DeniedOut and nft.DeniedIn, a
// refused connection's direction), the payload's headers the rest. The
// remote end of an inbound connection is its source; the port is always
// the destination's. ok is false for a message without both, or a
// packet too short to read.
func Parse(msg []byte) (f controlapi.Flow, ok bool) {
	if len(msg) < 4 {
		return f, false
	}
	var payload []byte
	for a := msg[4:]; len(a) >= 4; {
		l, typ := int(binary.NativeEndian.Uint16(a)), binary.NativeEndian.Uint16(a[2:])&0x3fff
		if l < 4 || l > len(a) {
			break
		}
		switch typ {
		case attrPayload:
			payload = a[4:l]
		case attrPrefix:
			p := a[4:l]
			if i := slices.Index(p, 0); i >= 0 {
				p = p[:i]
			}
			f.Segment = string(p)
		}
		a = a[min((l+3)&^3, len(a)):]
	}
	switch f.Segment {
	case "":
		return f, false
	case nft.DeniedOut:
		f.Segment, f.Direction = "", "out"
	case nft.DeniedIn:
		f.Segment, f.Direction = "", "in"
	}
	return parsePacket(f, payload)
}

// parsePacket fills in what the packet's headers say. IPv6 extension
// headers are not followed: such a packet is reported by its next-header
// value, with no port.
func parsePacket(f controlapi.Flow, p []byte) (controlapi.Flow, bool) {
	var proto byte
	var l4 []byte
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || len(p) < ihl {
			return f, false
		}
		proto, l4 = p[9], p[ihl:]
		f.Address = netip.AddrFrom4([4]byte(p[16:20]))
		if f.Direction == "in" {
			f.Address = netip.AddrFrom4([4]byte(p[12:16]))
		}
	case len(p) >= 40 && p[0]>>4 == 6:
		proto, l4 = p[6], p[40:]
		f.Address = netip.AddrFrom16([16]byte(p[24:40]))
		if f.Direction == "in" {
			f.Address = netip.AddrFrom16([16]byte(p[8:24]))
		}
	default:
		return f, false
	}
	switch proto {
	case 6, 17:
		if len(l4) < 4 {
			return f, false
		}
		f.Protocol = map[byte]policy.Protocol{6: policy.TCP, 17: policy.UDP}[proto]
		f.Port = binary.BigEndian.Uint16(l4[2:])
	case 1, 58:
		f.Protocol = policy.ICMP
	default:
		f.Protocol = policy.Any
	}
	return f, true
}

// MaxFlows bounds what a Log holds: a device scanning a /16 through a
// monitored segment costs at most this many entries (about 100 bytes
// each); what does not fit is counted as Overflow.
const MaxFlows = 4096

// Log aggregates flows. The zero value is ready to use.
type Log struct {
	all      map[controlapi.Flow]*controlapi.ObservedFlow
	pending  map[controlapi.Flow]*controlapi.ObservedFlow // since the last Take
	Overflow uint64
}

// Add counts one new connection of f at t.
func (l *Log) Add(f controlapi.Flow, t time.Time) {
	if l.all == nil {
		l.all, l.pending = map[controlapi.Flow]*controlapi.ObservedFlow{}, map[controlapi.Flow]*controlapi.ObservedFlow{}
	}
	if _, ok := l.all[f]; !ok && len(l.all) >= MaxFlows {
		l.Overflow++
		return
	}
	for _, m := range []map[controlapi.Flow]*controlapi.ObservedFlow{l.all, l.pending} {
		o := m[f]
		if o == nil {
			o = &controlapi.ObservedFlow{Flow: f, First: t}
			m[f] = o
		}
		o.Count++
		o.Last = t
	}
}

// All is every flow seen, in order.
func (l *Log) All() []controlapi.ObservedFlow { return sorted(l.all) }

// Take returns what was seen since the previous Take (counts of that time
// only), in order, and starts afresh.
func (l *Log) Take() []controlapi.ObservedFlow {
	out := sorted(l.pending)
	clear(l.pending)
	return out
}

func sorted(m map[controlapi.Flow]*controlapi.ObservedFlow) []controlapi.ObservedFlow {
	out := make([]controlapi.ObservedFlow, 0, len(m))
	for _, o := range m {
		out = append(out, *o)
	}
	slices.SortFunc(out, func(a, b controlapi.ObservedFlow) int { return Compare(a.Flow, b.Flow) })
	return out
}

// Compare orders flows by segment, direction, address, protocol and port.
func Compare(a, b controlapi.Flow) int {
	return cmp.Or(cmp.Compare(a.Segment, b.Segment), cmp.Compare(a.Direction, b.Direction), a.Address.Compare(b.Address),
		cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
}
