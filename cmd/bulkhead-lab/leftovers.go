package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/bulkhead-edge/bulkhead/cmd/subcmd"
)

// manifestDir holds one file per running demo, named by its pid: its
// directory and, once the site is up, its namespaces. A demo killed with
// SIGKILL cannot tear its site down; the next one does, from the file.
const manifestDir = "/run/bulkhead-demo"

type manifest struct{ path, dir string }

func newManifest(dir string) *manifest {
	m := &manifest{path: filepath.Join(manifestDir, strconv.Itoa(os.Getpid())), dir: dir}
	m.record(nil)
	return m
}

// record writes the directory and the namespaces (best effort: without
// the file only a SIGKILL's leftovers go unswept).
func (m *manifest) record(namespaces []string) {
	var b strings.Builder
	fmt.Fprintf(&b, "dir %s\n", m.dir)
	for _, ns := range namespaces {
		fmt.Fprintf(&b, "ns %s\n", ns)
	}
	os.MkdirAll(manifestDir, 0o700)
	os.WriteFile(m.path, []byte(b.String()), 0o600)
}

func (m *manifest) remove() { os.Remove(m.path) }

// sweep removes what demos that are no longer running left behind: the
// processes in their namespaces, the namespaces, their WireGuard sockets
// and their directories.
func sweep(env *subcmd.Env) {
	entries, _ := os.ReadDir(manifestDir)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || running(pid) {
			continue
		}
		path := filepath.Join(manifestDir, e.Name())
		raw, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		n := 0
		for _, line := range strings.Split(string(raw), "\n") {
			kind, value, _ := strings.Cut(line, " ")
			switch {
			case kind == "dir" && strings.HasPrefix(value, os.TempDir()+"/bulkhead-demo-"):
				killUsing(value) // processes outside the namespaces (the EDR stand-in)
				os.RemoveAll(value)
			case kind == "ns" && strings.HasPrefix(value, "bh-") && len(value) > 6:
				pids, _ := exec.Command("ip", "netns", "pids", value).Output()
				for _, f := range strings.Fields(string(pids)) {
					if p, err := strconv.Atoi(f); err == nil {
						syscall.Kill(p, syscall.SIGKILL)
					}
				}
				if exec.Command("ip", "netns", "del", value).Run() == nil {
					n++
				}
				suffix := value[len(value)-6:]
				os.Remove("/var/run/wireguard/bh-" + suffix + ".sock")
				os.Remove("/var/run/wireguard/wg-" + suffix + ".sock")
			}
		}
		os.Remove(path)
		fmt.Fprintf(env.Stdout, "Removed what an earlier demo (pid %d, no longer running) left: %d namespaces and their processes\n", pid, n)
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

// running reports whether pid is a live bulkhead-lab (not a process that
// reused the number).
func running(pid int) bool {
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return err == nil && strings.TrimSpace(string(comm)) == "bulkhead-lab"
}
