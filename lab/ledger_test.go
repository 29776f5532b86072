package lab

import (
	"bufio"
	"os"
	"os/exec"
	"testing"
)

// The sweep removes what a dead process noted and never what a live one
// did: a test package sweeping at its start runs beside others still
// using their namespaces.
func TestSweepTakesOnlyTheDeadsLeftovers(t *testing.T) {
	if dir := os.Getenv("LAB_LEDGER_CHILD"); dir != "" {
		Note("dir", dir)
		os.Stdout.WriteString("noted\n")
		select {} // until killed
	}
	RequirePrivileged(t)
	dir, err := os.MkdirTemp("", "bulkhead-ledger-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	child := exec.Command(os.Args[0], "-test.run", "^TestSweepTakesOnlyTheDeadsLeftovers$")
	child.Env = append(os.Environ(), "LAB_LEDGER_CHILD="+dir)
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "noted\n" {
		t.Fatalf("the child said %q", line)
	}
	if swept := SweepOrphans(); hasKey(swept, child.Process.Pid) {
		t.Fatalf("a live process's leftovers were swept: %v", swept)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("the sweep removed a live process's directory: %v", err)
	}
	child.Process.Kill()
	child.Wait()
	if swept := SweepOrphans(); !hasKey(swept, child.Process.Pid) {
		t.Fatalf("the dead child's ledger was not swept: %v", swept)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the dead child's directory is still there: %v", err)
	}
}

func hasKey(m map[int]int, k int) bool { _, ok := m[k]; return ok }
