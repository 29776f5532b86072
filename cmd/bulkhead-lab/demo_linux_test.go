package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
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
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go", "iperf3", "gpsfake", "gpsd")
	cmd := exec.Command(lab.Binary(t, "cmd/bulkhead-lab"), "demo", "--only", "1")
	cmd.Env = append(os.Environ(), "PATH="+os.Getenv("PATH"))
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
	sc := bufio.NewScanner(out)
	dirRE := regexp.MustCompile(`/tmp/bulkhead-demo-[0-9]+`)
	for sc.Scan() {
		line := sc.Text()
		log.WriteString(line + "\n")
		if ns, ok := strings.CutPrefix(strings.TrimSpace(line), "namespaces: "); ok {
			namespaces = strings.Fields(ns)
		}
		if dir == "" {
			dir = dirRE.FindString(line)
		}
		if strings.HasPrefix(line, "[1/") { // the site is up; scenario 1 starts
			cmd.Process.Signal(os.Interrupt)
		}
	}
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).ExitStatus() != 130 {
		t.Fatalf("demo after Ctrl-C: %v, want exit status 130:\n%s", err, log.String())
	}
	if len(namespaces) < 10 || dir == "" {
		t.Fatalf("the demo did not print its namespaces and directory:\n%s", log.String())
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
