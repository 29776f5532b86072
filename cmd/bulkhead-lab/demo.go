package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/site"
)

func demoCmd() *subcmd.Command {
	var summary strings.Builder
	summary.WriteString("Build a logistics site in network namespaces with the real binaries (a control\n" +
		"server; gateways for WMS, finance, a tier-1 carrier's EDI, a rate-limited tier-3\n" +
		"broker and diagnostics; agents on a dock gateway, a scanner and a telematics\n" +
		"box; a truck's safety controller behind its safety floor), then run:\n")
	for i, sc := range site.Scenarios() {
		fmt.Fprintf(&summary, "  %d. %s\n", i+1, sc.Title)
	}
	summary.WriteString("Each check prints what was expected, what was observed, the latency and PASS or\n" +
		"FAIL; any FAIL makes the exit status 1. Everything (namespaces, processes,\n" +
		"tables, files) is removed at the end, or on Ctrl-C; what a demo killed with\n" +
		"SIGKILL left, the next one removes first. Needs root and Debian's\n" +
		"nftables, wireguard-tools, wireguard-go, iperf3 and gpsd.")
	return &subcmd.Command{
		Name: "demo", Summary: summary.String(),
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			bin := fs.String("bin", "", "`DIR` holding bulkhead and bulkhead-control as `make build` leaves them (default: build them with go)")
			keep := fs.Bool("keep", false, "leave the site up after the scenarios, print how to explore it, and tear it down on Ctrl-C")
			only := fs.String("only", "", "run only these scenarios: comma-separated `NUMBERS` (1-7)")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("demo takes no arguments, got %q", args)
				}
				var picked []int
				for _, f := range strings.FieldsFunc(*only, func(r rune) bool { return r == ',' }) {
					n, err := strconv.Atoi(strings.TrimSpace(f))
					if err != nil || n < 1 || n > len(site.Scenarios()) {
						return subcmd.Usagef("--only: %q is not a scenario number (1-%d)", f, len(site.Scenarios()))
					}
					picked = append(picked, n)
				}
				if os.Geteuid() != 0 {
					return fmt.Errorf("demo needs root: it creates network namespaces and nftables tables (sudo make demo)")
				}
				if *bin != "" {
					for _, name := range []string{"bulkhead", "bulkhead-control"} {
						path, err := filepath.Abs(filepath.Join(*bin, name))
						if err != nil {
							return err
						}
						if _, err := os.Stat(path); err != nil {
							return fmt.Errorf("--bin %s: %w (make build puts the binaries there)", *bin, err)
						}
						lab.UsePrebuilt("cmd/"+name, path)
					}
				}
				return runDemo(env, picked, *keep)
			}
		},
	}
}

func runDemo(env *subcmd.Env, only []int, keep bool) error {
	// What a demo (or a test) killed before its cleanups left.
	for pid, n := range lab.SweepOrphans() {
		fmt.Fprintf(env.Stdout, "Removed what an earlier demo or test run (pid %d, no longer running) left: %d namespaces and their processes\n", pid, n)
	}
	dir, err := os.MkdirTemp("", "bulkhead-demo-")
	if err != nil {
		return err
	}
	r, err := site.NewRunner(dir)
	if err != nil {
		os.RemoveAll(dir)
		return err
	}
	lab.Note("dir", dir)
	var once sync.Once
	teardown := func() {
		once.Do(func() {
			fmt.Fprintf(env.Stdout, "Tearing the site down: processes, namespaces, tables, %s\n", dir)
			r.Close()
			os.RemoveAll(dir)
			lab.RemoveBuilds() // binaries built without --bin
			lab.CloseLedger()
		})
	}
	// An interruption at any point tears down what exists so far.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	interrupted := make(chan struct{})
	go func() {
		sig := <-sigs
		close(interrupted)
		fmt.Fprintf(env.Stdout, "\n%s: stopping\n", sig)
		teardown()
		os.Exit(130)
	}()

	start := time.Now()
	s, outcomes := site.Run(r, env.Stdout, only)
	site.Summary(env.Stdout, outcomes, time.Since(start))
	failed := r.Failed()
	if keep && s != nil {
		explore(env, s, dir)
		<-interrupted
		select {} // the handler tears down and exits
	}
	teardown() // a signal now waits for it, then exits 130
	select {
	case <-interrupted:
		// Interrupted mid-scenario: what the teardown killed failed the
		// scenario, but the run ends as interrupted (130), by the handler.
		select {}
	default:
	}
	if failed {
		return fmt.Errorf("demo FAILED (the log of every step is printed above)")
	}
	fmt.Fprintf(env.Stdout, "demo PASSED\n")
	return nil
}

// explore prints how to look at the running site.
func explore(env *subcmd.Env, s *site.Site, dir string) {
	w := env.Stdout
	fmt.Fprintf(w, "\nThe site stays up. In another terminal, as root:\n")
	for _, a := range s.Agents() {
		fmt.Fprintf(w, "  # the %s (%s, %s)\n", a.Name, a.Class, a.ID)
		fmt.Fprintf(w, "  %s\n", a.Explore("status"))
		fmt.Fprintf(w, "  ip netns exec %s wg show %s\n", a.NS.Name, a.Iface)
		fmt.Fprintf(w, "  ip netns exec %s nft list ruleset\n", a.NS.Name)
	}
	fmt.Fprintf(w, "  # control (devices, audit, device show ID, quarantine ID --reason R, ...)\n")
	fmt.Fprintf(w, "  ip netns exec %s env BULKHEAD_CONTROL=%s BULKHEAD_ADMIN=%s %s devices\n",
		s.Ctl.NS.Name, s.Ctl.URL, filepath.Join(s.Ctl.Data, "admin"), s.ControlBin)
	fmt.Fprintf(w, "  # the policy in force: %s; the ops key: %s\n", s.PolicyFile(s.Version), s.OpsKey)
	fmt.Fprintf(w, "  # logs: %s/tmp*/agent.log, %s/demo.log\n", dir, dir)
	fmt.Fprintf(w, "Press Ctrl-C here to tear it all down.\n")
}
