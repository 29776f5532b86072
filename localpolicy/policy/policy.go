// Package policy owns the Bulkhead policy document (schema v1): its types,
// strict decoding, and validation. A Document that passes Validate is free of
// contradictions the evaluator would otherwise have to guess about. It knows
// nothing of signatures, storage or the kernel.
package policy

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
)

// Schema is the only document schema this agent understands.
const Schema = "bulkhead.policy/v1"

// Document is one site-wide policy. Every device class it names gets its
// access from the same document, so contradictions between classes are
// caught once, at signing time and again on every device.
type Document struct {
	Schema    string              `json:"schema"`
	Control   []Endpoint          `json:"control"`
	Validity  Validity            `json:"validity"`
	Segments  []Segment           `json:"segments"`
	Schedules map[string]Schedule `json:"schedules,omitzero"`
	Classes   map[string]Class    `json:"classes"`
	// TierLimits caps every segment of a partner tier (1-3): each such
	// segment is limited by its tier's cap or its own rate_limit,
	// whichever is lower. A tier-3 broker's segments cannot be opened
	// wider by a segment entry that forgot its limit.
	TierLimits map[int]RateLimit `json:"tier_limits,omitzero"`

	segIndex map[string]int // by name; built by Validate
}

// Endpoint is a control-plane address the agent may always reach, in every
// mode including lockdown.
type Endpoint struct {
	Address netip.Addr `json:"address"`
	Port    uint16     `json:"port"`
}

// Validity says how long a bundle is enforced in normal mode without fresh
// contact with control, before the device falls back to its offline profile.
type Validity struct {
	MaxOffline Duration `json:"max_offline"`
}

// Segment is one network segment, reached only through the WireGuard
// gateway that fronts it.
type Segment struct {
	Name         string        `json:"name"`
	DataClass    string        `json:"data_class"`
	Tier         int           `json:"tier"`
	Partner      string        `json:"partner,omitzero"`
	Destinations []Destination `json:"destinations"`
	Gateway      Gateway       `json:"gateway"`
	RateLimit    *RateLimit    `json:"rate_limit,omitzero"`
}

// Destination is an address range and the protocol and ports on it.
type Destination struct {
	CIDR     netip.Prefix `json:"cidr"`
	Protocol Protocol     `json:"protocol"`
	Ports    []PortRange  `json:"ports,omitzero"`
}

// Gateway is the WireGuard peer for a segment.
type Gateway struct {
	PublicKey Key    `json:"public_key"`
	Endpoint  string `json:"endpoint"`
}

// RateLimit caps a segment's traffic, each direction on its own. It is a
// token bucket refilled at BytesPerSecond that holds one second of that
// rate plus BurstBytes (nftables' byte limit): after a quiet spell, up to
// BytesPerSecond+BurstBytes may pass at once, and then BytesPerSecond.
type RateLimit struct {
	BytesPerSecond uint64 `json:"bytes_per_second"`
	BurstBytes     uint64 `json:"burst_bytes,omitzero"`
}

// Limit is the cap on segment s: its own rate_limit or its tier's,
// whichever refills slower (nil: none). Each is a valid bucket on its
// own, so the cap is one of them whole, never a mix.
func (d *Document) Limit(s Segment) *RateLimit {
	l := s.RateLimit
	if t, ok := d.TierLimits[s.Tier]; ok && (l == nil || t.BytesPerSecond < l.BytesPerSecond || t.BytesPerSecond == l.BytesPerSecond && t.BurstBytes < l.BurstBytes) {
		l = &t
	}
	return l
}

// MinBucket is the smallest bucket a rate limit may have. With
// segmentation offload one packet through the tunnel can be 64 KiB; a
// smaller bucket could never pass it, and the segment would be shut
// instead of slowed.
const MinBucket = 64 << 10

// MaxRate is the highest rate a limit may have: the kernel computes its
// bucket in nanoseconds times bytes, and refuses (so the whole table
// with it) what overflows 64 bits. 10 GB/s is far above any link here.
const MaxRate = 10_000_000_000

// Class is a kind of device and what it may reach.
type Class struct {
	Rules []Rule `json:"rules"`
	// Inbound are the connections the class's devices accept through the
	// tunnel from a segment (a desk in diagnostics reaching a dock
	// gateway's ssh): see Rule.Accepts. Nothing else reaches a device.
	Inbound  []Rule   `json:"inbound,omitzero"`
	Profiles Profiles `json:"profiles,omitzero"`
	// Checks are the posture checks devices of the class judge themselves
	// on; a failing one moves the device to its profile.
	Checks []Check `json:"checks,omitzero"`
	// Monitor, until it ends, logs and passes what the class's rules would
	// drop on the monitored segments, so the flows a device really needs
	// can be observed before its rules are written (see Monitor).
	Monitor *Monitor `json:"monitor,omitzero"`
}

// Monitor is discovery mode: while it lasts, a connection a device of the
// class opens through the tunnel to a destination a monitored segment
// declares, but that no rule opens, is logged (NFLOG) and passed instead
// of dropped, and reported to control as an observed flow. It is a
// deliberate, bounded fail-open:
//   - it ends at Until, which the signed policy fixes, even offline;
//   - it holds only in normal mode: a failing check, the offline
//     deadline, quarantine, diagnostic or lockdown end it at once, and a
//     revoked partner's segments are never monitored;
//   - it never opens what no segment declares, nor a segment's
//     destinations over any path but the tunnel.
type Monitor struct {
	Until time.Time `json:"until"`
	// Segments are the monitored segments; none means every segment.
	Segments []string `json:"segments,omitzero"`
	// Devices narrows monitoring to these device ids; none means every
	// device of the class.
	Devices []string `json:"devices,omitzero"`
}

// Rule opens one segment to a class, optionally narrowed to some hosts, a
// protocol and some ports, and limited to a schedule. Each narrowing cuts
// the segment's declared destinations; none widens them.
type Rule struct {
	Segment string `json:"segment"`
	// Hosts narrows the rule to these addresses (prefixes) inside the
	// segment's destinations.
	Hosts []netip.Prefix `json:"hosts,omitzero"`
	// Protocol narrows the rule to one protocol (tcp, udp or icmp).
	Protocol Protocol    `json:"protocol,omitzero"`
	Ports    []PortRange `json:"ports,omitzero"`
	Schedule string      `json:"schedule,omitzero"`
}

// Profiles name, per degraded mode, which of the class's segments stay open.
// A mode without a profile keeps nothing open but the safety floor and the
// control endpoints.
type Profiles struct {
	Restricted []string `json:"restricted,omitzero"`
	Offline    []string `json:"offline,omitzero"`
	Diagnostic []string `json:"diagnostic,omitzero"`
}

// Schedule is a weekly time window in one IANA time zone. A window whose end
// is not after its start runs past midnight into the next day; Days name the
// day the window starts.
type Schedule struct {
	Zone  string    `json:"zone"`
	Days  []Weekday `json:"days"`
	Start ClockTime `json:"start"`
	End   ClockTime `json:"end"`
	loc   *time.Location
}

// Parse decodes a policy document strictly and validates it.
func Parse(data []byte) (*Document, error) {
	var d Document
	if err := strictjson.Unmarshal(data, &d); err != nil {
		return nil, err
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return &d, nil
}

// Segment returns the named segment.
func (d *Document) Segment(name string) (*Segment, bool) {
	if d.segIndex != nil {
		i, ok := d.segIndex[name]
		if !ok {
			return nil, false
		}
		return &d.Segments[i], true
	}
	for i := range d.Segments {
		if d.Segments[i].Name == name {
			return &d.Segments[i], true
		}
	}
	return nil, false
}

// Protocol is a transport protocol a destination is reached with.
type Protocol string

// Protocols a destination may name.
const (
	TCP  Protocol = "tcp"
	UDP  Protocol = "udp"
	ICMP Protocol = "icmp"
	Any  Protocol = "any"
)

// HasPorts reports whether the protocol is addressed by port.
func (p Protocol) HasPorts() bool { return p == TCP || p == UDP }

// UnmarshalText accepts only the protocols Bulkhead can enforce.
func (p *Protocol) UnmarshalText(b []byte) error {
	// A switch on string(b) allocates nothing: a policy names a
	// protocol on every destination.
	switch string(b) {
	case string(TCP):
		*p = TCP
		return nil
	case string(UDP):
		*p = UDP
		return nil
	case string(ICMP):
		*p = ICMP
		return nil
	case string(Any):
		*p = Any
		return nil
	}
	return fmt.Errorf("unknown protocol %q (want tcp, udp, icmp or any)", b)
}

// PortRange is an inclusive range of ports; a single port has First == Last.
type PortRange struct {
	First, Last uint16
}

// ParsePortRange reads "443" or "8000-8099".
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	first, err := parsePort(lo)
	if err != nil {
		return PortRange{}, fmt.Errorf("port range %q: %v", s, err)
	}
	last := first
	if isRange {
		if last, err = parsePort(hi); err != nil {
			return PortRange{}, fmt.Errorf("port range %q: %v", s, err)
		}
	}
	if last < first {
		return PortRange{}, fmt.Errorf("port range %q: end is below start", s)
	}
	return PortRange{first, last}, nil
}

// portDigits reads a port from 1 to 65535 written in decimal digits, as
// parsePort accepts it.
func portDigits(b []byte) (uint16, bool) {
	if len(b) == 0 || len(b) > 5 {
		return 0, false
	}
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return uint16(n), n >= 1 && n <= 65535
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a port from 1 to 65535", s)
	}
	return uint16(n), nil
}

func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// MarshalText writes the form ParsePortRange reads.
func (r PortRange) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText reads "443" or "8000-8099". The valid forms are read
// without allocating (a policy may list tens of thousands); anything else
// goes through ParsePortRange, which says what is wrong.
func (r *PortRange) UnmarshalText(b []byte) error {
	lo, hi, isRange := bytes.Cut(b, []byte("-"))
	first, ok1 := portDigits(lo)
	last, ok2 := first, true
	if isRange {
		last, ok2 = portDigits(hi)
	}
	if ok1 && ok2 && first <= last {
		*r = PortRange{first, last}
		return nil
	}
	v, err := ParsePortRange(string(b))
	if err != nil {
		return err
	}
	*r = v
	return nil
}

// Contains reports whether o lies wholly inside r.
func (r PortRange) Contains(o PortRange) bool { return r.First <= o.First && o.Last <= r.Last }

// Duration is a time.Duration written as Go writes it ("72h", "90m").
type Duration time.Duration

// MarshalText writes the duration as Go formats it.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText reads a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration such as \"72h\" or \"90m\"", b)
	}
	*d = Duration(v)
	return nil
}

// Key is a WireGuard public key, written in base64 as wg(8) prints it.
type Key [32]byte

// MarshalText writes the key as wg(8) does.
func (k Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

func (k Key) String() string { return encodeKey(k) }

// UnmarshalText reads a base64 WireGuard key.
func (k *Key) UnmarshalText(b []byte) error {
	v, err := decodeKey(string(b))
	if err != nil {
		return err
	}
	*k = v
	return nil
}

// Weekday is a day name as written in schedules ("mon" … "sun").
type Weekday time.Weekday

var weekdays = [...]string{"sun", "mon", "tue", "wed", "thu", "fri", "sat"}

// MarshalText writes the three-letter day name.
func (w Weekday) MarshalText() ([]byte, error) { return []byte(weekdays[w]), nil }

// UnmarshalText reads a three-letter day name.
func (w *Weekday) UnmarshalText(b []byte) error {
	for i, name := range weekdays {
		if strings.EqualFold(string(b), name) {
			*w = Weekday(i)
			return nil
		}
	}
	return fmt.Errorf("unknown day %q (want mon, tue, wed, thu, fri, sat or sun)", b)
}

// ClockTime is a wall-clock time of day, minutes after midnight; "24:00" is
// allowed as an end.
type ClockTime int

// MarshalText writes HH:MM.
func (c ClockTime) MarshalText() ([]byte, error) {
	return fmt.Appendf(nil, "%02d:%02d", int(c)/60, int(c)%60), nil
}

// UnmarshalText reads HH:MM.
func (c *ClockTime) UnmarshalText(b []byte) error {
	hh, mm, ok := strings.Cut(string(b), ":")
	h, err1 := strconv.Atoi(hh)
	m, err2 := strconv.Atoi(mm)
	if !ok || len(hh) != 2 || len(mm) != 2 || err1 != nil || err2 != nil ||
		h < 0 || m < 0 || m > 59 || h > 24 || (h == 24 && m != 0) {
		return fmt.Errorf("%q is not a time of day HH:MM (00:00 to 24:00)", b)
	}
	*c = ClockTime(h*60 + m)
	return nil
}

func encodeKey(k Key) string { return base64.StdEncoding.EncodeToString(k[:]) }

func decodeKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("%q is not a WireGuard public key (44 characters of base64, as `wg pubkey` prints)", s)
	}
	copy(k[:], b)
	return k, nil
}

// Opens is what the rule opens on seg: the segment's destinations cut to
// the rule's hosts, protocol and ports. A destination of protocol "any"
// narrowed to tcp or udp covers every port of it.
func (r Rule) Opens(seg *Segment) []Destination {
	var out []Destination
	r.opens(seg, func(d Destination) bool { out = append(out, d); return true })
	return out
}

// Accepts is what an inbound rule lets reach the device from seg: the
// sources are the rule's hosts, or every destination the segment
// declares, and each comes with the rule's protocol and the device's own
// ports it may connect to.
func (r Rule) Accepts(seg *Segment) []Destination {
	sources := r.Hosts
	if len(sources) == 0 {
		for _, d := range seg.Destinations {
			sources = append(sources, d.CIDR)
		}
	}
	var out []Destination
	for _, src := range sources {
		if !slices.ContainsFunc(out, func(d Destination) bool { return d.CIDR == src }) {
			out = append(out, Destination{CIDR: src, Protocol: r.Protocol, Ports: r.Ports})
		}
	}
	return out
}

// opensAnything is whether Opens would list anything, found without
// listing it.
func (r Rule) opensAnything(seg *Segment) bool {
	found := false
	r.opens(seg, func(Destination) bool { found = true; return false })
	return found
}

// opens calls yield with each destination Opens lists, until yield
// returns false.
func (r Rule) opens(seg *Segment, yield func(Destination) bool) {
	for _, d := range seg.Destinations {
		if r.Protocol != "" {
			switch d.Protocol {
			case r.Protocol:
			case Any:
				d.Protocol = r.Protocol
				if d.Protocol.HasPorts() {
					d.Ports = []PortRange{{1, 65535}}
				}
			default:
				continue
			}
		}
		if len(r.Ports) > 0 {
			if !d.Protocol.HasPorts() {
				continue
			}
			var kept []PortRange
			for _, have := range d.Ports {
				for _, want := range r.Ports {
					if lo, hi := max(have.First, want.First), min(have.Last, want.Last); lo <= hi {
						kept = append(kept, PortRange{First: lo, Last: hi})
					}
				}
			}
			if len(kept) == 0 {
				continue
			}
			d.Ports = kept
		}
		if len(r.Hosts) == 0 {
			if !yield(d) {
				return
			}
			continue
		}
		for _, h := range r.Hosts {
			switch {
			case contains(d.CIDR, h):
				if !yield(Destination{CIDR: h, Protocol: d.Protocol, Ports: d.Ports}) {
					return
				}
			case contains(h, d.CIDR):
				if !yield(d) {
					return
				}
			}
		}
	}
}
