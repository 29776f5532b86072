// Package nft owns the agent's kernel enforcement: the nftables table
// `inet bulkhead`. Build turns a Desired state into a Ruleset (pure: sets of
// address . protocol . port intervals and the rules that use them); Text
// renders it for `nft -f`; the Linux side applies it through netlink as one
// atomic transaction, notices when something else changes it, and removes
// it only when told to.
package nft

import (
	"cmp"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Table is the name of the agent's table in the inet family.
const Table = "bulkhead"

// Element is one interval box of a set: an address prefix, a protocol range
// and a port range. Sets are `ipvX_addr . inet_proto . inet_service` with
// the interval flag, so one lookup answers a whole destination list.
type Element struct {
	Prefix             netip.Prefix
	ProtoFrom, ProtoTo uint8
	PortFrom, PortTo   uint16
}

// Set is a named set of one address family.
type Set struct {
	Name     string
	V6       bool
	Elements []Element
}

// Field selects the source or destination side of a packet.
type Field int

// The two sides.
const (
	Src Field = iota
	Dst
)

// Rule is one rule of a base chain. At most one of Lookup, ND and DHCP is
// set; Iface may narrow any of them, or stand alone (loopback); none is set
// for the final drop.
type Rule struct {
	Comment string
	// Established limits the rule to packets of established or related
	// connections (the replies of what an outbound rule allowed).
	Established bool
	// New limits the rule to the first packet of a connection.
	New    bool
	Lookup *Lookup
	// Iface matches the interface a packet arrives on (input) or leaves by
	// (output): loopback, or the tunnel for segment traffic.
	Iface string
	// ND accepts ICMPv6 router and neighbour discovery (types 133-136),
	// without which IPv6 stops working altogether.
	ND bool
	// DHCP accepts the client side of DHCP (v4 and v6), so a device that
	// gets its address by DHCP keeps it in lockdown.
	DHCP *DHCP
	// Over narrows a rule to the packets above a byte rate: the rate
	// limit's drop, placed just before the accept it polices.
	Over *Rate
	// Limit narrows a rule to at most this many packets a second (and
	// as many again in a burst): a flood of refused connections costs
	// the log no more than that.
	Limit uint32
	// Log sends each matching packet's headers to NFLOG group LogGroup
	// with this prefix (a monitored segment's name, or DeniedOut or
	// DeniedIn), and counts it.
	Log  string
	Drop bool
}

// LogGroup is the NFLOG group the table logs to: monitored segments'
// new connections and refused ones. The agent reads it (package
// flowlog) in the table's namespace.
const LogGroup = 4242

// The log prefixes of refused new connections, outbound and inbound.
// A colon is never part of a segment name, so they cannot collide.
const (
	DeniedOut = "denied:out"
	DeniedIn  = "denied:in"
)

// deniedPerSecond bounds the refused connections logged per chain: a
// scan of a /16 is reported by its first packets, not all of them.
const deniedPerSecond = 20

// Rate is nftables' byte limit: refilled at PerSecond, holding one second
// of that plus Burst.
type Rate struct {
	PerSecond uint64
	Burst     uint32
}

func rate(l *policy.RateLimit) *Rate {
	if l == nil {
		return nil
	}
	return &Rate{PerSecond: l.BytesPerSecond, Burst: uint32(min(l.BurstBytes, math.MaxUint32))}
}

// Lookup matches address . l4proto . port against a set.
type Lookup struct {
	Set  string
	V6   bool
	Addr Field
	Port Field
}

// DHCP is a client port pair: from Src to Dst.
type DHCP struct {
	V6       bool
	Src, Dst uint16
}

// Chain is a base chain with policy drop.
type Chain struct {
	Name  string // also the hook: input, output or forward
	Rules []Rule
}

// Ruleset is the whole table.
type Ruleset struct {
	Sets   []Set
	Chains []Chain
}

// Options are device-local choices that no policy changes.
type Options struct {
	// DHCP keeps DHCP client traffic open in every mode.
	DHCP bool
	// Tunnel is the WireGuard interface. Segment traffic passes only
	// through it; a segment destination reached over any other interface
	// (the plain uplink) is dropped. Empty means there is no tunnel, and
	// then no segment is open at all.
	Tunnel string
}

// Build renders d as the agent's table. Every rule but the last accepts, so
// their order decides only what a packet costs, and the busiest come
// first: loopback, the segments (only through the tunnel; an interface
// compare rejects other packets before any lookup), WireGuard to the
// authorized gateways, then neighbour discovery, DHCP, the safety floor,
// the control endpoints, and drop.
// Packets of live connections are matched against the same sets as new
// ones (there is no blanket "established accept"), so when a destination
// leaves a set its established flows stop with the same transaction.
func Build(d localpolicy.Desired, opt Options) Ruleset {
	var rs Ruleset
	var floor, control []Element
	for _, f := range d.Floor {
		floor = append(floor, elements(f.Destination)...)
	}
	for _, c := range d.Control {
		control = append(control, Element{Prefix: netip.PrefixFrom(c.Address, c.Address.BitLen()), ProtoFrom: 6, ProtoTo: 6, PortFrom: c.Port, PortTo: c.Port})
	}
	var gateways []Element
	for _, p := range d.Peers {
		if ap, err := netip.ParseAddrPort(p.Endpoint); err == nil {
			a := ap.Addr().Unmap()
			gateways = append(gateways, Element{Prefix: netip.PrefixFrom(a, a.BitLen()), ProtoFrom: 17, ProtoTo: 17, PortFrom: ap.Port(), PortTo: ap.Port()})
		}
	}
	type group struct {
		name, comment string
		elems         []Element
		via           string // the interface the group's traffic must use
		limit         *Rate  // a cap in each direction
	}
	add := func(g group) (r rules) {
		for _, v6 := range []bool{false, true} {
			elems := normalize(family(g.elems, v6))
			if len(elems) == 0 {
				continue
			}
			name := g.name + map[bool]string{false: "_v4", true: "_v6"}[v6]
			rs.Sets = append(rs.Sets, Set{Name: name, V6: v6, Elements: elems})
			look := func(addr, port Field) *Lookup { return &Lookup{Set: name, V6: v6, Addr: addr, Port: port} }
			out := Rule{Comment: g.comment, Iface: g.via, Lookup: look(Dst, Dst)}
			in := Rule{Comment: g.comment + " replies", Established: true, Iface: g.via, Lookup: look(Src, Src)}
			if g.name == "gateways" {
				// A gateway may start a handshake (rekey, roaming) with no
				// conntrack entry of ours; WireGuard authenticates it.
				in = Rule{Comment: g.comment + " inbound", Lookup: look(Src, Src)}
			}
			if g.limit != nil {
				// Each direction has its own bucket: what exceeds it
				// is dropped before the accept sees it.
				r.out = append(r.out, overRate(out, g.limit))
				r.in = append(r.in, overRate(in, g.limit))
			}
			r.out, r.in = append(r.out, out), append(r.in, in)
			if g.name == "floor" {
				// The floor is symmetric: local services on the floor's
				// ports (a PLC port) are reachable from its addresses.
				r.out = append(r.out, Rule{Comment: g.comment + " served", Lookup: look(Dst, Src)})
				r.in = append(r.in, Rule{Comment: g.comment + " inbound", Lookup: look(Src, Dst)})
				r.fwd = append(r.fwd,
					Rule{Comment: g.comment + " to", Lookup: look(Dst, Dst)},
					Rule{Comment: g.comment + " from", Lookup: look(Src, Src)})
			}
		}
		return r
	}
	// Sets in a fixed order (floor, control, gateways, segments); rules
	// busiest first, as above.
	fixed := []rules{add(group{"floor", "safety floor", floor, "", nil}), add(group{"control", "control", control, "", nil})}
	var tunnel []rules
	if opt.Tunnel != "" {
		gw := add(group{"gateways", "wireguard gateways", gateways, "", nil})
		for _, a := range d.Segments {
			var elems []Element
			for _, dst := range a.Destinations {
				elems = append(elems, elements(dst)...)
			}
			tunnel = append(tunnel, add(group{"seg_" + a.Segment, "segment " + a.Segment, elems, opt.Tunnel, rate(a.RateLimit)}))
		}
		tunnel = append(tunnel, gw)
		if m := d.Monitor; m != nil {
			for _, a := range m.Segments {
				tunnel = append(tunnel, monitor(&rs, a, opt.Tunnel))
			}
		}
	}
	in := Chain{Name: "input", Rules: []Rule{{Comment: "loopback", Iface: "lo"}}}
	out := Chain{Name: "output", Rules: []Rule{{Comment: "loopback", Iface: "lo"}}}
	fwd := Chain{Name: "forward"}
	lay := func(groups []rules) {
		for _, r := range groups {
			in.Rules, out.Rules, fwd.Rules = append(in.Rules, r.in...), append(out.Rules, r.out...), append(fwd.Rules, r.fwd...)
		}
	}
	lay(tunnel)
	in.Rules, out.Rules = linkLocal(in.Rules, out.Rules, opt.DHCP)
	lay(fixed)
	// What reaches the end was refused: its first packet is logged (at
	// a bounded rate), so the device reports what it was asked to do and
	// refused (lateral movement out, a scan in). Forwarding is not a
	// device's business and is only counted.
	in.Rules = append(in.Rules, deniedLogged(DeniedIn))
	out.Rules = append(out.Rules, deniedLogged(DeniedOut))
	for _, c := range []*Chain{&in, &out, &fwd} {
		c.Rules = append(c.Rules, Rule{Comment: "default drop", Drop: true})
	}
	rs.Chains = []Chain{in, out, fwd}
	return rs
}

// deniedLogged logs and drops a refused connection's first packet, up to
// deniedPerSecond a second; the rest fall through to the default drop.
func deniedLogged(prefix string) Rule {
	return Rule{Comment: "refused logged", New: true, Limit: deniedPerSecond, Log: prefix, Drop: true}
}

// rules holds one group's rules per chain.
type rules struct{ in, out, fwd []Rule }

// monitor adds a monitored segment's sets (every destination it declares)
// and rules: through the tunnel only, a new connection is logged, counted
// and passed; its later packets and its replies pass. Rules that open the
// segment come first, so what they open is never logged. The segment's
// rate limit polices monitored traffic too.
func monitor(rs *Ruleset, a localpolicy.Access, tun string) (r rules) {
	var elems []Element
	for _, dst := range a.Destinations {
		elems = append(elems, elements(dst)...)
	}
	limit := rate(a.RateLimit)
	comment := "monitor " + a.Segment
	for _, v6 := range []bool{false, true} {
		elems := normalize(family(elems, v6))
		if len(elems) == 0 {
			continue
		}
		name := "mon_" + a.Segment + map[bool]string{false: "_v4", true: "_v6"}[v6]
		rs.Sets = append(rs.Sets, Set{Name: name, V6: v6, Elements: elems})
		out := Rule{Comment: comment, Iface: tun, Lookup: &Lookup{Set: name, V6: v6, Addr: Dst, Port: Dst}}
		in := Rule{Comment: comment + " replies", Iface: tun, Established: true, Lookup: &Lookup{Set: name, V6: v6, Addr: Src, Port: Src}}
		if limit != nil {
			r.out = append(r.out, overRate(out, limit))
			r.in = append(r.in, overRate(in, limit))
		}
		logged := out
		logged.Comment, logged.New, logged.Log = comment+" logged", true, a.Segment
		out.Established = true
		r.out = append(r.out, logged, out)
		r.in = append(r.in, in)
	}
	return r
}

// overRate is the drop that polices r: the same match, narrowed to the
// packets above the rate.
func overRate(r Rule, l *Rate) Rule {
	r.Comment += " over rate"
	r.Over, r.Drop = l, true
	return r
}

// linkLocal adds what keeps the link itself working in every mode: IPv6
// neighbour discovery and, when asked, the DHCP client.
func linkLocal(in, out []Rule, dhcp bool) ([]Rule, []Rule) {
	nd := Rule{Comment: "ipv6 neighbour discovery", ND: true}
	in, out = append(in, nd), append(out, nd)
	if dhcp {
		in = append(in,
			Rule{Comment: "dhcp", DHCP: &DHCP{Src: 67, Dst: 68}},
			Rule{Comment: "dhcpv6", DHCP: &DHCP{V6: true, Src: 547, Dst: 546}})
		out = append(out,
			Rule{Comment: "dhcp", DHCP: &DHCP{Src: 68, Dst: 67}},
			Rule{Comment: "dhcpv6", DHCP: &DHCP{V6: true, Src: 546, Dst: 547}})
	}
	return in, out
}

func elements(d policy.Destination) []Element {
	e := Element{Prefix: d.CIDR.Masked(), PortFrom: 0, PortTo: 65535}
	switch d.Protocol {
	case policy.TCP:
		e.ProtoFrom, e.ProtoTo = 6, 6
	case policy.UDP:
		e.ProtoFrom, e.ProtoTo = 17, 17
	case policy.ICMP:
		e.ProtoFrom, e.ProtoTo = 1, 1
		if d.CIDR.Addr().Is6() {
			e.ProtoFrom, e.ProtoTo = 58, 58
		}
	default:
		e.ProtoFrom, e.ProtoTo = 0, 255
	}
	if !d.Protocol.HasPorts() {
		return []Element{e}
	}
	out := make([]Element, 0, len(d.Ports))
	for _, p := range d.Ports {
		e.PortFrom, e.PortTo = p.First, p.Last
		out = append(out, e)
	}
	return out
}

func family(elems []Element, v6 bool) []Element {
	var out []Element
	for _, e := range elems {
		if e.Prefix.Addr().Is6() == v6 {
			out = append(out, e)
		}
	}
	return out
}

// normalize makes a set's boxes disjoint, as the kernel requires of
// interval sets, without changing what they match: boxes are taken widest
// prefix first, and each later box keeps only the parts not already
// covered. Prefixes nest or are disjoint, so the boxes a new one can
// overlap are those on its ancestor prefixes.
func normalize(elems []Element) []Element {
	slices.SortStableFunc(elems, func(a, b Element) int {
		return cmp.Or(cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()), a.Prefix.Addr().Compare(b.Prefix.Addr()),
			cmp.Compare(a.ProtoFrom, b.ProtoFrom), cmp.Compare(a.PortFrom, b.PortFrom))
	})
	kept := map[netip.Prefix][]Element{}
	var lengths []int // prefix lengths present, ascending
	var out []Element
	for _, e := range elems {
		pieces := []Element{e}
		for _, bits := range lengths {
			if bits > e.Prefix.Bits() {
				break
			}
			anc, _ := e.Prefix.Addr().Prefix(bits)
			for _, k := range kept[anc] {
				var next []Element
				for _, p := range pieces {
					next = append(next, subtract(p, k)...)
				}
				pieces = next
			}
		}
		if len(pieces) == 0 {
			continue
		}
		if _, ok := kept[e.Prefix]; !ok {
			lengths = append(lengths, e.Prefix.Bits())
			slices.Sort(lengths)
			lengths = slices.Compact(lengths)
		}
		kept[e.Prefix] = append(kept[e.Prefix], pieces...)
		out = append(out, pieces...)
	}
	slices.SortFunc(out, compareElements)
	return out
}

// subtract returns the parts of p not covered by k, where k's prefix
// contains p's: p's protocols outside k's whole, and inside k's the ports
// outside k's.
func subtract(p, k Element) []Element {
	lo, hi := max(p.ProtoFrom, k.ProtoFrom), min(p.ProtoTo, k.ProtoTo)
	if lo > hi || max(p.PortFrom, k.PortFrom) > min(p.PortTo, k.PortTo) {
		return []Element{p}
	}
	var out []Element
	if p.ProtoFrom < lo {
		q := p
		q.ProtoTo = lo - 1
		out = append(out, q)
	}
	if p.ProtoTo > hi {
		q := p
		q.ProtoFrom = hi + 1
		out = append(out, q)
	}
	mid := p
	mid.ProtoFrom, mid.ProtoTo = lo, hi
	if p.PortFrom < k.PortFrom {
		q := mid
		q.PortTo = k.PortFrom - 1
		out = append(out, q)
	}
	if p.PortTo > k.PortTo {
		q := mid
		q.PortFrom = k.PortTo + 1
		out = append(out, q)
	}
	return out
}

func compareElements(a, b Element) int {
	return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()),
		cmp.Compare(a.ProtoFrom, b.ProtoFrom), cmp.Compare(a.PortFrom, b.PortFrom))
}

// Text renders the ruleset in nft(8) syntax, for `nft -f` and for people.
// It creates the table if missing and replaces its contents.
func (rs Ruleset) Text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s\ndelete table inet %s\ntable inet %s {\n", Table, Table, Table)
	for _, s := range rs.Sets {
		typ := "ipv4_addr"
		if s.V6 {
			typ = "ipv6_addr"
		}
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s . inet_proto . inet_service\n\t\tflags interval\n", s.Name, typ)
		if len(s.Elements) > 0 {
			b.WriteString("\t\telements = {\n")
			for _, e := range s.Elements {
				fmt.Fprintf(&b, "\t\t\t%s . %s . %s,\n", e.Prefix, rangeText(int(e.ProtoFrom), int(e.ProtoTo)), rangeText(int(e.PortFrom), int(e.PortTo)))
			}
			b.WriteString("\t\t}\n")
		}
		b.WriteString("\t}\n")
	}
	for _, c := range rs.Chains {
		fmt.Fprintf(&b, "\tchain %s {\n\t\ttype filter hook %s priority filter; policy drop;\n", c.Name, c.Name)
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s comment %q\n", r.text(c.Name), r.Comment)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func rangeText(lo, hi int) string {
	if lo == hi {
		return fmt.Sprint(lo)
	}
	return fmt.Sprintf("%d-%d", lo, hi)
}

func (r Rule) text(chain string) string {
	var parts []string
	if r.Iface != "" {
		dir := "oifname"
		if chain == "input" {
			dir = "iifname"
		}
		parts = append(parts, fmt.Sprintf("%s %q", dir, r.Iface))
	}
	if r.Established {
		parts = append(parts, "ct state established,related")
	}
	if r.New {
		parts = append(parts, "ct state new")
	}
	switch {
	case r.ND:
		parts = append(parts, "icmpv6 type 133-136")
	case r.DHCP != nil:
		parts = append(parts, fmt.Sprintf("%s udp sport %d udp dport %d", map[bool]string{false: "meta nfproto ipv4", true: "meta nfproto ipv6"}[r.DHCP.V6], r.DHCP.Src, r.DHCP.Dst))
	case r.Lookup != nil:
		l := r.Lookup
		ip := "ip"
		if l.V6 {
			ip = "ip6"
		}
		parts = append(parts, fmt.Sprintf("%s %s . meta l4proto . th %s @%s", ip, map[Field]string{Src: "saddr", Dst: "daddr"}[l.Addr], map[Field]string{Src: "sport", Dst: "dport"}[l.Port], l.Set))
	}
	if r.Over != nil {
		parts = append(parts, fmt.Sprintf("limit rate over %d bytes/second", r.Over.PerSecond))
		if r.Over.Burst > 0 {
			parts = append(parts, fmt.Sprintf("burst %d bytes", r.Over.Burst))
		}
	}
	if r.Limit > 0 {
		parts = append(parts, fmt.Sprintf("limit rate %d/second burst %d packets", r.Limit, r.Limit))
	}
	if r.Log != "" {
		parts = append(parts, fmt.Sprintf("log prefix %q group %d counter", r.Log, LogGroup))
	}
	switch {
	case r.Drop && r.Log != "": // counted once, by the log's counter
		parts = append(parts, "drop")
	case r.Drop:
		parts = append(parts, "counter drop")
	default:
		parts = append(parts, "accept")
	}
	return strings.Join(parts, " ")
}
