package nft

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

var now = time.Date(2026, 11, 24, 16, 0, 0, 0, time.UTC)

func desired(t *testing.T, class string, sticky localpolicy.Sticky) localpolicy.Desired {
	t.Helper()
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	if class == "sharded" {
		// More destinations than one segments map holds: the dock
		// gateway's policy plus 3,000 hosts over 30 segments, some
		// rate-limited, two ports each.
		class = "dock-gateway"
		c := doc.Classes[class]
		for s := range 30 {
			seg := policy.Segment{Name: fmt.Sprintf("yard-%02d", s), DataClass: "operational",
				Gateway: doc.Segments[0].Gateway}
			if s%7 == 3 {
				seg.RateLimit = &policy.RateLimit{BytesPerSecond: 1 << 20}
			}
			for h := range 100 {
				seg.Destinations = append(seg.Destinations, policy.Destination{CIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 200, byte(s), byte(h + 1)}), 32),
					Protocol: policy.TCP, Ports: []policy.PortRange{{First: 443, Last: 443}, {First: 8000, Last: 8099}}})
			}
			doc.Segments = append(doc.Segments, seg)
			c.Rules = append(c.Rules, policy.Rule{Segment: seg.Name})
		}
		doc.Classes[class] = c
		if err := doc.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	if class == "monitored-scanner" {
		// Every segment monitored: open ones, a rate-limited partner's,
		// one with icmp, one with v6.
		class = "scanner"
		c := doc.Classes[class]
		c.Monitor = &policy.Monitor{Until: now.Add(time.Hour)}
		doc.Classes[class] = c
	}
	return localpolicy.Evaluate(localpolicy.Input{
		Bundle: &bundle.Payload{Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour), Policy: *doc},
		Device: bundle.Device{Class: class}, Now: now, Sticky: sticky,
		Floor: []localpolicy.FloorRule{{Name: "can", Destination: policy.Destination{
			CIDR: netip.MustParsePrefix("192.168.50.0/29"), Protocol: policy.Any}}},
	})
}

// rulesetFor is the table of a device of class, or of a segment gateway
// with 300 devices ("segment-gateway").
func rulesetFor(t *testing.T, class string) Ruleset {
	switch class {
	case "segment-gateway":
		return gatewayRuleset(t, 300)
	case "segment-gateway-sharded":
		return gatewayRulesetWith(t, 300, 3000)
	}
	return Build(desired(t, class, localpolicy.Sticky{}), Options{DHCP: true, Tunnel: "bh0", ListenPort: 51820})
}

// nftView is what `nft -j list table` says about the table, reduced to
// what the agent decides: rule comments in order per chain, chain
// policies, and set elements.
type nftView struct {
	Chains map[string][]string
	Policy map[string]string
	Sets   map[string][]string
}

func listTable(t *testing.T, ns *lab.NS) nftView {
	t.Helper()
	out := ns.MustRun(t, "nft", "-j", "list", "table", "inet", Table)
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("nft -j: %v", err)
	}
	v := nftView{Chains: map[string][]string{}, Policy: map[string]string{}, Sets: map[string][]string{}}
	for _, obj := range doc.Nftables {
		switch {
		case obj["chain"] != nil:
			var c struct{ Name, Policy string }
			json.Unmarshal(obj["chain"], &c)
			v.Policy[c.Name] = c.Policy
			v.Chains[c.Name] = v.Chains[c.Name][:0:0]
		case obj["rule"] != nil:
			var r struct{ Chain, Comment string }
			json.Unmarshal(obj["rule"], &r)
			v.Chains[r.Chain] = append(v.Chains[r.Chain], r.Comment)
		case obj["set"] != nil:
			var s struct {
				Name string
				Elem []struct {
					Concat []json.RawMessage `json:"concat"`
				}
			}
			json.Unmarshal(obj["set"], &s)
			var elems []string
			for _, e := range s.Elem {
				elems = append(elems, concatText(e.Concat))
			}
			slices.Sort(elems)
			v.Sets[s.Name] = elems
		case obj["map"] != nil:
			// A map element is a [key, verdict] pair.
			var m struct {
				Name string
				Elem [][2]json.RawMessage
			}
			json.Unmarshal(obj["map"], &m)
			var elems []string
			for _, kv := range m.Elem {
				var k struct {
					Concat []json.RawMessage `json:"concat"`
				}
				var verdict map[string]struct{ Target string }
				var addr string // the key of a map by address alone
				var text string
				json.Unmarshal(kv[1], &verdict)
				if json.Unmarshal(kv[0], &addr) == nil {
					text = addr + " : "
				} else {
					json.Unmarshal(kv[0], &k)
					text = concatText(k.Concat) + " : "
				}
				for kind, arg := range verdict { // one key: accept, or jump
					text += strings.TrimSpace(kind + " " + arg.Target)
				}
				elems = append(elems, text)
			}
			slices.Sort(elems)
			v.Sets[m.Name] = elems
		}
	}
	return v
}

// concatText renders one element as "prefix . proto . port" with ranges as
// lo-hi and protocol names as numbers, the form the model's Text uses.
func concatText(parts []json.RawMessage) string {
	var out []string
	for i, p := range parts {
		var prefix struct {
			Prefix *struct {
				Addr string
				Len  int
			}
			Range []json.RawMessage
		}
		var s string
		var n int
		switch {
		case json.Unmarshal(p, &n) == nil:
			out = append(out, fmt.Sprint(n))
		case json.Unmarshal(p, &s) == nil:
			if i == 0 {
				a := netip.MustParseAddr(s)
				out = append(out, netip.PrefixFrom(a, a.BitLen()).String())
			} else {
				out = append(out, fmt.Sprint(map[string]int{"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58}[s]))
			}
		case json.Unmarshal(p, &prefix) == nil && prefix.Prefix != nil:
			out = append(out, fmt.Sprintf("%s/%d", prefix.Prefix.Addr, prefix.Prefix.Len))
		case prefix.Range != nil:
			lo, hi := strings.Trim(string(prefix.Range[0]), `"`), strings.Trim(string(prefix.Range[1]), `"`)
			out = append(out, lo+"-"+hi)
		default:
			out = append(out, string(p))
		}
	}
	return strings.Join(out, " . ")
}

func modelView(rs Ruleset) nftView {
	v := nftView{Chains: map[string][]string{}, Policy: map[string]string{}, Sets: map[string][]string{}}
	for _, c := range rs.Chains {
		if c.Hook != "" {
			v.Policy[c.Name] = "drop"
		} else {
			v.Policy[c.Name] = ""
		}
		v.Chains[c.Name] = v.Chains[c.Name][:0:0]
		for _, r := range c.Rules {
			v.Chains[c.Name] = append(v.Chains[c.Name], r.Comment)
		}
	}
	for _, s := range rs.Sets {
		var elems []string
		for _, e := range s.Elements {
			text := fmt.Sprintf("%s . %s . %s", e.Prefix, rangeText(int(e.ProtoFrom), int(e.ProtoTo)), rangeText(int(e.PortFrom), int(e.PortTo)))
			if s.ByAddress {
				text = e.Prefix.Addr().String()
			}
			if s.Map {
				text += " : " + verdictText(e.Chain)
			}
			elems = append(elems, text)
		}
		slices.Sort(elems)
		v.Sets[s.Name] = elems
	}
	return v
}

func TestApplyMatchesNftListing(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "nft")
	e := NewEnforcer(WithNetNS(ns.FD()))
	for _, class := range []string{"dock-gateway", "scanner", "telematics", "monitored-scanner", "sharded", "segment-gateway", "segment-gateway-sharded"} {
		rs := rulesetFor(t, class)
		if _, err := e.Apply(rs); err != nil {
			t.Fatalf("%s: Apply: %v", class, err)
		}
		got, want := listTable(t, ns), modelView(rs)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s: nft -j list shows\n%v\nwant\n%v", class, got, want)
		}
		if err := e.Check(rs); err != nil {
			t.Errorf("%s: Check after Apply: %v", class, err)
		}
	}
}

// The same ruleset loaded by nft -f from Text and built through netlink
// must list identically: our netlink encoding is what nft itself makes.
func TestNetlinkMatchesNftText(t *testing.T) {
	for _, class := range []string{"dock-gateway", "monitored-scanner", "sharded", "segment-gateway", "segment-gateway-sharded"} {
		t.Run(class, func(t *testing.T) { netlinkMatchesNftText(t, class) })
	}
}

func netlinkMatchesNftText(t *testing.T, class string) {
	lab.RequirePrivileged(t, "nft")
	viaNetlink, viaText := lab.NewNS(t, "nl"), lab.NewNS(t, "txt")
	rs := rulesetFor(t, class)
	if _, err := NewEnforcer(WithNetNS(viaNetlink.FD())).Apply(rs); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(file, []byte(rs.Text()), 0o600); err != nil {
		t.Fatal(err)
	}
	viaText.MustRun(t, "nft", "-f", file)
	handles := regexp.MustCompile(`(?m)\s*# handle \d+`)
	a := handles.ReplaceAllString(viaNetlink.MustRun(t, "nft", "-a", "list", "table", "inet", Table), "")
	b := handles.ReplaceAllString(viaText.MustRun(t, "nft", "-a", "list", "table", "inet", Table), "")
	if a != b {
		t.Errorf("netlink-built table lists differently from nft -f of its text:\n--- netlink\n%s\n--- nft -f\n%s", a, b)
	}
}

func TestApplyIsIdempotentAndAtomic(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "atomic")
	e := NewEnforcer(WithNetNS(ns.FD()))
	rs := Build(desired(t, "scanner", localpolicy.Sticky{}), Options{Tunnel: "bh0"})
	if changed, err := e.Apply(rs); err != nil || !changed {
		t.Fatalf("first Apply = %v, %v", changed, err)
	}
	if changed, err := e.Apply(Build(desired(t, "scanner", localpolicy.Sticky{}), Options{Tunnel: "bh0"})); err != nil || changed {
		t.Fatalf("second Apply of the same state = %v, %v; want a no-op", changed, err)
	}
	// A ruleset the kernel refuses (a set name longer than nftables
	// allows; the model never makes one) must leave the previous table in
	// force, since its deletion is part of the refused transaction.
	bad := Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{Tunnel: "bh0"})
	long := strings.Repeat("x", 300)
	for _, c := range bad.Chains {
		for _, r := range c.Rules {
			if r.Lookup != nil && r.Lookup.Set == bad.Sets[0].Name {
				r.Lookup.Set = long
			}
		}
	}
	bad.Sets[0].Name = long
	if err := e.Verify(rs); err != nil {
		t.Fatal(err)
	}
	_, err := e.Apply(bad)
	if err == nil || !strings.Contains(err.Error(), "apply table") {
		t.Fatalf("Apply(bad) = %v; want the kernel to refuse the transaction", err)
	}
	// The kernel's generation did not move, but what it holds is not what
	// the caller now wants: Verify must not vouch for it.
	if err := e.Verify(bad); !errors.Is(err, ErrDrift) {
		t.Fatalf("Verify after a refused apply = %v, want ErrDrift", err)
	}
	if err := e.Check(rs); err != nil {
		t.Fatalf("after a refused apply the previous ruleset is gone: %v", err)
	}
}

// A gateway's device maps are keyed by address alone: an element added
// there by someone else (a device let through to accept, or to another
// group's chain) is drift, and so is a removed one.
func TestGatewayDeviceMapDriftIsDetected(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "gwdrift")
	e := NewEnforcer(WithNetNS(ns.FD()))
	rs := gatewayRuleset(t, 30)
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}
	for _, tamper := range [][]string{
		{"nft", "add", "element", "inet", Table, "gw_src_v4", "{ 100.64.9.9 : accept }"},
		{"nft", "add", "element", "inet", Table, "gw_dst_v4", "{ 100.64.0.0 : jump gw_0_to }"},
		{"nft", "delete", "element", "inet", Table, "gw_src_v4", "{ 100.64.0.1 }"},
	} {
		if err := e.Verify(rs); err != nil {
			t.Fatalf("before %q: %v", tamper, err)
		}
		ns.MustRun(t, tamper...)
		if err := e.Check(rs); !errors.Is(err, ErrDrift) {
			t.Fatalf("after %q Check = %v, want ErrDrift", tamper, err)
		}
		if err := e.Reapply(rs); err != nil {
			t.Fatal(err)
		}
		if err := e.Check(rs); err != nil {
			t.Fatalf("after repair: %v", err)
		}
	}
}

func TestDriftIsDetectedAndRepaired(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "drift")
	e := NewEnforcer(WithNetNS(ns.FD()))
	rs := Build(desired(t, "telematics", localpolicy.Sticky{}), Options{Tunnel: "bh0"})
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}
	for _, tamper := range [][]string{
		{"nft", "flush", "ruleset"},
		{"nft", "delete", "table", "inet", Table},
		{"nft", "flush", "chain", "inet", Table, "output"},
		{"nft", "delete", "element", "inet", Table, "control_v4", "{ 10.99.0.1 . 6 . 8443 }"},
		{"nft", "add", "rule", "inet", Table, "output", "accept"},
		// Elements the model never makes are drift, not skipped: an
		// address range that is no prefix, in a set and in the map.
		{"nft", "add", "element", "inet", Table, "control_v4", "{ 10.0.0.5-10.0.0.9 . 6 . 22 }"},
		{"nft", "add", "element", "inet", Table, "segments_v4", "{ 10.0.0.5-10.0.0.9 . 6 . 22 : accept }"},
		{"nft", "add", "element", "inet", Table, "segments_v4", "{ 10.0.0.0/24 . 6 . 22 : accept }"},
	} {
		if err := e.Verify(rs); err != nil {
			t.Fatalf("before %q: %v", tamper, err)
		}
		ns.MustRun(t, tamper...)
		if err := e.Verify(rs); !errors.Is(err, ErrDrift) {
			t.Fatalf("after %q Verify = %v, want ErrDrift", tamper, err)
		}
		if err := e.Check(rs); !errors.Is(err, ErrDrift) {
			t.Fatalf("after %q Check = %v, want ErrDrift", tamper, err)
		}
		if err := e.Reapply(rs); err != nil {
			t.Fatal(err)
		}
		if err := e.Verify(rs); err != nil {
			t.Fatalf("after repair: %v", err)
		}
	}
	// A rule replaced in place under its old comment is drift too: the
	// check compares what rules do, not what they are called. It did not
	// (the device was open to everything while status said normal).
	listing := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", Table, "output")
	m := regexp.MustCompile(`comment "default drop" # handle (\d+)`).FindStringSubmatch(listing)
	if m == nil {
		t.Fatalf("no default drop rule in output:\n%s", listing)
	}
	ns.MustRun(t, "nft", "replace", "rule", "inet", Table, "output", "handle", m[1], "accept", "comment", `"default drop"`)
	if err := e.Verify(rs); !errors.Is(err, ErrDrift) {
		t.Fatalf("a drop replaced by an accept under the same comment: Verify = %v, want ErrDrift", err)
	}
	if err := e.Reapply(rs); err != nil {
		t.Fatal(err)
	}
	if err := e.Verify(rs); err != nil {
		t.Fatalf("after repair: %v", err)
	}

	// Another table's change moves the generation too: Verify must look,
	// and find ours intact.
	ns.MustRun(t, "nft", "add", "table", "inet", "someone-else")
	if err := e.Verify(rs); err != nil {
		t.Fatalf("after another table was added: %v", err)
	}
}

// The generation the gate relies on: every commit advances it, and
// nothing else does.
func TestGenerationMovesWithEveryCommit(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "gen")
	e := NewEnforcer(WithNetNS(ns.FD()))
	defer e.Close()
	gen := func() uint32 {
		e.mu.Lock()
		defer e.mu.Unlock()
		g, err := e.generation()
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	g0 := gen()
	if g := gen(); g != g0 {
		t.Fatalf("generation moved from %d to %d with no commit", g0, g)
	}
	ns.MustRun(t, "nft", "add", "table", "ip", "t")
	g1 := gen()
	if g1 == g0 {
		t.Fatalf("generation stayed %d across a commit", g0)
	}
	if _, err := ns.Run("nft", "add", "element", "inet", Table, "x", "{ 1 }"); err == nil {
		t.Fatal("adding to a missing set was accepted")
	}
	if g := gen(); g != g1 {
		t.Fatalf("a refused transaction moved the generation from %d to %d", g1, g)
	}
	// It is asked twice a second for the agent's lifetime: an idle agent
	// must not make garbage doing so.
	if n := testing.AllocsPerRun(100, func() { gen() }); n > 8 {
		t.Errorf("asking for the generation allocates %.0f objects", n)
	}
}

func TestParseGen(t *testing.T) {
	msg := func(typ uint16, seq uint32, payload ...byte) []byte {
		b := binary.NativeEndian.AppendUint32(nil, uint32(16+len(payload)))
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, 0)
		b = binary.NativeEndian.AppendUint32(b, seq)
		b = binary.NativeEndian.AppendUint32(b, 0)
		b = append(b, payload...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	attr := func(typ uint16, v ...byte) []byte {
		b := binary.NativeEndian.AppendUint16(nil, uint16(4+len(v)))
		return append(binary.NativeEndian.AppendUint16(b, typ), v...)
	}
	gen := msg(uint16(newGen), 7, slices.Concat([]byte{0, 0, 0, 0}, attr(unix.NFTA_GEN_PROC_PID, 0, 0, 0, 9), attr(unix.NFTA_GEN_ID, 0, 0, 1, 2))...)
	errMsg := msg(uint16(netlink.Error), 7, binary.NativeEndian.AppendUint32(nil, uint32(0x100000000-int64(unix.EPERM)))...)
	for _, c := range []struct {
		name string
		in   []byte
		id   uint32
		done bool
		err  string
	}{
		{"answer", gen, 258, true, ""},
		{"answer after another request's", slices.Concat(msg(uint16(newGen), 6), gen), 258, true, ""},
		{"only another request's", msg(uint16(newGen), 6), 0, false, ""},
		{"kernel error", errMsg, 0, true, "operation not permitted"},
		{"no id", msg(uint16(newGen), 7, 0, 0, 0, 0), 0, true, "no generation"},
		{"truncated", gen[:len(gen)-4], 0, true, "malformed"},
		{"empty", nil, 0, false, ""},
	} {
		id, done, err := parseGen(c.in, 7)
		if id != c.id || done != c.done || (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%s: parseGen = %d, %v, %v; want %d, %v, error containing %q", c.name, id, done, err, c.id, c.done, c.err)
		}
	}
}

func TestRemove(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "rm")
	e := NewEnforcer(WithNetNS(ns.FD()))
	if removed, err := e.Remove(); err != nil || removed {
		t.Fatalf("Remove with no table: removed %v, %v", removed, err)
	}
	if _, err := e.Apply(Build(desired(t, "scanner", localpolicy.Sticky{}), Options{Tunnel: "bh0"})); err != nil {
		t.Fatal(err)
	}
	if removed, err := e.Remove(); err != nil || !removed {
		t.Fatalf("Remove: removed %v, %v", removed, err)
	}
	if out, _ := ns.Run("nft", "list", "tables"); strings.Contains(out, Table) {
		t.Errorf("table still listed after Remove: %s", out)
	}
}

// A 10,000-destination table is one transaction too: the batch does not fit
// a default socket buffer, so this fails if the buffer is not raised.
func TestLargeTableAppliesAndReadsBack(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "large")
	var rs Ruleset
	set := Set{Name: "seg_big_v4"}
	for i := range 10000 {
		set.Elements = append(set.Elements, Element{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(100 + i/10000), byte(i / 250 % 40), byte(i%250 + 1)}), 32),
			ProtoFrom: 6, ProtoTo: 6, PortFrom: 443, PortTo: 443})
	}
	rs.Sets = []Set{set}
	rs.Chains = []Chain{{Name: "output", Hook: "output", Rules: []Rule{{Comment: "segment big", Lookup: &Lookup{Set: set.Name, Addr: Dst, Port: Dst}}, {Comment: "default drop", Drop: true}}}}
	e := NewEnforcer(WithNetNS(ns.FD()))
	if _, err := e.Apply(rs); err != nil {
		t.Fatalf("Apply(10,000 elements): %v", err)
	}
	if err := e.Check(rs); err != nil {
		t.Fatal(err)
	}
}

// Two large tables that differ in every element and in their number of
// shards replace each other, again and again, each applied whole and read
// back. The kernel answers every message of such a batch before the agent
// reads one; these answers overflowed the default receive buffer (ENOBUFS
// after a successful transaction) until the buffer grew with the batch.
func TestLargeTablesReplaceEachOther(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "swap")
	e := NewEnforcer(WithNetNS(ns.FD()))
	var rs [2]Ruleset
	for i := range rs {
		doc, err := policy.Parse(examples.Site())
		if err != nil {
			t.Fatal(err)
		}
		c := doc.Classes["scanner"]
		for s := range 10 - 4*i {
			seg := policy.Segment{Name: fmt.Sprintf("yard-%02d", s), DataClass: "operational", Gateway: doc.Segments[0].Gateway}
			for h := range 1000 {
				seg.Destinations = append(seg.Destinations, policy.Destination{CIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + s), byte(h / 250), byte(h%250 + 1)}), 32),
					Protocol: policy.TCP, Ports: []policy.PortRange{{First: uint16(443 + i), Last: uint16(443 + i)}, {First: 8000, Last: 8099}}})
			}
			doc.Segments = append(doc.Segments, seg)
			c.Rules = append(c.Rules, policy.Rule{Segment: seg.Name})
		}
		doc.Classes["scanner"] = c
		if err := doc.Validate(); err != nil {
			t.Fatal(err)
		}
		d := localpolicy.Evaluate(localpolicy.Input{Bundle: &bundle.Payload{Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour), Policy: *doc},
			Device: bundle.Device{Class: "scanner"}, Now: now})
		rs[i] = Build(d, Options{Tunnel: "bh0"})
	}
	for i := range 4 {
		if _, err := e.Apply(rs[i%2]); err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
		if err := e.Check(rs[i%2]); err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
	}
}

// The kernel lists an interval set's elements in the order they were
// added. An element taken out and put back (the same table, listed in
// another order) is no drift, and an element put back with another
// verdict is.
func TestDriftIgnoresElementOrder(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "order")
	e := NewEnforcer(WithNetNS(ns.FD()))
	rs := Build(desired(t, "dock-gateway", localpolicy.Sticky{}), Options{Tunnel: "bh0"})
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(rs.Sets, func(s Set) bool { return s.Name == "segments_v4" })
	if i < 0 || len(rs.Sets[i].Elements) < 3 {
		t.Fatal("no segments_v4 map of three elements or more; the test proves nothing")
	}
	first := rs.Sets[i].Elements[0]
	key := fmt.Sprintf("%s . %d . %s", first.Prefix, first.ProtoFrom, rangeText(int(first.PortFrom), int(first.PortTo)))
	before := ns.MustRun(t, "nft", "list", "map", "inet", Table, "segments_v4")
	ns.MustRun(t, "nft", "delete", "element", "inet", Table, "segments_v4", "{ "+key+" }")
	ns.MustRun(t, "nft", "add", "element", "inet", Table, "segments_v4", "{ "+key+" : "+verdictText(first.Chain)+" }")
	if after := ns.MustRun(t, "nft", "list", "map", "inet", Table, "segments_v4"); after == before {
		t.Fatal("the kernel lists the map in the same order after the element moved; the test proves nothing")
	}
	if err := e.Check(rs); err != nil {
		t.Fatalf("the same elements in another order: %v", err)
	}
	ns.MustRun(t, "nft", "delete", "element", "inet", Table, "segments_v4", "{ "+key+" }")
	ns.MustRun(t, "nft", "add", "element", "inet", Table, "segments_v4", "{ "+key+" : jump seg_broker-portal }")
	if err := e.Check(rs); !errors.Is(err, ErrDrift) {
		t.Fatalf("an element jumping to another chain: Check = %v, want ErrDrift", err)
	}
}

// A change made between reading the kernel's table and sending the batch
// built from it does not survive the batch: the batch carries the
// generation it was built at, the kernel refuses it (ERESTART) once
// anything was committed since, and it is built again. Sent without the
// generation, a chain added in that window outlived the repair.
func TestChangeRacingAnApplyDoesNotSurviveIt(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "race")
	e := NewEnforcer(WithNetNS(ns.FD()))
	rs := Build(desired(t, "scanner", localpolicy.Sticky{}), Options{Tunnel: "bh0", ListenPort: 51820})
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}
	raced := 0
	e.beforeFlush = func() {
		if raced++; raced == 1 {
			ns.MustRun(t, "nft", "add", "chain", "inet", Table, "sneaky")
		}
	}
	if err := e.Reapply(rs); err != nil {
		t.Fatal(err)
	}
	e.beforeFlush = nil
	if raced < 2 {
		t.Fatalf("the batch was sent %d time(s): the race went unnoticed", raced)
	}
	if err := e.Check(rs); err != nil {
		t.Fatalf("after a repair raced by an outside change: %v", err)
	}
}
