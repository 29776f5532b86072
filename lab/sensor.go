package lab

import (
	"os"
	"os/exec"
	"path/filepath"
)

// Sensor stands in for a security daemon a posture check requires: a copy
// of sleep under a process name of its own (at most 15 bytes, unique to
// the namespace ns so no other test or host process shares it). It
// returns the name and a function starting one more instance, killed at
// cleanup.
func Sensor(t T, ns *NS) (name string, run func() *exec.Cmd) {
	t.Helper()
	name = "edr-" + ns.Name[len(ns.Name)-6:]
	bin := filepath.Join(t.TempDir(), name)
	sleep, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, sleep, 0o755); err != nil {
		t.Fatal(err)
	}
	return name, func() *exec.Cmd {
		cmd := exec.Command(bin, "600")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
}
