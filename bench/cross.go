package bench

import (
	"os"
	"path/filepath"
	"sync"

	"github.com/bulkhead-edge/bulkhead/cross"
)

// crossCases are the agent's size on every target, built as `make cross`
// builds it; arm64 is held to its budget.
func crossCases() []Case {
	var out []Case
	for _, t := range cross.Targets {
		c := Case{Name: "agent binary, " + t.Name, Unit: "MiB",
			Run:  func(b B) { benchBinarySize(b, t) },
			Note: "static, stripped, -trimpath, empty build id (make cross)"}
		if t.Name == cross.BudgetTarget {
			c.Max = cross.MiB(cross.Budget)
			c.Ref = "tailscaled 1.103 built the same way: 26.5 MiB"
		}
		out = append(out, c)
	}
	return out
}

var (
	sizesMu sync.Mutex
	sizes   = map[string]int64{}
)

// benchBinarySize builds once per target per run; testing.Benchmark calls
// Run again with a larger N, which then costs nothing.
func benchBinarySize(b B, t cross.Target) {
	sizesMu.Lock()
	defer sizesMu.Unlock()
	size, ok := sizes[t.Name]
	if !ok {
		dir, err := os.MkdirTemp("", "bulkhead-size-")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(dir)
		if size, _, err = cross.Build(t, "bench", filepath.Join(dir, "bulkhead")); err != nil {
			b.Fatal(err)
		}
		sizes[t.Name] = size
	}
	b.ReportMetric(cross.MiB(size), "MiB")
}
