package nft

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

func el(prefix string, proto0, proto1 uint8, port0, port1 uint16) Element {
	return Element{Prefix: netip.MustParsePrefix(prefix), ProtoFrom: proto0, ProtoTo: proto1, PortFrom: port0, PortTo: port1}
}

var prefixEq = cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })

// normalize must make boxes disjoint without changing what they match.
func TestNormalize(t *testing.T) {
	tests := []struct {
		name string
		in   []Element
		want []Element
	}{
		{"duplicates collapse",
			[]Element{el("10.0.0.0/24", 6, 6, 443, 443), el("10.0.0.0/24", 6, 6, 443, 443)},
			[]Element{el("10.0.0.0/24", 6, 6, 443, 443)}},
		{"contained box dropped",
			[]Element{el("10.0.1.0/24", 6, 6, 443, 443), el("10.0.0.0/16", 6, 6, 400, 500)},
			[]Element{el("10.0.0.0/16", 6, 6, 400, 500)}},
		{"overlapping ports split",
			[]Element{el("10.0.0.0/24", 6, 6, 400, 450), el("10.0.0.0/24", 6, 6, 440, 500)},
			[]Element{el("10.0.0.0/24", 6, 6, 400, 450), el("10.0.0.0/24", 6, 6, 451, 500)}},
		{"any protocol over a tcp port",
			[]Element{el("10.0.0.5/32", 6, 6, 22, 22), el("10.0.0.0/24", 0, 255, 0, 65535)},
			[]Element{el("10.0.0.0/24", 0, 255, 0, 65535)}},
		{"narrow prefix keeps what the wide one lacks",
			[]Element{el("10.0.0.5/32", 6, 6, 20, 30), el("10.0.0.0/24", 6, 6, 22, 22)},
			[]Element{el("10.0.0.0/24", 6, 6, 22, 22), el("10.0.0.5/32", 6, 6, 20, 21), el("10.0.0.5/32", 6, 6, 23, 30)}},
		{"disjoint stay",
			[]Element{el("10.0.1.0/24", 17, 17, 53, 53), el("10.0.0.0/24", 17, 17, 53, 53)},
			[]Element{el("10.0.0.0/24", 17, 17, 53, 53), el("10.0.1.0/24", 17, 17, 53, 53)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := normalize(slices.Clone(tt.in))
			if diff := cmp.Diff(tt.want, got, prefixEq); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			// Same coverage: every probe point matched before is matched
			// after, and nothing new.
			for _, pt := range probePoints(tt.in) {
				if covered(tt.in, pt) != covered(got, pt) {
					t.Errorf("coverage of %+v changed", pt)
				}
			}
		})
	}
}

type point struct {
	addr  netip.Addr
	proto uint8
	port  uint16
}

func probePoints(elems []Element) []point {
	var pts []point
	for _, e := range elems {
		for _, a := range []netip.Addr{e.Prefix.Addr(), lastAddr(e.Prefix)} {
			for _, pr := range []uint8{e.ProtoFrom, e.ProtoTo, 6, 17} {
				for _, po := range []uint16{e.PortFrom, e.PortTo, e.PortFrom - 1, e.PortTo + 1, 22, 443} {
					pts = append(pts, point{a, pr, po})
				}
			}
		}
	}
	return pts
}

func covered(elems []Element, p point) bool {
	for _, e := range elems {
		if e.Prefix.Contains(p.addr) && e.ProtoFrom <= p.proto && p.proto <= e.ProtoTo && e.PortFrom <= p.port && p.port <= e.PortTo {
			return true
		}
	}
	return false
}

// Inside every chain: loopback first, then the busy tunnel rules (segments,
// then WireGuard to the gateways), the link-local rules, the floor,
// control, and the drop last. Segment rules name the tunnel.
func TestBuildOrder(t *testing.T) {
	rs := Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{DHCP: true, Tunnel: "bh0"})
	for _, c := range rs.Chains {
		var order []string
		for _, r := range c.Rules {
			switch {
			case r.Iface == "lo":
				order = append(order, "loopback")
			case r.Lookup == nil && !r.Drop:
				order = append(order, "link")
			case r.Drop && r.Over == nil:
				order = append(order, "drop")
			case r.Lookup.Set[:5] == "floor":
				order = append(order, "floor")
			case r.Lookup.Set[:7] == "control":
				order = append(order, "control")
			case strings.HasPrefix(r.Lookup.Set, "gateways"):
				order = append(order, "gateways")
			default:
				order = append(order, "segment")
				if r.Iface != "bh0" {
					t.Errorf("chain %s: rule %q does not require the tunnel", c.Name, r.Comment)
				}
			}
		}
		rank := map[string]int{"loopback": 0, "segment": 1, "gateways": 2, "link": 3, "floor": 4, "control": 5, "drop": 6}
		if !slices.IsSortedFunc(order, func(a, b string) int { return rank[a] - rank[b] }) || order[len(order)-1] != "drop" {
			t.Errorf("chain %s order %v", c.Name, order)
		}
		// Input and output log the refused (a first packet each, at a
		// bounded rate) just before the default drop; forward only counts.
		want := map[string]string{"input": DeniedIn, "output": DeniedOut}[c.Name]
		last := c.Rules[len(c.Rules)-1]
		if last.Log != "" || last.Limit != 0 || last.New {
			t.Errorf("chain %s: the default drop is narrowed: %+v", c.Name, last)
		}
		if want == "" {
			continue
		}
		if r := c.Rules[len(c.Rules)-2]; r.Log != want || !r.New || !r.Drop || r.Limit == 0 || r.Lookup != nil {
			t.Errorf("chain %s: before the default drop %+v, want new connections logged as %q at a bounded rate", c.Name, r, want)
		}
	}
	quarantined := Build(desired(t, "dock-gateway", localpolicy.Sticky{Mode: localpolicy.Quarantine}), Options{Tunnel: "bh0"})
	for _, s := range quarantined.Sets {
		if s.Name[:4] == "seg_" {
			t.Errorf("quarantine keeps set %s", s.Name)
		}
	}
}

// A segment's rate limit is a drop of what exceeds the rate, right before
// the accept it polices and with the same match, in both directions; a
// segment without a limit has no such rule.
func TestRateLimitPolicesTheSegmentsOwnAccept(t *testing.T) {
	d := desired(t, "dock-gateway", localpolicy.Sticky{})
	limited := map[string]*policy.RateLimit{}
	for _, a := range d.Segments {
		if a.RateLimit != nil {
			limited["segment "+a.Segment] = a.RateLimit
		}
	}
	if len(limited) == 0 {
		t.Fatal("the example opens no rate-limited segment to dock gateways; the test proves nothing")
	}
	rs := Build(d, Options{Tunnel: "bh0"})
	for _, c := range rs.Chains[:2] {
		policed := map[string]bool{}
		for i, r := range c.Rules {
			if r.Over == nil {
				continue
			}
			if i+1 == len(c.Rules) {
				t.Fatalf("chain %s ends with %q", c.Name, r.Comment)
			}
			next := c.Rules[i+1]
			same := next
			same.Comment, same.Over, same.Drop = r.Comment, r.Over, true
			if !r.Drop || next.Drop || !reflect.DeepEqual(same, r) || r.Comment != next.Comment+" over rate" {
				t.Errorf("chain %s: %+v does not police the rule after it, %+v", c.Name, r, next)
			}
			seg := strings.TrimSuffix(next.Comment, " replies")
			l := limited[seg]
			if l == nil || r.Over.PerSecond != l.BytesPerSecond || uint64(r.Over.Burst) != l.BurstBytes {
				t.Errorf("chain %s: %q limits at %+v, policy says %+v", c.Name, r.Comment, r.Over, l)
			}
			policed[seg] = true
		}
		if len(policed) != len(limited) {
			t.Errorf("chain %s polices %v, want every segment of %v", c.Name, policed, limited)
		}
	}
}
