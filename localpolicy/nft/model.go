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
	"github.com/bulkhead-edge/bulkhead/localpolicy/admit"
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
	// Chain is a map element's verdict: a jump to this chain, or accept
	// when empty. Elements of a plain set have none.
	Chain string
}

// Set is a named set of one address family.
type Set struct {
	Name string
	V6   bool
	// Map makes it a verdict map: a lookup takes the matching element's
	// verdict (Element.Chain), and falls through when nothing matches.
	Map bool
	// ByAddress keys it by address alone: a hash, not intervals, whose
	// every element is one address over every protocol and port (a
	// gateway's devices). Thousands of them load and look up in a
	// fraction of what the same in an interval set costs.
	ByAddress bool
	Elements  []Element
}

// Field selects the source or destination side of a packet.
type Field int

// The two sides.
const (
	Src Field = iota
	Dst
)

// Direction narrows a rule to one direction of a tracked connection.
type Direction int

// Any direction, the original one (the connection's first packet's), or
// the replies.
const (
	AnyDirection Direction = iota
	Original
	Reply
)

// Rule is one rule of a chain. At most one of Lookup, ND and DHCP is set;
// Iface may narrow any of them, or stand alone (loopback); none is set for
// the final drop.
type Rule struct {
	Comment string
	// Established limits the rule to packets of established or related
	// connections (the replies of what an outbound rule allowed).
	Established bool
	// New limits the rule to the first packet of a connection.
	New bool
	// Direction limits the rule to one direction of a connection: a
	// segment's two rate limits, each with its own bucket.
	Direction Direction
	Lookup    *Lookup
	// Iface matches the interface a packet arrives on (input) or leaves by
	// (output, forward): loopback, or the tunnel for segment traffic.
	Iface string
	// InIface matches the interface a packet arrived on, in any chain: a
	// gateway's forward chain judges what comes out of the tunnel apart
	// from what goes into it.
	InIface string
	// ND accepts ICMPv6 router and neighbour discovery (types 133-136),
	// without which IPv6 stops working altogether.
	ND bool
	// DHCP accepts the client side of DHCP (v4 and v6), so a device that
	// gets its address by DHCP keeps it in lockdown.
	DHCP *DHCP
	// DstPort narrows a rule to one transport destination port (the
	// tunnel's own, for WireGuard arriving from a gateway).
	DstPort uint16
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

// Lookup matches address . l4proto . port against a set, or takes the
// verdict of a verdict map's element.
type Lookup struct {
	Set  string
	V6   bool
	Map  bool
	Addr Field
	Port Field
	// ByAddress looks up the address alone, in a ByAddress set (Port
	// is unused).
	ByAddress bool
}

// DHCP is a client port pair: from Src to Dst.
type DHCP struct {
	V6       bool
	Src, Dst uint16
}

// Chain is a chain of the table: a base chain with policy drop on its
// hook, or a regular chain that segment map elements jump to.
type Chain struct {
	Name string
	// Hook is input, output or forward for a base chain; empty for a
	// regular chain.
	Hook  string
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
	// ListenPort is the tunnel's UDP port: the only local port a gateway's
	// packets may reach. 0 (the tunnel is not up) admits none.
	ListenPort uint16
	// Gateway, when set, makes the table a segment gateway's: the tunnel
	// is the one devices arrive on, WireGuard reaches ListenPort from
	// anywhere (WireGuard itself answers only the admitted keys), and
	// every packet the tunnel carries is judged by its device's group.
	Gateway *admit.Desired
}

// Build renders d as the agent's table. Every base-chain rule but the last
// accepts (or hands the packet to a segment's chain), so their order
// decides only what a packet costs, and the busiest come first: loopback,
// the segments (only through the tunnel; an interface compare rejects
// other packets before any lookup), WireGuard to the authorized gateways,
// then neighbour discovery, DHCP, the safety floor, the control endpoints,
// and drop.
//
// Every open or monitored segment's destinations are in one verdict map
// per address family (segments_v4, segments_v6), so a packet costs one
// lookup however many segments there are. An element accepts, or jumps to
// its segment's chain when the segment is rate-limited (seg_NAME) or
// monitored (mon_NAME).
//
// Packets of live connections are matched against the same map as new
// ones (there is no blanket "established accept"), so when a destination
// leaves it its established flows stop with the same transaction.
//
// The result depends on what d says, never on the order it says it in:
// segments, destinations, peers and floor rules arriving in another order
// give the same Ruleset, so the same netlink batch.
func Build(d localpolicy.Desired, opt Options) Ruleset {
	var rs Ruleset
	var floor, control, gateways []Element
	for _, f := range d.Floor {
		floor = append(floor, elements(f.Destination)...)
	}
	for _, c := range d.Control {
		control = append(control, Element{Prefix: netip.PrefixFrom(c.Address, c.Address.BitLen()), ProtoFrom: 6, ProtoTo: 6, PortFrom: c.Port, PortTo: c.Port})
	}
	for _, p := range d.Peers {
		if ap, err := netip.ParseAddrPort(p.Endpoint); err == nil {
			a := ap.Addr().Unmap()
			gateways = append(gateways, Element{Prefix: netip.PrefixFrom(a, a.BitLen()), ProtoFrom: 17, ProtoTo: 17, PortFrom: ap.Port(), PortTo: ap.Port()})
		}
	}
	in := Chain{Name: "input", Hook: "input", Rules: []Rule{{Comment: "loopback", Iface: "lo"}}}
	out := Chain{Name: "output", Hook: "output", Rules: []Rule{{Comment: "loopback", Iface: "lo"}}}
	fwd := Chain{Name: "forward", Hook: "forward"}
	var jumped []Chain
	switch {
	case opt.Gateway != nil && opt.Tunnel != "":
		var r rules
		r, jumped = gateway(&rs, opt.Gateway, opt.Tunnel, opt.ListenPort)
		in.Rules, out.Rules, fwd.Rules = append(in.Rules, r.in...), append(out.Rules, r.out...), append(fwd.Rules, r.fwd...)
	case opt.Tunnel != "":
		var r rules
		r, jumped = segments(&rs, d, opt.Tunnel)
		gw := addSets(&rs, "gateways", gateways, func(look func(addr, port Field) *Lookup) (r rules) {
			r.out = []Rule{{Comment: "wireguard gateways", Lookup: look(Dst, Dst)}}
			// A gateway may start a handshake (rekey, roaming) with no
			// conntrack entry of ours; WireGuard authenticates it. Only
			// the tunnel's port: a packet from a gateway's address and
			// port (spoofable) reaches no other local service.
			if opt.ListenPort != 0 {
				r.in = []Rule{{Comment: "wireguard gateways inbound", Lookup: look(Src, Src), DstPort: opt.ListenPort}}
			}
			return r
		})
		r.add(gw)
		r.add(addSets(&rs, "inbound", accessElements(d.Inbound), func(look func(addr, port Field) *Lookup) (r rules) {
			// What the policy lets connect to the device, through the
			// tunnel only: by source and the device's port, and the
			// device's replies to exactly that.
			r.in = []Rule{{Comment: "inbound", Iface: opt.Tunnel, Lookup: look(Src, Dst)}}
			r.out = []Rule{{Comment: "inbound replies", Iface: opt.Tunnel, Established: true, Lookup: look(Dst, Src)}}
			return r
		}))
		in.Rules, out.Rules = append(in.Rules, r.in...), append(out.Rules, r.out...)
	}
	in.Rules, out.Rules = linkLocal(in.Rules, out.Rules, opt.DHCP)
	var fixed rules
	fixed.add(addSets(&rs, "floor", floor, func(look func(addr, port Field) *Lookup) (r rules) {
		// The floor is symmetric: local services on the floor's ports
		// (a PLC port) are reachable from its addresses.
		// Replies only, where a floor address and port is the source: a
		// floor host (or anything spoofing one) using the floor's port as
		// its source starts nothing, here or through the device.
		r.out = []Rule{{Comment: "safety floor", Lookup: look(Dst, Dst)}, {Comment: "safety floor served", Established: true, Lookup: look(Dst, Src)}}
		r.in = []Rule{{Comment: "safety floor replies", Established: true, Lookup: look(Src, Src)}, {Comment: "safety floor inbound", Lookup: look(Src, Dst)}}
		r.fwd = []Rule{{Comment: "safety floor to", Lookup: look(Dst, Dst)}, {Comment: "safety floor replies", Established: true, Lookup: look(Src, Src)}}
		return r
	}))
	fixed.add(addSets(&rs, "control", control, func(look func(addr, port Field) *Lookup) (r rules) {
		r.out = []Rule{{Comment: "control", Lookup: look(Dst, Dst)}}
		r.in = []Rule{{Comment: "control replies", Established: true, Lookup: look(Src, Src)}}
		return r
	}))
	in.Rules, out.Rules, fwd.Rules = append(in.Rules, fixed.in...), append(out.Rules, fixed.out...), append(fwd.Rules, fixed.fwd...)
	// What reaches the end was refused: its first packet is logged (at
	// a bounded rate), so the device reports what it was asked to do and
	// refused (lateral movement out, a scan in). Forwarding is not a
	// device's business and is only counted.
	in.Rules = append(in.Rules, deniedLogged(DeniedIn))
	out.Rules = append(out.Rules, deniedLogged(DeniedOut))
	for _, c := range []*Chain{&in, &out, &fwd} {
		c.Rules = append(c.Rules, Rule{Comment: "default drop", Drop: true})
	}
	rs.Chains = append([]Chain{in, out, fwd}, jumped...)
	// Sets were added floor, control, gateways, segments as the groups
	// above ran; name order makes that independent of how Build is laid
	// out.
	slices.SortFunc(rs.Sets, func(a, b Set) int { return strings.Compare(a.Name, b.Name) })
	return rs
}

// addSets adds the set pair (v4, v6) of one group of elements, normalized
// and sorted, and the rules made for each by mk; a family with no
// elements has neither set nor rules.
func addSets(rs *Ruleset, name string, elems []Element, mk func(look func(addr, port Field) *Lookup) rules) (r rules) {
	for _, v6 := range []bool{false, true} {
		elems := normalize(family(elems, v6))
		if len(elems) == 0 {
			continue
		}
		set := setName(name, v6)
		rs.Sets = append(rs.Sets, Set{Name: set, V6: v6, Elements: elems})
		r.add(mk(func(addr, port Field) *Lookup { return &Lookup{Set: set, V6: v6, Addr: addr, Port: port} }))
	}
	return r
}

func setName(name string, v6 bool) string {
	if v6 {
		return name + "_v6"
	}
	return name + "_v4"
}

// segmentsMap is the verdict map of every open and monitored segment.
const segmentsMap = "segments"

// segments adds the segments' verdict maps, the two rules that look them
// up (outbound through the tunnel; replies arriving on it), and the
// chains their elements jump to, in name order.
//
// Where segments overlap, one element can carry only one verdict, so the
// stricter segment decides: a rate-limited segment before an unlimited
// one (among rate-limited ones, by name), and an open segment before a
// monitored one, so what a rule opens is never logged as discovery.
func segments(rs *Ruleset, d localpolicy.Desired, tun string) (r rules, chains []Chain) {
	open := slices.SortedFunc(slices.Values(d.Segments), func(a, b localpolicy.Access) int { return strings.Compare(a.Segment, b.Segment) })
	var monitored []localpolicy.Access
	if d.Monitor != nil {
		monitored = slices.SortedFunc(slices.Values(d.Monitor.Segments), func(a, b localpolicy.Access) int { return strings.Compare(a.Segment, b.Segment) })
	}
	var limited, unlimited [][]Element
	for _, a := range open {
		if l := rate(a.RateLimit); l != nil {
			name := "seg_" + a.Segment
			limited = append(limited, verdict(destinations(a), name))
			chains = append(chains, Chain{Name: name, Rules: overRate("segment "+a.Segment, l, Rule{Comment: "segment " + a.Segment})})
			continue
		}
		unlimited = append(unlimited, destinations(a))
	}
	groups := append(limited, slices.Concat(unlimited...))
	for _, a := range monitored {
		name := "mon_" + a.Segment
		groups = append(groups, verdict(destinations(a), name))
		// A new connection is logged, counted and passed; its later
		// packets and its replies pass.
		comment := "monitor " + a.Segment
		chains = append(chains, Chain{Name: name, Rules: overRate(comment, rate(a.RateLimit),
			Rule{Comment: comment + " logged", New: true, Log: a.Segment},
			Rule{Comment: comment, Established: true})})
	}
	for _, v6 := range []bool{false, true} {
		var byGroup [][]Element
		for _, g := range groups {
			byGroup = append(byGroup, normalize(family(g, v6)))
		}
		elems := disjoint(byGroup)
		if len(elems) == 0 {
			continue
		}
		out, in := setName(segmentsMap, v6), setName(segmentsMap, v6)
		if len(elems) <= shardSize {
			rs.Sets = append(rs.Sets, Set{Name: out, V6: v6, Map: true, Elements: elems})
		} else {
			out, in = setName(segmentsMap+"_out", v6), setName(segmentsMap+"_in", v6)
			chains = append(chains, sharded(rs, setName(segmentsMap, v6), out, in, v6, elems)...)
		}
		r.out = append(r.out, Rule{Comment: "segments", Iface: tun, Lookup: &Lookup{Set: out, V6: v6, Map: true, Addr: Dst, Port: Dst}})
		r.in = append(r.in, Rule{Comment: "segment replies", Iface: tun, Established: true, Lookup: &Lookup{Set: in, V6: v6, Map: true, Addr: Src, Port: Src}})
	}
	slices.SortFunc(chains, func(a, b Chain) int { return strings.Compare(a.Name, b.Name) })
	return r, chains
}

// gateway adds a segment gateway's part. Each group of devices has a
// set of what is open to it (gw_N_v4, gw_N_v6; above shardSize elements
// cut by address into maps behind dispatch maps, as the device's segments
// are) and two chains: gw_N_from
// accepts a device's packet to an open destination, gw_N_to accepts the
// replies to it. Two verdict maps keyed by the devices' tunnel addresses
// send a packet to its device's chains: gw_src (coming out of the
// tunnel, by source) and gw_dst (going into it, by destination). A
// packet costs two lookups however many devices and groups there are.
// A device in no group (removed, quarantined) matches neither map, and
// its packets are dropped: no established flow survives the apply that
// removed it, because nothing is accepted for being established alone.
func gateway(rs *Ruleset, g *admit.Desired, tun string, port uint16) (r rules, chains []Chain) {
	if port != 0 {
		var any []Element
		for _, all := range []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")} {
			any = append(any, Element{Prefix: all, ProtoFrom: 17, ProtoTo: 17, PortFrom: port, PortTo: port})
		}
		r.add(addSets(rs, "gw_wireguard", any, func(look func(addr, port Field) *Lookup) (r rules) {
			r.in = []Rule{{Comment: "wireguard from devices", Lookup: look(Dst, Dst)}}
			r.out = []Rule{{Comment: "wireguard to devices", Lookup: look(Src, Src)}}
			return r
		}))
	}
	var from, to []Element
	for i, grp := range g.Groups {
		name := fmt.Sprintf("gw_%d", i)
		var dsts []Element
		for _, a := range grp.Segments {
			dsts = append(dsts, destinations(a)...)
		}
		fromChain := Chain{Name: name + "_from"}
		toChain := Chain{Name: name + "_to"}
		for _, v6 := range []bool{false, true} {
			elems := normalize(family(dsts, v6))
			var from, to *Lookup
			switch {
			case len(elems) == 0:
				continue
			case len(elems) <= shardSize:
				set := setName(name, v6)
				rs.Sets = append(rs.Sets, Set{Name: set, V6: v6, Elements: elems})
				from, to = &Lookup{Set: set, V6: v6, Addr: Dst, Port: Dst}, &Lookup{Set: set, V6: v6, Addr: Src, Port: Src}
			default:
				// Cut by address as the device's segments map is: a
				// lookup in a large interval set costs in proportion
				// to its size.
				out, in := setName(name+"_out", v6), setName(name+"_in", v6)
				chains = append(chains, sharded(rs, setName(name, v6), out, in, v6, verdict(elems, ""))...)
				from, to = &Lookup{Set: out, V6: v6, Map: true, Addr: Dst, Port: Dst}, &Lookup{Set: in, V6: v6, Map: true, Addr: Src, Port: Src}
			}
			fromChain.Rules = append(fromChain.Rules, Rule{Comment: grp.Name, Lookup: from})
			toChain.Rules = append(toChain.Rules, Rule{Comment: grp.Name + " replies", Established: true, Lookup: to})
		}
		// What may connect to the group's devices (into the tunnel, by
		// source and the device's port), and their replies to it.
		inbound := addSets(rs, name+"_inbound", accessElements(grp.Inbound), func(look func(addr, port Field) *Lookup) (r rules) {
			r.in = []Rule{{Comment: grp.Name + " inbound", Lookup: look(Src, Dst)}}
			r.out = []Rule{{Comment: grp.Name + " inbound replies", Established: true, Lookup: look(Dst, Src)}}
			return r
		})
		toChain.Rules = append(toChain.Rules, inbound.in...)
		fromChain.Rules = append(fromChain.Rules, inbound.out...)
		fromChain.Rules = append(fromChain.Rules, Rule{Comment: grp.Name + " refused", Drop: true})
		toChain.Rules = append(toChain.Rules, Rule{Comment: grp.Name + " refused", Drop: true})
		chains = append(chains, fromChain, toChain)
		for _, src := range grp.Sources {
			e := Element{Prefix: netip.PrefixFrom(src, src.BitLen()), ProtoFrom: 0, ProtoTo: 255, PortFrom: 0, PortTo: 65535}
			e.Chain = fromChain.Name
			from = append(from, e)
			e.Chain = toChain.Name
			to = append(to, e)
		}
	}
	for _, v6 := range []bool{false, true} {
		f, t := family(from, v6), family(to, v6)
		if len(f) == 0 {
			continue
		}
		slices.SortFunc(f, compareElements)
		slices.SortFunc(t, compareElements)
		src, dst := setName("gw_src", v6), setName("gw_dst", v6)
		rs.Sets = append(rs.Sets, Set{Name: src, V6: v6, Map: true, ByAddress: true, Elements: f}, Set{Name: dst, V6: v6, Map: true, ByAddress: true, Elements: t})
		from := &Lookup{Set: src, V6: v6, Map: true, Addr: Src, ByAddress: true}
		to := &Lookup{Set: dst, V6: v6, Map: true, Addr: Dst, ByAddress: true}
		r.in = append(r.in, Rule{Comment: "from devices", InIface: tun, Lookup: from})
		r.fwd = append(r.fwd, Rule{Comment: "from devices", InIface: tun, Lookup: from})
		r.out = append(r.out, Rule{Comment: "to devices", Iface: tun, Lookup: to})
		r.fwd = append(r.fwd, Rule{Comment: "to devices", Iface: tun, Lookup: to})
	}
	// Whatever else the tunnel carries is refused here, before the
	// device-local rules (floor, control) could see it.
	r.in = append(r.in, Rule{Comment: "from no admitted device", InIface: tun, Drop: true})
	r.fwd = append(r.fwd, Rule{Comment: "from no admitted device", InIface: tun, Drop: true}, Rule{Comment: "to no admitted device", Iface: tun, Drop: true})
	r.out = append(r.out, Rule{Comment: "to no admitted device", Iface: tun, Drop: true})
	slices.SortFunc(chains, func(a, b Chain) int { return strings.Compare(a.Name, b.Name) })
	return r, chains
}

// shardSize bounds the elements of one segments map. Filling an interval
// map costs the kernel more than in proportion to its size (20,000
// elements took 152 ms in one map, 76 ms in maps of 2,000), so a larger
// policy is cut by address into maps of about this many.
const shardSize = 1024

// sharded adds a large segments map as shards by address (NAME_0, NAME_1,
// ...) and the two small dispatch maps the base chains look up instead:
// out (by destination) and in (by source) send each address range to its
// shard's chain for that direction, whose one rule looks the packet up in
// the shard. A packet costs two lookups, however many segments and
// destinations there are. It returns the shards' chains.
func sharded(rs *Ruleset, name, out, in string, v6 bool, elems []Element) []Chain {
	var chains []Chain
	var toOut, toIn []Element
	for k, sh := range shards(elems) {
		m := fmt.Sprintf("%s_%d", name, k)
		rs.Sets = append(rs.Sets, Set{Name: m, V6: v6, Map: true, Elements: sh.elems})
		span := fmt.Sprintf("%s-%s", sh.from, sh.to)
		chains = append(chains,
			Chain{Name: m + "_out", Rules: []Rule{{Comment: "segments " + span, Lookup: &Lookup{Set: m, V6: v6, Map: true, Addr: Dst, Port: Dst}}}},
			Chain{Name: m + "_in", Rules: []Rule{{Comment: "segment replies " + span, Lookup: &Lookup{Set: m, V6: v6, Map: true, Addr: Src, Port: Src}}}})
		for _, p := range rangePrefixes(sh.from, sh.to) {
			every := Element{Prefix: p, ProtoFrom: 0, ProtoTo: 255, PortFrom: 0, PortTo: 65535}
			every.Chain = m + "_out"
			toOut = append(toOut, every)
			every.Chain = m + "_in"
			toIn = append(toIn, every)
		}
	}
	slices.SortFunc(toOut, compareElements)
	slices.SortFunc(toIn, compareElements)
	rs.Sets = append(rs.Sets, Set{Name: out, V6: v6, Map: true, Elements: toOut}, Set{Name: in, V6: v6, Map: true, Elements: toIn})
	return chains
}

// shard is a run of a map's elements and the address range it answers
// for; together the shards cover every address of the family.
type shard struct {
	from, to netip.Addr
	elems    []Element
}

// shards cuts elems (disjoint, in the model's order) into runs of about
// shardSize. A cut falls only where no element's addresses span it, and on
// the most aligned address there, so each shard's range is a few
// prefixes.
func shards(elems []Element) []shard {
	first := netip.IPv4Unspecified()
	if elems[0].Prefix.Addr().Is6() {
		first = netip.IPv6Unspecified()
	}
	var out []shard
	cur := shard{from: first}
	var end netip.Addr // the last address the current shard's elements cover
	for _, e := range elems {
		if len(cur.elems) >= shardSize && e.Prefix.Addr().Compare(end) > 0 {
			cut := alignedAfter(end, e.Prefix.Addr())
			cur.to = cut.Prev()
			out = append(out, cur)
			cur = shard{from: cut}
		}
		cur.elems = append(cur.elems, e)
		if last := lastAddr(e.Prefix); !end.IsValid() || last.Compare(end) > 0 {
			end = last
		}
	}
	cur.to = lastAddr(netip.PrefixFrom(first, 0))
	return append(out, cur)
}

// alignedAfter is the address in (after, upTo] with the most trailing
// zero bits.
func alignedAfter(after, upTo netip.Addr) netip.Addr {
	for bits := 0; ; bits++ {
		if p, _ := upTo.Prefix(bits); p.Addr().Compare(after) > 0 {
			return p.Addr()
		}
	}
}

// rangePrefixes is the shortest list of prefixes that covers exactly the
// addresses from through to.
func rangePrefixes(from, to netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for {
		p := widestFrom(from, to)
		out = append(out, p)
		last := lastAddr(p)
		if last.Compare(to) >= 0 {
			return out
		}
		from = last.Next()
	}
}

// widestFrom is the widest prefix that starts at first and ends at or
// before limit.
func widestFrom(first, limit netip.Addr) netip.Prefix {
	bits := first.BitLen()
	for bits > 0 {
		p, _ := first.Prefix(bits - 1)
		if p.Addr() != first || lastAddr(p).Compare(limit) > 0 {
			break
		}
		bits--
	}
	return netip.PrefixFrom(first, bits)
}

// destinations are the boxes of every destination open on a segment.
func destinations(a localpolicy.Access) []Element {
	var out []Element
	for _, dst := range a.Destinations {
		out = append(out, elements(dst)...)
	}
	return out
}

// accessElements are the elements of every access in as.
func accessElements(as []localpolicy.Access) []Element {
	var out []Element
	for _, a := range as {
		out = append(out, destinations(a)...)
	}
	return out
}

// verdict marks elems as jumping to chain.
func verdict(elems []Element, chain string) []Element {
	for i := range elems {
		elems[i].Chain = chain
	}
	return elems
}

// overRate puts a segment's rate limit ahead of the rules it polices: in
// each direction of a connection (each with its own bucket), what exceeds
// the rate is dropped before they see it. A nil limit polices nothing.
func overRate(comment string, l *Rate, then ...Rule) []Rule {
	if l == nil {
		return then
	}
	return append([]Rule{
		{Comment: comment + " over rate", Direction: Original, Over: l, Drop: true},
		{Comment: comment + " replies over rate", Direction: Reply, Over: l, Drop: true},
	}, then...)
}

// deniedLogged logs and drops a refused connection's first packet, up to
// deniedPerSecond a second; the rest fall through to the default drop.
func deniedLogged(prefix string) Rule {
	return Rule{Comment: "refused logged", New: true, Limit: deniedPerSecond, Log: prefix, Drop: true}
}

// rules holds one group's rules per base chain.
type rules struct{ in, out, fwd []Rule }

func (r *rules) add(o rules) {
	r.in, r.out, r.fwd = append(r.in, o.in...), append(r.out, o.out...), append(r.fwd, o.fwd...)
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
	// Every field takes part in the order, so boxes arriving in another
	// order are cut the same way.
	slices.SortFunc(elems, func(a, b Element) int {
		return cmp.Or(cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()), compareElements(a, b))
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

// compareElements is the order of a set's elements: by address, prefix
// length, protocols, ports and verdict, so that no two distinct elements
// compare equal.
func compareElements(a, b Element) int {
	return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()),
		cmp.Compare(a.ProtoFrom, b.ProtoFrom), cmp.Compare(a.ProtoTo, b.ProtoTo),
		cmp.Compare(a.PortFrom, b.PortFrom), cmp.Compare(a.PortTo, b.PortTo), strings.Compare(a.Chain, b.Chain))
}

// disjoint merges groups of boxes, each already disjoint within itself
// (normalize), into one disjoint list in which every point keeps the
// verdict of the first group that covers it: a box of a later group loses
// whatever an earlier group's boxes cover.
//
// Prefixes nest or are disjoint, so after sorting by address (wider
// first) the boxes whose addresses overlap a box are exactly those on a
// stack of the prefixes enclosing it.
func disjoint(groups [][]Element) []Element {
	type box struct {
		e     Element
		group int
	}
	var all []box
	for g, elems := range groups {
		for _, e := range elems {
			all = append(all, box{e, g})
		}
	}
	if len(groups) > 1 {
		slices.SortFunc(all, func(a, b box) int {
			return cmp.Or(a.e.Prefix.Addr().Compare(b.e.Prefix.Addr()), cmp.Compare(a.e.Prefix.Bits(), b.e.Prefix.Bits()), cmp.Compare(a.group, b.group))
		})
		// beaten[i] lists the earlier groups' boxes that overlap box i.
		beaten := map[int][]Element{}
		var stack []int
		for i, x := range all {
			for len(stack) > 0 && !all[stack[len(stack)-1]].e.Prefix.Contains(x.e.Prefix.Addr()) {
				stack = stack[:len(stack)-1]
			}
			for _, j := range stack {
				y := all[j]
				if y.group == x.group || !overlaps(y.e, x.e) {
					continue
				}
				if y.group < x.group {
					beaten[i] = append(beaten[i], y.e)
				} else {
					beaten[j] = append(beaten[j], x.e)
				}
			}
			stack = append(stack, i)
		}
		var out []box
		for i, x := range all {
			pieces := []Element{x.e}
			for _, k := range beaten[i] {
				var next []Element
				for _, p := range pieces {
					next = append(next, cut(p, k)...)
				}
				pieces = next
			}
			for _, p := range pieces {
				out = append(out, box{p, x.group})
			}
		}
		all = out
	}
	elems := make([]Element, len(all))
	for i, b := range all {
		elems[i] = b.e
	}
	slices.SortFunc(elems, compareElements)
	return elems
}

// overlaps reports whether two boxes share a point.
func overlaps(a, b Element) bool {
	return a.Prefix.Overlaps(b.Prefix) && max(a.ProtoFrom, b.ProtoFrom) <= min(a.ProtoTo, b.ProtoTo) &&
		max(a.PortFrom, b.PortFrom) <= min(a.PortTo, b.PortTo)
}

// cut returns the parts of p that k does not cover, whichever of their
// prefixes contains the other. Where p's is the wider, the addresses
// outside k's prefix are the siblings of the prefixes on the way down to
// it, each with all of p's protocols and ports.
func cut(p, k Element) []Element {
	if !overlaps(p, k) {
		return []Element{p}
	}
	if k.Prefix.Bits() <= p.Prefix.Bits() {
		return subtract(p, k)
	}
	var out []Element
	for bits := p.Prefix.Bits() + 1; bits <= k.Prefix.Bits(); bits++ {
		on, _ := k.Prefix.Addr().Prefix(bits)
		q := p
		q.Prefix = netip.PrefixFrom(flipBit(on.Addr(), bits-1), bits)
		out = append(out, q)
	}
	inner := p
	inner.Prefix = k.Prefix
	return append(out, subtract(inner, k)...)
}

// flipBit inverts bit i (0 is the most significant) of a.
func flipBit(a netip.Addr, i int) netip.Addr {
	b := a.AsSlice()
	b[i/8] ^= 0x80 >> (i % 8)
	out, _ := netip.AddrFromSlice(b)
	return out
}

// sameKind reports whether two sets are the same set but for elements.
func (s Set) sameKind(o Set) bool {
	return s.Name == o.Name && s.V6 == o.V6 && s.Map == o.Map && s.ByAddress == o.ByAddress
}

// Equal reports whether two rulesets are the same table.
func (rs Ruleset) Equal(o Ruleset) bool {
	return slices.EqualFunc(rs.Sets, o.Sets, func(a, b Set) bool {
		return a.sameKind(b) && slices.Equal(a.Elements, b.Elements)
	}) && slices.EqualFunc(rs.Chains, o.Chains, func(a, b Chain) bool {
		return a.Name == b.Name && a.Hook == b.Hook && slices.EqualFunc(a.Rules, b.Rules, Rule.equal)
	})
}

func (r Rule) equal(o Rule) bool {
	return r.Comment == o.Comment && r.Established == o.Established && r.New == o.New && r.Direction == o.Direction &&
		r.Iface == o.Iface && r.InIface == o.InIface && r.ND == o.ND && r.Limit == o.Limit && r.Log == o.Log && r.Drop == o.Drop && r.DstPort == o.DstPort &&
		same(r.Lookup, o.Lookup) && same(r.DHCP, o.DHCP) && same(r.Over, o.Over)
}

// same reports whether two optional values are both absent or equal.
func same[T comparable](a, b *T) bool { return a == b || a != nil && b != nil && *a == *b }

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
		kind, data := "set", ""
		if s.Map {
			kind, data = "map", " : verdict"
		}
		if s.ByAddress {
			fmt.Fprintf(&b, "\t%s %s {\n\t\ttype %s%s\n", kind, s.Name, typ, data)
		} else {
			fmt.Fprintf(&b, "\t%s %s {\n\t\ttype %s . inet_proto . inet_service%s\n\t\tflags interval\n", kind, s.Name, typ, data)
		}
		if len(s.Elements) > 0 {
			b.WriteString("\t\telements = {\n")
			for _, e := range s.Elements {
				if s.ByAddress {
					b.WriteString("\t\t\t" + e.Prefix.Addr().String())
				} else {
					fmt.Fprintf(&b, "\t\t\t%s . %s . %s", e.Prefix, rangeText(int(e.ProtoFrom), int(e.ProtoTo)), rangeText(int(e.PortFrom), int(e.PortTo)))
				}
				if s.Map {
					b.WriteString(" : " + verdictText(e.Chain))
				}
				b.WriteString(",\n")
			}
			b.WriteString("\t\t}\n")
		}
		b.WriteString("\t}\n")
	}
	for _, c := range rs.Chains {
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if c.Hook != "" {
			fmt.Fprintf(&b, "\t\ttype filter hook %s priority filter; policy drop;\n", c.Hook)
		}
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s comment %q\n", r.text(c.Hook), r.Comment)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func verdictText(chain string) string {
	if chain == "" {
		return "accept"
	}
	return "jump " + chain
}

func rangeText(lo, hi int) string {
	if lo == hi {
		return fmt.Sprint(lo)
	}
	return fmt.Sprintf("%d-%d", lo, hi)
}

// text renders the rule for a chain on hook.
func (r Rule) text(hook string) string {
	var parts []string
	if r.Iface != "" {
		dir := "oifname"
		if hook == "input" {
			dir = "iifname"
		}
		parts = append(parts, fmt.Sprintf("%s %q", dir, r.Iface))
	}
	if r.InIface != "" {
		parts = append(parts, fmt.Sprintf("iifname %q", r.InIface))
	}
	if r.Established {
		parts = append(parts, "ct state established,related")
	}
	if r.New {
		parts = append(parts, "ct state new")
	}
	switch r.Direction {
	case Original:
		parts = append(parts, "ct direction original")
	case Reply:
		parts = append(parts, "ct direction reply")
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
		op := ""
		if l.Map {
			op = "vmap "
		}
		addr := map[Field]string{Src: "saddr", Dst: "daddr"}[l.Addr]
		if l.ByAddress {
			parts = append(parts, fmt.Sprintf("%s %s %s@%s", ip, addr, op, l.Set))
		} else {
			parts = append(parts, fmt.Sprintf("%s %s . meta l4proto . th %s %s@%s", ip, addr, map[Field]string{Src: "sport", Dst: "dport"}[l.Port], op, l.Set))
		}
	}
	if r.DstPort != 0 {
		parts = append(parts, fmt.Sprintf("th dport %d", r.DstPort))
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
	case r.Lookup != nil && r.Lookup.Map: // the map's element decides
	case r.Drop && r.Log != "": // counted once, by the log's counter
		parts = append(parts, "drop")
	case r.Drop:
		parts = append(parts, "counter drop")
	default:
		parts = append(parts, "accept")
	}
	return strings.Join(parts, " ")
}
