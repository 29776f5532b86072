package bench

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture"
)

func postureCases() []Case {
	return []Case{
		{Name: "posture change to enforced: required process dies", Privileged: true, Unit: "ms-p99", Also: []string{"ms-p50"}, Max: 100,
			Run:  benchPostureChange,
			Note: "30 trials: from killing the process a check requires (quarantine profile; the agent samples every 30 s) to the last packet of a running 1 ms UDP flow through the tunnel reaching the segment host; the exit is seen through a pidfd, then one sample, judgement and the table apply; each trial starts after a second without changes, since the agent spaces change-triggered samples 250 ms apart"},
	}
}

// benchPostureSample is what one posture sample costs the device: every
// fact the agent gathers each interval, on this machine's process table.
func benchPostureSample(b B) {
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := posture.Gather(ctx, "v1.0.0", posture.Wants{}); err != nil {
			b.Fatal(err)
		}
	}
}

// benchPostureChange measures how long a running flow survives the death
// of the process a posture check requires: the real agent (default 30 s
// sampling interval) notices the exit, samples, judges, and applies its
// quarantine profile; a segment host behind a Debian wireguard-go gateway
// notes when each packet of a 1 ms UDP stream arrives. Between trials the
// process is started again and the check's pinned file rewritten, which
// wakes a sample that sees both.
func benchPostureChange(b B) {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go")
	devNS, gwNS := lab.NewNS(b, "dev"), lab.NewNS(b, "gw")
	lab.Link(b, devNS, "192.0.2.2/30", gwNS, "192.0.2.1/30")
	gw := lab.StartGateway(b, gwNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	gwNS.MustRun(b, "ip", "addr", "add", iperfHost.String()+"/32", "dev", "lo")

	dir := b.TempDir()
	name, run := lab.Sensor(b, devNS)
	var sensor *exec.Cmd
	start := func() { sensor = run() }
	kill := func() {
		sensor.Process.Kill()
		sensor.Wait()
	}
	conf, content := filepath.Join(dir, "edr.conf"), []byte("mode=block\n")
	if err := os.WriteFile(conf, content, 0o600); err != nil {
		b.Fatal(err)
	}
	start()

	a := runAgent(b, devNS, "scanner", "100.64.0.2/32", 51820, nil)
	gw.AllowPeer(b, a.PublicKey, netip.MustParseAddrPort("192.0.2.2:51820"), "100.64.0.2/32")
	a.apply(b, 1, flowPolicy(b, gw,
		policy.Check{ID: "edr-running", Profile: "quarantine", Process: &policy.ProcessMatch{Name: name}},
		policy.Check{ID: "edr-config", Profile: "quarantine", File: &policy.FileDigest{Path: conf, SHA256: fmt.Sprintf("%x", sha256.Sum256(content))}}))

	flow := startFlows(b, gwNS, []*lab.NS{devNS})
	trials := 30
	if Quick {
		trials = 1
	}
	quarantineTrials(b, trials, flow, func() bool { return a.status(b).Mode == "normal" }, kill,
		func() bool { return a.status(b).Mode == "quarantine" }, func() {
			start()
			if err := os.WriteFile(conf, content, 0o600); err != nil {
				b.Fatal(err)
			}
			// The agent spaces change-triggered samples 250 ms apart (the
			// sample this write triggers may itself wait that long): each
			// trial starts from a device quiet for longer.
			time.Sleep(time.Second)
		})
}
