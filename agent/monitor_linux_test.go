package agent

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/controlapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
)

// Monitor mode against real gateways: what no rule opens on a declared
// segment destination passes through the tunnel and is logged, read back
// as exactly the flows made, counted as the kernel counted them, and
// reported; what the rules open is not logged; a segment's destination
// over the plain uplink stays dropped; and the monitor ends at its signed
// instant with no new bundle.
func TestMonitorLogsInsteadOfDropping(t *testing.T) {
	s := newTunnelSite(t)
	s.start()
	pub := s.call(Request{Op: "status"}).Status.Tunnel.PublicKey
	s.gw1.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")
	s.gw2.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")

	// v1: wms, tcp only.
	tcpOnly := func(doc *policy.Document) {
		c := doc.Classes["scanner"]
		c.Rules = []policy.Rule{{Segment: "wms", Protocol: policy.TCP}}
		doc.Classes["scanner"] = c
	}
	doc := s.doc(t, "wms")
	tcpOnly(doc)
	s.apply(t, signFor(t, 1, doc, s.key))
	if !lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Fatal("wms tcp unreachable through its tunnel")
	}
	if lab.Reaches(t, s.ns, "udp", wmsHost) || lab.Reaches(t, s.ns, "tcp", financeHost) {
		t.Fatal("wms udp or finance reachable with no rule opening them; the test would prove nothing")
	}

	// v2: the same rules, every segment monitored for an hour.
	doc = s.doc(t, "wms")
	tcpOnly(doc)
	c := doc.Classes["scanner"]
	c.Monitor = &policy.Monitor{Until: time.Now().Add(time.Hour).UTC().Truncate(time.Second)}
	doc.Classes["scanner"] = c
	st := s.apply(t, signFor(t, 2, doc, s.key))
	if st.Mode != "normal" || st.Monitor == nil || len(st.Monitor.Segments) != 2 {
		t.Fatalf("after v2: mode %s, monitor %+v", st.Mode, st.Monitor)
	}
	if !lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("wms tcp unreachable while monitored")
	}
	if !lab.Reaches(t, s.ns, "udp", wmsHost) || !lab.Reaches(t, s.ns, "tcp", financeHost) {
		t.Error("a monitored destination no rule opens was dropped, not passed")
	}
	if lab.Reaches(t, s.ns, "tcp", financeSide) {
		t.Error("monitor passed a finance host over the plain uplink, outside the tunnel")
	}
	want := []controlapi.Flow{
		{Segment: "finance", Protocol: policy.TCP, Address: financeHost.Addr(), Port: financeHost.Port()},
		{Segment: "wms", Protocol: policy.UDP, Address: wmsHost.Addr(), Port: wmsHost.Port()},
	}
	var seen []controlapi.ObservedFlow
	waitFor(t, "the monitored flows in status", func() bool {
		seen = s.call(Request{Op: "status"}).Status.Monitor.Flows
		return len(seen) >= len(want)
	})
	var got []controlapi.Flow
	for _, f := range seen {
		got = append(got, f.Flow)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("observed flows %+v, want exactly %+v", got, want)
	}
	// The kernel's own count of what it logged agrees.
	counts := logCounters(t, s.ns)
	for _, f := range seen {
		if counts[f.Segment] != f.Count {
			t.Errorf("%s: the agent read %d connections, nft counted %d", f.Segment, f.Count, counts[f.Segment])
		}
	}

	// v3: a monitor ending in two seconds ends then, with no new bundle.
	c.Monitor = &policy.Monitor{Until: time.Now().Add(2 * time.Second).UTC()}
	doc.Classes["scanner"] = c
	s.apply(t, signFor(t, 3, doc, s.key))
	if !lab.Reaches(t, s.ns, "tcp", financeHost) {
		t.Error("finance dropped before the monitor's end")
	}
	waitFor(t, "the monitor's end", func() bool { return s.call(Request{Op: "status"}).Status.Monitor.Until.IsZero() })
	if lab.Reaches(t, s.ns, "tcp", financeHost) || lab.Reaches(t, s.ns, "udp", wmsHost) {
		t.Error("a monitored destination still passes after the monitor ended")
	}
	if !lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("wms tcp stopped with the monitor")
	}
	out := s.ns.MustRun(t, "nft", "list", "table", "inet", "bulkhead")
	if strings.Contains(out, "log ") || strings.Contains(out, "mon_") {
		t.Errorf("monitor rules left in the table after the end:\n%s", out)
	}

	// Everything seen was reported, through the audit log.
	s.stop()
	reported := map[controlapi.Flow]bool{}
	for _, e := range s.auditLog() {
		if e.Kind != controlapi.EventFlows {
			continue
		}
		var flows []controlapi.ObservedFlow
		if err := json.Unmarshal([]byte(e.Detail), &flows); err != nil {
			t.Fatalf("report %q: %v", e.Detail, err)
		}
		for _, f := range flows {
			reported[f.Flow] = true
		}
	}
	for _, f := range want {
		if !reported[f] {
			t.Errorf("flow %+v never reported (audit: %v)", f, kinds(s.auditLog()))
		}
	}
}

// logCounters reads, through nft -j, the packets each monitor's log rule
// counted, by segment.
func logCounters(t *testing.T, ns *lab.NS) map[string]uint64 {
	t.Helper()
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Comment string            `json:"comment"`
				Expr    []json.RawMessage `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(ns.MustRun(t, "nft", "-j", "list", "table", "inet", "bulkhead")), &doc); err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, o := range doc.Nftables {
		if o.Rule == nil {
			continue
		}
		seg, ok := strings.CutPrefix(o.Rule.Comment, "monitor ")
		if seg, ok = strings.CutSuffix(seg, " logged"); !ok {
			continue
		}
		for _, e := range o.Rule.Expr {
			var c struct {
				Counter *struct{ Packets uint64 } `json:"counter"`
			}
			if json.Unmarshal(e, &c) == nil && c.Counter != nil {
				out[seg] += c.Counter.Packets
			}
		}
	}
	return out
}

func kinds(events []store.Event) []string {
	var out []string
	for _, e := range events {
		out = append(out, e.Kind)
	}
	return out
}
