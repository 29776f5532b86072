package bulkhead

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// layers is the layout, lowest first: raw bytes and generic helpers, the
// policy document and its signatures, the pure decision core and the
// kernel edges, the device⇄control wire contract, the channel's parts and
// the server's, the daemons, what installs and drives them, the test lab,
// and the commands at the top. A package may import only packages of its
// own layer or below. Each entry is a package (or, ending in "/", a tree)
// relative to the module; the longest match decides.
var layers = [][]string{
	{"internal/", "localpolicy/opskey", "localpolicy/trustedtime", "cross", "lab/wgbare"},
	{"localpolicy/policy", "localpolicy/envelope"},
	{"localpolicy/bundle"},
	{"localpolicy", "localpolicy/admit", "localpolicy/command", "localpolicy/store", "localpolicy/nft", "posture", "posture/", "tunnel"},
	{"api/controlapi", "api/adminapi"},
	{"agent/config", "agent/controlclient", "agent/spool", "agent/flowlog", "control/pki", "control/suggest", "control/opsclient", "control/store"},
	{"control/store/"},
	{"agent", "control/server"},
	{"installer", "control/opscli"},
	{"cmd/bulkhead/cli", "lab", "lab/agentproc", "lab/crowd"},
	{"lab/site", "bench"},
	{"", "cmd/", "bench/cmd/", "cross/cmd/", "examples"},
}

const module = "github.com/bulkhead-edge/bulkhead"

// testSupport may be imported by any package's tests: the lab harness,
// the agent process harness and the example documents tests read.
var testSupport = []string{"lab", "lab/agentproc", "examples"}

// layerOf is the layer of a package (relative to the module), or -1.
func layerOf(pkg string) int {
	best, layer := -1, -1
	for i, entries := range layers {
		for _, e := range entries {
			match := pkg == e || (strings.HasSuffix(e, "/") && strings.HasPrefix(pkg, e))
			if match && len(e) > best {
				best, layer = len(e), i
			}
		}
	}
	return layer
}

// No import runs up the layers, and every package has a layer: a new one
// is placed here on purpose.
func TestNoImportRunsUpward(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}} | {{join .TestImports " "}}`, "./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	checked := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(strings.TrimPrefix(f[0], module), "/")
		from := layerOf(pkg)
		if from < 0 {
			t.Errorf("package %q has no layer in layers_test.go", pkg)
			continue
		}
		inTests := false
		for _, imp := range f[1:] {
			if imp == "|" {
				inTests = true
				continue
			}
			rel, ok := strings.CutPrefix(imp, module+"/")
			if !ok || (inTests && slices.Contains(testSupport, rel)) {
				continue
			}
			checked++
			if to := layerOf(rel); to > from {
				t.Errorf("%s (layer %d) imports %s (layer %d), above it", pkg, from, rel, to)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no import inside the module was checked")
	}
}
