package bench

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// controlCases measure the control channel.
func controlCases() []Case {
	return []Case{
		{Name: "idle control traffic per device per day", Privileged: true, Unit: "MB/day", Max: 1,
			Run:  benchIdleBytes,
			Note: "bytes both ways on the device's link over idle sync cycles (server keep-alive shortened to 2 s), scaled to the default 4-minute keep-alive: 360 cycles a day"},
	}
}

// benchIdleBytes enrols a real agent with a real server and counts what
// an idle device costs on the wire per long-poll cycle.
func benchIdleBytes(b *testing.B) {
	lab.RequirePrivileged(b, "nft", "wg")
	const keepAlive = 2 * time.Second
	ctlNS, devNS := lab.NewNS(b, "ctl"), lab.NewNS(b, "dev")
	devIf, _ := lab.Link(b, devNS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	ctl := lab.StartControl(b, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"), keepAlive)

	dir := b.TempDir()
	if _, err := opskey.Generate(filepath.Join(dir, "ops")); err != nil {
		b.Fatal(err)
	}
	bin := lab.Binary(b, "cmd/bulkhead")
	iface := "bh-" + devNS.Name[len(devNS.Name)-6:]
	sock := filepath.Join(dir, "admin.sock")
	cfg := filepath.Join(dir, "config.json")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`{"device": {"class": "truck"}, "trust": {"keys": [%q]}, "state_dir": %q, "admin_socket": %q,
  "tunnel": {"interface": %q, "addresses": ["100.64.0.2/32"]}}`, filepath.Join(dir, "ops", opskey.PublicFile), filepath.Join(dir, "state"), sock, iface)), 0o600)
	cmd := devNS.Command(bin, "run", "--config", cfg)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		devNS.Run("nft", "delete", "table", "inet", "bulkhead")
		os.Remove("/var/run/wireguard/" + iface + ".sock")
	})
	token := strings.TrimSpace(strings.Split(ctl.MustCLI(b, "token", "create", "--class", "truck"), "\n")[0])
	var out []byte
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		out, err = devNS.Command(bin, "enroll", "--socket", sock, "--control", ctl.URL, "--token", token, "--trust-ca", ctl.Fingerprint).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "cannot reach the agent") {
			break
		}
	}
	if err != nil {
		b.Fatalf("enroll: %v %s", err, out)
	}
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
