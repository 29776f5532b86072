package bench

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/nftables"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// kernelCases need root, ip and nft; they measure the real kernel.
func kernelCases() []Case {
	var cs []Case
	for _, n := range []int{100, 1000, 10000} {
		target := time.Duration(0)
		if n == 10000 {
			target = 100 * time.Millisecond
		}
		cs = append(cs,
			Case{Name: fmt.Sprintf("apply via netlink, %d destinations", n), Target: target, Privileged: true,
				NoSlowerThan: fmt.Sprintf("nft -f of the same ruleset, %d destinations", n),
				Run:          func(b B) { benchApply(b, n) }, Note: "whole table replaced in one transaction"},
			Case{Name: fmt.Sprintf("nft -f of the same ruleset, %d destinations", n), Privileged: true,
				Run: func(b B) { benchNftF(b, n) }, Note: "reference: the nft binary loading Text()"},
		)
	}
	cs = append(cs, Case{Name: "start to enforced, from the cache", Target: 50 * time.Millisecond, Privileged: true,
		Run: benchStart, Note: "exec of bin/bulkhead run until its boot apply is logged"},
		Case{Name: "drift repaired: the table removed from outside, until it is back", Privileged: true, Unit: "ms-p99", Also: []string{"ms-p50"}, Max: 1000,
			Run:  benchDriftRepair,
			Note: "30 trials, alternately `nft flush ruleset` and `nft delete table inet bulkhead`, against the real agent enforcing 100 destinations; timed from the command's return to the table's reappearing (one transaction brings all of it back), read through netlink every millisecond; each restored table is checked against the original; the agent checks twice a second, and each trial starts at a random point of that period"},
	)
	return cs
}

// benchDriftRepair removes the real agent's table from outside, again and
// again, and times how long the device stays without it.
func benchDriftRepair(b B) {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go")
	ns := lab.NewNS(b, "drift")
	a := runAgent(b, ns, "scanner", "100.64.0.2/32", 0, nil)
	a.apply(b, 1, LargePolicy(100))
	want := lab.CanonicalTable(ns.MustRun(b, "nft", "list", "table", "inet", nft.Table))
	conn, err := nftables.New(nftables.WithNetNSFd(ns.FD()))
	if err != nil {
		b.Fatal(err)
	}
	present := func() bool {
		t, err := conn.ListTableOfFamily(nft.Table, nftables.TableFamilyINet)
		return err == nil && t != nil
	}
	trials := 30
	if Quick {
		trials = 2
	}
	tampers := [][]string{{"nft", "flush", "ruleset"}, {"nft", "delete", "table", "inet", nft.Table}}
	var ms []float64
	b.ResetTimer()
	for range b.N {
		ms = ms[:0]
		for i := range trials {
			b.StopTimer()
			// A second of calm, so no trial lands on a repair still
			// under way, and a random part of the check period, so the
			// trials sample every phase of it instead of one.
			time.Sleep(time.Second + rand.N(500*time.Millisecond))
			b.StartTimer()
			ns.MustRun(b, tampers[i%2]...)
			start := time.Now()
			for deadline := start.Add(10 * time.Second); !present(); time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					b.Fatalf("trial %d: the table was not restored after %q", i, tampers[i%2])
				}
			}
			ms = append(ms, float64(time.Since(start).Microseconds())/1000)
			b.StopTimer()
			if got := lab.CanonicalTable(ns.MustRun(b, "nft", "list", "table", "inet", nft.Table)); got != want {
				b.Fatalf("trial %d: the restored table differs from the original:\n%s\nwant\n%s", i, got, want)
			}
			b.StartTimer()
		}
	}
	b.StopTimer()
	b.ReportMetric(percentile(ms, 0.99), "ms-p99")
	b.ReportMetric(percentile(ms, 0.50), "ms-p50")
}

// rulesets returns two rulesets of n destinations that differ in every
// set element (the floor's address, every destination's first port), so
// each timed apply changes the whole table: the worst case.
func rulesets(n int) [2]nft.Ruleset {
	var out [2]nft.Ruleset
	now := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	for i := range out {
		doc := LargePolicy(n)
		for _, seg := range doc.Segments {
			for d := range seg.Destinations {
				seg.Destinations[d].Ports = []policy.PortRange{{First: uint16(443 + i), Last: uint16(443 + i)}, {First: 8000, Last: 8099}}
			}
		}
		floor := []localpolicy.FloorRule{{Name: "plc", Destination: policy.Destination{
			CIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, 50, byte(i)}), 32), Protocol: policy.TCP,
			Ports: []policy.PortRange{{First: 502, Last: 502}}}}}
		d := localpolicy.Evaluate(localpolicy.Input{Bundle: &bundle.Payload{Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour), Policy: doc},
			Device: scanner, Now: now, Floor: floor})
		out[i] = nft.Build(d, nft.Options{DHCP: true, Tunnel: "bh0"})
	}
	return out
}

func benchApply(b B, n int) {
	lab.RequirePrivileged(b, "nft")
	ns := lab.NewNS(b, "bench")
	e := nft.NewEnforcer(nft.WithNetNS(ns.FD()))
	rs := rulesets(n)
	i := 0
	for b.Loop() {
		if _, err := e.Apply(rs[i%2]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func benchNftF(b B, n int) {
	lab.RequirePrivileged(b, "nft")
	ns := lab.NewNS(b, "bench")
	rs := rulesets(n)
	dir := b.TempDir()
	var files [2]string
	for i, r := range rs {
		files[i] = filepath.Join(dir, fmt.Sprintf("r%d.nft", i))
		if err := os.WriteFile(files[i], []byte(r.Text()), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	i := 0
	for b.Loop() {
		if out, err := ns.Command("nft", "-f", files[i%2]).CombinedOutput(); err != nil {
			b.Fatalf("nft -f: %v: %s", err, out)
		}
		i++
	}
}

// benchStart measures a cold start of the real agent binary with a cached
// 1,000-destination bundle: exec until the boot apply is logged.
func benchStart(b B) {
	lab.RequirePrivileged(b, "nft")
	ns := lab.NewNS(b, "start")
	dir := b.TempDir()
	bin := lab.Binary(b, "cmd/bulkhead")
	ops := newOpsKeys(b, dir)
	now := time.Now().UTC()
	raw, err := bundle.Sign(bundle.Payload{Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: LargePolicy(1000)}, ops.priv)
	if err != nil {
		b.Fatal(err)
	}
	cfg := filepath.Join(dir, "config.json")
	iface := "bh-" + ns.Name[len(ns.Name)-6:]
	b.Cleanup(func() { os.Remove("/var/run/wireguard/" + iface + ".sock") }) // the agent is killed
	os.WriteFile(cfg, []byte(fmt.Sprintf(`{"device": {"class": "scanner"}, "trust": {"keys": [%q]}, "state_dir": %q, "admin_socket": %q,
  "tunnel": {"interface": %q}}`, ops.pubFile, filepath.Join(dir, "state"), filepath.Join(dir, "admin.sock"), iface)), 0o600)
	os.MkdirAll(filepath.Join(dir, "state", "inbox"), 0o700)
	os.WriteFile(filepath.Join(dir, "state", "inbox", "b.dsse"), raw, 0o600)
	// A first run installs the bundle from the drop directory into the cache.
	// start execs the agent and returns once it logged wait; stop kills it.
	start := func(wait string) (stop func()) {
		cmd := ns.Command(bin, "run", "--config", cfg)
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		stop = func() { cmd.Process.Kill(); cmd.Wait() }
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), wait) {
				return stop
			}
		}
		stop()
		b.Fatalf("agent exited before logging %q", wait)
		return nil
	}
	// A first run installs the bundle from the drop directory into the cache.
	start("bundle accepted")()
	b.ResetTimer()
	for range b.N {
		// Remove the table the previous run left, so every start really
		// enforces; only the start itself is timed.
		b.StopTimer()
		ns.Run("nft", "delete", "table", "inet", nft.Table)
		b.StartTimer()
		stop := start("why=boot")
		b.StopTimer()
		stop()
		b.StartTimer()
	}
}
