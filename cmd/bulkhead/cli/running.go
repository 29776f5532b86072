package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
)

// runningAgent finds a `bulkhead run` in this network namespace (the
// one whose table cleanup would remove) other than this process.
func runningAgent() (pid int, ok bool) {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return 0, false
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		args := bytes.Split(readOr(filepath.Join(dir, "cmdline")), []byte{0})
		if len(args) < 2 || filepath.Base(string(args[0])) != "bulkhead" || string(args[1]) != "run" {
			continue
		}
		if ns, err := os.Readlink(filepath.Join(dir, "ns/net")); err == nil && ns == self {
			return pid, true
		}
	}
	return 0, false
}

func readOr(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}
