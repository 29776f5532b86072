// Package admit is a segment gateway's decision: which enrolled devices it
// admits as WireGuard peers, and what each may reach through it. It is the
// device evaluator (localpolicy.Evaluate) run from the gateway's side: the
// same signed policy, the orders the gateway itself verified and keeps, the
// gateway's trusted time and its own last contact with control. Nothing a
// device says enters it, so nothing a device says can widen what the
// gateway admits; a device whose agent was killed is judged exactly as one
// whose agent runs.
//
// Devices in the same situation (class, ordered state, monitoring) get the
// same answer, so the evaluator runs once per such group, not once per
// device: the cost follows the policy, not the fleet. Pure: no I/O.
package admit

import (
	"bytes"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Member is an enrolled device as the gateway knows it: from a
// certificate control's CA issued, which binds the key, the address and
// the class to the device id.
type Member struct {
	ID      string
	Class   string
	Key     policy.Key
	Address netip.Addr
}

// Input is everything the gateway's decision depends on.
type Input struct {
	// Bundle is the accepted policy; nil admits nobody.
	Bundle   *bundle.Payload
	NoPolicy string
	// Segments are the segments this gateway fronts.
	Segments []string
	Roster   []Member
	// Orders are the orders the gateway verified and keeps, in the order
	// it took them; Decide folds them per device in effect order.
	Orders []command.Verified
	// Now is the gateway's trusted time; LastContact its own latest
	// contact with control (past max_offline, each class falls back to
	// its offline profile, as its devices do).
	Now, LastContact time.Time
}

// Group is devices that reach the same destinations now.
type Group struct {
	// Name says what the group is: class, mode, revoked partners.
	Name  string
	Class string
	Mode  localpolicy.Mode
	// Sources are the members' tunnel addresses, in address order.
	Sources []netip.Addr
	// Segments are the gateway's segments open to the group, each with
	// what is open on it, by name.
	Segments []localpolicy.Access
	// Inbound is what may connect to the group's devices from the
	// gateway's segments now (localpolicy.Desired.Inbound), by name.
	Inbound []localpolicy.Access
}

// Verdict is one member's outcome.
type Verdict struct {
	ID       string
	Admitted bool
	// Group is the index in Desired.Groups of an admitted member's group.
	Group  int
	Reason string
}

// Desired is what the gateway should enforce now.
type Desired struct {
	PolicyVersion uint64
	Groups        []Group
	// Peers are the admitted members, by key: each routed only its own
	// tunnel address.
	Peers []localpolicy.Peer
	// Verdicts explain every member, admitted or not, by id.
	Verdicts []Verdict
	// NextChange is the next instant the decision changes by itself (a
	// schedule edge, expiry, the offline deadline); zero if none.
	NextChange time.Time
}

// Admitted counts the admitted members.
func (d Desired) Admitted() int { return len(d.Peers) }

// Decide computes the gateway's Desired state: the same inputs give the
// same result, whatever order the roster and the orders come in.
func Decide(in Input) Desired {
	d := Desired{Verdicts: make([]Verdict, 0, len(in.Roster))}
	roster := slices.Clone(in.Roster)
	slices.SortFunc(roster, func(a, b Member) int { return strings.Compare(a.ID, b.ID) })
	if in.Bundle == nil {
		why := in.NoPolicy
		if why == "" {
			why = "no policy has been accepted yet"
		}
		for _, m := range roster {
			d.Verdicts = append(d.Verdicts, Verdict{ID: m.ID, Reason: "lockdown: " + why})
		}
		return d
	}
	d.PolicyVersion = in.Bundle.Version
	conflict := conflicts(roster)
	orders := slices.Clone(in.Orders)
	slices.SortStableFunc(orders, func(a, b command.Verified) int { return a.Since().Compare(b.Since()) })

	type outcome struct {
		group int // index into groups, -1: none open
		why   string
		segs  []string // the group's segment names, shared by its peers
	}
	byKey := map[string]outcome{}
	var groups []*Group
	for _, m := range roster {
		if why, ok := conflict[m.ID]; ok {
			d.Verdicts = append(d.Verdicts, Verdict{ID: m.ID, Reason: why})
			continue
		}
		dev := bundle.Device{ID: m.ID, Class: m.Class}
		st := Sticky(orders, dev)
		monitored := monitors(in.Bundle, dev)
		key := groupKey(m.Class, st, monitored)
		o, seen := byKey[key]
		if !seen {
			o = outcome{group: -1}
			desired := localpolicy.Evaluate(localpolicy.Input{Bundle: in.Bundle, Device: dev, Now: in.Now, LastContact: in.LastContact, Sticky: st})
			d.NextChange = earliest(d.NextChange, desired.NextChange)
			g := Group{Name: key, Class: m.Class, Mode: desired.Mode, Segments: served(desired, in.Segments), Inbound: at(desired.Inbound, in.Segments)}
			if len(g.Segments)+len(g.Inbound) > 0 {
				o.group, o.segs = len(groups), slices.Compact(slices.Sorted(slices.Values(append(names(g.Segments), names(g.Inbound)...))))
				groups = append(groups, &g)
			}
			o.why = reason(desired, in.Segments, g)
			byKey[key] = o
		}
		if o.group < 0 {
			d.Verdicts = append(d.Verdicts, Verdict{ID: m.ID, Reason: o.why})
			continue
		}
		g := groups[o.group]
		g.Sources = append(g.Sources, m.Address)
		d.Verdicts = append(d.Verdicts, Verdict{ID: m.ID, Admitted: true, Group: o.group, Reason: o.why})
		d.Peers = append(d.Peers, localpolicy.Peer{PublicKey: m.Key, AllowedIPs: []netip.Prefix{netip.PrefixFrom(m.Address, m.Address.BitLen())},
			Segments: o.segs})
	}
	// Groups in name order, so their numbering (and the table's chain
	// names) does not depend on which device came first.
	order := make([]int, len(groups))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return strings.Compare(groups[a].Name, groups[b].Name) })
	renumber := make([]int, len(groups))
	for to, from := range order {
		renumber[from] = to
		g := groups[from]
		slices.SortFunc(g.Sources, func(a, b netip.Addr) int { return a.Compare(b) })
		d.Groups = append(d.Groups, *g)
	}
	for i := range d.Verdicts {
		if d.Verdicts[i].Admitted {
			d.Verdicts[i].Group = renumber[d.Verdicts[i].Group]
		}
	}
	slices.SortFunc(d.Peers, func(a, b localpolicy.Peer) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return d
}

// Sticky folds the orders covering dev, in the order given (effect
// order), as the device itself would: what the ratchet or the since rule
// refuses has no effect.
func Sticky(orders []command.Verified, dev bundle.Device) localpolicy.Sticky {
	var st localpolicy.Sticky
	for _, o := range orders {
		if !o.Target.Matches(dev) {
			continue
		}
		if next, changed, err := command.Effect(st, o.Command, o.ByOps); err == nil && changed {
			st = next
		}
	}
	return st
}

// conflicts names the members that share a key or an address with
// another: a WireGuard key is one peer and an address routes to one peer,
// so none of them is admitted rather than one at random.
func conflicts(roster []Member) map[string]string {
	// First holder of each key and address; -1 once a second one shows.
	keys := make(map[policy.Key]int, len(roster))
	addrs := make(map[netip.Addr]int, len(roster))
	shared := false
	for i, m := range roster {
		for _, seen := range []bool{claim(keys, m.Key, i), claim(addrs, m.Address, i)} {
			shared = shared || seen
		}
	}
	out := map[string]string{}
	for _, m := range roster {
		switch {
		case !m.Address.IsValid():
			out[m.ID] = "no tunnel address is bound to its certificate"
		case shared && keys[m.Key] < 0:
			out[m.ID] = "its tunnel key is also bound to " + others(roster, m.ID, func(o Member) bool { return o.Key == m.Key })
		case shared && addrs[m.Address] < 0:
			out[m.ID] = "its tunnel address " + m.Address.String() + " is also bound to " + others(roster, m.ID, func(o Member) bool { return o.Address == m.Address })
		}
	}
	return out
}

// claim notes member i as holding k, and reports whether another did.
func claim[K comparable](holders map[K]int, k K, i int) bool {
	if _, taken := holders[k]; taken {
		holders[k] = -1
		return true
	}
	holders[k] = i
	return false
}

// others names the members other than self that match: only called for
// a conflict, which is rare, so a scan of the roster is fine.
func others(roster []Member, self string, match func(Member) bool) string {
	var ids []string
	for _, o := range roster {
		if o.ID != self && match(o) {
			ids = append(ids, o.ID)
		}
	}
	return strings.Join(ids, ", ")
}

// monitors says whether the class's monitor names dev: the only part of
// a decision that depends on the device's id.
func monitors(b *bundle.Payload, dev bundle.Device) bool {
	m := b.Policy.Classes[dev.Class].Monitor
	return m != nil && slices.Contains(m.Devices, dev.ID)
}

// groupKey names a device's situation: what the evaluator's answer
// depends on besides the policy and the time.
func groupKey(class string, st localpolicy.Sticky, monitored bool) string {
	k := class + " " + st.Mode.String()
	if len(st.RevokedPartners) > 0 {
		k += " revoked:" + strings.Join(slices.Sorted(maps.Keys(st.RevokedPartners)), ",")
	}
	if monitored {
		k += " monitored"
	}
	return k
}

// served is what desired opens (or monitors) on the gateway's segments:
// a monitored segment passes at the gateway, as the signed policy says,
// for as long as the monitor lasts.
func served(desired localpolicy.Desired, segments []string) []localpolicy.Access {
	var out []localpolicy.Access
	add := func(a localpolicy.Access) {
		if !slices.Contains(segments, a.Segment) || slices.ContainsFunc(out, func(b localpolicy.Access) bool { return b.Segment == a.Segment }) {
			return
		}
		out = append(out, a)
	}
	for _, a := range desired.Segments {
		add(a)
	}
	if desired.Monitor != nil {
		for _, a := range desired.Monitor.Segments {
			add(a)
		}
	}
	slices.SortFunc(out, func(a, b localpolicy.Access) int { return strings.Compare(a.Segment, b.Segment) })
	return out
}

// at is what of as is on the gateway's segments.
func at(as []localpolicy.Access, segments []string) []localpolicy.Access {
	var out []localpolicy.Access
	for _, a := range as {
		if slices.Contains(segments, a.Segment) {
			out = append(out, a)
		}
	}
	return out
}

// reason explains a group's outcome at this gateway.
func reason(desired localpolicy.Desired, segments []string, g Group) string {
	if len(g.Segments)+len(g.Inbound) > 0 {
		var what []string
		if len(g.Segments) > 0 {
			what = append(what, "opens "+strings.Join(names(g.Segments), ", "))
		}
		if len(g.Inbound) > 0 {
			what = append(what, "accepts from "+strings.Join(names(g.Inbound), ", "))
		}
		return fmt.Sprintf("%s: %s", desired.Mode, strings.Join(what, "; "))
	}
	var why []string
	for _, dec := range desired.Decisions {
		if slices.Contains(segments, dec.Segment) {
			why = append(why, dec.Segment+": "+dec.Reason)
		}
	}
	if len(why) == 0 {
		why = append(why, "policy v"+fmt.Sprint(desired.PolicyVersion)+" declares none of this gateway's segments")
	}
	return fmt.Sprintf("%s: none of this gateway's segments is open (%s)", desired.Mode, strings.Join(why, "; "))
}

func names(as []localpolicy.Access) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = a.Segment
	}
	return out
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}
