package site

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// Check is one observation a scenario makes: what the policy says should
// happen, what did, how long it took, and whether the two agree.
type Check struct {
	What     string
	Expected string
	Observed string
	// Latency is how long the change took to show (zero: not timed);
	// Of says from what to what.
	Latency time.Duration
	Of      string
	Pass    bool
}

// Scenario is one of the article's scenarios.
type Scenario struct {
	Title string
	Run   func(s *Site, r *Result)
}

// Result collects a scenario's checks, printing each as it is made.
type Result struct {
	out    io.Writer
	Checks []Check
}

// Check records and prints c.
func (r *Result) Check(c Check) {
	r.Checks = append(r.Checks, c)
	verdict := "PASS"
	if !c.Pass {
		verdict = "FAIL"
	}
	fmt.Fprintf(r.out, "    %s  %s\n", verdict, c.What)
	fmt.Fprintf(r.out, "          expected  %s\n", c.Expected)
	fmt.Fprintf(r.out, "          observed  %s\n", c.Observed)
	if c.Of != "" {
		fmt.Fprintf(r.out, "          latency   %s (%s)\n", ms(c.Latency), c.Of)
	}
}

// Note prints a line of context between checks.
func (r *Result) Note(format string, args ...any) {
	fmt.Fprintf(r.out, "    . "+format+"\n", args...)
}

func ms(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

// yesno renders a reachability.
func yesno(open bool) string {
	if open {
		return "open"
	}
	return "shut"
}

// list renders names, or "none".
func list(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
