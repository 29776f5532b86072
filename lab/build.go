package lab

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var builds struct {
	sync.Mutex
	dir  string
	bins map[string]string
}

// Binary builds a command of this module (such as "cmd/bulkhead") once
// per process, static and stripped as releases are, and returns its path.
func Binary(t testing.TB, pkg string) string {
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
		builds.dir, builds.bins = dir, map[string]string{}
	}
	bin := filepath.Join(builds.dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "github.com/bulkhead-edge/bulkhead/"+pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v: %s", pkg, err, out)
	}
	builds.bins[pkg] = bin
	return bin
}
