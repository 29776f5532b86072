package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
)

// Interrupted while its site is up, the demo tears everything down: its
// namespaces, its processes (agents, gateways, control, gpsd), its
// WireGuard sockets and its files; and it exits 130.
func TestInterruptedDemoLeavesNothing(t *testing.T) {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go", "iperf3", "gpsd")
	cmd, namespaces, dir, log := demoUntilUp(t, func(p *os.Process) { p.Signal(os.Interrupt) })
	err := cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).ExitStatus() != 130 {
		t.Fatalf("demo after Ctrl-C: %v, want exit status 130:\n%s", err, log)
	}
	if len(namespaces) < 10 || dir == "" {
		t.Fatalf("the demo did not print its namespaces and directory:\n%s", log)
	}
	time.Sleep(200 * time.Millisecond)
	netns, _ := exec.Command("ip", "netns", "list").Output()
	for _, ns := range namespaces {
		if strings.Contains(string(netns), ns) {
			t.Errorf("namespace %s left behind", ns)
		}
		if _, err := os.Stat("/var/run/wireguard/bh-" + ns[len(ns)-6:] + ".sock"); err == nil {
			t.Errorf("agent socket of %s left behind", ns)
		}
		if gw, _ := exec.Command("pgrep", "-af", "wireguard-go -f wg-"+ns[len(ns)-6:]).Output(); len(gw) > 0 {
			t.Errorf("gateway of %s left running: %s", ns, gw)
		}
	}
	procs, _ := exec.Command("pgrep", "-af", dir).Output()
	if len(strings.TrimSpace(string(procs))) > 0 {
		t.Errorf("processes left behind:\n%s", procs)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("%s left behind", dir)
	}
}

// A demo killed with SIGKILL cannot tear its site down; the next demo
// does, before it builds its own.
func TestKilledDemoIsSweptByTheNext(t *testing.T) {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go", "iperf3", "gpsd")
	first, namespaces, _, _ := demoUntilUp(t, func(p *os.Process) { p.Kill() })
	first.Wait()
	listed := func() string { out, _ := exec.Command("ip", "netns", "list").Output(); return string(out) }
	if len(namespaces) == 0 || !strings.Contains(listed(), namespaces[0]) {
		t.Fatalf("a SIGKILLed demo left no namespace to sweep (%v); the test would prove nothing", namespaces)
	}
	second, err := exec.Command(lab.Binary(t, "cmd/bulkhead-lab"), "demo", "--only", "1", "--bin", prebuilt(t)).CombinedOutput()
	if err != nil || !strings.Contains(string(second), "Removed what an earlier demo or test run") {
		t.Fatalf("the next demo: %v\n%s", err, second)
	}
	for _, ns := range namespaces {
		if strings.Contains(listed(), ns) {
			t.Errorf("namespace %s of the killed demo still there", ns)
		}
		if gw, _ := exec.Command("pgrep", "-af", "wireguard-go -f wg-"+ns[len(ns)-6:]).Output(); len(gw) > 0 {
			t.Errorf("gateway of %s still running: %s", ns, gw)
		}
	}
}

// prebuilt is a directory holding the agent and the control server, built
// by this test binary (Main removes them): a demo run with --bin builds
// nothing of its own, so one killed leaves no binaries behind.
func prebuilt(t *testing.T) string {
	t.Helper()
	lab.Binary(t, "cmd/bulkhead-control")
	return filepath.Dir(lab.Binary(t, "cmd/bulkhead"))
}

// demoUntilUp starts `bulkhead-lab demo --only 1`, calls stop once the
// site is up (scenario 1 starts), and reads the rest of what it prints.
// It returns the process (to Wait for), the namespaces and the directory
// the demo named, and everything it printed.
func demoUntilUp(t *testing.T, stop func(*os.Process)) (*exec.Cmd, []string, string, string) {
	t.Helper()
	cmd := exec.Command(lab.Binary(t, "cmd/bulkhead-lab"), "demo", "--only", "1", "--bin", prebuilt(t))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	var namespaces []string
	var dir string
	var log strings.Builder
	dirRE := regexp.MustCompile(`/tmp/bulkhead-demo-[0-9]+`)
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		log.WriteString(line + "\n")
		if ns, ok := strings.CutPrefix(strings.TrimSpace(line), "namespaces: "); ok {
			namespaces = strings.Fields(ns)
		}
		if dir == "" {
			dir = dirRE.FindString(line)
		}
		if strings.HasPrefix(line, "[1/") {
			stop(cmd.Process)
		}
	}
	return cmd, namespaces, dir, log.String()
}
