package localpolicy

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Verdict answers "may this device open a connection to there, now?".
type Verdict struct {
	Allowed bool
	// By names what decided: "safety floor can-gateway", "control",
	// "segment wms", "profile", or "default deny".
	By     string
	Reason string
}

// Explain decides a connection from the device to addr:port over proto
// against d, the way the kernel table built from d decides it.
func Explain(d Desired, doc *policy.Document, addr netip.Addr, port uint16, proto policy.Protocol) Verdict {
	for _, f := range d.Floor {
		if matches(f.Destination, addr, port, proto) {
			return Verdict{true, "safety floor " + f.Name, "device-local allowance; open in every mode"}
		}
	}
	for _, c := range d.Control {
		if c.Address == addr && c.Port == port && proto == policy.TCP {
			return Verdict{true, "control", "the control endpoint is open in every mode"}
		}
	}
	for _, a := range d.Segments {
		for _, dst := range a.Destinations {
			if matches(dst, addr, port, proto) {
				return Verdict{true, "segment " + a.Segment, reasonFor(d, a.Segment)}
			}
		}
	}
	if m := d.Monitor; m != nil {
		for _, a := range m.Segments {
			for _, dst := range a.Destinations {
				if matches(dst, addr, port, proto) {
					return Verdict{true, "monitor " + a.Segment, fmt.Sprintf("no rule opens it; segment %s is monitored until %s, so a new connection is logged and passed", a.Segment, stamp(m.Until))}
				}
			}
		}
	}
	// Denied: say which segment the address belongs to and why it is shut.
	if doc != nil {
		for _, s := range doc.Segments {
			for _, dst := range s.Destinations {
				if dst.CIDR.Contains(addr) {
					why := reasonFor(d, s.Name)
					if _, open := openSegment(d, s.Name); open {
						why = fmt.Sprintf("segment %s is open, but not for %s port %d", s.Name, proto, port)
					}
					return Verdict{false, "segment " + s.Name, denied(d, why)}
				}
			}
		}
	}
	return Verdict{false, "default deny", denied(d, fmt.Sprintf("%s is in no segment of the policy", addr))}
}

// denied words a denial: the mode, why, and, when the mode is not
// normal, what put the device there (a failing check with its observed
// and expected values, a command, the offline deadline), as status lists
// it.
func denied(d Desired, why string) string {
	if !strings.HasPrefix(why, "mode ") {
		why = fmt.Sprintf("mode %s: %s", d.Mode, why)
	}
	if d.Mode != Normal && len(d.Why) > 0 {
		why += " (" + strings.Join(d.Why, "; ") + ")"
	}
	return why
}

func matches(d policy.Destination, addr netip.Addr, port uint16, proto policy.Protocol) bool {
	if !d.CIDR.Contains(addr) {
		return false
	}
	switch d.Protocol {
	case policy.Any:
		return true
	case policy.ICMP:
		return proto == policy.ICMP
	}
	if d.Protocol != proto {
		return false
	}
	for _, p := range d.Ports {
		if p.First <= port && port <= p.Last {
			return true
		}
	}
	return false
}

func openSegment(d Desired, name string) (Access, bool) {
	for _, a := range d.Segments {
		if a.Segment == name {
			return a, true
		}
	}
	return Access{}, false
}

func reasonFor(d Desired, segment string) string {
	for _, dec := range d.Decisions {
		if dec.Segment == segment {
			return dec.Reason
		}
	}
	return "not in the policy"
}
