package policy

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrInvalid is wrapped by every validation failure.
var ErrInvalid = errors.New("invalid policy")

// InvalidError lists every problem found in a document, each prefixed with
// the path of the field at fault, so one round of fixes is enough.
type InvalidError struct {
	Problems []string
}

func (e *InvalidError) Error() string {
	const show = 3
	msg := strings.Join(e.Problems[:min(show, len(e.Problems))], "; ")
	if n := len(e.Problems) - show; n > 0 {
		msg += fmt.Sprintf("; and %d more", n)
	}
	return "invalid policy: " + msg
}

func (e *InvalidError) Unwrap() error { return ErrInvalid }

// Names of segments and classes end up in nftables set names, status output
// and file names, so they are kept plain.
var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)

const maxTier = 3

type validator struct{ problems []string }

func (v *validator) addf(path, format string, args ...any) {
	v.problems = append(v.problems, path+": "+fmt.Sprintf(format, args...))
}

// Validate reports every contradiction or impossible value in d. It also
// resolves schedule time zones, so it must run before a Document is used.
func (d *Document) Validate() error {
	v := &validator{}
	if d.Schema != Schema {
		v.addf("schema", "is %q; this agent understands %q", d.Schema, Schema)
	}
	if len(d.Control) == 0 {
		v.addf("control", "names no endpoint; the agent must always be able to reach control")
	}
	for i, e := range d.Control {
		p := fmt.Sprintf("control[%d]", i)
		v.checkAddr(p+".address", e.Address)
		if e.Port == 0 {
			v.addf(p+".port", "is missing or 0")
		}
	}
	if d.Validity.MaxOffline <= 0 {
		v.addf("validity.max_offline", "must be a positive duration such as \"72h\"")
	}
	v.checkSegments(d.Segments)
	v.checkTierLimits(d.TierLimits)
	d.segIndex = make(map[string]int, len(d.Segments))
	for i, s := range d.Segments {
		if _, dup := d.segIndex[s.Name]; !dup {
			d.segIndex[s.Name] = i
		}
	}
	for _, name := range sortedKeys(d.Schedules) {
		s := d.Schedules[name]
		v.checkSchedule("schedules."+name, name, &s)
		d.Schedules[name] = s
	}
	if len(d.Classes) == 0 {
		v.addf("classes", "names no device class")
	}
	for _, name := range sortedKeys(d.Classes) {
		v.checkClass(d, "classes."+name, name, d.Classes[name])
	}
	if len(v.problems) > 0 {
		return &InvalidError{Problems: v.problems}
	}
	return nil
}

func (v *validator) checkAddr(path string, a netip.Addr) {
	switch {
	case !a.IsValid():
		v.addf(path, "is missing")
	case a.Is4In6():
		v.addf(path, "%s is an IPv4-mapped IPv6 address; write it as %s", a, a.Unmap())
	case a.Zone() != "":
		v.addf(path, "%s carries a zone; zones are not allowed", a)
	}
}

func (v *validator) checkSegments(segs []Segment) {
	if len(segs) == 0 {
		v.addf("segments", "names no segment")
	}
	seen := map[string]int{}
	for i, s := range segs {
		p := fmt.Sprintf("segments[%d]", i)
		if !nameRE.MatchString(s.Name) {
			v.addf(p+".name", "%q must be 1-32 characters of a-z, 0-9, '-' or '_', starting with a letter or digit", s.Name)
		} else if j, dup := seen[s.Name]; dup {
			v.addf(p+".name", "%q is already the name of segments[%d]", s.Name, j)
		}
		seen[s.Name] = i
		if s.DataClass == "" {
			v.addf(p+".data_class", "is missing (for example \"pii\", \"financial\", \"operational\")")
		}
		switch {
		case s.Tier < 0 || s.Tier > maxTier:
			v.addf(p+".tier", "is %d; tiers run from 0 (internal) to %d", s.Tier, maxTier)
		case s.Partner == "" && s.Tier != 0:
			v.addf(p+".partner", "is missing; a tier %d segment belongs to a partner", s.Tier)
		case s.Partner != "" && s.Tier == 0:
			v.addf(p+".tier", "is 0 (internal) but the segment belongs to partner %q; give it the partner's tier (1-3)", s.Partner)
		}
		if s.Partner != "" && !nameRE.MatchString(s.Partner) {
			v.addf(p+".partner", "%q must be 1-32 characters of a-z, 0-9, '-' or '_'", s.Partner)
		}
		if len(s.Destinations) == 0 {
			v.addf(p+".destinations", "is empty")
		}
		for j, dst := range s.Destinations {
			// Not Sprintf: ten thousand destinations are checked for
			// every bundle a device verifies.
			v.checkDestination(p+".destinations["+strconv.Itoa(j)+"]", dst)
		}
		if s.Gateway.PublicKey == (Key{}) {
			v.addf(p+".gateway.public_key", "is missing")
		}
		if ap, err := netip.ParseAddrPort(s.Gateway.Endpoint); err != nil || ap.Port() == 0 {
			v.addf(p+".gateway.endpoint", "%q is not an IP:port (such as 203.0.113.5:51820 or [2001:db8::5]:51820)", s.Gateway.Endpoint)
		}
		if s.RateLimit != nil {
			v.checkRate(p+".rate_limit", *s.RateLimit)
		}
	}
	v.checkPartnerOverlap(segs)
	v.checkGateways(segs)
}

// checkRate refuses a limit the kernel would refuse, or one that would
// shut its segment instead of slowing it.
func (v *validator) checkRate(p string, l RateLimit) {
	switch {
	case l.BytesPerSecond == 0:
		v.addf(p+".bytes_per_second", "must be above 0; omit the limit for none")
	case l.BytesPerSecond > MaxRate:
		v.addf(p+".bytes_per_second", "%d is above %d (the kernel's byte limit overflows beyond)", l.BytesPerSecond, uint64(MaxRate))
	case l.BurstBytes > math.MaxUint32:
		v.addf(p+".burst_bytes", "%d is above %d", l.BurstBytes, uint64(math.MaxUint32))
	case l.BytesPerSecond+l.BurstBytes < MinBucket:
		v.addf(p, "bytes_per_second plus burst_bytes is %d, below %d: the bucket must hold one offloaded packet (64 KiB) or nothing passes", l.BytesPerSecond+l.BurstBytes, MinBucket)
	}
}

func (v *validator) checkTierLimits(limits map[int]RateLimit) {
	for _, tier := range slices.Sorted(maps.Keys(limits)) {
		p := fmt.Sprintf("tier_limits.%d", tier)
		if tier < 1 || tier > 3 {
			v.addf(p, "tier %d is not a partner tier (1-3); internal segments take rate_limit each", tier)
			continue
		}
		v.checkRate(p, limits[tier])
	}
}

func (v *validator) checkDestination(p string, d Destination) {
	switch {
	case !d.CIDR.IsValid():
		v.addf(p+".cidr", "is missing")
	case d.CIDR.Addr().Is4In6():
		v.addf(p+".cidr", "%s is IPv4-mapped; write the IPv4 prefix", d.CIDR)
	case d.CIDR != d.CIDR.Masked():
		v.addf(p+".cidr", "%s has host bits set; write %s", d.CIDR, d.CIDR.Masked())
	}
	switch {
	case d.Protocol == "":
		v.addf(p+".protocol", "is missing (tcp, udp, icmp or any)")
	case d.Protocol.HasPorts() && len(d.Ports) == 0:
		v.addf(p+".ports", "is empty; name the ports (\"1-65535\" for all)")
	case !d.Protocol.HasPorts() && len(d.Ports) > 0:
		v.addf(p+".ports", "%s has no ports; remove them", d.Protocol)
	}
}

// checkPartnerOverlap rejects address space claimed by segments of different
// partners: a packet there could not be attributed to one partner, so a
// partner revocation could not be enforced. Prefixes nest or are disjoint, so
// after sorting a stack of enclosing prefixes finds every overlap in
// O(n log n).
func (v *validator) checkPartnerOverlap(segs []Segment) {
	type owned struct {
		prefix  netip.Prefix
		segment int
	}
	n := 0
	for _, s := range segs {
		n += len(s.Destinations)
	}
	all := make([]owned, 0, n)
	for i, s := range segs {
		for _, d := range s.Destinations {
			if d.CIDR.IsValid() {
				all = append(all, owned{d.CIDR.Masked(), i})
			}
		}
	}
	slices.SortFunc(all, func(a, b owned) int {
		return cmp.Or(a.prefix.Addr().Compare(b.prefix.Addr()), cmp.Compare(a.prefix.Bits(), b.prefix.Bits()))
	})
	var stack []owned
	reported := map[[2]int]bool{}
	for _, o := range all {
		for len(stack) > 0 && !contains(stack[len(stack)-1].prefix, o.prefix) {
			stack = stack[:len(stack)-1]
		}
		if len(stack) > 0 {
			top := stack[len(stack)-1]
			a, b := segs[top.segment], segs[o.segment]
			if a.Partner != b.Partner && !reported[[2]int{top.segment, o.segment}] {
				reported[[2]int{top.segment, o.segment}] = true
				v.addf("segments", "%s (segment %s, %s) overlaps %s (segment %s, %s); segments of different partners must not share addresses",
					top.prefix, a.Name, partnerName(a.Partner), o.prefix, b.Name, partnerName(b.Partner))
			}
		}
		stack = append(stack, o)
	}
}

func contains(outer, inner netip.Prefix) bool {
	return outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

func partnerName(p string) string {
	if p == "" {
		return "internal"
	}
	return "partner " + p
}

func (v *validator) checkSchedule(p, name string, s *Schedule) {
	if !nameRE.MatchString(name) {
		v.addf(p, "schedule name %q must be 1-32 characters of a-z, 0-9, '-' or '_'", name)
	}
	loc, err := time.LoadLocation(s.Zone)
	switch {
	case s.Zone == "":
		v.addf(p+".zone", "is missing (an IANA zone such as \"Europe/Berlin\" or \"UTC\")")
	case err != nil:
		v.addf(p+".zone", "%q is not a known IANA time zone", s.Zone)
	default:
		s.loc = loc
	}
	if len(s.Days) == 0 {
		v.addf(p+".days", "is empty")
	}
	seen := map[Weekday]bool{}
	for _, d := range s.Days {
		if seen[d] {
			v.addf(p+".days", "names %s twice", weekdays[d])
		}
		seen[d] = true
	}
	if s.Start >= 24*60 {
		v.addf(p+".start", "must be before 24:00")
	}
	if s.Start == s.End {
		v.addf(p, "start and end are both %s; the window would be empty", mustText(s.Start))
	}
}

func mustText(c ClockTime) string {
	b, _ := c.MarshalText()
	return string(b)
}

func (v *validator) checkClass(d *Document, p, name string, c Class) {
	if !nameRE.MatchString(name) {
		v.addf(p, "class name %q must be 1-32 characters of a-z, 0-9, '-' or '_'", name)
	}
	opened := map[string]bool{}
	for i, r := range c.Rules {
		rp := fmt.Sprintf("%s.rules[%d]", p, i)
		seg, ok := d.Segment(r.Segment)
		if !ok {
			v.addf(rp+".segment", "names unknown segment %q", r.Segment)
			continue
		}
		opened[r.Segment] = true
		if r.Schedule != "" {
			if _, ok := d.Schedules[r.Schedule]; !ok {
				v.addf(rp+".schedule", "names unknown schedule %q", r.Schedule)
			}
		}
		for j, pr := range r.Ports {
			if !segmentDeclares(seg, pr) {
				v.addf(fmt.Sprintf("%s.ports[%d]", rp, j), "opens %s, which segment %s does not declare on any tcp or udp destination", pr, seg.Name)
			}
		}
		v.checkNarrowing(rp, r, seg)
	}
	for i, r := range c.Inbound {
		rp := fmt.Sprintf("%s.inbound[%d]", p, i)
		if seg, ok := d.Segment(r.Segment); !ok {
			v.addf(rp+".segment", "names unknown segment %q", r.Segment)
		} else {
			opened[r.Segment] = true
			v.checkInbound(rp, r, seg, d)
		}
	}
	v.checkChecks(p, c.Checks, d)
	if c.Monitor != nil {
		v.checkMonitor(p+".monitor", *c.Monitor, d)
	}
	for _, m := range []struct {
		mode     string
		segments []string
	}{{"restricted", c.Profiles.Restricted}, {"offline", c.Profiles.Offline}, {"diagnostic", c.Profiles.Diagnostic}} {
		for j, s := range m.segments {
			pp := fmt.Sprintf("%s.profiles.%s[%d]", p, m.mode, j)
			if _, ok := d.Segment(s); !ok {
				v.addf(pp, "names unknown segment %q", s)
			} else if !opened[s] {
				v.addf(pp, "opens segment %q, which normal mode does not open for class %s; a profile may only keep open what normal mode opens", s, name)
			}
		}
	}
}

// checkNarrowing refuses hosts and protocols a segment does not declare,
// and a rule whose narrowings leave it nothing to open.
func (v *validator) checkNarrowing(rp string, r Rule, seg *Segment) {
	bad := v.checkHosts(rp, r.Hosts, seg)
	switch r.Protocol {
	case "":
	case Any:
		v.addf(rp+".protocol", "\"any\" narrows nothing; omit protocol")
		bad = true
	case ICMP:
		if len(r.Ports) > 0 {
			v.addf(rp+".ports", "icmp has no ports; remove them")
			bad = true
		}
	}
	if !bad && !r.opensAnything(seg) {
		v.addf(rp, "opens nothing: segment %s declares no destination on these hosts, protocol and ports", seg.Name)
	}
}

// checkHosts refuses a rule's hosts that are no plain prefix or lie
// outside the segment's destinations, and reports whether it did.
func (v *validator) checkHosts(rp string, hosts []netip.Prefix, seg *Segment) (bad bool) {
	for j, h := range hosts {
		hp := fmt.Sprintf("%s.hosts[%d]", rp, j)
		switch {
		case !h.IsValid():
			v.addf(hp, "is not an address prefix")
		case h.Addr().Is4In6():
			v.addf(hp, "%s is IPv4-mapped; write the IPv4 prefix", h)
		case h != h.Masked():
			v.addf(hp, "%s has host bits set; write %s", h, h.Masked())
		case !slices.ContainsFunc(seg.Destinations, func(d Destination) bool { return contains(d.CIDR, h) }):
			v.addf(hp, "%s lies outside every destination of segment %s", h, seg.Name)
		default:
			continue
		}
		bad = true
	}
	return bad
}

// checkInbound refuses an inbound rule that does not say exactly what
// reaches the device: its sources must lie inside the segment's
// destinations, and it names a protocol and, for tcp and udp, the
// device's ports.
func (v *validator) checkInbound(rp string, r Rule, seg *Segment, d *Document) {
	if r.Schedule != "" {
		if _, ok := d.Schedules[r.Schedule]; !ok {
			v.addf(rp+".schedule", "names unknown schedule %q", r.Schedule)
		}
	}
	v.checkHosts(rp, r.Hosts, seg)
	switch {
	case r.Protocol == "" || r.Protocol == Any:
		v.addf(rp+".protocol", "an inbound rule names its protocol: tcp, udp or icmp")
	case r.Protocol.HasPorts() && len(r.Ports) == 0:
		v.addf(rp+".ports", "names none of the device's ports; an inbound rule opens only the ports it names")
	case !r.Protocol.HasPorts() && len(r.Ports) > 0:
		v.addf(rp+".ports", "%s has no ports; remove them", r.Protocol)
	}
	for j, pr := range r.Ports {
		if pr.First == 0 || pr.First > pr.Last {
			v.addf(fmt.Sprintf("%s.ports[%d]", rp, j), "%s is not a port range of 1-65535", pr)
		}
	}
}

// checkMonitor refuses a monitor with no end or naming what is not there.
func (v *validator) checkMonitor(p string, m Monitor, d *Document) {
	if m.Until.IsZero() {
		v.addf(p+".until", "is missing; monitoring passes what rules would drop, so it must end (an RFC 3339 time)")
	}
	seen := map[string]bool{}
	for i, s := range m.Segments {
		if _, ok := d.Segment(s); !ok {
			v.addf(fmt.Sprintf("%s.segments[%d]", p, i), "names unknown segment %q", s)
		} else if seen[s] {
			v.addf(fmt.Sprintf("%s.segments[%d]", p, i), "names segment %q twice", s)
		}
		seen[s] = true
	}
	for i, id := range m.Devices {
		if strings.TrimSpace(id) == "" {
			v.addf(fmt.Sprintf("%s.devices[%d]", p, i), "is empty")
		}
	}
}

func segmentDeclares(seg *Segment, pr PortRange) bool {
	for _, dst := range seg.Destinations {
		if !dst.Protocol.HasPorts() {
			continue
		}
		for _, dp := range dst.Ports {
			if dp.Contains(pr) {
				return true
			}
		}
	}
	return false
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// checkGateways rejects one gateway key reached at two endpoints: a
// WireGuard peer has exactly one endpoint.
func (v *validator) checkGateways(segs []Segment) {
	endpoints := map[Key]string{}
	for i, s := range segs {
		if prev, ok := endpoints[s.Gateway.PublicKey]; ok && prev != s.Gateway.Endpoint {
			v.addf(fmt.Sprintf("segments[%d].gateway.endpoint", i), "gateway %s is already reached at %s; one gateway key has one endpoint", s.Gateway.PublicKey, prev)
			continue
		}
		endpoints[s.Gateway.PublicKey] = s.Gateway.Endpoint
	}
}

// Check validates one destination on its own, as the agent's configuration
// uses them for the safety floor.
func (d Destination) Check() error {
	v := &validator{}
	v.checkDestination("", d)
	if len(v.problems) > 0 {
		return errors.New(strings.TrimPrefix(strings.Join(v.problems, "; "), "."))
	}
	return nil
}
