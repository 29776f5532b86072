// Command bulkhead-lab is the lab's tool. `bulkhead-lab demo` builds a
// whole logistics site in network namespaces and runs the article's
// scenarios against it (package lab/site; `make demo`). The other
// commands run the pieces of a test site that are not the agent: the
// bare-library WireGuard daemon
// (`bulkhead-lab wireguard IFACE`), used as a gateway and as the data-path
// reference in benchmarks, and a crowd of long-polling devices
// (`bulkhead-lab crowd`), the control server's fan-out load.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/lab/crowd"
	"github.com/bulkhead-edge/bulkhead/lab/wgbare"
)

func main() {
	os.Exit(subcmd.Main(&subcmd.Command{
		Name:    "bulkhead-lab",
		Summary: "bulkhead-lab: pieces of a Bulkhead test site.",
		Sub: []*subcmd.Command{demoCmd(), crowdCmd(), {
			Name: "wireguard", Args: "IFACE",
			Summary: "Run the bare tailscale/wireguard-go library on a new TUN interface, in the\n" +
				"foreground, configured with wg through /var/run/wireguard/IFACE.sock.",
			Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
				return func(env *subcmd.Env, args []string) error {
					if len(args) != 1 {
						return subcmd.Usagef("wireguard takes one interface name")
					}
					ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
					defer stop()
					return wgbare.Run(ctx, args[0])
				}
			},
		}},
	}))
}

func crowdCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "crowd",
		Summary: "Enrol one device per token read from standard input (one per line) and hold\n" +
			"a long-poll open for each until interrupted, printing a JSON line when every\n" +
			"device is enrolled, when each poll is held, and when each command arrives.\n" +
			"The devices obey nothing and check no signatures: they are load, not agents.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			var o crowd.Options
			fs.StringVar(&o.URL, "control", "", "control server `URL` (https://HOST:PORT, required)")
			fs.StringVar(&o.Fingerprint, "trust-ca", "", "the control CA's `SHA256:FP` fingerprint (required)")
			fs.StringVar(&o.Class, "class", "", "device `CLASS` the tokens were made for (required)")
			fs.StringVar(&o.Dir, "dir", "", "`DIR` for the devices' enrolment files (default: a temporary directory, removed at exit)")
			fs.DurationVar(&o.Wait, "wait", 4*time.Minute, "how long each poll asks the server to hold it")
			var also subcmd.Strings
			fs.Var(&also, "also", "another control replica's `ADDR:PORT`, tried in turn when the one enrolled with does not answer (repeatable)")
			return func(env *subcmd.Env, args []string) error {
				if o.URL == "" || o.Fingerprint == "" || o.Class == "" || len(args) > 0 {
					return subcmd.Usagef("crowd needs --control URL, --trust-ca FP and --class CLASS, and tokens on standard input")
				}
				for _, a := range also {
					ap, err := netip.ParseAddrPort(a)
					if err != nil {
						return subcmd.Usagef("--also %q: an ADDR:PORT such as 10.98.0.2:8443", a)
					}
					o.Also = append(o.Also, ap)
				}
				var tokens []string
				sc := bufio.NewScanner(os.Stdin)
				for sc.Scan() {
					if t := strings.TrimSpace(sc.Text()); t != "" {
						tokens = append(tokens, t)
					}
				}
				if err := sc.Err(); err != nil {
					return fmt.Errorf("reading tokens: %w", err)
				}
				if len(tokens) == 0 {
					return subcmd.Usagef("crowd read no tokens on standard input")
				}
				if o.Dir == "" {
					dir, err := os.MkdirTemp("", "bulkhead-crowd-")
					if err != nil {
						return err
					}
					defer os.RemoveAll(dir)
					o.Dir = dir
				}
				if os.Getenv("GOGC") == "" {
					// The crowd is load sharing a machine with the server it
					// measures: it collects garbage a quarter as often, and
					// leaves the CPU to the server (10,000 members hold
					// hundreds of MiB, and each collection scans them).
					debug.SetGCPercent(400)
				}
				ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
				defer stop()
				clients, err := crowd.Enroll(ctx, o, tokens)
				if err != nil {
					return err
				}
				crowd.Poll(ctx, o, clients, env.Stdout)
				return nil
			}
		},
	}
}
