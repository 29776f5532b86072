// Package localpolicy decides what a device may reach. Evaluate is a pure
// function from the accepted policy, the device's identity and its context
// (trusted time, check results, sticky state set by commands) to a Desired
// state that the reconcilers apply. Its sub-packages own the pieces: the
// policy document, signed bundles, the on-device cache.
package localpolicy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Input is everything a decision depends on. Evaluate reads nothing else.
type Input struct {
	// Bundle is the accepted policy; nil means there is none and the device
	// is in lockdown.
	Bundle *bundle.Payload
	// NoPolicy says why there is no bundle, for the explanation.
	NoPolicy string
	Device   bundle.Device
	// Now is the trusted current time (see package trustedtime).
	Now time.Time
	// LastContact is the latest trusted time at which control confirmed the
	// bundle is current. The bundle's issue time counts as contact too.
	LastContact time.Time
	Checks      []Check
	Sticky      Sticky
	// Floor is the device-local safety floor; open in every mode.
	Floor []FloorRule
	// Control is the device-local control endpoint list (from enrolment),
	// open in every mode, lockdown included.
	Control []policy.Endpoint
	// Traffic is the tunnel's live per-peer counters. No decision reads it
	// yet; it is the context behaviour checks (thresholds over sliding
	// windows) will be judged on.
	Traffic []PeerTraffic
}

// PeerTraffic is one tunnel peer's handshake and byte counters.
type PeerTraffic struct {
	PublicKey        policy.Key
	LastHandshake    time.Time
	RxBytes, TxBytes uint64
}

// Check is the latest result of one context check (posture, location,
// behaviour). A failing check moves the device to its profile mode.
type Check struct {
	ID       string
	Failing  bool
	Profile  Mode
	Observed string
	Expected string
}

// Sticky is state set by signed commands; it survives restarts and outages.
type Sticky struct {
	// Mode is Normal, Diagnostic or Quarantine.
	Mode   Mode   `json:"mode"`
	Reason string `json:"reason,omitzero"`
	// RevokedPartners maps a partner id to the reason it was cut off.
	RevokedPartners map[string]string `json:"revoked_partners,omitzero"`
	// Held says which order holds each slot in force (SlotMode, or
	// PartnerSlot of a revoked partner) and since when it was imposed: a
	// lifting order may lift only what was imposed before it was issued.
	Held map[string]Held `json:"held,omitzero"`
}

// Held is the order holding a slot of the sticky state, and when ops
// imposed it.
type Held struct {
	Order string    `json:"order"`
	Since time.Time `json:"since"`
}

// SlotMode is the slot of the sticky mode (quarantine, diagnostic).
const SlotMode = "mode"

// PartnerSlot is the slot of a partner's revocation.
func PartnerSlot(partner string) string { return "partner/" + partner }

// Orders maps each held slot to the order holding it: what a device
// reports, so control sees which of its orders are in force there.
func (s Sticky) Orders() map[string]string {
	if len(s.Held) == 0 {
		return nil
	}
	m := make(map[string]string, len(s.Held))
	for slot, h := range s.Held {
		m[slot] = h.Order
	}
	return m
}

// FloorRule is one safety-floor allowance, such as a vehicle's CAN gateway
// subnet. No policy, command or mode removes it.
type FloorRule struct {
	Name               string `json:"name"`
	policy.Destination `json:",inline"`
}

// Desired is what the device should enforce now.
type Desired struct {
	Mode Mode
	// Why lists the reasons for the mode, most restrictive first.
	Why           []string
	PolicyVersion uint64
	Floor         []FloorRule
	Control       []policy.Endpoint
	// Segments are the open segments, by name.
	Segments []Access
	// Inbound is what may connect to the device now, per segment, by
	// name: each destination is a source prefix with the protocol and
	// the device's own ports it may reach (policy.Rule.Accepts). An
	// inbound rule is in force exactly when an outbound rule on its
	// segment would be (mode, profile, partner, schedule).
	Inbound []Access
	// Peers are the WireGuard gateways of the open segments, by key.
	Peers []Peer
	// Decisions explain every segment of the policy, open or not, by name.
	Decisions []Decision
	// Monitor is the discovery in force (nil: none): what no rule opens
	// on these segments is logged and passed until it ends.
	Monitor *Monitoring
	// NextChange is the next instant at which the decision changes with no
	// other input (a schedule edge, expiry, the offline deadline); zero if
	// none.
	NextChange time.Time
}

// Access is one open segment and exactly what is open on it.
type Access struct {
	Segment      string
	Partner      string
	Tier         int
	Gateway      policy.Gateway
	Destinations []policy.Destination
	RateLimit    *policy.RateLimit
}

// Monitoring is a class's monitor as it applies to this device now.
type Monitoring struct {
	Until time.Time
	// Segments are the monitored segments, each with every destination it
	// declares, by name.
	Segments []Access
}

// Peer is a WireGuard peer and the addresses routed to it.
type Peer struct {
	PublicKey  policy.Key
	Endpoint   string
	AllowedIPs []netip.Prefix
	Segments   []string
	// Keepalive is set for a gateway that carries inbound connections:
	// the device keeps its session (and its NAT's mapping) alive so the
	// gateway can reach it.
	Keepalive bool
}

// Decision explains one segment.
type Decision struct {
	Segment string
	Allowed bool
	Reason  string
}

type reason struct {
	mode Mode
	why  string
}

// Evaluate computes the Desired state. It performs no I/O and gives the same
// result for the same Input.
func Evaluate(in Input) Desired {
	d := Desired{
		Floor:   slices.Clone(in.Floor),
		Control: slices.Clone(in.Control),
	}
	if in.Bundle == nil {
		why := in.NoPolicy
		if why == "" {
			why = "no policy has been accepted yet"
		}
		d.Mode, d.Why = Lockdown, []string{why}
		return d
	}
	b := in.Bundle
	doc := &b.Policy
	d.PolicyVersion = b.Version
	d.Control = mergeEndpoints(in.Control, doc.Control)

	reasons, deadline := modeReasons(in)
	d.Mode = Normal
	for _, r := range reasons {
		d.Mode = max(d.Mode, r.mode)
	}
	slices.SortStableFunc(reasons, func(a, b reason) int { return cmp.Compare(b.mode, a.mode) })
	for _, r := range reasons {
		d.Why = append(d.Why, r.mode.String()+": "+r.why)
	}
	d.NextChange = deadline

	class, hasClass := doc.Classes[in.Device.Class]
	open := map[string]*Access{}
	rulesOpening := map[string]int{}
	why := map[string][]string{}
	for _, rule := range class.Rules {
		seg, _ := doc.Segment(rule.Segment)
		ok, because, edge := ruleOpen(doc, class, rule, seg, d.Mode, in)
		d.NextChange = earliest(d.NextChange, edge)
		why[seg.Name] = append(why[seg.Name], because)
		if !ok {
			continue
		}
		a := open[seg.Name]
		if a == nil {
			a = &Access{Segment: seg.Name, Partner: seg.Partner, Tier: seg.Tier, Gateway: seg.Gateway, RateLimit: doc.Limit(*seg)}
			open[seg.Name] = a
		}
		a.Destinations = append(a.Destinations, rule.Opens(seg)...)
		rulesOpening[seg.Name]++
	}

	inbound := map[string]*Access{}
	for _, rule := range class.Inbound {
		seg, _ := doc.Segment(rule.Segment)
		ok, because, edge := ruleOpen(doc, class, rule, seg, d.Mode, in)
		d.NextChange = earliest(d.NextChange, edge)
		why[seg.Name] = append(why[seg.Name], "inbound: "+because)
		if !ok {
			continue
		}
		a := inbound[seg.Name]
		if a == nil {
			a = &Access{Segment: seg.Name, Partner: seg.Partner, Tier: seg.Tier, Gateway: seg.Gateway}
			inbound[seg.Name] = a
		}
		a.Destinations = dedupe(append(a.Destinations, rule.Accepts(seg)...))
	}
	for _, a := range inbound {
		d.Inbound = append(d.Inbound, *a)
	}
	slices.SortFunc(d.Inbound, func(a, b Access) int { return strings.Compare(a.Segment, b.Segment) })

	for _, seg := range doc.Segments {
		dec := Decision{Segment: seg.Name}
		if a, ok := open[seg.Name]; ok {
			dec.Allowed = true
			if rulesOpening[seg.Name] > 1 {
				a.Destinations = dedupe(a.Destinations)
			}
			d.Segments = append(d.Segments, *a)
		}
		switch reasons := why[seg.Name]; {
		case !hasClass:
			dec.Reason = fmt.Sprintf("class %s has no entry in policy v%d", in.Device.Class, b.Version)
		case len(reasons) == 0:
			dec.Reason = fmt.Sprintf("no rule of class %s opens it", in.Device.Class)
		default:
			dec.Reason = strings.Join(slices.Compact(reasons), "; ")
		}
		d.Decisions = append(d.Decisions, dec)
	}
	slices.SortFunc(d.Segments, func(a, b Access) int { return strings.Compare(a.Segment, b.Segment) })
	slices.SortFunc(d.Decisions, func(a, b Decision) int { return strings.Compare(a.Segment, b.Segment) })
	if hasClass && d.Mode == Normal {
		d.Monitor = monitoring(doc, class.Monitor, in)
	}
	routed := d.Segments
	if m := d.Monitor; m != nil {
		d.NextChange = earliest(d.NextChange, m.Until)
		routed = slices.Concat(d.Segments, m.Segments)
		for i := range d.Decisions {
			if slices.ContainsFunc(m.Segments, func(a Access) bool { return a.Segment == d.Decisions[i].Segment }) {
				d.Decisions[i].Reason += fmt.Sprintf("; monitored until %s: what no rule opens is logged and passed", stamp(m.Until))
			}
		}
	}
	d.Peers = peers(routed, d.Inbound)
	return d
}

// monitoring is m as it applies to the device now: nil once it has ended,
// for a device it does not name, or when every segment it names is a
// revoked partner's. Evaluate asks only in normal mode.
func monitoring(doc *policy.Document, m *policy.Monitor, in Input) *Monitoring {
	if m == nil || !in.Now.Before(m.Until) || (len(m.Devices) > 0 && !slices.Contains(m.Devices, in.Device.ID)) {
		return nil
	}
	names := m.Segments
	if len(names) == 0 {
		for _, s := range doc.Segments {
			names = append(names, s.Name)
		}
	}
	out := &Monitoring{Until: m.Until}
	for _, name := range names {
		seg, _ := doc.Segment(name)
		if seg.Partner != "" && revoked(in.Sticky, seg.Partner) {
			continue
		}
		out.Segments = append(out.Segments, Access{Segment: seg.Name, Partner: seg.Partner, Tier: seg.Tier, Gateway: seg.Gateway,
			Destinations: seg.Destinations, RateLimit: doc.Limit(*seg)})
	}
	if len(out.Segments) == 0 {
		return nil
	}
	slices.SortFunc(out.Segments, func(a, b Access) int { return strings.Compare(a.Segment, b.Segment) })
	return out
}

// modeReasons lists every active reason for a mode above normal and the
// next instant a time-based one starts.
func modeReasons(in Input) ([]reason, time.Time) {
	b := in.Bundle
	var rs []reason
	var next time.Time
	switch in.Sticky.Mode {
	case Quarantine, Diagnostic:
		why := "ordered by security operations"
		if in.Sticky.Reason != "" {
			why += ": " + in.Sticky.Reason
		}
		rs = append(rs, reason{in.Sticky.Mode, why})
	}
	if !in.Now.Before(b.ExpiresAt) {
		rs = append(rs, reason{Offline, fmt.Sprintf("policy v%d expired at %s", b.Version, stamp(b.ExpiresAt))})
	} else {
		next = b.ExpiresAt
	}
	contact := b.IssuedAt
	if in.LastContact.After(contact) {
		contact = in.LastContact
	}
	maxOffline := time.Duration(b.Policy.Validity.MaxOffline)
	if deadline := contact.Add(maxOffline); !in.Now.Before(deadline) {
		rs = append(rs, reason{Offline, fmt.Sprintf("no contact with control since %s (max_offline %s)", stamp(contact), maxOffline)})
	} else {
		next = earliest(next, deadline)
	}
	for _, c := range in.Checks {
		if c.Failing {
			rs = append(rs, reason{c.Profile, fmt.Sprintf("check %s failed: observed %s, expected %s", c.ID, c.Observed, c.Expected)})
		}
	}
	return rs, next
}

// ruleOpen decides one rule: whether it opens its segment now, why, and the
// next schedule edge that could change that.
func ruleOpen(doc *policy.Document, class policy.Class, rule policy.Rule, seg *policy.Segment, mode Mode, in Input) (bool, string, time.Time) {
	var edge time.Time
	active := true
	if rule.Schedule != "" {
		active, edge = doc.Schedules[rule.Schedule].Active(in.Now)
	}
	switch {
	case mode >= Quarantine:
		return false, fmt.Sprintf("mode %s opens only the safety floor and control", mode), edge
	case seg.Partner != "" && revoked(in.Sticky, seg.Partner):
		return false, fmt.Sprintf("partner %s is revoked: %s", seg.Partner, in.Sticky.RevokedPartners[seg.Partner]), edge
	case mode != Normal && !slices.Contains(profile(class, mode), seg.Name):
		return false, fmt.Sprintf("mode %s: the %s profile of class %s does not keep it open", mode, mode, in.Device.Class), edge
	case !active:
		return false, fmt.Sprintf("schedule %s is closed until %s", rule.Schedule, stamp(edge)), edge
	}
	because := fmt.Sprintf("class %s rule", in.Device.Class)
	if len(rule.Hosts) > 0 {
		because += " for hosts " + prefixList(rule.Hosts)
	}
	if rule.Protocol != "" {
		because += " on " + string(rule.Protocol)
	}
	if len(rule.Ports) > 0 {
		because += " on ports " + portList(rule.Ports)
	}
	if rule.Schedule != "" {
		because += fmt.Sprintf(" within schedule %s until %s", rule.Schedule, stamp(edge))
	}
	if mode != Normal {
		because += fmt.Sprintf(", kept by the %s profile", mode)
	}
	return true, because, edge
}

func revoked(s Sticky, partner string) bool {
	_, ok := s.RevokedPartners[partner]
	return ok
}

func profile(c policy.Class, m Mode) []string {
	switch m {
	case Restricted:
		return c.Profiles.Restricted
	case Offline:
		return c.Profiles.Offline
	case Diagnostic:
		return c.Profiles.Diagnostic
	}
	return nil
}

// dedupe drops repeated destinations, which overlapping rules (a day and a
// night shift on the same ports) produce.
func dedupe(dsts []policy.Destination) []policy.Destination {
	seen := make(map[string]bool, len(dsts))
	out := dsts[:0:0]
	for _, d := range dsts {
		k := d.CIDR.String() + "/" + string(d.Protocol) + "/" + portList(d.Ports)
		if !seen[k] {
			seen[k] = true
			out = append(out, d)
		}
	}
	return out
}

// peers are the gateways of the open (and monitored) segments and of
// the inbound ones, each routed what it carries; a gateway carrying
// inbound connections is kept alive.
func peers(open, inbound []Access) []Peer {
	byKey := map[policy.Key]*Peer{}
	for i, a := range slices.Concat(open, inbound) {
		p := byKey[a.Gateway.PublicKey]
		if p == nil {
			p = &Peer{PublicKey: a.Gateway.PublicKey, Endpoint: a.Gateway.Endpoint}
			byKey[a.Gateway.PublicKey] = p
		}
		if !slices.Contains(p.Segments, a.Segment) { // open and monitored
			p.Segments = append(p.Segments, a.Segment)
		}
		for _, d := range a.Destinations {
			p.AllowedIPs = append(p.AllowedIPs, d.CIDR)
		}
		p.Keepalive = p.Keepalive || i >= len(open)
	}
	out := make([]Peer, 0, len(byKey))
	for _, p := range byKey {
		slices.SortFunc(p.AllowedIPs, comparePrefix)
		p.AllowedIPs = slices.Compact(p.AllowedIPs)
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b Peer) int { return strings.Compare(a.PublicKey.String(), b.PublicKey.String()) })
	return out
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func mergeEndpoints(local, fromPolicy []policy.Endpoint) []policy.Endpoint {
	out := slices.Concat(local, fromPolicy)
	slices.SortFunc(out, func(a, b policy.Endpoint) int {
		return cmp.Or(a.Address.Compare(b.Address), cmp.Compare(a.Port, b.Port))
	})
	return slices.Compact(out)
}

func portList(ports []policy.PortRange) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }
