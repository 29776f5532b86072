// Command bulkhead-lab is the lab's tool: it runs the pieces of a test
// site that are not the agent. For now that is the bare-library WireGuard
// daemon (`bulkhead-lab wireguard IFACE`), used as a gateway and as the
// data-path reference in benchmarks.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"github.com/bulkhead-edge/bulkhead/cmd/subcmd"
	"github.com/bulkhead-edge/bulkhead/lab/wgbare"
)

func main() {
	os.Exit(subcmd.Main(&subcmd.Command{
		Name:    "bulkhead-lab",
		Summary: "bulkhead-lab: pieces of a Bulkhead test site.",
		Sub: []*subcmd.Command{{
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
