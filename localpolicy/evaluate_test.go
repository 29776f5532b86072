package localpolicy

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Tuesday 2026-11-24 10:00 in Chicago (16:00 UTC): inside the day shift.
var dayShift = time.Date(2026, 11, 24, 16, 0, 0, 0, time.UTC)

func example(t *testing.T) *bundle.Payload {
	t.Helper()
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	return &bundle.Payload{
		Version:   4,
		IssuedAt:  dayShift.Add(-24 * time.Hour),
		ExpiresAt: dayShift.Add(30 * 24 * time.Hour),
		Target:    bundle.Target{Classes: []string{"dock-gateway", "scanner", "telematics"}},
		Policy:    *doc,
	}
}

func openSegments(d Desired) []string {
	var names []string
	for _, a := range d.Segments {
		names = append(names, a.Segment)
	}
	return names
}

var floor = []FloorRule{{Name: "can-gateway", Destination: policy.Destination{
	CIDR: netip.MustParsePrefix("192.168.50.0/29"), Protocol: policy.Any}}}

func TestEvaluateModes(t *testing.T) {
	b := example(t)
	tests := []struct {
		name     string
		in       Input
		wantMode Mode
		wantOpen []string
		wantWhy  string // substring of the first reason
	}{
		{
			name:     "dock gateway normal",
			in:       Input{Device: bundle.Device{Class: "dock-gateway"}},
			wantMode: Normal,
			wantOpen: []string{"broker-portal", "carrier-edi", "diagnostics", "dock-scheduling", "finance", "wms"},
		},
		{
			name:     "scanner in its shift never reaches finance",
			in:       Input{Device: bundle.Device{Class: "scanner"}},
			wantMode: Normal,
			wantOpen: []string{"diagnostics", "wms"},
		},
		{
			name:     "scanner between shifts",
			in:       Input{Device: bundle.Device{Class: "scanner"}, Now: time.Date(2026, 11, 24, 21, 0, 0, 0, time.UTC)}, // 15:00 Chicago
			wantMode: Normal,
			wantOpen: []string{"diagnostics"},
		},
		{
			name: "failing check restricts",
			in: Input{Device: bundle.Device{Class: "dock-gateway"}, Checks: []Check{
				{ID: "edr-running", Failing: true, Profile: Restricted, Observed: "absent", Expected: "running"},
				{ID: "disk-free", Failing: false, Profile: Quarantine},
			}},
			wantMode: Restricted,
			wantOpen: []string{"dock-scheduling", "wms"},
			wantWhy:  "check edr-running failed: observed absent, expected running",
		},
		{
			name:     "expired bundle falls to offline profile",
			in:       Input{Device: bundle.Device{Class: "telematics"}, Now: b.ExpiresAt},
			wantMode: Offline,
			wantOpen: []string{"telemetry"},
			wantWhy:  "expired",
		},
		{
			name:     "no contact past max_offline",
			in:       Input{Device: bundle.Device{Class: "dock-gateway"}, Now: b.IssuedAt.Add(72 * time.Hour)},
			wantMode: Offline,
			wantOpen: []string{"dock-scheduling", "wms"},
			wantWhy:  "no contact with control since",
		},
		{
			name:     "recent contact keeps normal",
			in:       Input{Device: bundle.Device{Class: "dock-gateway"}, Now: b.IssuedAt.Add(72 * time.Hour), LastContact: b.IssuedAt.Add(71 * time.Hour)},
			wantMode: Normal,
			wantOpen: []string{"broker-portal", "carrier-edi", "diagnostics", "dock-scheduling", "finance", "wms"},
		},
		{
			name:     "diagnostic",
			in:       Input{Device: bundle.Device{Class: "telematics"}, Sticky: Sticky{Mode: Diagnostic, Reason: "INC-7"}},
			wantMode: Diagnostic,
			wantOpen: []string{"diagnostics"},
			wantWhy:  "ordered by security operations: INC-7",
		},
		{
			name:     "quarantine beats everything but lockdown",
			in:       Input{Device: bundle.Device{Class: "dock-gateway"}, Sticky: Sticky{Mode: Quarantine}, Checks: []Check{{ID: "x", Failing: true, Profile: Restricted}}},
			wantMode: Quarantine,
			wantOpen: nil,
		},
		{
			name:     "revoked partner is cut in normal mode",
			in:       Input{Device: bundle.Device{Class: "dock-gateway"}, Sticky: Sticky{RevokedPartners: map[string]string{"spotload-brokers": "breach"}}},
			wantMode: Normal,
			wantOpen: []string{"carrier-edi", "diagnostics", "dock-scheduling", "finance", "wms"},
		},
		{
			name:     "class missing from policy",
			in:       Input{Device: bundle.Device{ID: "dev-1", Class: "forklift"}},
			wantMode: Normal,
			wantOpen: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := tt.in
			in.Bundle = b
			if in.Now.IsZero() {
				in.Now = dayShift
			}
			in.Floor = floor
			d := Evaluate(in)
			if d.Mode != tt.wantMode {
				t.Errorf("mode = %v, want %v (why %q)", d.Mode, tt.wantMode, d.Why)
			}
			if diff := cmp.Diff(tt.wantOpen, openSegments(d), netipEq); diff != "" {
				t.Errorf("open segments (-want +got):\n%s", diff)
			}
			if tt.wantWhy != "" && (len(d.Why) == 0 || !strings.Contains(d.Why[0], tt.wantWhy)) {
				t.Errorf("why = %q, want first reason to mention %q", d.Why, tt.wantWhy)
			}
			if diff := cmp.Diff(floor, d.Floor, netipEq); diff != "" {
				t.Errorf("safety floor changed (-want +got):\n%s", diff)
			}
			if len(d.Control) != 2 {
				t.Errorf("control endpoints = %v, want the policy's two", d.Control)
			}
			if got, want := len(d.Decisions), len(b.Policy.Segments); got != want {
				t.Errorf("%d decisions, want one per segment (%d)", got, want)
			}
			for _, dec := range d.Decisions {
				if dec.Reason == "" {
					t.Errorf("decision for %s has no reason", dec.Segment)
				}
				if dec.Allowed != slices.Contains(tt.wantOpen, dec.Segment) {
					t.Errorf("decision for %s: allowed=%v disagrees with open segments", dec.Segment, dec.Allowed)
				}
			}
		})
	}
}

func TestLockdownWithoutPolicy(t *testing.T) {
	ctl := []policy.Endpoint{{Address: netip.MustParseAddr("10.99.0.1"), Port: 8443}}
	d := Evaluate(Input{NoPolicy: "cached bundle failed verification: signature does not verify", Floor: floor, Control: ctl, Now: dayShift})
	if d.Mode != Lockdown {
		t.Fatalf("mode = %v, want lockdown", d.Mode)
	}
	if len(d.Segments) != 0 || len(d.Peers) != 0 {
		t.Errorf("lockdown opens %v / peers %v", d.Segments, d.Peers)
	}
	if diff := cmp.Diff(floor, d.Floor, netipEq); diff != "" {
		t.Errorf("floor (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(ctl, d.Control, netipEq); diff != "" {
		t.Errorf("control (-want +got):\n%s", diff)
	}
	if !strings.Contains(d.Why[0], "signature does not verify") {
		t.Errorf("why = %q", d.Why)
	}
}

func TestRulePortsNarrowDestinations(t *testing.T) {
	d := Evaluate(Input{Bundle: example(t), Device: bundle.Device{Class: "scanner"}, Now: dayShift})
	for _, a := range d.Segments {
		if a.Segment != "wms" {
			continue
		}
		want := []policy.Destination{
			{CIDR: netip.MustParsePrefix("10.20.1.0/24"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}}},
			{CIDR: netip.MustParsePrefix("fd00:20:1::/64"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}}},
		}
		if diff := cmp.Diff(want, a.Destinations, netipEq); diff != "" {
			t.Errorf("wms destinations for a scanner (-want +got):\n%s", diff)
		}
		return
	}
	t.Fatal("wms not open for a scanner in its shift")
}

func TestPeersFollowOpenSegments(t *testing.T) {
	b := example(t)
	d := Evaluate(Input{Bundle: b, Device: bundle.Device{Class: "dock-gateway"}, Now: dayShift, Checks: []Check{{ID: "c", Failing: true, Profile: Restricted}}})
	if len(d.Peers) != 1 {
		t.Fatalf("peers = %+v, want the one gateway of wms and dock-scheduling", d.Peers)
	}
	p := d.Peers[0]
	if diff := cmp.Diff([]string{"dock-scheduling", "wms"}, p.Segments, netipEq); diff != "" {
		t.Errorf("peer segments (-want +got):\n%s", diff)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.20.1.0/24"), netip.MustParsePrefix("10.20.2.0/24"), netip.MustParsePrefix("fd00:20:1::/64")}
	if diff := cmp.Diff(want, p.AllowedIPs, netipEq); diff != "" {
		t.Errorf("allowed IPs (-want +got):\n%s", diff)
	}
}

func TestEvaluateIsDeterministic(t *testing.T) {
	in := Input{Bundle: example(t), Device: bundle.Device{Class: "dock-gateway"}, Now: dayShift}
	first := Evaluate(in)
	for range 50 {
		if diff := cmp.Diff(first, Evaluate(in), netipEq); diff != "" {
			t.Fatalf("second evaluation differs:\n%s", diff)
		}
	}
}

// The scanner's shift rules decide both the access and the instant of the
// next change, so the agent wakes exactly then.
func TestNextChangeIsTheShiftEdge(t *testing.T) {
	d := Evaluate(Input{Bundle: example(t), Device: bundle.Device{Class: "scanner"}, Now: dayShift})
	want := time.Date(2026, 11, 24, 20, 0, 0, 0, time.UTC) // 14:00 CST
	if !d.NextChange.Equal(want) {
		t.Errorf("NextChange = %v, want %v", d.NextChange, want)
	}
	after := Evaluate(Input{Bundle: example(t), Device: bundle.Device{Class: "scanner"}, Now: want})
	if slices.Contains(openSegments(after), "wms") {
		t.Errorf("wms still open at the end of the shift")
	}
}

var netipEq = cmp.Options{
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
}

// A partner tier's cap limits each of its segments: the tier's or the
// segment's own, whichever refills slower; internal segments are not
// touched.
func TestTierLimits(t *testing.T) {
	limitOf := func(b *bundle.Payload, seg string) *policy.RateLimit {
		t.Helper()
		d := Evaluate(Input{Bundle: b, Device: bundle.Device{Class: "dock-gateway"}, Now: dayShift})
		for _, a := range d.Segments {
			if a.Segment == seg {
				return a.RateLimit
			}
		}
		t.Fatalf("%s is not open for a dock gateway: %v", seg, openSegments(d))
		return nil
	}
	b := example(t)
	own := policy.RateLimit{BytesPerSecond: 125000, BurstBytes: 250000}
	if l := limitOf(b, "broker-portal"); l == nil || *l != own {
		t.Errorf("a tier cap looser than the segment's own replaced it: %+v", l)
	}
	b.Policy.TierLimits[3] = policy.RateLimit{BytesPerSecond: 100000, BurstBytes: 100000}
	if l := limitOf(b, "broker-portal"); l == nil || l.BytesPerSecond != 100000 {
		t.Errorf("a stricter tier cap did not apply: %+v", l)
	}
	for i, s := range b.Policy.Segments {
		if s.Name == "broker-portal" {
			b.Policy.Segments[i].RateLimit = nil
		}
	}
	if l := limitOf(b, "broker-portal"); l == nil || l.BytesPerSecond != 100000 {
		t.Errorf("a tier-3 segment without a limit of its own is uncapped: %+v", l)
	}
	if l := limitOf(b, "wms"); l != nil {
		t.Errorf("an internal segment took a partner tier's cap: %+v", l)
	}
}

// A rule's hosts and protocol cut the segment's destinations; an "any"
// destination narrowed to tcp keeps every tcp port of its hosts.
func TestRuleHostsAndProtocolNarrow(t *testing.T) {
	b := example(t)
	c := b.Policy.Classes["scanner"]
	c.Rules = []policy.Rule{
		{Segment: "wms", Hosts: []netip.Prefix{netip.MustParsePrefix("10.20.1.7/32")}, Ports: []policy.PortRange{{First: 8080, Last: 8080}}},
		{Segment: "diagnostics", Hosts: []netip.Prefix{netip.MustParsePrefix("10.50.0.4/31")}, Protocol: policy.ICMP},
	}
	b.Policy.Classes["scanner"] = c
	if err := b.Policy.Validate(); err != nil {
		t.Fatal(err)
	}
	d := Evaluate(Input{Bundle: b, Device: bundle.Device{Class: "scanner"}, Now: dayShift})
	got := map[string][]policy.Destination{}
	for _, a := range d.Segments {
		got[a.Segment] = a.Destinations
	}
	want := map[string][]policy.Destination{
		"wms":         {{CIDR: netip.MustParsePrefix("10.20.1.7/32"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 8080, Last: 8080}}}},
		"diagnostics": {{CIDR: netip.MustParsePrefix("10.50.0.4/31"), Protocol: policy.ICMP}},
	}
	if diff := cmp.Diff(want, got, netipEq); diff != "" {
		t.Errorf("open destinations (-want +got):\n%s", diff)
	}
}

// Monitoring routes and passes a segment no rule opens, only in normal
// mode, only until its end (which is the next change), only for the
// devices it names, and never for a revoked partner.
func TestMonitor(t *testing.T) {
	b := example(t)
	until := dayShift.Add(time.Hour)
	c := b.Policy.Classes["scanner"]
	c.Monitor = &policy.Monitor{Until: until, Segments: []string{"finance", "carrier-edi"}}
	b.Policy.Classes["scanner"] = c
	scanner := bundle.Device{ID: "scanner-17", Class: "scanner"}
	d := Evaluate(Input{Bundle: b, Device: scanner, Now: dayShift})
	if d.Mode != Normal || d.Monitor == nil || !d.Monitor.Until.Equal(until) {
		t.Fatalf("mode %s, monitor %+v; want normal, monitoring until %s", d.Mode, d.Monitor, until)
	}
	var monitored []string
	for _, a := range d.Monitor.Segments {
		monitored = append(monitored, a.Segment)
		if a.Segment == "finance" && len(a.Destinations) != 1 {
			t.Errorf("finance monitored with %v, want its one declared destination", a.Destinations)
		}
	}
	if diff := cmp.Diff([]string{"carrier-edi", "finance"}, monitored); diff != "" {
		t.Errorf("monitored segments (-want +got):\n%s", diff)
	}
	if slices.Contains(openSegments(d), "finance") {
		t.Error("monitoring opened finance as a rule would")
	}
	if !d.NextChange.Equal(until) {
		t.Errorf("NextChange = %v, want the monitor's end %v", d.NextChange, until)
	}
	if !slices.ContainsFunc(d.Peers, func(p Peer) bool {
		return slices.Contains(p.Segments, "finance") && slices.Contains(p.AllowedIPs, netip.MustParsePrefix("10.30.0.0/24"))
	}) {
		t.Errorf("finance's gateway is not routed: %+v", d.Peers)
	}
	v := Explain(d, &b.Policy, netip.MustParseAddr("10.30.0.9"), 443, policy.TCP)
	if !v.Allowed || v.By != "monitor finance" {
		t.Errorf("explain 10.30.0.9:443 = %+v, want passed by monitor finance", v)
	}
	if v := Explain(d, &b.Policy, netip.MustParseAddr("10.30.0.9"), 22, policy.TCP); v.Allowed {
		t.Errorf("explain 10.30.0.9:22 (not declared by finance) = %+v, want denied", v)
	}

	for name, in := range map[string]Input{
		"ended":          {Now: until},
		"failing check":  {Now: dayShift, Checks: []Check{{ID: "edr", Failing: true, Profile: Restricted}}},
		"quarantined":    {Now: dayShift, Sticky: Sticky{Mode: Quarantine}},
		"diagnostic":     {Now: dayShift, Sticky: Sticky{Mode: Diagnostic}},
		"offline":        {Now: dayShift, LastContact: dayShift.Add(-100 * time.Hour)},
		"another device": {Now: dayShift, Device: bundle.Device{ID: "scanner-18", Class: "scanner"}},
		"all revoked":    {Now: dayShift, Sticky: Sticky{RevokedPartners: map[string]string{"northline-freight": "breach"}}, Device: scanner},
		"not the class":  {Now: dayShift, Device: bundle.Device{ID: "scanner-17", Class: "telematics"}},
	} {
		in.Bundle = b
		if in.Device == (bundle.Device{}) {
			in.Device = scanner
		}
		if name == "another device" {
			c.Monitor.Devices = []string{"scanner-17"}
		}
		if name == "all revoked" {
			c.Monitor.Segments = []string{"carrier-edi"}
		}
		if name == "offline" {
			b.IssuedAt = dayShift.Add(-100 * time.Hour)
		}
		d := Evaluate(in)
		c.Monitor.Devices, c.Monitor.Segments, b.IssuedAt = nil, []string{"finance", "carrier-edi"}, dayShift.Add(-24*time.Hour)
		if d.Monitor != nil {
			t.Errorf("%s: monitoring %+v in mode %s", name, d.Monitor, d.Mode)
		}
		if slices.ContainsFunc(d.Peers, func(p Peer) bool { return slices.Contains(p.Segments, "finance") }) {
			t.Errorf("%s: finance still routed", name)
		}
	}
}

// An inbound rule lets the named sources reach the device's own ports
// through its segment's gateway: in force when an outbound rule on that
// segment would be (so a profile keeps it, quarantine ends it, and its
// schedule bounds it), and the gateway carrying it is kept alive.
func TestInbound(t *testing.T) {
	b := example(t)
	c := b.Policy.Classes["dock-gateway"]
	c.Inbound = []policy.Rule{{Segment: "diagnostics", Hosts: []netip.Prefix{netip.MustParsePrefix("10.50.0.8/29")},
		Protocol: policy.TCP, Ports: []policy.PortRange{{First: 22, Last: 22}}, Schedule: "day-shift"}}
	b.Policy.Classes["dock-gateway"] = c
	if err := b.Policy.Validate(); err != nil {
		t.Fatal(err)
	}
	diagnostics, _ := b.Policy.Segment("diagnostics")
	want := []Access{{Segment: "diagnostics", Gateway: diagnostics.Gateway, Destinations: []policy.Destination{
		{CIDR: netip.MustParsePrefix("10.50.0.8/29"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 22, Last: 22}}}}}}
	dock := bundle.Device{Class: "dock-gateway"}
	for _, tc := range []struct {
		name string
		in   Input
		want []Access
	}{
		{"normal, in the shift", Input{Device: dock, Now: dayShift}, want},
		{"the diagnostic profile keeps diagnostics", Input{Device: dock, Now: dayShift, Sticky: Sticky{Mode: Diagnostic}}, want},
		{"quarantine ends it", Input{Device: dock, Now: dayShift, Sticky: Sticky{Mode: Quarantine}}, nil},
		{"outside its schedule", Input{Device: dock, Now: dayShift.Add(10 * time.Hour)}, nil},
		{"a class without inbound rules", Input{Device: bundle.Device{Class: "scanner"}, Now: dayShift}, nil},
	} {
		tc.in.Bundle = b
		d := Evaluate(tc.in)
		if diff := cmp.Diff(tc.want, d.Inbound, netipEq); diff != "" {
			t.Errorf("%s: inbound (-want +got):\n%s", tc.name, diff)
		}
		i := slices.IndexFunc(d.Peers, func(p Peer) bool { return p.PublicKey == diagnostics.Gateway.PublicKey })
		if tc.want != nil && (i < 0 || !d.Peers[i].Keepalive || !slices.Contains(d.Peers[i].AllowedIPs, netip.MustParsePrefix("10.50.0.8/29"))) {
			t.Errorf("%s: peers %+v; want the diagnostics gateway kept alive and routing the sources", tc.name, d.Peers)
		}
		if tc.want == nil && i >= 0 && d.Peers[i].Keepalive {
			t.Errorf("%s: the diagnostics gateway is kept alive with nothing inbound", tc.name)
		}
	}
	// The schedule's edges are the decision's.
	if d := Evaluate(Input{Bundle: b, Device: dock, Now: dayShift}); d.NextChange.IsZero() || !d.NextChange.After(dayShift) {
		t.Errorf("next change %v; want the shift's end", d.NextChange)
	}
}
