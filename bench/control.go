package bench

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// controlCases measure the control channel.
func controlCases() []Case {
	return []Case{
		{Name: "idle control traffic per device per day", Privileged: true, Unit: "MB/day", Max: 1,
			Ref:  "comparable agents: 20-30 MB/day, as their users report",
			Run:  benchIdleBytes,
			Note: "bytes both ways on the device's link over idle sync cycles (server keep-alive shortened to 2 s), scaled to the default 4-minute keep-alive: 360 cycles a day"},
		{Name: "kill-switch latency: quarantine to the last packet", Privileged: true, Unit: "ms-p99", Also: []string{"ms-p50"}, Max: 250,
			Run:  benchKillSwitch,
			Note: "100 trials: from starting `bulkhead-control quarantine ID` (real TLS, server-signed command, long-poll) to the last packet of a running 1 ms UDP flow through the tunnel reaching the segment host; an ops-signed `release` between trials"},
		{Name: "partner revocation fan-out: 1,000 long-polls and 2 agents", Privileged: true, Unit: "ms-p99", Also: []string{"ms-p50", "ms-max"}, Max: 1000,
			Run:  benchFanOut,
			Note: "5 trials of `bulkhead-control revoke-partner` reaching 1,000 held long-polls of `bulkhead-lab crowd` (real TLS, one client certificate each) and 2 real agents; a crowd device counts when its answer arrives, an agent when the last packet of its 1 ms UDP flow to the partner's segment does; an ops-signed `reinstate-partner` between trials"},
		{Name: fmt.Sprintf("order fan-out: %s long-polls over %d replicas on PostgreSQL, and 2 agents", grouped(ReplicaCrowd), replicasFor(ReplicaCrowd)), Privileged: true, Unit: "ms-p99",
			Also: []string{"ms-p50", "ms-max", "kill-ms-p99", "kill-ms-max", "KiB/poll", "cpu-ms/order"}, Max: 1000,
			Run:  benchFanOutReplicas,
			Note: "as the 1,000-poll case, with three `bulkhead-control serve --db` replicas sharing one PostgreSQL (Debian's, in the lab), a third of the crowd enrolled with each (each member tries the other replicas in turn), the agents with the first, and the order given on the last, so it reaches the polls on the others through LISTEN/NOTIFY; then one more trial that starts by killing (SIGKILL) the first replica, reported as kill-ms (its devices reconnect to another after a retry of about a second, jittered as the agent's first). KiB/poll: the replicas' VmRSS with every poll held, above what they held before the crowd enrolled, per poll (enrolment garbage included); cpu-ms/order: CPU of every process in the control namespace (replicas and PostgreSQL) from the order to the last device, per order"},
	}
}

// benchIdleBytes enrols a real agent with a real server and counts what
// an idle device costs on the wire per long-poll cycle.
func benchIdleBytes(b B) {
	lab.RequirePrivileged(b, "nft", "wg")
	const keepAlive = 2 * time.Second
	ctlNS, devNS := lab.NewNS(b, "ctl"), lab.NewNS(b, "dev")
	devIf, _ := lab.Link(b, devNS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	ctl := lab.StartControl(b, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"), keepAlive)

	a := runAgent(b, devNS, "truck", "100.64.0.2/32", 0, nil)
	a.enroll(b, ctl)
	cycles := 10
	if Quick {
		cycles = 1
	}
	time.Sleep(keepAlive + time.Second) // the enrolment's reports are out
	b.ResetTimer()
	var perDay float64
	for range b.N {
		before := linkBytes(b, devNS, devIf)
		time.Sleep(time.Duration(cycles) * keepAlive)
		perCycle := float64(linkBytes(b, devNS, devIf)-before) / float64(cycles)
		perDay = perCycle * float64(24*time.Hour/server.DefaultKeepAlive) / 1e6
	}
	b.StopTimer()
	b.ReportMetric(perDay, "MB/day")
}

// linkBytes is rx plus tx bytes of iface in ns, from the kernel's counters.
func linkBytes(b testing.TB, ns *lab.NS, iface string) uint64 {
	var total uint64
	for _, dir := range []string{"rx_bytes", "tx_bytes"} {
		out := ns.MustRun(b, "cat", "/sys/class/net/"+iface+"/statistics/"+dir)
		n, err := strconv.ParseUint(strings.TrimSpace(out), 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		total += n
	}
	return total
}

// flowPort is the UDP port of the flow the kill-switch must cut.
const flowPort = 9000

// benchKillSwitch measures how long a running flow survives a quarantine
// issued from the ops CLI: the real control server, the real agent over
// its long-poll, a Debian wireguard-go gateway, and a segment host that
// notes when each packet of a 1 ms UDP stream arrives.
func benchKillSwitch(b B) {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go")
	ctlNS, devNS, gwNS := lab.NewNS(b, "ctl"), lab.NewNS(b, "dev"), lab.NewNS(b, "gw")
	lab.Link(b, devNS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	lab.Link(b, devNS, "192.0.2.2/30", gwNS, "192.0.2.1/30")
	// Control publishes the ops key: it checks the release as a device
	// would before it records it.
	ops := newOpsKeys(b, b.TempDir())
	ctl := lab.StartControl(b, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"), 0, ops.pubFile)
	gw := lab.StartGateway(b, gwNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	gwNS.MustRun(b, "ip", "addr", "add", iperfHost.String()+"/32", "dev", "lo")

	a := runAgent(b, devNS, "scanner", "100.64.0.2/32", 51820, ops)
	id := a.enroll(b, ctl)
	gw.AllowPeer(b, a.PublicKey, netip.MustParseAddrPort("192.0.2.2:51820"), "100.64.0.2/32")
	a.apply(b, 1, flowPolicy(b, gw))

	// The segment host notes when the newest packet arrived; the device
	// sends one every millisecond whatever happens to it.
	flow := startFlows(b, gwNS, []*lab.NS{devNS})

	trials := 100
	if Quick {
		trials = 1
	}
	quarantineTrials(b, trials, flow,
		func() bool { return a.status(b).Mode == "normal" },
		func() { ctl.MustCLI(b, "quarantine", id, "--reason", "bench") },
		func() bool { return a.status(b).Mode == "quarantine" },
		func() { ctl.MustCLI(b, "release", id, "--reason", "bench", "--key", a.ops.privFile, "--wait", "60s") })
}

// quarantineTrials times trials of cut (something that should quarantine
// a device) against a running flow: from calling cut to the last packet
// reaching the segment host. cutDone says the enforcer (the device's
// agent, or a gateway) has applied it; restore brings the device back,
// and normal says it is back. It reports the p99 and the p50 in ms.
func quarantineTrials(b B, trials int, flow *udpFlows, normal func() bool, cut func(), cutDone func() bool, restore func()) {
	var ms []float64
	b.ResetTimer()
	for range b.N {
		for range trials {
			lab.WaitFor(b, "the flow runs", 20*time.Second, func() bool { return flow.running(20*time.Millisecond) && normal() })
			start := time.Now()
			cut()
			// The last packet is known once the enforcer says it has
			// applied the quarantine and the host has heard nothing for
			// a while.
			lab.WaitFor(b, "the flow stops in quarantine", 20*time.Second, func() bool {
				return flow.silent(100*time.Millisecond) && cutDone()
			})
			ms = append(ms, max(0, float64(flow.last()[0].Sub(start))/float64(time.Millisecond)))
			restore()
		}
	}
	b.StopTimer()
	b.ReportMetric(percentile(ms, 0.99), "ms-p99")
	b.ReportMetric(percentile(ms, 0.50), "ms-p50")
}

// flowPolicy opens the UDP flow port on the segment host behind gw to
// scanners, with checks (if any) on them.
func flowPolicy(b testing.TB, gw *lab.Gateway, checks ...policy.Check) policy.Document {
	return policy.Document{
		Schema:   policy.Schema,
		Control:  []policy.Endpoint{{Address: netip.MustParseAddr("10.99.0.1"), Port: 8443}},
		Validity: policy.Validity{MaxOffline: policy.Duration(72 * time.Hour)},
		Segments: []policy.Segment{{Name: "wms", DataClass: "operational",
			Destinations: []policy.Destination{{CIDR: netip.PrefixFrom(iperfHost, 32), Protocol: policy.UDP, Ports: []policy.PortRange{{First: flowPort, Last: flowPort}}}},
			Gateway:      policy.Gateway{PublicKey: key(b, gw.PublicKey), Endpoint: gw.Endpoint.String()}}},
		Classes: map[string]policy.Class{"scanner": {Rules: []policy.Rule{{Segment: "wms"}}, Checks: checks}},
	}
}

// percentile is the nearest-rank percentile p (0 < p <= 1) of v.
func percentile(v []float64, p float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[max(0, int(math.Ceil(p*float64(len(s))))-1)]
}

// grouped writes n with a comma between groups of three digits.
func grouped(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
