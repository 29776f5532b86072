package agent

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	jsonv2 "github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
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
	pub := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey
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
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, lab.FirstContact) {
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
	if !lab.ReachesWithin(t, s.ns, "udp", wmsHost, lab.FirstContact) || !lab.ReachesWithin(t, s.ns, "tcp", financeHost, lab.FirstContact) {
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
	lab.WaitFor(t, "the monitored flows in status", shortWait, func() bool {
		seen = s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Monitor.Flows
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
		// A monitored segment's new connections are logged in its own
		// chain, entered from the segments map.
		if n := counts["mon_"+f.Segment+" monitor "+f.Segment+" logged"]; n != f.Count {
			t.Errorf("%s: the agent read %d connections, nft counted %d", f.Segment, f.Count, n)
		}
	}

	// v3: a monitor ending in two seconds ends then, with no new bundle.
	c.Monitor = &policy.Monitor{Until: time.Now().Add(2 * time.Second).UTC()}
	doc.Classes["scanner"] = c
	s.apply(t, signFor(t, 3, doc, s.key))
	if !lab.Reaches(t, s.ns, "tcp", financeHost) {
		t.Error("finance dropped before the monitor's end")
	}
	lab.WaitFor(t, "the monitor's end", shortWait, func() bool { return s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Monitor.Until.IsZero() })
	if lab.Reaches(t, s.ns, "tcp", financeHost) || lab.Reaches(t, s.ns, "udp", wmsHost) {
		t.Error("a monitored destination still passes after the monitor ended")
	}
	if !lab.Reaches(t, s.ns, "tcp", wmsHost) {
		t.Error("wms tcp stopped with the monitor")
	}
	out := s.ns.MustRun(t, "nft", "list", "table", "inet", "bulkhead")
	if strings.Contains(out, `log prefix "wms"`) || strings.Contains(out, `log prefix "finance"`) || strings.Contains(out, "mon_") {
		t.Errorf("monitor rules left in the table after the end:\n%s", out)
	}

	// Everything seen was reported, through the audit log.
	s.stop()
	reported := reportedFlows(t, s.auditLog(), controlapi.EventFlows)
	for _, f := range want {
		if !reported[f] {
			t.Errorf("flow %+v never reported (audit: %v)", f, kinds(s.auditLog()))
		}
	}
}

// What the table refuses is reported, by direction: a connection the
// device tried to a segment it has no rule for (lateral movement out),
// and one a neighbour tried to the device (a scan in), each with the
// attempts the kernel counted; a connection the policy opens is not.
func TestRefusedConnectionsAreReported(t *testing.T) {
	s := newTunnelSite(t)
	s.start()
	pub := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Tunnel.PublicKey
	s.gw1.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")
	s.apply(t, s.policy(t, 1, "wms"))
	if !lab.ReachesWithin(t, s.ns, "tcp", wmsHost, 10*time.Second) {
		t.Fatal("wms unreachable through its tunnel")
	}
	for range 3 {
		if lab.Reaches(t, s.ns, "tcp", financeSide) {
			t.Fatal("a finance host no rule opens answered")
		}
	}
	scan := netip.MustParseAddrPort("192.0.2.2:2222")
	if lab.Reaches(t, s.gw1.NS, "tcp", scan) {
		t.Fatal("the device answered a neighbour's connection to a port nothing opens")
	}
	out := controlapi.Flow{Direction: "out", Protocol: policy.TCP, Address: financeSide.Addr(), Port: financeSide.Port()}
	in := controlapi.Flow{Direction: "in", Protocol: policy.TCP, Address: netip.MustParseAddr("192.0.2.1"), Port: scan.Port()}
	// Every packet logged is read: the agent's counts come to the
	// kernel's. (A refused connect is several SYNs: the kernel
	// retransmits, a second apart.)
	var seen map[controlapi.Flow]uint64
	var byDir, counts map[string]uint64
	lab.WaitFor(t, "the refused connections in status, as the kernel counted them", shortWait, func() bool {
		seen, byDir = map[controlapi.Flow]uint64{}, map[string]uint64{}
		if r := s.call(adminapi.Request{Op: adminapi.OpStatus}).Status.Refused; r != nil {
			for _, f := range r.Flows {
				seen[f.Flow] = f.Count
				byDir[f.Direction] += f.Count
			}
		}
		counts = logCounters(t, s.ns)
		return seen[out] > 0 && seen[in] > 0 && byDir["out"] == counts["output refused logged"] && byDir["in"] == counts["input refused logged"]
	})
	if seen[out] < 3 {
		t.Errorf("three refused connections to finance counted as %d attempts", seen[out])
	}
	for f := range seen {
		if f.Address == wmsHost.Addr() {
			t.Errorf("a connection the policy opens was reported refused: %+v", f)
		}
	}
	s.stop()
	reported := reportedFlows(t, s.auditLog(), controlapi.EventRefused)
	if !reported[out] || !reported[in] {
		t.Errorf("refused connections reported %v, want %+v and %+v", reported, out, in)
	}
}

// reportedFlows is every flow the events of kind report.
func reportedFlows(t *testing.T, events []store.Event, kind string) map[controlapi.Flow]bool {
	t.Helper()
	reported := map[controlapi.Flow]bool{}
	for _, e := range events {
		if e.Kind != kind {
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
	return reported
}

// logCounters reads, through nft -j, the packets each logging rule
// counted, by chain and comment ("mon_wms monitor wms logged").
func logCounters(t *testing.T, ns *lab.NS) map[string]uint64 {
	t.Helper()
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Chain   string            `json:"chain"`
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
		if o.Rule == nil || !strings.HasSuffix(o.Rule.Comment, " logged") {
			continue
		}
		for _, e := range o.Rule.Expr {
			var c struct {
				Counter *struct{ Packets uint64 } `json:"counter"`
			}
			if json.Unmarshal(e, &c) == nil && c.Counter != nil {
				out[o.Rule.Chain+" "+o.Rule.Comment] += c.Counter.Packets
			}
		}
	}
	return out
}

// Discovery end to end, all real binaries over mTLS: a class with no
// rules, monitored; a device opens two flows; control collects them;
// `bulkhead-control policy suggest` drafts rules for exactly those two;
// once the draft is signed and pushed the device reaches exactly them,
// and a host of the same segment it never used stays shut.
func TestMonitorThenPolicySuggest(t *testing.T) {
	s := newControlSite(t)
	s.a.Start(t)
	if out, err := s.a.Enroll(s.ctl.URL, s.token(t, "scanner", "1h"), s.ctl.Fingerprint); err != nil {
		t.Fatalf("enroll: %v %s", err, out)
	}
	pub := s.a.Status(t).Tunnel.PublicKey
	s.gw1.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")
	s.gw2.AllowPeer(t, pub, netip.AddrPort{}, "100.64.0.2/32")
	unused := netip.MustParseAddrPort("10.20.1.11:443")
	s.gw1.Serve(t, unused.Addr(), unused.Port())

	monitored := s.policyWith(t, func(doc *policy.Document) {
		doc.Classes["scanner"] = policy.Class{Monitor: &policy.Monitor{Until: time.Now().Add(time.Hour).UTC().Truncate(time.Second)}}
	})
	inForce := filepath.Join(t.TempDir(), "policy.json")
	raw, err := jsonv2.Marshal(monitored)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, inForce, string(raw))
	bundle := filepath.Join(t.TempDir(), "v1.dsse")
	writeFile(t, bundle, string(signFor(t, 1, monitored, s.opsKey)))
	s.ctl.MustCLI(t, "policy", "push", bundle)
	lab.WaitFor(t, "policy v1", longWait, func() bool { return s.a.Status(t).PolicyVersion == 1 })

	for _, ap := range []netip.AddrPort{wmsHost, financeHost} {
		if !lab.ReachesWithin(t, s.a.NS, "tcp", ap, 10*time.Second) {
			t.Fatalf("%s dropped while monitored", ap)
		}
	}
	lab.WaitFor(t, "both flows at control", longWait, func() bool {
		out, err := s.ctl.CLI("policy", "suggest", "--class", "scanner", inForce)
		return err == nil && strings.Contains(out, "2 rules added")
	})
	draftFile := filepath.Join(t.TempDir(), "draft.json")
	out := s.ctl.MustCLI(t, "policy", "suggest", "--class", "scanner", "--out", draftFile, inForce)
	if !strings.Contains(out, "2 flows observed for class scanner by 1 devices; 2 rules added") {
		t.Errorf("suggest said:\n%s", out)
	}
	data, err := os.ReadFile(draftFile)
	if err != nil {
		t.Fatal(err)
	}
	draft, err := policy.Parse(data)
	if err != nil {
		t.Fatalf("the draft is not a valid policy: %v", err)
	}
	want := []policy.Rule{
		{Segment: "finance", Hosts: []netip.Prefix{netip.PrefixFrom(financeHost.Addr(), 32)}, Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}}},
		{Segment: "wms", Hosts: []netip.Prefix{netip.PrefixFrom(wmsHost.Addr(), 32)}, Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}}},
	}
	if got := draft.Classes["scanner"]; got.Monitor != nil || fmt.Sprint(got.Rules) != fmt.Sprint(want) {
		t.Fatalf("draft for scanner: rules %+v, monitor %+v; want exactly %+v and no monitor", got.Rules, got.Monitor, want)
	}

	writeFile(t, bundle, string(signFor(t, 2, draft, s.opsKey)))
	s.ctl.MustCLI(t, "policy", "push", bundle)
	lab.WaitFor(t, "the draft as v2", longWait, func() bool { return s.a.Status(t).PolicyVersion == 2 })
	if st := s.a.Status(t); st.Monitor == nil || !st.Monitor.Until.IsZero() || len(st.Open) != 2 {
		t.Errorf("after v2: open %v, monitor %+v; want wms and finance open, the monitor ended", st.Open, st.Monitor)
	}
	for _, ap := range []netip.AddrPort{wmsHost, financeHost} {
		if !lab.ReachesWithin(t, s.a.NS, "tcp", ap, lab.FirstContact) {
			t.Errorf("%s, observed and drafted, is not reachable under the draft", ap)
		}
	}
	if lab.Reaches(t, s.a.NS, "tcp", unused) {
		t.Errorf("%s, never observed, is reachable under the draft", unused)
	}
}
