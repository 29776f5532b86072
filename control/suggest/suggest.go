// Package suggest drafts least-privilege rules from observed flows: given
// the policy in force and what a class's devices opened in monitor mode
// that no rule opened, it proposes the rules that open exactly those
// flows and nothing else, for an operator to review and sign. It is pure:
// the flows come from control, the policy from the operator.
package suggest

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Draft is the proposal: the policy with the class's new rules added and
// its monitor removed, the rules added, and the flows no rule could be
// written for, each with the reason.
type Draft struct {
	Policy    *policy.Document
	Added     []policy.Rule
	Unmatched []Unmatched
}

// Unmatched is an observed flow the draft does not open.
type Unmatched struct {
	Flow controlapi.ObservedFlow
	Why  string
}

// Rules drafts class's rules from flows. A flow is opened exactly: its
// host (a /32 or /128), its protocol and its port. Hosts of one segment
// and protocol that were seen on the same ports share a rule, so every
// rule opens the cross product of its hosts and ports and that product is
// exactly what was observed.
func Rules(doc *policy.Document, class string, flows []controlapi.ObservedFlow) (Draft, error) {
	c, ok := doc.Classes[class]
	if !ok {
		return Draft{}, fmt.Errorf("class %q is not in the policy (it has %s)", class, strings.Join(slices.Sorted(maps.Keys(doc.Classes)), ", "))
	}
	type group struct {
		segment string
		proto   policy.Protocol
	}
	ports := map[group]map[netip.Addr][]uint16{}
	var d Draft
	for _, f := range flows {
		if why := unmatched(doc, c, f.Flow); why != "" {
			d.Unmatched = append(d.Unmatched, Unmatched{f, why})
			continue
		}
		g := group{f.Segment, f.Protocol}
		if ports[g] == nil {
			ports[g] = map[netip.Addr][]uint16{}
		}
		ports[g][f.Address] = append(ports[g][f.Address], f.Port)
	}
	groups := slices.SortedFunc(maps.Keys(ports), func(a, b group) int {
		return cmp.Or(cmp.Compare(a.segment, b.segment), cmp.Compare(a.proto, b.proto))
	})
	for _, g := range groups {
		byPorts := map[string]*policy.Rule{}
		var order []string
		for _, host := range slices.SortedFunc(maps.Keys(ports[g]), netip.Addr.Compare) {
			r := policy.Rule{Segment: g.segment, Protocol: g.proto, Ports: ranges(ports[g][host])}
			key := fmt.Sprint(r.Ports)
			if byPorts[key] == nil {
				byPorts[key] = &r
				order = append(order, key)
			}
			byPorts[key].Hosts = append(byPorts[key].Hosts, netip.PrefixFrom(host, host.BitLen()))
		}
		for _, k := range order {
			d.Added = append(d.Added, *byPorts[k])
		}
	}
	draft := *doc
	draft.Classes, draft.Schedules = maps.Clone(doc.Classes), maps.Clone(doc.Schedules) // Validate writes both
	c.Rules = slices.Concat(c.Rules, d.Added)
	c.Monitor = nil
	draft.Classes[class] = c
	if err := draft.Validate(); err != nil {
		return Draft{}, fmt.Errorf("the draft does not validate (a bug; nothing was written): %w", err)
	}
	d.Policy = &draft
	return d, nil
}

// unmatched says why no rule is drafted for f, or "" when one is.
func unmatched(doc *policy.Document, c policy.Class, f controlapi.Flow) string {
	seg, ok := doc.Segment(f.Segment)
	switch {
	case !ok:
		return fmt.Sprintf("segment %s is not in this policy", f.Segment)
	case f.Protocol == policy.Any:
		return "not tcp, udp or icmp: a rule opens such a protocol only by opening every protocol of the host"
	}
	exact := policy.Rule{Segment: seg.Name, Hosts: []netip.Prefix{netip.PrefixFrom(f.Address, f.Address.BitLen())}, Protocol: f.Protocol}
	if f.Protocol.HasPorts() {
		exact.Ports = []policy.PortRange{{First: f.Port, Last: f.Port}}
	}
	if len(exact.Opens(seg)) == 0 {
		return fmt.Sprintf("segment %s in this policy does not declare it", seg.Name)
	}
	for i, r := range c.Rules {
		if r.Segment == seg.Name && covers(r.Opens(seg), exact.Opens(seg)[0]) {
			return fmt.Sprintf("rule %d of the class already opens it (it was seen while that rule was closed: its schedule, or a profile)", i)
		}
	}
	return ""
}

// covers reports whether one of dsts opens all of want (a single host,
// protocol and port).
func covers(dsts []policy.Destination, want policy.Destination) bool {
	for _, d := range dsts {
		if !d.CIDR.Contains(want.CIDR.Addr()) || (d.Protocol != policy.Any && d.Protocol != want.Protocol) {
			continue
		}
		if !want.Protocol.HasPorts() || !d.Protocol.HasPorts() {
			return true
		}
		if slices.ContainsFunc(d.Ports, func(p policy.PortRange) bool { return p.Contains(want.Ports[0]) }) {
			return true
		}
	}
	return false
}

// ranges folds ports into sorted ranges of consecutive ports; none (a
// protocol without ports) gives none.
func ranges(ports []uint16) []policy.PortRange {
	slices.Sort(ports)
	ports = slices.Compact(ports)
	var out []policy.PortRange
	for _, p := range ports {
		if p == 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Last+1 == p {
			out[n-1].Last = p
			continue
		}
		out = append(out, policy.PortRange{First: p, Last: p})
	}
	return out
}
