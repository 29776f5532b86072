package site

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// Outcome is how one scenario went.
type Outcome struct {
	N        int
	Title    string
	Checks   int
	Failed   int
	Err      string // why it stopped early, if it did
	Duration time.Duration
	Ran      bool
}

// Pass reports whether the scenario ran to its end with every check
// holding.
func (o Outcome) Pass() bool { return o.Ran && o.Err == "" && o.Failed == 0 && o.Checks > 0 }

// Run builds the site with r and runs the scenarios numbered in only
// (1-based; empty: all), printing progress and every check to out. A
// scenario that cannot carry on (the site broke under it) stops the run;
// the rest are reported as not run. The site stays up until r is closed.
func Run(r *Runner, out io.Writer, only []int) (*Site, []Outcome) {
	var s *Site
	begin := time.Now()
	fmt.Fprintf(out, "Building the site (real binaries, one network namespace per host)\n")
	if err := r.Try(func() { s = Build(r, out) }); err != nil {
		fmt.Fprintf(out, "FAIL the site could not be built: %v\n", err)
		r.Fail()
		return nil, nil
	}
	fmt.Fprintf(out, "  site up in %s: every device on policy v%d\n", ms(time.Since(begin)), s.Version)
	var outcomes []Outcome
	stopped := ""
	all := Scenarios()
	for i, sc := range all {
		n := i + 1
		if len(only) > 0 && !slices.Contains(only, n) {
			continue
		}
		o := Outcome{N: n, Title: sc.Title}
		if stopped != "" {
			o.Err = "not run: " + stopped
			outcomes = append(outcomes, o)
			continue
		}
		fmt.Fprintf(out, "\n[%d/%d] %s\n", n, len(all), sc.Title)
		res := &Result{out: out}
		start := time.Now()
		err := r.Try(func() { sc.Run(s, res) })
		o.Ran, o.Duration, o.Checks = true, time.Since(start), len(res.Checks)
		for _, c := range res.Checks {
			if !c.Pass {
				o.Failed++
			}
		}
		if err != nil {
			o.Err = err.Error()
			stopped = fmt.Sprintf("scenario %d stopped", n)
			fmt.Fprintf(out, "    FAIL  the scenario could not carry on: %v\n", err)
		}
		if !o.Pass() {
			r.Fail()
		}
		fmt.Fprintf(out, "  => %s in %s\n", verdict(o), ms(o.Duration))
		outcomes = append(outcomes, o)
	}
	return s, outcomes
}

func verdict(o Outcome) string {
	if o.Pass() {
		return "PASS"
	}
	return "FAIL"
}

// Summary prints one line per scenario.
func Summary(out io.Writer, outcomes []Outcome, took time.Duration) {
	fmt.Fprintf(out, "\nSummary\n")
	for _, o := range outcomes {
		detail := fmt.Sprintf("%d/%d checks", o.Checks-o.Failed, o.Checks)
		if o.Err != "" {
			detail += "; " + strings.SplitN(o.Err, "\n", 2)[0]
		}
		fmt.Fprintf(out, "  %s  %d. %-78s %s\n", verdict(o), o.N, o.Title, detail)
	}
	fmt.Fprintf(out, "  total %s\n", ms(took))
}
