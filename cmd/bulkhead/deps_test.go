package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The agent runs on small ARM boxes and must not carry the control server,
// the ops tooling or test helpers. Each forbidden prefix says why.
var forbidden = map[string]string{
	"github.com/bulkhead-edge/bulkhead/control": "server and ops-side code stays out of the device binary",
	"github.com/bulkhead-edge/bulkhead/bench":   "benchmark workloads are not agent code",
	"github.com/bulkhead-edge/bulkhead/lab":     "the namespace lab is test tooling",
	"github.com/google/go-cmp":                  "test-only diffing",
	"testing":                                   "the testing package drags in flags and test machinery",
	"net/http/pprof":                            "profiling endpoints do not ship",
	"gvisor.dev/gvisor":                         "a userspace network stack; the agent uses the kernel's through TUN",
	"golang.zx2c4.com/wintun":                   "Windows TUN driver",
}

func TestAgentDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for prefix, why := range forbidden {
			if pkg == prefix || strings.HasPrefix(pkg, prefix+"/") {
				t.Errorf("bulkhead links %s: %s", pkg, why)
			}
		}
	}
}
