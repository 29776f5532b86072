package lab

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/bulkhead-edge/bulkhead/cross"
)

// builds are the binaries Binary made in this process, in one directory
// that RemoveBuilds (run by Main) deletes.
var builds struct {
	sync.Mutex
	dir  string
	bins map[string]string
}

// AgentTags are the tags the agent is released with (cross.AgentTags,
// the Makefile's AGENT_TAGS). The control server keeps HTTP/2 (and must:
// built with the tag, Go 1.26's server still offers h2 in TLS and then
// cannot speak it).
const AgentTags = cross.AgentTags

// UsePrebuilt makes Binary answer pkg with a binary built beforehand (as
// `make build` leaves them in bin/), instead of building it.
func UsePrebuilt(pkg, path string) {
	builds.Lock()
	defer builds.Unlock()
	if builds.bins == nil {
		builds.bins = map[string]string{}
	}
	builds.bins[pkg] = path
}

// Binary builds a command of this module (such as "cmd/bulkhead") once
// per process, static, stripped and tagged as releases are, and returns its path.
func Binary(t T, pkg string) string {
	t.Helper()
	builds.Lock()
	defer builds.Unlock()
	if bin, ok := builds.bins[pkg]; ok {
		return bin
	}
	if builds.dir == "" {
		dir, err := os.MkdirTemp("", "bulkhead-lab-bin-")
		if err != nil {
			t.Fatal(err)
		}
		Note("dir", dir)
		builds.dir = dir
		if builds.bins == nil {
			builds.bins = map[string]string{}
		}
	}
	bin := filepath.Join(builds.dir, filepath.Base(pkg))
	tags := ""
	if pkg == "cmd/bulkhead" {
		tags = AgentTags
	}
	// Stripped, as shipped; BULKHEAD_LAB_SYMBOLS=1 keeps the symbol
	// table, so that a profiler (perf) can name the functions.
	ldflags := "-s -w"
	if os.Getenv("BULKHEAD_LAB_SYMBOLS") == "1" {
		ldflags = ""
	}
	cmd := exec.Command("go", "build", "-trimpath", "-tags", tags, "-ldflags", ldflags, "-o", bin, "github.com/bulkhead-edge/bulkhead/"+pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v: %s", pkg, err, out)
	}
	builds.bins[pkg] = bin
	return bin
}

// RemoveBuilds deletes what Binary built. A test binary does it through
// Main; a program using the lab (the demo, the benchmarks) on its way out.
func RemoveBuilds() {
	builds.Lock()
	defer builds.Unlock()
	if builds.dir != "" {
		os.RemoveAll(builds.dir)
	}
	builds.dir, builds.bins = "", nil
}

// Main is the TestMain of a package whose tests use the lab: it sweeps
// what runs killed before their cleanups left (SweepOrphans), runs the
// tests, then removes the binaries they built, pass or fail.
func Main(m *testing.M) {
	SweepOrphans()
	code := m.Run()
	RemoveBuilds()
	CloseLedger()
	os.Exit(code)
}
