package nft

import (
	"fmt"
	"maps"
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

// Inside every base chain: loopback first, then the busy tunnel rules
// (the segments' map, then WireGuard to the gateways), the link-local
// rules, the floor, control, and the drop last. Segment rules name the
// tunnel.
func TestBuildOrder(t *testing.T) {
	rs := Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{DHCP: true, Tunnel: "bh0", ListenPort: 51820})
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

// verdictAt is the verdict the output chain's segment rules give a packet
// to p: the segments map's element, followed through a shard's chain when
// the map dispatches. It is the final verdict: accept (""), or the
// segment chain jumped to.
func verdictAt(rs Ruleset, p point) (string, bool) {
	sets, chains := map[string]Set{}, map[string]Chain{}
	for _, s := range rs.Sets {
		sets[s.Name] = s
	}
	for _, c := range rs.Chains {
		chains[c.Name] = c
	}
	var look func(set string) (string, bool)
	look = func(set string) (string, bool) {
		for _, e := range sets[set].Elements {
			if !covered([]Element{e}, p) {
				continue
			}
			if c, ok := chains[e.Chain]; ok && strings.HasPrefix(e.Chain, segmentsMap) {
				return look(c.Rules[0].Lookup.Set) // a shard
			}
			return e.Chain, true
		}
		return "", false
	}
	for _, c := range rs.Chains {
		if c.Hook != "output" {
			continue
		}
		for _, r := range c.Rules {
			if r.Lookup != nil && r.Lookup.Map && r.Lookup.V6 == p.addr.Is6() {
				if v, ok := look(r.Lookup.Set); ok {
					return v, true
				}
			}
		}
	}
	return "", false
}

// A policy too large for one segments map is cut into shards by address,
// and a packet still gets the verdict its segment gives it, through the
// dispatch map; a packet to no segment gets none. Each shard holds at most
// about shardSize elements, and the dispatch maps cover every address.
func TestShardedMapsKeepEveryVerdict(t *testing.T) {
	d := desired(t, "sharded", localpolicy.Sticky{})
	rs := Build(d, Options{Tunnel: "bh0"})
	shardMaps := 0
	for _, s := range rs.Sets {
		if strings.HasPrefix(s.Name, segmentsMap+"_v4_") {
			shardMaps++
			if len(s.Elements) > shardSize+64 {
				t.Errorf("shard %s holds %d elements", s.Name, len(s.Elements))
			}
		}
	}
	if shardMaps < 2 {
		t.Fatalf("%d shards; the test proves nothing", shardMaps)
	}
	checked := 0
	for _, a := range d.Segments {
		want := ""
		if a.RateLimit != nil {
			want = "seg_" + a.Segment
		}
		for _, e := range destinations(a) {
			// The corners of each box: where a cut would show.
			for _, p := range []point{{e.Prefix.Addr(), e.ProtoFrom, e.PortFrom}, {lastAddr(e.Prefix), e.ProtoTo, e.PortTo}} {
				got, ok := verdictAt(rs, p)
				if !ok || got != want {
					// Overlapping segments may decide otherwise; the
					// sharded policy's segments do not overlap.
					t.Fatalf("segment %s: %+v has verdict %q (found %v), want %q", a.Segment, p, got, ok, want)
				}
				checked++
			}
		}
	}
	for _, p := range []point{{netip.MustParseAddr("10.200.40.1"), 6, 443}, {netip.MustParseAddr("0.0.0.1"), 6, 443}, {netip.MustParseAddr("255.255.255.255"), 17, 53}} {
		if v, ok := verdictAt(rs, p); ok {
			t.Errorf("%+v, in no segment, has verdict %q", p, v)
		}
	}
	t.Logf("%d shards, %d points checked", shardMaps, checked)
}

func TestRangePrefixes(t *testing.T) {
	for _, tt := range []struct{ from, to, want string }{
		{"0.0.0.0", "255.255.255.255", "[0.0.0.0/0]"},
		{"10.0.0.0", "10.0.0.255", "[10.0.0.0/24]"},
		{"10.0.0.1", "10.0.0.6", "[10.0.0.1/32 10.0.0.2/31 10.0.0.4/31 10.0.0.6/32]"},
		{"10.200.4.0", "255.255.255.255", "[10.200.4.0/22 10.200.8.0/21 10.200.16.0/20 10.200.32.0/19 10.200.64.0/18 10.200.128.0/17 10.201.0.0/16 10.202.0.0/15 10.204.0.0/14 10.208.0.0/12 10.224.0.0/11 11.0.0.0/8 12.0.0.0/6 16.0.0.0/4 32.0.0.0/3 64.0.0.0/2 128.0.0.0/1]"},
		{"::", "::ffff", "[::/112]"},
	} {
		if got := fmt.Sprint(rangePrefixes(netip.MustParseAddr(tt.from), netip.MustParseAddr(tt.to))); got != tt.want {
			t.Errorf("rangePrefixes(%s, %s) = %s, want %s", tt.from, tt.to, got, tt.want)
		}
	}
}

// Equal tells apart rulesets that differ in any field of a rule, a set or
// a chain: Apply skips a ruleset Equal to the last one, so a field it
// overlooked would never reach the kernel.
func TestEqualSeesEveryField(t *testing.T) {
	base := Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{DHCP: true, Tunnel: "bh0", ListenPort: 51820})
	clone := func() Ruleset {
		var rs Ruleset
		for _, s := range base.Sets {
			s.Elements = slices.Clone(s.Elements)
			rs.Sets = append(rs.Sets, s)
		}
		for _, c := range base.Chains {
			c.Rules = slices.Clone(c.Rules)
			rs.Chains = append(rs.Chains, c)
		}
		return rs
	}
	if !base.Equal(clone()) {
		t.Fatal("a ruleset differs from its copy")
	}
	// Every field of a rule, one at a time, set to a value no rule has.
	rt := reflect.TypeFor[Rule]()
	for i := range rt.NumField() {
		rs := clone()
		f := reflect.ValueOf(&rs.Chains[0].Rules[1]).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("changed")
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.Int, reflect.Uint16, reflect.Uint32:
			if f.CanInt() {
				f.SetInt(f.Int() + 7)
			} else {
				f.SetUint(f.Uint() + 7)
			}
		case reflect.Pointer:
			if f.IsNil() {
				f.Set(reflect.New(f.Type().Elem()))
			} else {
				v := reflect.New(f.Type().Elem())
				v.Elem().Set(f.Elem())
				v.Elem().Field(0).SetString("changed")
				f.Set(v)
			}
		default:
			t.Fatalf("rule field %s of kind %s: the test does not know how to change it", rt.Field(i).Name, f.Kind())
		}
		if base.Equal(rs) {
			t.Errorf("a ruleset with rule field %s changed is Equal to the original", rt.Field(i).Name)
		}
	}
	rs := clone()
	rs.Sets[0].Elements[0].PortTo--
	if base.Equal(rs) {
		t.Error("an element's port changed and the rulesets are Equal")
	}
	rs = clone()
	rs.Chains[3].Hook = "input"
	if base.Equal(rs) {
		t.Error("a chain's hook changed and the rulesets are Equal")
	}
}
