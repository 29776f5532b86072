package site

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Scenarios are the article's scenarios, in the order the demo runs
// them; each leaves the site as it found it.
func Scenarios() []Scenario {
	return []Scenario{
		{"Baseline: each device reaches exactly its authorized segments", baseline},
		{"Compromised scanner: lateral movement is blocked and reported", compromisedScanner},
		{"Partner disconnect: the tier-1 carrier is revoked fleet-wide, then reinstated", partnerDisconnect},
		{"Telematics quarantine: data stops, the safety controller stays reachable", telematicsQuarantine},
		{"Ransomware drill: control and uplink cut, agents restarted, nothing lost", ransomwareDrill},
		{"Context: geofence, shift end, a required process dies", context},
		{"Attacks: forged bundle, rolled-back bundle, replayed release", attacks},
		{"Rooted truck: the gateways hold the policy when the box's agent is gone", rootedTruck},
		{"Control failover: the devices' replica dies mid-revocation, the database restarts", controlFailover},
	}
}

// target is a column of the reachability matrix.
type target struct {
	name string
	ap   netip.AddrPort
}

func (s *Site) targets() []target {
	var ts []target
	for _, seg := range s.Segments {
		ts = append(ts, target{seg.Name, seg.Host})
	}
	return append(ts, target{"safety-ctl", s.Truck.Controller}, target{"dock-ssh", s.DockSSH})
}

// authorized is what the site's policy opens to a device in normal mode:
// its class's segments, and the safety controller for the truck.
func (s *Site) authorized(a *Agent, t string) bool {
	if t == "safety-ctl" {
		return a == s.Tele
	}
	return slices.Contains(classSegments[a.Class], t)
}

// matrix probes every device against every target at once.
func (s *Site) matrix() map[*Agent]map[string]bool {
	got := map[*Agent]map[string]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, a := range s.Agents() {
		got[a] = map[string]bool{}
		for _, t := range s.targets() {
			if a == s.Dock && t.name == "dock-ssh" {
				continue // itself
			}
			wg.Go(func() {
				// Twenty probes share two cores with five WireGuard
				// gateways: an open cell gets a second chance.
				tries := map[bool]int{true: 3, false: 1}[s.authorized(a, t.name)]
				ok, err := false, error(nil)
				for range tries {
					if ok, err = lab.Reachable(a.NS, "tcp", t.ap, 2*time.Second); ok {
						break
					}
				}
				mu.Lock()
				defer mu.Unlock()
				got[a][t.name] = ok && err == nil
			})
		}
	}
	wg.Wait()
	return got
}

func baseline(s *Site, r *Result) {
	got := s.matrix()
	var b strings.Builder
	fmt.Fprintf(&b, "    %-16s", "")
	for _, t := range s.targets() {
		fmt.Fprintf(&b, "%-15s", t.name)
	}
	b.WriteString("\n")
	wrong := 0
	for _, a := range s.Agents() {
		fmt.Fprintf(&b, "    %-16s", a.Name)
		for _, t := range s.targets() {
			cell := "-"
			if o, ok := got[a][t.name]; ok {
				cell = yesno(o)
				if o != s.authorized(a, t.name) {
					cell, wrong = strings.ToUpper(cell)+"(!)", wrong+1
				}
			}
			fmt.Fprintf(&b, "%-15s", cell)
		}
		b.WriteString("\n")
	}
	fmt.Fprint(r.out, b.String())
	cells := 0
	for _, row := range got {
		cells += len(row)
	}
	r.Check(Check{What: "reachability matrix (TCP echo from each device to each target)",
		Expected: "open exactly where the policy's class rules (or the truck's safety floor) open it",
		Observed: fmt.Sprintf("%d of %d cells as the policy says", cells-wrong, cells), Pass: wrong == 0})

	// The tier-3 broker is rate-limited by the policy: 125 kB/s, with a
	// bucket of one second of that plus a 125 kB burst. Three seconds of
	// iperf3 may pass at most the rate for four seconds and the burst.
	const secs, rate, burst = 3, 125000.0, 125000.0
	bound := (rate*(secs+1) + burst) * 8 / secs / 1e6
	bps := lab.Iperf3(s.t, s.Dock.NS, netip.AddrPortFrom(s.Segment("broker-portal").Host.Addr(), brokerFeed), secs)
	r.Check(Check{What: "tier-3 broker feed is rate-limited (iperf3 from the dock gateway, 3 s)",
		Expected: fmt.Sprintf("at most %.2f Mbit/s (125 kB/s for 3 s, and a full bucket: 1 s of rate plus a 125 kB burst)", bound),
		Observed: fmt.Sprintf("%.2f Mbit/s", bps/1e6), Pass: bps > 0 && bps/1e6 <= bound})
}

func compromisedScanner(s *Site, r *Result) {
	fin := s.Segment("finance").Host
	start := time.Now()
	for _, t := range []target{{"finance", fin}, {"the dock gateway's ssh", s.DockSSH}} {
		open := s.reach(s.Scanner, t.ap)
		r.Check(Check{What: "the scanner tries " + t.name + " (" + t.ap.String() + ")",
			Expected: "refused by the scanner's own table (it was reachable before Bulkhead)", Observed: yesno(open), Pass: !open})
	}
	for _, t := range []netip.AddrPort{fin, s.DockSSH} {
		lat, ok := lab.Until(start, 20*time.Second, func() bool {
			return s.refusedReported(s.Scanner, controlapi.Flow{Direction: "out", Protocol: policy.TCP, Address: t.Addr(), Port: t.Port()})
		})
		r.Check(Check{What: "control hears of the attempt on " + t.String(),
			Expected: "a flows-refused report from the scanner naming it", Observed: found(ok, "reported"),
			Latency: lat, Of: "attempt -> in control's device record", Pass: ok})
	}

	r.Note("the attacker is root on the scanner: kills the agent and deletes its table")
	s.Scanner.Kill()
	s.Scanner.NS.MustRun(s.t, "nft", "delete", "table", "inet", "bulkhead")
	start = time.Now()
	open := s.reach(s.Scanner, s.DockSSH)
	r.Check(Check{What: "the scanner, its own enforcement gone, tries the dock gateway's ssh",
		Expected: "refused by the dock gateway's table", Observed: yesno(open), Pass: !open})
	lat, ok := lab.Until(start, 20*time.Second, func() bool {
		return s.refusedReported(s.Dock, controlapi.Flow{Direction: "in", Protocol: policy.TCP, Address: s.Scanner.LAN, Port: s.DockSSH.Port()})
	})
	r.Check(Check{What: "the dock gateway reports who knocked",
		Expected: "a flows-refused report from the dock gateway naming the scanner " + s.Scanner.LAN.String(), Observed: found(ok, "reported"),
		Latency: lat, Of: "attempt -> in control's device record", Pass: ok})
	start = time.Now()
	s.Scanner.Start(s.t)
	lat, ok = lab.Until(start, 10*time.Second, func() bool { return !s.reach(s.Scanner, fin) && s.Scanner.Status(s.t).Mode == "normal" })
	r.Check(Check{What: "the scanner's agent restarts from its cache",
		Expected: "policy v" + fmt.Sprint(s.Version) + " enforced again, finance refused", Observed: fmt.Sprintf("v%d, %s", s.Scanner.Status(s.t).PolicyVersion, s.Scanner.Status(s.t).Mode),
		Latency: lat, Of: "agent start -> table back", Pass: ok})
}

func found(ok bool, what string) string {
	if ok {
		return what
	}
	return "not " + what
}

func partnerDisconnect(s *Site, r *Result) {
	edi, wms := s.Segment("carrier-edi").Host, s.Segment("wms").Host
	flows := map[*Agent]*flow{s.Dock: s.openFlow(s.Dock, edi), s.Tele: s.openFlow(s.Tele, edi)}
	// A name typed wrong orders nothing, and says what was meant.
	auditBefore := s.Ctl.MustCLI(s.t, "audit")
	out, err := s.Ctl.CLI("revoke-partner", "northline", "--reason", "INC-231 partner breach")
	r.Note("$ bulkhead-control revoke-partner northline ...\n%s", strings.TrimSpace(out))
	ordered := strings.Contains(s.Ctl.MustCLI(s.t, "orders", "--all"), "revoke-partner northline ")
	unchanged := s.Ctl.MustCLI(s.t, "audit") == auditBefore
	r.Check(Check{What: "a mistyped partner (northline)", Expected: "refused naming northline-freight; no order, audit unchanged",
		Observed: fmt.Sprintf("exit error %v; an order for northline %v; audit unchanged %v", err != nil, ordered, unchanged),
		Pass:     err != nil && strings.Contains(out, "northline-freight") && !ordered && unchanged})

	r.Note("live EDI connections from the dock gateway and the telematics box; revoking northline-freight")
	start := time.Now()
	out = s.Ctl.MustCLI(s.t, "revoke-partner", "northline-freight", "--reason", "INC-231 partner breach", "--wait", "20s")
	r.Note("$ bulkhead-control revoke-partner northline-freight --wait 20s ...\n%s", strings.TrimSpace(out))
	for _, a := range []*Agent{s.Dock, s.Tele} {
		lat, ok := flows[a].diesAfter(start, 15*time.Second)
		r.Check(Check{What: "the " + a.Name + "'s established EDI connection",
			Expected: "cut", Observed: found(ok, "cut") + fmt.Sprintf(", last echo %s after the command", ms(lat)),
			Latency: lat, Of: "revoke-partner -> last echo", Pass: ok})
	}
	for _, a := range []*Agent{s.Dock, s.Tele} {
		open := s.reach(a, edi)
		r.Check(Check{What: "a new EDI connection from the " + a.Name, Expected: "shut", Observed: yesno(open), Pass: !open})
	}
	open := s.reach(s.Dock, wms)
	r.Check(Check{What: "the dock gateway's WMS (not the partner's)", Expected: "open", Observed: yesno(open), Pass: open})

	start = time.Now()
	out = s.Ctl.MustCLI(s.t, "reinstate-partner", "northline-freight", "--reason", "INC-231 closed", "--key", s.OpsKey, "--wait", "20s")
	r.Note("$ bulkhead-control reinstate-partner northline-freight --key ops.key --wait 20s ...\n%s", strings.TrimSpace(out))
	for _, a := range []*Agent{s.Dock, s.Tele} {
		lat, ok := lab.Until(start, 20*time.Second, func() bool { return s.reach(a, edi) })
		r.Check(Check{What: "reinstated (ops-signed): EDI from the " + a.Name, Expected: "open", Observed: yesno(ok),
			Latency: lat, Of: "reinstate-partner -> first echo", Pass: ok})
	}
}

func telematicsQuarantine(s *Site, r *Result) {
	edi, diag := s.Segment("carrier-edi").Host, s.Segment("diagnostics").Host
	data, safety := s.openFlow(s.Tele, edi), s.openFlow(s.Tele, s.Truck.Controller)
	start := time.Now()
	out := s.Ctl.MustCLI(s.t, "quarantine", s.Tele.ID, "--reason", "INC-232 tampered telematics box", "--wait", "20s")
	lat, ok := data.diesAfter(start, 15*time.Second)
	r.Note("$ bulkhead-control quarantine %s --wait 20s ...\n%s", s.Tele.ID, strings.TrimSpace(out))
	r.Check(Check{What: "the truck's live EDI upload", Expected: "cut", Observed: found(ok, "cut"),
		Latency: lat, Of: "quarantine -> last echo", Pass: ok})
	st := s.Tele.Status(s.t)
	var opened []string
	for _, t := range []target{{"carrier-edi", edi}, {"diagnostics", diag}} {
		if s.reach(s.Tele, t.ap) {
			opened = append(opened, t.name)
		}
	}
	r.Check(Check{What: "all data transmission", Expected: "mode quarantine, no segment, no tunnel peer",
		Observed: fmt.Sprintf("mode %s, segments reachable: %s, %d peers", st.Mode, list(opened), len(st.Tunnel.Peers)),
		Pass:     st.Mode == "quarantine" && len(opened) == 0 && len(st.Tunnel.Peers) == 0})
	r.Check(Check{What: "the vehicle safety controller (safety floor), on a connection open throughout",
		Expected: "still answering", Observed: map[bool]string{true: "answering", false: "SILENT"}[safety.alive()], Pass: safety.alive()})
	c := st.Control
	r.Check(Check{What: "the control channel", Expected: "connected, so ops can release it",
		Observed: map[bool]string{true: "connected", false: "not connected"}[c != nil && c.Connected], Pass: c != nil && c.Connected})

	start = time.Now()
	s.Ctl.MustCLI(s.t, "release", s.Tele.ID, "--reason", "INC-232 box replaced", "--key", s.OpsKey)
	lat, ok = lab.Until(start, 20*time.Second, func() bool { return s.reach(s.Tele, edi) })
	r.Check(Check{What: "release (ops-signed)", Expected: "EDI open again", Observed: yesno(ok),
		Latency: lat, Of: "release -> first echo", Pass: ok})
	outOfCoverage(s, r)
}

// outOfCoverage quarantines the truck while it is out of coverage for
// longer than a delivery lasts: the order is state at control, and lands
// on the truck's first sync back.
func outOfCoverage(s *Site, r *Result) {
	r.Note("the truck drives out of coverage (its link cut); a new incident quarantines it meanwhile")
	s.setDeviceLink(s.Tele, false)
	out, err := s.Ctl.CLI("quarantine", s.Tele.ID, "--reason", "INC-235 box reported stolen", "--wait", "3s")
	r.Note("$ bulkhead-control quarantine %s --wait 3s ...\n%s", s.Tele.ID, strings.TrimSpace(out))
	id := ""
	if f := strings.Fields(out); len(f) > 1 && f[0] == "quarantine" {
		id = f[1]
	}
	r.Check(Check{What: "--wait with the truck out of coverage", Expected: "exits non-zero naming the truck, pending",
		Observed: fmt.Sprintf("error %v, names it %v", err != nil, strings.Contains(out, s.Tele.ID) && strings.Contains(out, "pending")),
		Pass:     err != nil && id != "" && strings.Contains(out, s.Tele.ID) && strings.Contains(out, "pending")})
	away := 2*commandLifetime + time.Second
	r.Note("%v pass, longer than the %v each delivery lasts here (15 min by default): a message with that lifetime would be gone", away, commandLifetime)
	time.Sleep(away)
	if id != "" {
		r.Note("$ bulkhead-control orders %s\n%s", id, strings.TrimSpace(s.Ctl.MustCLI(s.t, "orders", id)))
	}
	start := time.Now()
	s.setDeviceLink(s.Tele, true)
	lat, ok := lab.Until(start, 60*time.Second, func() bool { return s.Tele.Status(s.t).Mode == "quarantine" })
	r.Check(Check{What: "back in coverage", Expected: "quarantined on its first sync", Observed: "mode " + s.Tele.Status(s.t).Mode,
		Latency: lat, Of: "link back -> quarantine", Pass: ok})
	out = s.Ctl.MustCLI(s.t, "release", s.Tele.ID, "--reason", "INC-235 box recovered", "--key", s.OpsKey, "--wait", "20s")
	r.Note("$ bulkhead-control release %s --key ops.key --wait 20s ...\n%s", s.Tele.ID, strings.TrimSpace(out))
}

func ransomwareDrill(s *Site, r *Result) {
	wms, fin := s.Segment("wms").Host, s.Segment("finance").Host
	before := map[*Agent]uint64{}
	for _, a := range s.Agents() {
		d, _ := s.device(a)
		before[a] = lastSeq(d)
	}
	r.Note("ransomware on the corporate side: every control replica down, corporate uplink cut")
	for _, c := range s.Controls() {
		c.Stop()
	}
	s.setUplink(false)
	r.Note("every device reboots")
	for _, a := range s.Agents() {
		a.Kill()
	}
	for _, a := range s.Agents() {
		start := time.Now()
		a.Start(s.t)
		st := a.Status(s.t)
		lat := time.Since(start)
		expected := fmt.Sprintf("policy v%d from the cache, mode normal", s.Version)
		observed := fmt.Sprintf("v%d, mode %s", st.PolicyVersion, st.Mode)
		ok := st.PolicyVersion == s.Version && st.Mode == "normal"
		if a == s.Tele {
			// Its geofence fails closed (restricted) until gpsd's first
			// fix is read, which may come after the agent is up.
			expected += " once gpsd's first fix is read (restricted until then)"
			ok = st.PolicyVersion == s.Version && lab.Within(10*time.Second, func() bool { return a.Status(s.t).Mode == "normal" })
			observed += fmt.Sprintf(" at start, %s after the first fix", a.Status(s.t).Mode)
		}
		r.Check(Check{What: "the " + a.Name + " boots with no control server", Expected: expected,
			Observed: observed, Latency: lat, Of: "start -> enforcing", Pass: ok})
	}
	checks := []struct {
		what string
		a    *Agent
		ap   netip.AddrPort
		want bool
	}{
		{"on-site WMS from the scanner", s.Scanner, wms, true},
		{"on-site WMS from the dock gateway", s.Dock, wms, true},
		{"lateral: the scanner to finance", s.Scanner, fin, false},
		{"lateral: the scanner to the dock gateway's ssh", s.Scanner, s.DockSSH, false},
		{"the truck's safety controller", s.Tele, s.Truck.Controller, true},
	}
	for _, c := range checks {
		got := lab.ReachesWithin(s.t, c.a.NS, "tcp", c.ap, map[bool]time.Duration{true: 10 * time.Second, false: 0}[c.want])
		r.Check(Check{What: c.what + ", isolated", Expected: yesno(c.want), Observed: yesno(got), Pass: got == c.want})
	}
	r.Note("the ransomware flushes the dock gateway's firewall")
	start := time.Now()
	s.Dock.NS.MustRun(s.t, "nft", "flush", "ruleset")
	lat, ok := lab.Until(start, 5*time.Second, func() bool { return s.Dock.Status(s.t).DriftRepairs > 0 })
	r.Check(Check{What: "the dock gateway's table, flushed offline", Expected: "restored", Observed: found(ok, "restored"),
		Latency: lat, Of: "flush -> restored", Pass: ok})

	r.Note("recovery: control and uplink back")
	// The replicas are up before the uplink, so each device finds the
	// one it enrolled with first, as before the attack.
	for _, c := range s.Controls() {
		c.Start(s.t)
	}
	s.setUplink(true)
	start = time.Now()
	for _, a := range s.Agents() {
		lat, ok := lab.Until(start, 100*time.Second, func() bool { c := a.Status(s.t).Control; return c != nil && c.Connected })
		r.Check(Check{What: "the " + a.Name + " reconnects", Expected: "connected", Observed: found(ok, "connected"),
			Latency: lat, Of: "control back -> connected (backoff since boot)", Pass: ok})
	}
	for _, a := range s.Agents() {
		var d controlapi.Device
		var gaps []uint64
		ok := lab.Within(20*time.Second, func() bool {
			d, _ = s.device(a)
			gaps = missing(d, before[a])
			_, drift := s.reported(a, "drift-repaired")
			return len(gaps) == 0 && lastSeq(d) > before[a] && (a != s.Dock || drift)
		})
		want := "every event since before the outage, in order, none dropped"
		if a == s.Dock {
			want += ", the offline drift repair among them"
		}
		r.Check(Check{What: "the " + a.Name + "'s reports from the outage at control", Expected: want,
			Observed: fmt.Sprintf("events %d-%d, missing %v, %d dropped", before[a]+1, lastSeq(d), gaps, d.ReportsDropped),
			Pass:     ok && d.ReportsDropped == 0})
	}
}

func lastSeq(d controlapi.Device) uint64 {
	if len(d.Reports) == 0 {
		return 0
	}
	return d.Reports[len(d.Reports)-1].Seq
}

// missing is the sequence numbers above from that the device's reports
// skip.
func missing(d controlapi.Device, from uint64) []uint64 {
	var gaps []uint64
	want := from + 1
	for _, e := range d.Reports {
		if e.Seq <= from {
			continue
		}
		for ; want < e.Seq; want++ {
			gaps = append(gaps, want)
		}
		want = e.Seq + 1
	}
	return gaps
}

func context(s *Site, r *Result) {
	wms, edi, diag := s.Segment("wms").Host, s.Segment("carrier-edi").Host, s.Segment("diagnostics").Host

	// A shift ending at the next minute (at least 20 s away), pushed
	// now; the other two changes are made while it runs out.
	now := time.Now().UTC()
	end := now.Truncate(time.Minute).Add(time.Minute)
	if end.Sub(now) < 20*time.Second {
		end = end.Add(time.Minute)
	}
	shift := [2]string{end.Add(-8 * time.Hour).Format("15:04"), end.Format("15:04")}
	s.Push(&shift)
	s.WaitVersion(s.Version, 20*time.Second)
	r.Note("policy v%d: scanners reach WMS only during the shift %s-%s UTC", s.Version, shift[0], shift[1])

	r.Note("the truck drives out of its service area (its receiver is read through gpsd)")
	start := time.Now()
	s.gps.Move(lab.Point{Lat: yard.Lat + 0.009, Lon: yard.Lon}) // 1 km north
	lat, ok := lab.Until(start, 30*time.Second, func() bool { return s.Tele.Status(s.t).Mode == "restricted" })
	st := s.Tele.Status(s.t)
	r.Check(Check{What: "the telematics box outside its geofence", Expected: "mode restricted: its profile keeps diagnostics only",
		Observed: fmt.Sprintf("mode %s, open %s (%s)", st.Mode, list(st.Open), strings.Join(st.Why, "; ")),
		Latency:  lat, Of: "leaving the fence -> restricted", Pass: ok && slices.Equal(st.Open, []string{"diagnostics"})})
	ediOpen, diagOpen := s.reach(s.Tele, edi), lab.ReachesWithin(s.t, s.Tele.NS, "tcp", diag, 10*time.Second)
	r.Check(Check{What: "the truck's EDI and diagnostics outside the fence", Expected: "EDI shut, diagnostics open",
		Observed: fmt.Sprintf("EDI %s, diagnostics %s", yesno(ediOpen), yesno(diagOpen)), Pass: !ediOpen && diagOpen})
	start = time.Now()
	s.gps.Move(parked)
	lat, ok = lab.Until(start, 30*time.Second, func() bool { return s.Tele.Status(s.t).Mode == "normal" })
	st = s.Tele.Status(s.t)
	r.Check(Check{What: "back in the yard", Expected: "mode normal",
		Observed: strings.TrimSpace(fmt.Sprintf("mode %s %s", st.Mode, strings.Join(st.Why, "; "))),
		Latency:  lat, Of: "back inside -> normal", Pass: ok})

	r.Note("the dock gateway's EDR sensor (%s) dies", s.SensorName)
	start = time.Now()
	s.sensor.Process.Kill()
	s.sensor.Wait()
	lat, ok = lab.Until(start, 10*time.Second, func() bool { return !s.reach(s.Dock, edi) })
	st = s.Dock.Status(s.t)
	r.Check(Check{What: "the dock gateway without its required process", Expected: "mode restricted: WMS only",
		Observed: fmt.Sprintf("mode %s, open %s", st.Mode, list(st.Open)),
		Latency:  lat, Of: "kill -> EDI refused", Pass: ok && st.Mode == "restricted" && slices.Equal(st.Open, []string{"wms"})})
	start = time.Now()
	s.sensor = s.runSensor()
	lat, ok = lab.Until(start, 10*time.Second, func() bool { return s.Dock.Status(s.t).Mode == "normal" })
	r.Check(Check{What: "the sensor restarted", Expected: "mode normal", Observed: "mode " + s.Dock.Status(s.t).Mode,
		Latency: lat, Of: "restart -> normal", Pass: ok})

	open := s.reach(s.Scanner, wms)
	r.Check(Check{What: "the scanner during its shift", Expected: "WMS open", Observed: "WMS " + yesno(open), Pass: open})
	r.Note("waiting for the shift to end at %s UTC (%s from now)", end.Format("15:04:05"), time.Until(end).Round(time.Second))
	time.Sleep(time.Until(end))
	lat, ok = lab.Until(end, 10*time.Second, func() bool { return !s.reach(s.Scanner, wms) })
	st = s.Scanner.Status(s.t)
	r.Check(Check{What: "the scanner once the shift has ended", Expected: "WMS shut, diagnostics still open",
		Observed: fmt.Sprintf("open %s", list(st.Open)), Latency: lat, Of: "shift end -> WMS refused",
		Pass: ok && slices.Equal(st.Open, []string{"diagnostics"})})
	s.Push(nil) // the next scenarios start from the site's usual policy
	s.WaitVersion(s.Version, 20*time.Second)
}

func attacks(s *Site, r *Result) {
	fin := s.Segment("finance").Host

	// A compromised control server forwards a bundle that opens finance
	// to scanners, signed by a key no device trusts.
	forged := s.Version + 1
	doc := filepath.Join(s.dir, "forged.json")
	if err := os.WriteFile(doc, []byte(strings.Replace(s.policyJSON(nil), `{"segment": "diagnostics"}],
      "profiles": {"restricted": ["wms"], "diagnostic": ["diagnostics"]}`, `{"segment": "diagnostics"}, {"segment": "finance"}],
      "profiles": {"restricted": ["wms"], "diagnostic": ["diagnostics"]}`, 1)), 0o600); err != nil {
		s.t.Fatal(err)
	}
	forgedFile := s.Sign(forged, doc, s.AttackerKey)
	// The server checks what it is given against the ops keys it
	// publishes, and refuses what devices would refuse.
	out, err := s.Ctl.CLI("policy", "push", forgedFile)
	r.Check(Check{What: fmt.Sprintf("forged bundle v%d (attacker's key) pushed to the control server", forged),
		Expected: "refused by control itself, version left free", Observed: strings.TrimSpace(out),
		Pass: err != nil && strings.Contains(out, "not a trusted ops key")})
	// An attacker who takes the control plane over (every replica: they
	// share their configuration) can make it trust their key; the devices
	// pin the real one.
	var honest []lab.ControlOptions
	for _, c := range s.Controls() {
		honest = append(honest, c.Options())
		taken := c.Options()
		taken.OpsPub = []string{filepath.Join(filepath.Dir(s.AttackerKey), "ops.pub")}
		c.RestartWith(s.t, taken)
	}
	start := time.Now()
	s.Ctl.MustCLI(s.t, "policy", "push", forgedFile)
	lat, ok := lab.Until(start, 20*time.Second, func() bool {
		for _, a := range s.Agents() {
			if _, ok := s.reported(a, "bundle-rejected", "not a trusted ops key"); !ok {
				return false
			}
		}
		return true
	})
	var versions []string
	unchanged := true
	for _, a := range s.Agents() {
		v := a.Status(s.t).PolicyVersion
		unchanged = unchanged && v == s.Version
		versions = append(versions, fmt.Sprintf("v%d", v))
	}
	open := s.reach(s.Scanner, fin)
	r.Check(Check{What: "the same bundle through a control plane the attacker took over (its replicas trust the attacker's key)",
		Expected: fmt.Sprintf("rejected by all three devices and audited; they stay on v%d; finance stays shut to the scanner", s.Version),
		Observed: fmt.Sprintf("%s audited; versions %s; finance %s", found(ok, "rejection"), strings.Join(versions, " "), yesno(open)),
		Latency:  lat, Of: "push -> every rejection at control", Pass: ok && !open && unchanged})
	for i, c := range s.Controls() {
		c.RestartWith(s.t, honest[i]) // restored: it no longer offers what it cannot verify
	}

	// An old bundle, validly signed, dropped on the scanner (a USB stick
	// from last month, or a network replaying it).
	old := filepath.Join(s.Scanner.Inbox(), "policy-v1.dsse")
	raw, err := os.ReadFile(s.Bundles[1])
	if err != nil {
		s.t.Fatal(err)
	}
	start = time.Now()
	if err := os.WriteFile(old, raw, 0o600); err != nil {
		s.t.Fatal(err)
	}
	lat, ok = lab.Until(start, 20*time.Second, func() bool {
		_, ok := s.reported(s.Scanner, "bundle-rejected", "version 1")
		return ok
	})
	_, renamed := os.Stat(old + ".rejected")
	v := s.Scanner.Status(s.t).PolicyVersion
	r.Check(Check{What: "rolled-back bundle: a validly signed v1 dropped into the scanner's inbox",
		Expected: fmt.Sprintf("rejected, audited, file renamed .rejected; the scanner stays on v%d", s.Version),
		Observed: fmt.Sprintf("%s; %s; v%d", found(ok, "rejection reported"), found(renamed == nil, "renamed"), v),
		Latency:  lat, Of: "drop -> rejection at control", Pass: ok && renamed == nil && v == s.Version})

	// A release an operator signed is captured and replayed.
	key, err := opskey.LoadPrivate(s.OpsKey)
	if err != nil {
		s.t.Fatal(err)
	}
	release := func(id string) []byte {
		now := time.Now().UTC()
		raw, err := command.Sign(command.Command{ID: id, Kind: command.Release, Target: command.Target{Devices: []string{s.Scanner.ID}},
			Reason: "INC-233 cleared", IssuedAt: now, ExpiresAt: now.Add(10 * time.Minute)}, key)
		if err != nil {
			s.t.Fatal(err)
		}
		return raw
	}
	mode := func(m string) bool { return s.Scanner.Status(s.t).Mode == m }
	s.Ctl.MustCLI(s.t, "quarantine", s.Scanner.ID, "--reason", "INC-233 scanner beaconing")
	if !lab.Within(20*time.Second, func() bool { return mode("quarantine") }) {
		s.t.Fatalf("the scanner was never quarantined")
	}
	captured := release("cmd-release-233a")
	if err := s.Ctl.Deliver(s.t, captured); err != nil {
		s.t.Fatalf("the ops-signed release was refused: %v", err)
	}
	if !lab.Within(20*time.Second, func() bool { return mode("normal") }) {
		s.t.Fatalf("the ops-signed release was not obeyed")
	}
	s.Ctl.MustCLI(s.t, "quarantine", s.Scanner.ID, "--reason", "INC-234 beaconing again")
	if !lab.Within(20*time.Second, func() bool { return mode("quarantine") }) {
		s.t.Fatalf("the scanner was never quarantined again")
	}
	err = s.Ctl.Deliver(s.t, captured)
	r.Check(Check{What: "replayed release: the captured, ops-signed release given to control again",
		Expected: "refused (already given)", Observed: fmt.Sprint(err), Pass: err != nil && strings.Contains(err.Error(), "already given")})
	// The same release carried to the scanner's inbox, past control.
	start = time.Now()
	if err := os.WriteFile(filepath.Join(s.Scanner.Inbox(), "release-233a.dsse"), captured, 0o600); err != nil {
		s.t.Fatal(err)
	}
	lat, ok = lab.Until(start, 20*time.Second, func() bool {
		_, ok := s.reported(s.Scanner, "command-rejected", "cmd-release-233a", "imposed after")
		return ok
	})
	m := s.Scanner.Status(s.t).Mode
	r.Check(Check{What: "replayed release: the same release dropped into the scanner's inbox",
		Expected: "rejected (the quarantine was imposed after it), audited; the scanner stays quarantined",
		Observed: fmt.Sprintf("%s; mode %s", found(ok, "rejection reported"), m), Latency: lat, Of: "drop -> rejection at control",
		Pass: ok && m == "quarantine"})
	if err := s.Ctl.Deliver(s.t, release("cmd-release-234")); err != nil {
		s.t.Fatalf("a fresh release was refused: %v", err)
	}
	if !lab.Within(20*time.Second, func() bool { return mode("normal") }) {
		s.t.Fatalf("a fresh release was not obeyed")
	}
}

// rootedTruck is the article's compromised telematics unit with root
// taken: the agent killed, the table flushed, and the box's own
// WireGuard key in a WireGuard of root's, with routes to WMS, finance
// and EDI through their gateways. The segment gateways hold it to its
// class's access and obey the desk's quarantine without the box.
func rootedTruck(s *Site, r *Result) {
	t := s.t
	edi, wms, fin := s.Segment("carrier-edi"), s.Segment("wms"), s.Segment("finance")
	addr := tunnelAddress(t, s.Tele)
	r.Note("root on the telematics box: kills the agent, flushes the ruleset, runs its own WireGuard with the box's key (tunnel address %s)", addr)
	s.Tele.Kill()
	s.Tele.NS.MustRun(t, "nft", "flush", "ruleset")
	rogue := lab.StartGateway(t, s.Tele.NS, lab.DebianWireGuard, s.Tele.LAN, 51899, addr.String())
	s.Tele.NS.MustRun(t, "wg", "set", rogue.Iface, "private-key", filepath.Join(s.Tele.Dir, "state", "wg.key"))
	for _, seg := range []*Segment{wms, fin, edi} {
		rogue.RouteVia(t, seg.Key, seg.Endpoint, netip.PrefixFrom(seg.Host.Addr(), 24).Masked().String())
	}
	r.Note("its routes: wms, finance and carrier-edi each through its own gateway")
	table := strings.TrimSpace(s.Tele.NS.MustRun(t, "nft", "list", "ruleset"))
	r.Check(Check{What: "the box's own enforcement", Expected: "gone: no agent, no table", Observed: fmt.Sprintf("table %q", table), Pass: table == ""})

	for _, c := range []struct {
		seg  *Segment
		want bool
	}{{wms, false}, {fin, false}, {edi, true}} {
		open := s.reach(s.Tele, c.seg.Host)
		if c.want && !open {
			open = lab.ReachesWithin(t, s.Tele.NS, "tcp", c.seg.Host, lab.FirstContact)
		}
		why := "its class has no rule for " + c.seg.Name + ": that gateway does not admit the box's key"
		if c.want {
			why = "its class's rule: the gateway admits it there"
		}
		r.Check(Check{What: "the rooted box tries " + c.seg.Name + " (" + c.seg.Host.String() + ")", Expected: yesno(c.want) + " (" + why + ")",
			Observed: yesno(open), Pass: open == c.want})
	}
	safe := s.reach(s.Tele, s.Truck.Controller)
	r.Check(Check{What: "the truck's safety controller", Expected: "open: it is local to the truck, no gateway in the way",
		Observed: yesno(safe), Pass: safe})

	data := s.openFlow(s.Tele, edi.Host)
	start := time.Now()
	out := s.Ctl.MustCLI(t, "quarantine", s.Tele.ID, "--reason", "INC-240 telematics box rooted")
	r.Note("$ bulkhead-control quarantine %s ...\n%s", s.Tele.ID, strings.TrimSpace(out))
	lat, ok := data.diesAfter(start, 15*time.Second)
	r.Check(Check{What: "the rooted box's live EDI upload", Expected: "cut at the carrier-edi gateway (the box's agent is dead)",
		Observed: found(ok, "cut"), Latency: lat, Of: "quarantine -> last echo", Pass: ok})
	open := s.reach(s.Tele, edi.Host)
	r.Check(Check{What: "a new EDI connection from the rooted box", Expected: "shut", Observed: yesno(open), Pass: !open})

	start = time.Now()
	s.Ctl.MustCLI(t, "release", s.Tele.ID, "--reason", "INC-240 box reimaged", "--key", s.OpsKey)
	lat, ok = lab.Until(start, 20*time.Second, func() bool { return s.reach(s.Tele, edi.Host) })
	r.Check(Check{What: "release (ops-signed)", Expected: "EDI open again at the gateway", Observed: yesno(ok),
		Latency: lat, Of: "release -> first echo (root's WireGuard sends on its dead session until its own 15 s rekey timer)", Pass: ok})

	r.Note("the box is reimaged: root's WireGuard gone, the agent back")
	rogue.Stop()
	start = time.Now()
	s.Tele.Start(t)
	lat, ok = lab.Until(start, 20*time.Second, func() bool {
		return s.Tele.Status(t).Mode == "normal" && s.reach(s.Tele, edi.Host) && !s.reach(s.Tele, wms.Host)
	})
	r.Check(Check{What: "the box's agent restarts from its cache", Expected: "normal, EDI open through its own tunnel, wms refused",
		Observed: fmt.Sprintf("mode %s", s.Tele.Status(t).Mode), Latency: lat, Of: "agent start -> EDI open", Pass: ok})
}

// tunnelAddress is the address control assigned a device's tunnel.
func tunnelAddress(t lab.T, a *Agent) netip.Prefix {
	for _, f := range strings.Fields(a.NS.MustRun(t, "ip", "-o", "-4", "addr", "show", "dev", a.Iface)) {
		if p, err := netip.ParsePrefix(f); err == nil {
			return p
		}
	}
	t.Fatalf("the %s has no tunnel address", a.Name)
	return netip.Prefix{}
}

// controlFailover kills the control replica every device holds its poll
// on right after a partner revocation committed on another, gives an
// order while it is down, and restarts the database under the replicas.
func controlFailover(s *Site, r *Result) {
	edi, broker := s.Segment("carrier-edi").Host, s.Segment("broker-portal").Host
	wms, finance := s.Segment("wms").Host, s.Segment("finance").Host
	b, c := s.Replicas[0], s.Replicas[1]
	r.Note("every device and gateway holds its poll on %s, the replica it enrolled with; %s and %s share its database", s.Ctl.URL, b.URL, c.URL)
	flows := map[*Agent]*flow{s.Dock: s.openFlow(s.Dock, edi), s.Tele: s.openFlow(s.Tele, edi)}
	start := time.Now()
	out := c.MustCLI(s.t, "revoke-partner", "northline-freight", "--reason", "INC-240 partner breach, failover drill")
	s.Ctl.Stop()
	id := orderID(out)
	r.Note("$ bulkhead-control revoke-partner northline-freight ... (on %s)\n%s\nthen %s is killed (SIGKILL)", c.URL, strings.TrimSpace(out), s.Ctl.URL)
	for _, a := range []*Agent{s.Dock, s.Tele} {
		lat, ok := flows[a].diesAfter(start, 15*time.Second)
		r.Check(Check{What: "the " + a.Name + "'s established EDI connection, its replica dead", Expected: "cut",
			Observed: found(ok, "cut") + fmt.Sprintf(", last echo %s after the command", ms(lat)), Latency: lat, Of: "revoke-partner -> last echo", Pass: ok})
	}
	lat, ok := lab.Until(start, 20*time.Second, func() bool { return s.appliedEverywhere(b, id) })
	r.Check(Check{What: "the order on every enrolled device and gateway, as another replica shows it", Expected: "applied on all",
		Observed: found(ok, "applied on all"), Latency: lat, Of: "revoke-partner -> all applied", Pass: ok})

	start = time.Now()
	out = b.MustCLI(s.t, "reinstate-partner", "northline-freight", "--reason", "INC-240 closed", "--key", s.OpsKey, "--wait", "20s")
	r.Note("with that replica still down, through another:\n$ bulkhead-control reinstate-partner northline-freight --key ops.key --wait 20s ...\n%s", strings.TrimSpace(out))
	for _, a := range []*Agent{s.Dock, s.Tele} {
		lat, ok := lab.Until(start, 20*time.Second, func() bool { return s.reach(a, edi) })
		r.Check(Check{What: "EDI from the " + a.Name + ", reinstated while its first replica is down", Expected: "open", Observed: yesno(ok),
			Latency: lat, Of: "reinstate-partner -> first echo", Pass: ok})
	}

	r.Note("the database crashes (immediate shutdown) under the replicas")
	s.DB.Stop(s.t)
	_, err := b.CLI("revoke-partner", "spotload-brokers", "--reason", "INC-241")
	r.Check(Check{What: "an order while the database is down", Expected: "refused, nothing acknowledged", Observed: found(err != nil, "refused"), Pass: err != nil})
	held := s.reach(s.Scanner, wms) && !s.reach(s.Scanner, finance) && s.reach(s.Tele, edi)
	r.Check(Check{What: "devices while the database is down", Expected: "enforcing (scanner: WMS open, finance shut; EDI open)", Observed: yesno(held), Pass: held})
	s.DB.Start(s.t)
	r.Note("the database is back; the replicas reconnect by themselves")
	start = time.Now()
	id = ""
	lat, ok = lab.Until(start, 30*time.Second, func() bool {
		if id == "" {
			if out, err := c.CLI("revoke-partner", "spotload-brokers", "--reason", "INC-241"); err == nil {
				id = orderID(out)
			}
		}
		return id != "" && s.appliedEverywhere(b, id)
	})
	shut := ok && !s.reach(s.Dock, broker)
	r.Check(Check{What: "an order after the restart: spotload-brokers revoked, the dock gateway's broker portal", Expected: "applied on all; shut",
		Observed: found(ok, "applied on all") + "; " + map[bool]string{true: "shut", false: "open"}[shut], Latency: lat, Of: "database back -> all applied", Pass: ok && shut})
	start = time.Now()
	b.MustCLI(s.t, "reinstate-partner", "spotload-brokers", "--reason", "INC-241 closed", "--key", s.OpsKey, "--wait", "20s")
	lat, ok = lab.Until(start, 20*time.Second, func() bool { return s.reach(s.Dock, broker) })
	r.Check(Check{What: "the broker portal, reinstated", Expected: "open", Observed: yesno(ok), Latency: lat, Of: "reinstate-partner -> first echo", Pass: ok})
	s.Ctl.Start(s.t)
}

// orderID is the order a command's output names ("" if none).
func orderID(out string) string {
	for _, f := range strings.Fields(out) {
		if strings.HasPrefix(f, "order-") {
			return f
		}
	}
	return ""
}

// appliedEverywhere reports whether every device order id covers holds
// it, as replica c shows it.
func (s *Site) appliedEverywhere(c *lab.Control, id string) bool {
	var o controlapi.Order
	if err := c.Ops(s.t).Call("GET", controlapi.PathAdminOrders+"/"+id, nil, &o); err != nil || len(o.Devices) == 0 {
		return false
	}
	for _, d := range o.Devices {
		if d.State != controlapi.OrderApplied {
			return false
		}
	}
	return true
}
