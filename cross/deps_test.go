package cross

import (
	"flag"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite agent-deps.txt with what the agent links now")

// depsFile is the committed list of the packages the agent links (for
// linux/arm64, its tags applied; the standard library's internal
// packages left out, as they move with every Go release).
const depsFile = "agent-deps.txt"

// Packages the agent must never link: the server side, the test lab, and
// weight that only a server needs.
var forbidden = []string{
	"github.com/bulkhead-edge/bulkhead/control/",
	"github.com/bulkhead-edge/bulkhead/lab",
	"github.com/bulkhead-edge/bulkhead/bench",
	"github.com/bulkhead-edge/bulkhead/cross",
	"html/template",
	"text/template",
	"net/http/pprof",
	"net/rpc",
	"expvar",
	"database/sql",
	"testing",
	"golang.org/x/net/http2",
	"google.golang.org/grpc",
}

func agentDeps(t *testing.T) []string {
	t.Helper()
	cmd := exec.Command("go", "list", "-tags", AgentTags, "-deps", "-f", "{{.ImportPath}}", Agent)
	cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH=arm64", "CGO_ENABLED=0")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var deps []string
	for _, p := range strings.Fields(string(out)) {
		if !strings.HasPrefix(p, "internal/") && !strings.HasPrefix(p, "vendor/") {
			deps = append(deps, p)
		}
	}
	slices.Sort(deps)
	return deps
}

// The agent links nothing forbidden, and exactly what agent-deps.txt
// lists: a new dependency is a reviewed change to that file (`go test
// ./cross -update`), never a surprise in the binary.
func TestAgentLinksOnlyWhatIsListed(t *testing.T) {
	deps := agentDeps(t)
	for _, p := range deps {
		for _, f := range forbidden {
			if p == strings.TrimSuffix(f, "/") || strings.HasPrefix(p, f) || strings.HasPrefix(p, f+"/") {
				t.Errorf("the agent links %s (forbidden: %s)", p, f)
			}
		}
	}
	if *update {
		if err := os.WriteFile(depsFile, []byte(strings.Join(deps, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	raw, err := os.ReadFile(depsFile)
	if err != nil {
		t.Fatal(err)
	}
	listed := strings.Fields(string(raw))
	for _, p := range deps {
		if !slices.Contains(listed, p) {
			t.Errorf("the agent now links %s, which %s does not list", p, depsFile)
		}
	}
	for _, p := range listed {
		if !slices.Contains(deps, p) {
			t.Errorf("%s lists %s, which the agent no longer links", depsFile, p)
		}
	}
	if t.Failed() {
		t.Log("if the change is intended, run `go test ./cross -update` and commit " + depsFile)
	}
}
