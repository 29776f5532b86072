package suggest

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

func flow(seg string, proto policy.Protocol, addr string, port uint16) controlapi.ObservedFlow {
	return controlapi.ObservedFlow{Flow: controlapi.Flow{Segment: seg, Protocol: proto, Address: netip.MustParseAddr(addr), Port: port}, Count: 1}
}

// The draft opens exactly the flows observed: every added rule's
// destinations, taken together, are the observed host, protocol and
// port triples and nothing else; flows no rule should be written for are
// named with the reason.
func TestRulesOpenExactlyTheObservedFlows(t *testing.T) {
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	c := doc.Classes["scanner"]
	c.Monitor = &policy.Monitor{Until: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	doc.Classes["scanner"] = c
	flows := []controlapi.ObservedFlow{
		flow("wms", policy.TCP, "10.20.1.7", 8080),
		flow("wms", policy.TCP, "10.20.1.7", 8081),
		flow("wms", policy.TCP, "10.20.1.8", 8080),
		flow("wms", policy.TCP, "fd00:20:1::9", 443),
		flow("dock-scheduling", policy.UDP, "10.20.2.5", 5683),
		flow("dock-scheduling", policy.TCP, "10.20.2.5", 443),
		flow("diagnostics", policy.ICMP, "10.50.0.3", 0),
		flow("wms", policy.TCP, "10.20.1.9", 443),
		flow("finance", policy.TCP, "10.30.0.9", 22),
		flow("wms", policy.Any, "10.20.1.7", 0),
		flow("yard-cams", policy.TCP, "10.80.0.2", 554),
	}
	d, err := Rules(doc, "scanner", flows)
	if err != nil {
		t.Fatal(err)
	}
	type triple struct {
		cidr  string
		proto policy.Protocol
		ports string
	}
	var opened []triple
	for _, r := range d.Added {
		seg, _ := d.Policy.Segment(r.Segment)
		for _, dst := range r.Opens(seg) {
			var ports []string
			for _, p := range dst.Ports {
				ports = append(ports, p.String())
			}
			opened = append(opened, triple{dst.CIDR.String(), dst.Protocol, strings.Join(ports, ",")})
		}
	}
	want := []triple{
		{"10.20.2.5/32", policy.TCP, "443"},
		{"10.20.2.5/32", policy.UDP, "5683"},
		{"10.20.1.7/32", policy.TCP, "8080-8081"},
		{"10.20.1.8/32", policy.TCP, "8080"},
	}
	if diff := cmp.Diff(want, opened, cmp.AllowUnexported(triple{})); diff != "" {
		t.Errorf("the added rules open (-want +got):\n%s", diff)
	}
	var why []string
	for _, u := range d.Unmatched {
		why = append(why, u.Flow.Segment+" "+u.Flow.Address.String()+": "+u.Why)
	}
	for _, w := range []string{
		"wms fd00:20:1::9: rule 0 of the class already opens it",
		"diagnostics 10.50.0.3: rule 2 of the class already opens it",
		"wms 10.20.1.9: rule 0 of the class already opens it",
		"finance 10.30.0.9: segment finance in this policy does not declare it",
		"wms 10.20.1.7: not tcp, udp or icmp",
		"yard-cams 10.80.0.2: segment yard-cams is not in this policy",
	} {
		if !slices.ContainsFunc(why, func(s string) bool { return strings.HasPrefix(s, w) }) {
			t.Errorf("unmatched lacks %q: %q", w, why)
		}
	}
	if len(d.Unmatched) != 6 {
		t.Errorf("%d unmatched, want 6: %q", len(d.Unmatched), why)
	}
	if got := d.Policy.Classes["scanner"]; got.Monitor != nil || len(got.Rules) != 3+len(d.Added) {
		t.Errorf("draft class: monitor %+v, %d rules; want no monitor and the 3 old rules plus the added", got.Monitor, len(got.Rules))
	}
	if doc.Classes["scanner"].Monitor == nil || len(doc.Classes["scanner"].Rules) != 3 {
		t.Error("drafting changed the policy it started from")
	}
	if _, err := Rules(doc, "scaner", flows); err == nil || !strings.Contains(err.Error(), `class "scaner" is not in the policy`) {
		t.Errorf("unknown class: %v", err)
	}
}
