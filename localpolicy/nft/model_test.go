package nft

import (
	"maps"
	"net/netip"
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

// Inside every base chain: loopback first, then the busy tunnel rules
// (the segments' map, then WireGuard to the gateways), the link-local
// rules, the floor, control, and the drop last. Segment rules name the
// tunnel.
func TestBuildOrder(t *testing.T) {
	rs := Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{DHCP: true, Tunnel: "bh0"})
	for _, c := range rs.Chains {
		if c.Hook == "" {
			continue // a segment's own chain, entered from the map
		}
		var order []string
		for _, r := range c.Rules {
			switch {
			case r.Iface == "lo":
				order = append(order, "loopback")
			case r.Lookup == nil && !r.Drop:
				order = append(order, "link")
			case r.Drop && r.Over == nil:
				order = append(order, "drop")
			case strings.HasPrefix(r.Lookup.Set, "floor"):
				order = append(order, "floor")
			case strings.HasPrefix(r.Lookup.Set, "control"):
				order = append(order, "control")
			case strings.HasPrefix(r.Lookup.Set, "gateways"):
				order = append(order, "gateways")
			default:
				order = append(order, "segment")
				if r.Iface != "bh0" || !r.Lookup.Map {
					t.Errorf("chain %s: rule %q does not require the tunnel, or looks up no map", c.Name, r.Comment)
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
		if strings.HasPrefix(s.Name, segmentsMap) {
			t.Errorf("quarantine keeps map %s", s.Name)
		}
	}
	if len(quarantined.Chains) != 3 {
		t.Errorf("quarantine keeps chains beyond the base ones: %d", len(quarantined.Chains))
	}
}

// A segment's rate limit is its own chain: in each direction of a
// connection, what exceeds the rate is dropped, then the rest accepted;
// every element of the segment jumps there, and no other element does. A
// segment without a limit is accepted by the map itself.
func TestRateLimitPolicesTheSegmentsOwnTraffic(t *testing.T) {
	d := desired(t, "dock-gateway", localpolicy.Sticky{})
	limited := map[string]*policy.RateLimit{}
	for _, a := range d.Segments {
		if a.RateLimit != nil {
			limited[a.Segment] = a.RateLimit
		}
	}
	if len(limited) == 0 || len(limited) == len(d.Segments) {
		t.Fatal("the example opens no rate-limited segment to dock gateways, or only those; the test proves nothing")
	}
	rs := Build(d, Options{Tunnel: "bh0"})
	chains := map[string]Chain{}
	for _, c := range rs.Chains {
		if c.Hook == "" {
			chains[c.Name] = c
		}
	}
	for seg, l := range limited {
		c, ok := chains["seg_"+seg]
		if !ok {
			t.Errorf("no chain for rate-limited segment %s", seg)
			continue
		}
		over := &Rate{PerSecond: l.BytesPerSecond, Burst: uint32(l.BurstBytes)}
		want := []Rule{
			{Comment: "segment " + seg + " over rate", Direction: Original, Over: over, Drop: true},
			{Comment: "segment " + seg + " replies over rate", Direction: Reply, Over: over, Drop: true},
			{Comment: "segment " + seg},
		}
		if diff := cmp.Diff(want, c.Rules); diff != "" {
			t.Errorf("chain %s (-want +got):\n%s", c.Name, diff)
		}
	}
	if len(chains) != len(limited) {
		t.Errorf("chains %v, want one per rate-limited segment %v", slices.Sorted(maps.Keys(chains)), slices.Sorted(maps.Keys(limited)))
	}
	// Each segment's destinations jump to its chain, or are accepted.
	for _, a := range d.Segments {
		want := ""
		if a.RateLimit != nil {
			want = "seg_" + a.Segment
		}
		for _, dst := range destinations(a) {
			pt := point{dst.Prefix.Addr(), dst.ProtoFrom, dst.PortFrom}
			if got, ok := verdictAt(rs, pt); !ok || got != want {
				t.Errorf("segment %s: %+v has verdict %q (found %v), want %q", a.Segment, pt, got, ok, want)
			}
		}
	}
}

// verdictAt is the verdict the segments map gives a point.
func verdictAt(rs Ruleset, p point) (string, bool) {
	for _, s := range rs.Sets {
		if !s.Map {
			continue
		}
		for _, e := range s.Elements {
			if covered([]Element{e}, p) {
				return e.Chain, true
			}
		}
	}
	return "", false
}
