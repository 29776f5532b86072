package nft

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/admit"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

var gatewayNow = time.Date(2026, 11, 24, 16, 0, 0, 0, time.UTC) // in the scanners' day shift

// gatewayInput is a wms and diagnostics gateway's decision input with n
// devices of three classes, the first scanner quarantined.
func gatewayInput(t testing.TB, n int) admit.Input {
	t.Helper()
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	classes := []string{"scanner", "dock-gateway", "telematics"}
	in := admit.Input{Bundle: &bundle.Payload{Version: 1, IssuedAt: gatewayNow, ExpiresAt: gatewayNow.Add(time.Hour), Policy: *doc},
		Segments: []string{"wms", "diagnostics"}, Now: gatewayNow, LastContact: gatewayNow}
	for i := range n {
		var k policy.Key
		k[0], k[1], k[2] = byte(i), byte(i>>8), 1
		in.Roster = append(in.Roster, admit.Member{ID: fmt.Sprintf("dev-%05d", i), Class: classes[i%3], Key: k,
			Address: netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})})
	}
	in.Orders = []command.Verified{{Command: command.Command{ID: "q-dev-00000", Kind: command.Quarantine,
		Target: command.Target{Devices: []string{"dev-00000"}}, Reason: "test", IssuedAt: gatewayNow, ExpiresAt: gatewayNow.Add(time.Minute)}}}
	return in
}

func gatewayRuleset(t testing.TB, n int) Ruleset { return gatewayRulesetWith(t, n, 0) }

// gatewayRulesetWith is gatewayRuleset with extra more /32 destinations
// (two ports each) in wms, all open to dock gateways.
func gatewayRulesetWith(t testing.TB, n, extra int) Ruleset {
	in := gatewayInput(t, n)
	if extra > 0 {
		doc := &in.Bundle.Policy
		seg, _ := doc.Segment("wms")
		for i := range extra {
			seg.Destinations = append(seg.Destinations, policy.Destination{CIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 20, byte(2 + i/250), byte(i%250 + 1)}), 32),
				Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}, {First: 8000, Last: 8099}}})
		}
		if err := doc.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	d := admit.Decide(in)
	self := localpolicy.Evaluate(localpolicy.Input{Bundle: in.Bundle, Device: bundle.Device{ID: "gw-wms", Class: "segment-gateway"}, Now: in.Now,
		Control: []policy.Endpoint{{Address: netip.MustParseAddr("10.10.0.2"), Port: 8443}}})
	return Build(self, Options{Tunnel: "wg-gw", ListenPort: 51820, Gateway: &d})
}

func setOf(rs Ruleset, name string) (Set, bool) {
	i := slices.IndexFunc(rs.Sets, func(s Set) bool { return s.Name == name })
	if i < 0 {
		return Set{}, false
	}
	return rs.Sets[i], true
}

// The per-packet cost of a gateway does not grow with the fleet: a
// thousand devices give the same chains and rules as ten, only the two
// maps keyed by device address are longer, and each admitted device is
// in both.
func TestGatewayRulesDoNotGrowWithTheFleet(t *testing.T) {
	small, large := gatewayRuleset(t, 10), gatewayRuleset(t, 1000)
	if !slices.EqualFunc(small.Chains, large.Chains, func(a, b Chain) bool { return a.Name == b.Name && slices.EqualFunc(a.Rules, b.Rules, Rule.equal) }) {
		t.Fatalf("chains differ between 10 and 1,000 devices:\n%s\n%s", small.Text(), large.Text())
	}
	// Every class reaches wms or diagnostics; dev-00000 is quarantined.
	for _, name := range []string{"gw_src_v4", "gw_dst_v4"} {
		if s, ok := setOf(large, name); !ok || len(s.Elements) != 999 {
			t.Errorf("%s has %d elements, want 999", name, len(s.Elements))
		}
	}
}

// A device that is not admitted is in neither map, so every packet it
// sends or is sent through the tunnel falls to the tunnel's drop; an
// admitted one jumps to its group's chains.
func TestGatewayMapsHoldOnlyAdmittedDevices(t *testing.T) {
	rs := gatewayRuleset(t, 30)
	src, _ := setOf(rs, "gw_src_v4")
	quarantined := netip.MustParsePrefix("100.64.0.0/32")
	for _, e := range src.Elements {
		if e.Prefix == quarantined {
			t.Fatalf("the quarantined device is in gw_src_v4: %+v", e)
		}
		if e.Prefix.Bits() != 32 || e.ProtoFrom != 0 || e.ProtoTo != 255 || !strings.HasSuffix(e.Chain, "_from") {
			t.Errorf("element %+v: want a /32 over every protocol and port, jumping to a group's _from chain", e)
		}
	}
	text := rs.Text()
	for _, want := range []string{
		`ip saddr . meta l4proto . th sport @gw_wireguard_v4`,
		`iifname "wg-gw" ip saddr vmap @gw_src_v4`,
		`oifname "wg-gw" ip daddr vmap @gw_dst_v4`,
		`iifname "wg-gw" counter drop comment "from no admitted device"`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("table lacks %q:\n%s", want, text)
		}
	}
}

// The same decision in another order gives the same table.
func TestGatewayBuildIgnoresRosterOrder(t *testing.T) {
	in := gatewayInput(t, 200)
	self := localpolicy.Desired{Mode: localpolicy.Normal}
	d := admit.Decide(in)
	want := Build(self, Options{Tunnel: "wg-gw", ListenPort: 51820, Gateway: &d})
	r := rand.New(rand.NewPCG(3, 4))
	for range 3 {
		r.Shuffle(len(in.Roster), func(i, j int) { in.Roster[i], in.Roster[j] = in.Roster[j], in.Roster[i] })
		d := admit.Decide(in)
		if got := Build(self, Options{Tunnel: "wg-gw", ListenPort: 51820, Gateway: &d}); !got.Equal(want) {
			t.Fatal("a shuffled roster builds another table")
		}
	}
}

// A group with more destinations than one set should hold is cut into
// shards by address, behind two dispatch maps, as a device's segments
// are: the from and to chains each look up a dispatch map, and every
// shard holds at most about shardSize elements.
func TestLargeGroupSetsAreSharded(t *testing.T) {
	rs := gatewayRulesetWith(t, 30, 3000)
	dock := slices.IndexFunc(rs.Chains, func(c Chain) bool {
		return strings.HasPrefix(c.Name, "gw_") && strings.HasSuffix(c.Name, "_from") && strings.Contains(c.Rules[0].Comment, "dock-gateway")
	})
	if dock < 0 {
		t.Fatalf("no dock-gateway group chain:\n%s", rs.Text())
	}
	from := rs.Chains[dock]
	if l := from.Rules[0].Lookup; l == nil || !l.Map || !strings.HasSuffix(l.Set, "_out_v4") {
		t.Fatalf("the dock gateways' from chain looks up %+v, want a dispatch map", from.Rules[0].Lookup)
	}
	shards, total := 0, 0
	prefix := strings.TrimSuffix(from.Name, "_from") + "_v4_"
	for _, set := range rs.Sets {
		if strings.HasPrefix(set.Name, prefix) {
			shards++
			total += len(set.Elements)
			if len(set.Elements) > 2*shardSize {
				t.Errorf("shard %s holds %d elements", set.Name, len(set.Elements))
			}
		}
	}
	if shards < 2 || total < 6000 {
		t.Errorf("%d shards holding %d elements; want the 6,000 boxes cut into several", shards, total)
	}
}

// An inbound rule (ssh to the dock gateways from the diagnostics desk)
// is enforced at both ends: the dock's table accepts exactly those
// sources on that port through the tunnel and answers only them, and
// the diagnostics gateway's group chain lets exactly that into the
// tunnel toward the docks, and only replies back. A class without it
// gets neither.
func TestInboundIsEnforcedAtBothEnds(t *testing.T) {
	in := gatewayInput(t, 30)
	doc := &in.Bundle.Policy
	c := doc.Classes["dock-gateway"]
	c.Inbound = []policy.Rule{{Segment: "diagnostics", Hosts: []netip.Prefix{netip.MustParsePrefix("10.50.0.8/29")},
		Protocol: policy.TCP, Ports: []policy.PortRange{{First: 22, Last: 22}}}}
	doc.Classes["dock-gateway"] = c
	if err := doc.Validate(); err != nil {
		t.Fatal(err)
	}
	dock := localpolicy.Evaluate(localpolicy.Input{Bundle: in.Bundle, Device: bundle.Device{ID: "dock-1", Class: "dock-gateway"}, Now: in.Now})
	text := Build(dock, Options{Tunnel: "bh0", ListenPort: 51820}).Text()
	for _, want := range []string{
		`iifname "bh0" ip saddr . meta l4proto . th dport @inbound_v4 accept comment "inbound"`,
		`oifname "bh0" ct state established,related ip daddr . meta l4proto . th sport @inbound_v4 accept comment "inbound replies"`,
		"10.50.0.8/29 . 6 . 22",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the dock's table lacks %q:\n%s", want, text)
		}
	}
	scanner := localpolicy.Evaluate(localpolicy.Input{Bundle: in.Bundle, Device: bundle.Device{ID: "s-1", Class: "scanner"}, Now: in.Now})
	if text := Build(scanner, Options{Tunnel: "bh0", ListenPort: 51820}).Text(); strings.Contains(text, "@inbound_") {
		t.Errorf("a scanner's table accepts inbound:\n%s", text)
	}

	in.Segments = []string{"diagnostics"}
	d := admit.Decide(in)
	gw := Build(localpolicy.Desired{Mode: localpolicy.Normal}, Options{Tunnel: "wg-gw", ListenPort: 51820, Gateway: &d})
	var dockGroup int = -1
	for i, g := range d.Groups {
		if g.Class == "dock-gateway" {
			dockGroup = i
		}
	}
	if dockGroup < 0 {
		t.Fatalf("no dock group: %+v", d.Groups)
	}
	name := fmt.Sprintf("gw_%d", dockGroup)
	gtext := gw.Text()
	for _, want := range []string{
		`ip saddr . meta l4proto . th dport @` + name + `_inbound_v4 accept comment "dock-gateway normal inbound"`,
		`ct state established,related ip daddr . meta l4proto . th sport @` + name + `_inbound_v4 accept comment "dock-gateway normal inbound replies"`,
	} {
		if !strings.Contains(gtext, want) {
			t.Errorf("the gateway's table lacks %q:\n%s", want, gtext)
		}
	}
	if strings.Count(gtext, "_inbound_v4 accept") != 2 {
		t.Errorf("inbound rules for more than the docks' group:\n%s", gtext)
	}
}
