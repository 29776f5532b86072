package bench

import (
	"flag"
	"testing"
)

// The workloads must be what they claim: valid, and the size named.
func TestLargePolicyIsValid(t *testing.T) {
	for _, n := range []int{100, 10000} {
		doc := LargePolicy(n)
		if err := doc.Validate(); err != nil {
			t.Fatalf("LargePolicy(%d): %v", n, err)
		}
		got := 0
		for _, s := range doc.Segments {
			got += len(s.Destinations)
		}
		if got != n {
			t.Errorf("LargePolicy(%d) has %d destinations", n, got)
		}
	}
}

// Each benchmark body runs once, so a broken workload fails `make test`
// instead of producing a meaningless figure in `make bench`.
func TestCasesRun(t *testing.T) {
	if err := flag.Set("test.benchtime", "1x"); err != nil {
		t.Fatal(err)
	}
	Quick = true
	for _, c := range All() {
		r := Benchmark(c)
		if r.N == 0 {
			t.Errorf("%s did not run", c.Name)
		}
	}
}
