package cli

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/installer"
	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
)

func installCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "install",
		Summary: "Install this binary as the device's Bulkhead agent and enrol it: checks the kernel and the\n" +
			"control server first (a failed check changes nothing), then copies the binary to " + installer.LocalBinary + ",\n" +
			"writes " + installer.ConfigFile + " (0600) and " + installer.StateDir + " (0700), pins the ops keys, installs\n" +
			"the service (systemd, OpenRC or SysV), starts it and prints what it did. Running it again\n" +
			"changes only what differs. Run as root.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			url := fs.String("control", "", "control server `URL`, e.g. https://10.99.0.1:8443 (required)")
			token := fs.String("token", "", "one-time enrolment `TOKEN` from `bulkhead-control token create` (needed until enrolled)")
			fp := fs.String("trust-ca", "", "the control CA's fingerprint `SHA256:HEX`, as `bulkhead-control serve` prints it (required)")
			class := fs.String("class", "", "device `CLASS` (default: the class the token was made for)")
			floor := fs.String("safety-floor", "", "JSON `FILE` with the safety floor: destinations open in every mode, e.g.\n"+
				`[{"name": "can-gateway", "cidr": "192.168.50.0/29", "protocol": "any"}]`+"\n(default: keep the installed floor, or none)")
			var keys, segments subcmd.Strings
			fs.Var(&keys, "trust-key", "ops public key `FILE` (ops.pub) to pin; repeat for each (default: the keys the control server publishes)")
			role := fs.String("role", "device", "device, or gateway: a segment gateway enforcing the policy for the devices (docs/gateway.md)")
			fs.Var(&segments, "segment", "a `SEGMENT` this gateway fronts; repeat for each (gateway only; the token must name exactly these)")
			port := fs.Uint("listen-port", installer.DefaultGatewayPort, "the gateway's WireGuard UDP `PORT`, the one the policy names (gateway only)")
			return func(env *subcmd.Env, args []string) error {
				switch {
				case len(args) > 0 || *url == "" || *fp == "":
					return subcmd.Usagef("install needs --control URL and --trust-ca SHA256:FP (and --token TOKEN to enrol)")
				case *role != "device" && *role != "gateway":
					return subcmd.Usagef("--role %q is neither device nor gateway", *role)
				case *role == "gateway" && len(segments) == 0:
					return subcmd.Usagef("install --role gateway needs --segment SEGMENT (the segments it fronts)")
				case *role == "device" && len(segments) > 0:
					return subcmd.Usagef("--segment is for --role gateway")
				case *port == 0 || *port > 65535:
					return subcmd.Usagef("--listen-port %d is not a UDP port", *port)
				}
				if _, err := controlapi.ParseFingerprint(*fp); err != nil {
					return subcmd.Usagef("--trust-ca: %v", err)
				}
				o := installer.Options{Control: *url, Token: *token, TrustCA: *fp, Class: *class, TrustKeys: keys, Out: env.Stdout}
				if *role == "gateway" {
					o.Segments, o.ListenPort = segments, uint16(*port)
				}
				if *floor != "" {
					rules, err := readFloor(*floor)
					if err != nil {
						return err
					}
					o.SafetyFloor, o.SetFloor = rules, true
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				return installer.Install(ctx, o)
			}
		},
	}
}

func readFloor(path string) ([]localpolicy.FloorRule, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--safety-floor: %w", err)
	}
	var rules []localpolicy.FloorRule
	if err := strictjson.Unmarshal(data, &rules); err != nil {
		return nil, fmt.Errorf("--safety-floor %s: %s", path, strictjson.Line(data, err))
	}
	return rules, nil
}

func uninstallCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "uninstall",
		Summary: "Stop and remove the agent's service and installed binary. The nftables table stays, so the\n" +
			"device keeps enforcing its last policy (fail closed), and so do the configuration and state.\n" +
			"--purge also removes the table, " + installer.ConfigDir + " and " + installer.StateDir + ": the device then\n" +
			"enforces nothing, and needs a new token to enrol again.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			purge := fs.Bool("purge", false, "also remove the table, the configuration and the state")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("uninstall takes no arguments")
				}
				return installer.Uninstall(*purge, env.Stdout)
			}
		},
	}
}
