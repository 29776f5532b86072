package lab

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// ledgerDir holds one file per live process using the lab (a test binary,
// a demo): the namespaces and directories it made outside its own
// temporary directories. Cleanups remove them; a run killed before its
// cleanups (SIGKILL, or a test timeout, which panics past them) cannot,
// so the next run sweeps what a dead process's file names.
const ledgerDir = "/run/bulkhead-lab"

var ledger struct {
	sync.Mutex
	path string
}

// Note records a namespace ("ns") or directory ("dir") this process made,
// for SweepOrphans to remove should the process die first. It is best
// effort: without the file only a killed run's leftovers go unswept.
func Note(kind, value string) {
	ledger.Lock()
	defer ledger.Unlock()
	if ledger.path == "" {
		start, err := startTime(os.Getpid())
		if err != nil {
			return
		}
		os.MkdirAll(ledgerDir, 0o700)
		ledger.path = filepath.Join(ledgerDir, fmt.Sprintf("%d-%s", os.Getpid(), start))
	}
	f, err := os.OpenFile(ledger.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return
	}
	fmt.Fprintf(f, "%s %s\n", kind, value)
	f.Close()
}

// CloseLedger removes this process's file: what it noted is gone (its
// cleanups ran).
func CloseLedger() {
	ledger.Lock()
	defer ledger.Unlock()
	if ledger.path != "" {
		os.Remove(ledger.path)
		ledger.path = ""
	}
}

// SweepOrphans removes what processes that died without their cleanups
// left: the processes in their namespaces, the namespaces and their
// WireGuard sockets, their directories and the processes using them. It
// reports, per dead process, how many namespaces it removed.
func SweepOrphans() map[int]int {
	swept := map[int]int{}
	entries, _ := os.ReadDir(ledgerDir)
	for _, e := range entries {
		pidText, start, ok := strings.Cut(e.Name(), "-")
		pid, err := strconv.Atoi(pidText)
		if !ok || err != nil || alive(pid, start) {
			continue
		}
		path := filepath.Join(ledgerDir, e.Name())
		raw, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		n := 0
		for _, line := range strings.Split(string(raw), "\n") {
			kind, value, _ := strings.Cut(line, " ")
			switch {
			case kind == "dir" && strings.HasPrefix(value, os.TempDir()+"/bulkhead-"):
				killUsing(value) // processes outside the namespaces (the EDR stand-in)
				os.RemoveAll(value)
			case kind == "ns" && strings.HasPrefix(value, "bh-") && len(value) > 6:
				killIn(value)
				if exec.Command("ip", "netns", "del", value).Run() == nil {
					n++
				}
				suffix := value[len(value)-6:]
				os.Remove("/var/run/wireguard/bh-" + suffix + ".sock")
				os.Remove("/var/run/wireguard/wg-" + suffix + ".sock")
			}
		}
		os.Remove(path)
		swept[pid] = n
	}
	return swept
}

// alive reports whether pid is the process that started at start (not a
// later one that reused the number).
func alive(pid int, start string) bool {
	s, err := startTime(pid)
	return err == nil && s == start
}

// startTime is field 22 of /proc/PID/stat: when the process started, in
// clock ticks since boot.
func startTime(pid int) (string, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from after its closing parenthesis (field 3 onwards).
	i := bytes.LastIndexByte(stat, ')')
	f := strings.Fields(string(stat[i+1:]))
	if i < 0 || len(f) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return f[19], nil
}

// killIn kills every process in the namespace.
func killIn(ns string) {
	pids, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, f := range strings.Fields(string(pids)) {
		if p, err := strconv.Atoi(f); err == nil && p != os.Getpid() {
			syscall.Kill(p, syscall.SIGKILL)
		}
	}
}

// killUsing kills every process whose command line names dir.
func killUsing(dir string) {
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if cmdline, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline")); err == nil && strings.Contains(string(cmdline), dir) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
