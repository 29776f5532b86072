package admit

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Tuesday 2026-11-24 10:00 in Chicago (16:00 UTC): inside the day shift.
var dayShift = time.Date(2026, 11, 24, 16, 0, 0, 0, time.UTC)

func site(t *testing.T) *bundle.Payload {
	t.Helper()
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	return &bundle.Payload{Version: 4, IssuedAt: dayShift.Add(-24 * time.Hour), ExpiresAt: dayShift.Add(30 * 24 * time.Hour),
		Target: bundle.Target{Classes: []string{"dock-gateway", "scanner", "telematics"}}, Policy: *doc}
}

func member(n int, class string) Member {
	var k policy.Key
	k[0], k[1] = byte(n), byte(n>>8)
	return Member{ID: fmt.Sprintf("dev-%04d", n), Class: class, Key: k, Address: netip.AddrFrom4([4]byte{100, 64, byte(n >> 8), byte(n)})}
}

func order(id string, kind command.Kind, target command.Target, partner string, at time.Time, byOps bool) command.Verified {
	return command.Verified{ByOps: byOps, Command: command.Command{ID: id, Kind: kind, Target: target, Partner: partner,
		Reason: "test", IssuedAt: at, ExpiresAt: at.Add(15 * time.Minute)}}
}

func admitted(d Desired) []string {
	var ids []string
	for _, v := range d.Verdicts {
		if v.Admitted {
			ids = append(ids, v.ID)
		}
	}
	return ids
}

func verdict(t *testing.T, d Desired, id string) Verdict {
	t.Helper()
	for _, v := range d.Verdicts {
		if v.ID == id {
			return v
		}
	}
	t.Fatalf("no verdict for %s in %+v", id, d.Verdicts)
	return Verdict{}
}

// The wms gateway admits the classes the policy opens wms to, grouped by
// situation, and only them; each admitted device is a peer routed its own
// address alone.
func TestGatewayAdmitsTheClassesThePolicyOpens(t *testing.T) {
	roster := []Member{member(1, "scanner"), member(2, "scanner"), member(3, "dock-gateway"), member(4, "telematics"), member(5, "unknown-class")}
	d := Decide(Input{Bundle: site(t), Segments: []string{"wms"}, Roster: roster, Now: dayShift, LastContact: dayShift})
	if got, want := admitted(d), []string{"dev-0001", "dev-0002", "dev-0003"}; !slices.Equal(got, want) {
		t.Fatalf("admitted %v, want %v", got, want)
	}
	if len(d.Groups) != 2 {
		t.Fatalf("groups %+v, want two (dock-gateway, scanner)", d.Groups)
	}
	scanners := d.Groups[verdict(t, d, "dev-0001").Group]
	if scanners.Class != "scanner" || !slices.Equal(scanners.Sources, []netip.Addr{roster[0].Address, roster[1].Address}) {
		t.Errorf("scanner group %+v", scanners)
	}
	// A scanner's rule narrows wms to port 443; the dock gateway's opens
	// the segment whole.
	if got := scanners.Segments[0].Destinations; len(got) != 2 || !slices.Equal(got[0].Ports, []policy.PortRange{{First: 443, Last: 443}}) {
		t.Errorf("scanner destinations %+v, want wms narrowed to 443", got)
	}
	if why := verdict(t, d, "dev-0004").Reason; !strings.Contains(why, "no rule of class telematics opens it") {
		t.Errorf("telematics refused because %q", why)
	}
	if why := verdict(t, d, "dev-0005").Reason; !strings.Contains(why, "class unknown-class has no entry") {
		t.Errorf("unknown class refused because %q", why)
	}
	for _, p := range d.Peers {
		if len(p.AllowedIPs) != 1 || p.AllowedIPs[0].Bits() != 32 || p.Endpoint != "" {
			t.Errorf("peer %+v: want exactly its own /32 and no endpoint", p)
		}
	}
}

// A class that reaches nothing through the gateway but accepts a
// connection from its segment is admitted for that alone, and its group
// carries only the inbound access; what it may reach stays nothing.
func TestInboundAloneAdmits(t *testing.T) {
	b := site(t)
	c := b.Policy.Classes["telematics"]
	c.Inbound = []policy.Rule{{Segment: "wms", Hosts: []netip.Prefix{netip.MustParsePrefix("10.20.1.0/28")}, Protocol: policy.TCP,
		Ports: []policy.PortRange{{First: 22, Last: 22}}}}
	b.Policy.Classes["telematics"] = c
	if err := b.Policy.Validate(); err != nil {
		t.Fatal(err)
	}
	d := Decide(Input{Bundle: b, Segments: []string{"wms"}, Roster: []Member{member(4, "telematics")}, Now: dayShift, LastContact: dayShift})
	v := verdict(t, d, "dev-0004")
	if !v.Admitted || !strings.Contains(v.Reason, "accepts from wms") {
		t.Fatalf("verdict %+v, want admitted for wms's inbound", v)
	}
	g := d.Groups[v.Group]
	if len(g.Segments) != 0 || len(g.Inbound) != 1 || g.Inbound[0].Segment != "wms" {
		t.Errorf("group %+v, want the wms inbound access alone", g)
	}
	q := Decide(Input{Bundle: b, Segments: []string{"wms"}, Roster: []Member{member(4, "telematics")}, Now: dayShift, LastContact: dayShift,
		Orders: []command.Verified{order("q", command.Quarantine, command.Target{Devices: []string{"dev-0004"}}, "", dayShift.Add(-time.Minute), false)}})
	if v := verdict(t, q, "dev-0004"); v.Admitted {
		t.Errorf("a quarantined device is admitted for its inbound rule: %+v", v)
	}
}

// The kill-switch at the gateway: each order cuts what it names, whoever
// runs the device; the control key only tightens; lifting takes the ops
// keys, and an old lift replayed cannot undo a later order.
func TestOrdersCutAtTheGateway(t *testing.T) {
	b := site(t)
	truck, dock := member(7, "telematics"), member(8, "dock-gateway")
	roster := []Member{truck, dock}
	edi := []string{"carrier-edi"}
	at := dayShift.Add(-time.Hour)
	quarantine := order("q-truck-0001", command.Quarantine, command.Target{Devices: []string{truck.ID}}, "", at, false)
	releaseByControl := order("r-truck-0001", command.Release, command.Target{Devices: []string{truck.ID}}, "", at.Add(time.Minute), false)
	releaseByOps := order("r-truck-0002", command.Release, command.Target{Devices: []string{truck.ID}}, "", at.Add(2*time.Minute), true)
	oldRelease := order("r-truck-0000", command.Release, command.Target{Devices: []string{truck.ID}}, "", at.Add(-time.Hour), true)
	revoke := order("p-north-0001", command.RevokePartner, command.Target{All: true}, "northline-freight", at, false)
	reinstate := order("p-north-0002", command.ReinstatePartner, command.Target{All: true}, "northline-freight", at.Add(time.Minute), true)

	for _, tc := range []struct {
		name   string
		orders []command.Verified
		want   []string
	}{
		{"no orders", nil, []string{truck.ID, dock.ID}},
		{"quarantine", []command.Verified{quarantine}, []string{dock.ID}},
		{"a release signed by control only is refused", []command.Verified{quarantine, releaseByControl}, []string{dock.ID}},
		{"a release signed by ops lifts", []command.Verified{quarantine, releaseByOps}, []string{truck.ID, dock.ID}},
		{"an old release replayed lifts nothing", []command.Verified{quarantine, oldRelease}, []string{dock.ID}},
		{"partner revocation", []command.Verified{revoke}, nil},
		{"reinstatement by ops", []command.Verified{revoke, reinstate}, []string{truck.ID, dock.ID}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := Decide(Input{Bundle: b, Segments: edi, Roster: roster, Orders: tc.orders, Now: dayShift, LastContact: dayShift})
			want := slices.Sorted(slices.Values(tc.want))
			if got := admitted(d); !slices.Equal(got, want) {
				t.Fatalf("admitted %v, want %v; verdicts %+v", got, want, d.Verdicts)
			}
		})
	}
	// Diagnostic mode keeps the diagnostics segment only.
	diag := order("d-truck-0001", command.Diagnostic, command.Target{Devices: []string{truck.ID}}, "", at, false)
	d := Decide(Input{Bundle: b, Segments: []string{"diagnostics", "carrier-edi"}, Roster: roster, Orders: []command.Verified{diag}, Now: dayShift, LastContact: dayShift})
	g := d.Groups[verdict(t, d, truck.ID).Group]
	if g.Mode != localpolicy.Diagnostic || len(g.Segments) != 1 || g.Segments[0].Segment != "diagnostics" {
		t.Errorf("diagnostic truck's group %+v, want diagnostics alone", g)
	}
}

// Schedules are judged at the gateway with the same evaluator: a scanner
// between shifts is not admitted to wms, and the decision says when that
// changes.
func TestScheduleEdgeAtTheGateway(t *testing.T) {
	b := site(t)
	roster := []Member{member(1, "scanner")}
	afternoon := time.Date(2026, 11, 24, 21, 0, 0, 0, time.UTC) // 15:00 Chicago
	d := Decide(Input{Bundle: b, Segments: []string{"wms"}, Roster: roster, Now: afternoon, LastContact: afternoon})
	if len(admitted(d)) != 0 {
		t.Fatalf("scanner admitted between shifts: %+v", d.Verdicts)
	}
	if want := time.Date(2026, 11, 25, 4, 0, 0, 0, time.UTC); !d.NextChange.Equal(want) { // 22:00 Chicago
		t.Errorf("next change %v, want %v", d.NextChange, want)
	}
	d = Decide(Input{Bundle: b, Segments: []string{"wms"}, Roster: roster, Now: dayShift, LastContact: dayShift})
	if len(admitted(d)) != 1 {
		t.Fatalf("scanner not admitted in its shift: %+v", d.Verdicts)
	}
}

// A gateway past max_offline applies each class's offline profile, as
// the devices do: the policy defines what stays open.
func TestOfflineGatewayFallsBackToOfflineProfiles(t *testing.T) {
	b := site(t)
	roster := []Member{member(3, "dock-gateway")}
	later := dayShift.Add(7 * 24 * time.Hour) // a Tuesday again, a week without contact
	for seg, want := range map[string]int{"wms": 1, "finance": 0} {
		d := Decide(Input{Bundle: b, Segments: []string{seg}, Roster: roster, Now: later, LastContact: dayShift})
		if got := len(admitted(d)); got != want {
			t.Errorf("%s: %d admitted offline, want %d (%+v)", seg, got, want, d.Verdicts)
		}
	}
}

// Two members bound to one key or one address: neither is admitted.
func TestConflictingBindingsAdmitNeither(t *testing.T) {
	a, b, c := member(1, "scanner"), member(2, "scanner"), member(3, "scanner")
	b.Key = a.Key
	c.Address = netip.Addr{}
	d := Decide(Input{Bundle: site(t), Segments: []string{"wms"}, Roster: []Member{a, b, c}, Now: dayShift, LastContact: dayShift})
	if got := admitted(d); len(got) != 0 {
		t.Fatalf("admitted %v", got)
	}
	if why := verdict(t, d, a.ID).Reason; !strings.Contains(why, "also bound to "+b.ID) {
		t.Errorf("reason %q", why)
	}
}

var addrs = cmp.Options{cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })}

// No policy: nobody is admitted.
func TestNoPolicyAdmitsNobody(t *testing.T) {
	d := Decide(Input{Segments: []string{"wms"}, Roster: []Member{member(1, "dock-gateway")}, Now: dayShift})
	if len(d.Peers) != 0 || len(d.Groups) != 0 || !strings.HasPrefix(d.Verdicts[0].Reason, "lockdown") {
		t.Fatalf("%+v", d)
	}
}

// The result does not depend on the roster's order, and devices in the
// same situation share one group whatever their number.
func TestDecideIgnoresRosterOrder(t *testing.T) {
	b := site(t)
	classes := []string{"scanner", "dock-gateway", "telematics"}
	var roster []Member
	for i := range 300 {
		roster = append(roster, member(i+1, classes[i%3]))
	}
	q := order("q-some-00001", command.Quarantine, command.Target{Devices: []string{"dev-0004", "dev-0100"}}, "", dayShift.Add(-time.Hour), false)
	in := Input{Bundle: b, Segments: []string{"wms", "diagnostics"}, Roster: roster, Orders: []command.Verified{q}, Now: dayShift, LastContact: dayShift}
	want := Decide(in)
	if len(want.Groups) != 3 { // scanner, dock-gateway, telematics (diagnostics); the quarantined have none open
		var names []string
		for _, g := range want.Groups {
			names = append(names, g.Name)
		}
		t.Errorf("groups %v", names)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 5 {
		r.Shuffle(len(in.Roster), func(i, j int) { in.Roster[i], in.Roster[j] = in.Roster[j], in.Roster[i] })
		if diff := cmp.Diff(want, Decide(in), addrs); diff != "" {
			t.Fatalf("shuffled roster decides differently (-want +got):\n%s", diff)
		}
	}
}
