package opscli

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/control/suggest"
	"github.com/bulkhead-edge/bulkhead/internal/atomicfile"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

func serveCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "serve",
		Summary: "Run the control server. On first start it creates its CA, its command key and the first\n" +
			"operator's credentials in DATA; it prints the CA fingerprint devices pin at enrolment.\n" +
			"State is DATA/control.db for one process, or with --db a PostgreSQL database that any\n" +
			"number of replicas share; each replica needs the same ca.crt, ca.key and command.key in\n" +
			"its DATA (copy them from the first; docs/control.md, Replicas).",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			data := fs.String("data", DefaultData, "data `DIR` (CA, keys, control.db); created 0700")
			db := fs.String("db", os.Getenv("BULKHEAD_DB"), "PostgreSQL `URL` (postgres://user@host/db?sslmode=verify-full) replicas share, instead of DIR/control.db; a password belongs in ~/.pgpass or PGPASSFILE, not here (env BULKHEAD_DB)")
			listen := fs.String("listen", ":8443", "`ADDR` to listen on")
			var names subcmd.Strings
			fs.Var(&names, "name", "DNS `NAME` or address devices use to reach the server (in its certificate); repeatable; default: localhost and 127.0.0.1")
			keepAlive := fs.Duration("keepalive", server.DefaultKeepAlive, "how long an idle device sync is held before it is answered empty")
			var opsPub subcmd.Strings
			fs.Var(&opsPub, "ops-pub", "ops public key `FILE` (ops.pub) to publish to enrolling devices, whose installer pins it; repeat for each key")
			opsThreshold := fs.Int("ops-threshold", 0, "how many of the --ops-pub keys devices require on a bundle (default: all)")
			clockOffset := fs.Duration("clock-offset", 0, "for drills and tests only: run the server's clock this far ahead (negative: behind) of the machine's")
			lifetime := fs.Duration("command-lifetime", server.DefaultCommandLifetime, "how long each delivery of an order the server signs stays valid (1s-1h); the order stays in force until lifted")
			pool := fs.String("tunnel-pool", "", "`PREFIX` devices' tunnel addresses are assigned from at enrolment, each bound in the device's certificate with its WireGuard key (for example 100.80.0.0/16); default: none, devices name their own")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("serve takes no arguments, got %q", args)
				}
				var ops opskey.Roots
				if len(opsPub) > 0 {
					keys, err := opskey.LoadPublicKeys(opsPub)
					if err != nil {
						return err
					}
					if ops, err = opskey.NewRoots(opskey.OrAll(*opsThreshold, len(keys)), keys...); err != nil {
						return subcmd.Usagef("--ops-threshold: %v", err)
					}
				} else if *opsThreshold != 0 {
					return subcmd.Usagef("--ops-threshold needs --ops-pub keys")
				}
				if *keepAlive <= 0 || *keepAlive > controlapi.MaxWait {
					return subcmd.Usagef("--keepalive must be between 1s and %v", controlapi.MaxWait)
				}
				if *lifetime < time.Second || *lifetime > command.MaxLifetime {
					return subcmd.Usagef("--command-lifetime must be between 1s and %v", command.MaxLifetime)
				}
				var tunnelPool netip.Prefix
				if *pool != "" {
					p, err := netip.ParsePrefix(*pool)
					if err != nil {
						return subcmd.Usagef("--tunnel-pool %q: not a prefix such as 100.80.0.0/16", *pool)
					}
					if err := server.CheckTunnelPool(p); err != nil {
						return subcmd.Usagef("--tunnel-pool: %v", err)
					}
					tunnelPool = p
				}
				if len(names) == 0 {
					names = subcmd.Strings{"localhost", "127.0.0.1"}
				}
				log := slog.New(slog.NewTextHandler(env.Stderr, nil))
				if *db != "" && !strings.HasPrefix(*db, "postgres://") && !strings.HasPrefix(*db, "postgresql://") {
					return subcmd.Usagef("--db %q: a PostgreSQL URL, postgres://user@host/database", *db)
				}
				srv, created, err := server.Open(server.Config{DataDir: *data, Database: *db, Names: names, KeepAlive: *keepAlive, Logger: log, Ops: ops, ClockOffset: *clockOffset, CommandLifetime: *lifetime, TunnelPool: tunnelPool})
				if err != nil {
					return err
				}
				defer srv.Close()
				// No TCP keep-alive probes: a device's long-poll is answered
				// every keep-alive period anyway, and probes cost metered bytes.
				ln, err := (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp", *listen)
				if err != nil {
					return err
				}
				if created {
					fmt.Fprintf(env.Stdout, "created a new CA in %s\n", *data)
				}
				fmt.Fprintf(env.Stdout, "listening on %s for %s\nCA fingerprint %s\noperator credentials in %s\n",
					ln.Addr(), strings.Join(names, ", "), srv.Fingerprint(), filepath.Join(*data, pki.AdminDir))
				if ops.Len() > 0 {
					fmt.Fprintf(env.Stdout, "publishing %d ops keys (threshold %d) to enrolling devices: %s\n", ops.Len(), ops.Threshold, strings.Join(ops.IDs(), ", "))
				} else {
					fmt.Fprintf(env.Stdout, "publishing no ops keys: `bulkhead install` needs --trust-key on each device (or restart with --ops-pub)\n")
				}
				ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
				defer stop()
				return srv.Serve(ctx, ln)
			}
		},
	}
}

func tokenCmd() *subcmd.Command {
	return &subcmd.Command{Name: "token", Summary: "one-time enrolment tokens", Sub: []*subcmd.Command{{
		Name: "create",
		Summary: "Make one-time enrolment tokens for devices of CLASS, one per line. Each is shown\n" +
			"once and enrols one device; only their hashes are stored.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			class := fs.String("class", "", "device `CLASS` the token enrols (required for a device; a gateway's defaults to segment-gateway)")
			role := fs.String("role", "device", "what the token enrols: device, or gateway (a segment gateway, with --segment)")
			var segments subcmd.Strings
			fs.Var(&segments, "segment", "a `SEGMENT` the gateway fronts (repeat for several; gateway tokens only)")
			ttl := fs.Duration("ttl", 24*time.Hour, "how long the token is valid")
			count := fs.Int("count", 1, "how many tokens to make, for a batch of devices (at most 10000)")
			unknown := fs.Bool("allow-unknown-class", false, "issue tokens for a class no stored policy defines yet (its devices sit in lockdown until one does)")
			return func(env *subcmd.Env, args []string) error {
				switch {
				case len(args) > 0:
					return subcmd.Usagef("token create takes no arguments (got %q)", args[0])
				case *role != "device" && *role != "gateway":
					return subcmd.Usagef("token create: --role %q is neither device nor gateway", *role)
				case *role == "gateway" && len(segments) == 0:
					return subcmd.Usagef("token create --role gateway needs --segment SEGMENT (the segments the gateway fronts)")
				case *role == "device" && len(segments) > 0:
					return subcmd.Usagef("token create: --segment is for --role gateway")
				case *role == "device" && *class == "":
					return subcmd.Usagef("token create needs --class CLASS")
				}
				if *count < 1 || *count > 10000 {
					return subcmd.Usagef("token create: --count %d is outside 1-10000", *count)
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var t controlapi.TokenResponse
				for i := range *count {
					if err := a.Call("POST", controlapi.PathAdminTokens, controlapi.TokenRequest{Class: *class, Role: *role, Segments: segments, TTLSeconds: int64(ttl.Seconds()), AllowUnknownClass: *unknown}, &t); err != nil {
						if i > 0 {
							return fmt.Errorf("after %d tokens (printed above, each still usable): %w", i, err)
						}
						return err
					}
					fmt.Fprintf(env.Stdout, "%s\n", t.Token)
				}
				plural := "token"
				if *count > 1 {
					plural = fmt.Sprintf("%d tokens", *count)
				}
				what := "class " + t.Class
				if t.Role == "gateway" {
					what = "a gateway of " + strings.Join(t.Segments, ", ")
				}
				fmt.Fprintf(env.Stderr, "%s for %s, valid until %s, each usable once\n", plural, what, t.ExpiresAt.Format(time.RFC3339))
				return nil
			}
		},
	}}}
}

func pushCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "push", Args: "BUNDLE",
		Summary: "Hand a signed bundle, or a trust-root rotation (roots sign), to the control server,\n" +
			"which forwards it unchanged to its target devices (a rotation: to every device).",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 {
					return subcmd.Usagef("policy push takes one bundle file")
				}
				raw, err := envelope.ReadFile(args[0])
				if err != nil {
					return err
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var out struct {
					Version      uint64 `json:"version"`
					RootsVersion uint64 `json:"roots_version"`
				}
				if err := a.Call("POST", controlapi.PathAdminBundles, raw, &out); err != nil {
					return err
				}
				if out.RootsVersion > 0 {
					fmt.Fprintf(env.Stdout, "pushed trust-root rotation version %d\n", out.RootsVersion)
					return nil
				}
				fmt.Fprintf(env.Stdout, "pushed policy version %d\n", out.Version)
				return nil
			}
		},
	}
}

func withdrawCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "withdraw", Args: "VERSION",
		Summary: "Withdraw a pushed policy bundle: devices that do not have it are no longer offered it.\n" +
			"Devices that took it keep it (a device never goes back to a lower version): push a\n" +
			"newer bundle to replace it there.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			reason := fs.String("reason", "", "why (required): lands in the audit log")
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 {
					return subcmd.Usagef("policy withdraw takes one version number")
				}
				v, err := strconv.ParseUint(args[0], 10, 64)
				if err != nil || v == 0 {
					return subcmd.Usagef("policy withdraw: %q is not a policy version number", args[0])
				}
				if strings.TrimSpace(*reason) == "" {
					return subcmd.Usagef("policy withdraw needs --reason")
				}
				a, err := connect()
				if err != nil {
					return err
				}
				path := fmt.Sprintf("%s/%d?reason=%s", controlapi.PathAdminBundles, v, url.QueryEscape(*reason))
				if err := a.Call("DELETE", path, nil, nil); err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "withdrew policy version %d\n", v)
				return nil
			}
		},
	}
}

func devicesCmd() *subcmd.Command {
	return &subcmd.Command{
		Name:    "devices",
		Summary: "List enrolled devices: id, class, mode and why, policy version, last seen.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			asJSON := fs.Bool("json", false, "print JSON")
			return func(env *subcmd.Env, args []string) error {
				a, err := connect()
				if err != nil {
					return err
				}
				var devs []controlapi.Device
				if err := a.Call("GET", controlapi.PathAdminDevices, nil, &devs); err != nil {
					return err
				}
				if *asJSON {
					return printJSON(env, devs)
				}
				w := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "ID\tCLASS\tMODE\tPOLICY\tLAST SEEN\tWHY")
				for _, d := range devs {
					fmt.Fprintf(w, "%s\t%s\t%s\tv%d\t%s\t%s\n", safe(d.ID), safe(d.Class), d.State.Mode, d.State.PolicyVersion, ago(d.LastSeen), safe(d.State.Why))
				}
				return w.Flush()
			}
		},
	}
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}

func deviceCmd() *subcmd.Command {
	return &subcmd.Command{Name: "device", Summary: "one device", Sub: []*subcmd.Command{{
		Name: "show", Args: "ID",
		Summary: "Show one device: its state, keys and latest reports (JSON).",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 {
					return subcmd.Usagef("device show takes one device id")
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var d controlapi.Device
				if err := a.Call("GET", controlapi.PathAdminDevices+"/"+args[0], nil, &d); err != nil {
					return err
				}
				return printJSON(env, d)
			}
		},
	}, {
		Name: "revoke", Args: "ID",
		Summary: "Revoke a device for good: every Bulkhead gateway drops it from its roster (its live flows\n" +
			"cut there) and control answers it no more, whatever its own agent does. Only a new\n" +
			"enrolment, with a new token, brings it back.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			reason := fs.String("reason", "", "why, for the audit log (required)")
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 || strings.TrimSpace(*reason) == "" {
					return subcmd.Usagef("device revoke takes one device id and --reason REASON")
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var d controlapi.Device
				if err := a.Call("POST", controlapi.PathAdminDevices+"/"+args[0]+"/revoke", controlapi.RevokeRequest{Reason: *reason}, &d); err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "revoked %s (class %s) at %s: %s\n", d.ID, d.Class, d.RevokedAt.Format(time.RFC3339), d.RevokedWhy)
				return nil
			}
		},
	}}}
}

func auditCmd() *subcmd.Command {
	return &subcmd.Command{
		Name:    "audit",
		Summary: "Print the server's audit log: who did what, when, and why, oldest first, page by page.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			after := fs.Uint64("after", 0, "start after this sequence `NUMBER`")
			limit := fs.Int("limit", 0, "print at most `N` entries (default: all)")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("audit takes no arguments")
				}
				if *limit < 0 {
					return subcmd.Usagef("--limit must be positive")
				}
				a, err := connect()
				if err != nil {
					return err
				}
				printed := 0
				for next := *after; ; {
					var page controlapi.AuditPage
					if err := a.Call("GET", fmt.Sprintf("%s?after=%d", controlapi.PathAdminAudit, next), nil, &page); err != nil {
						return err
					}
					for _, e := range page.Entries {
						if *limit > 0 && printed == *limit {
							return nil
						}
						fmt.Fprintf(env.Stdout, "%s  %-20s %-18s %s\n", e.Time.Format(time.RFC3339), safe(e.Actor), safe(e.Action), safe(e.Detail))
						printed++
					}
					if page.Next == 0 {
						return nil
					}
					next = page.Next
				}
			}
		},
	}
}

func printJSON(env *subcmd.Env, v any) error {
	raw, err := json.Marshal(v, jsontext.WithIndent("  "))
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(env.Stdout, "%s\n", raw)
	return err
}

func suggestCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "suggest", Args: "POLICY.json",
		Summary: "Draft least-privilege rules for a class from the flows its devices were seen to need in\n" +
			"monitor mode: the policy with rules added that open exactly those flows (host, protocol,\n" +
			"port) and the class's monitor removed. Review it, then sign it. Flows no rule is drafted\n" +
			"for are listed with the reason.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			class := fs.String("class", "", "device `CLASS` to draft rules for (required)")
			out := fs.String("out", "", "write the draft to `FILE` (default: standard output)")
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 || *class == "" {
					return subcmd.Usagef("policy suggest needs --class CLASS and the policy file in force")
				}
				doc, err := readPolicy(args[0])
				if err != nil {
					return err
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var flows []controlapi.ObservedFlow
				if err := a.Call("GET", controlapi.PathAdminFlows+"?class="+url.QueryEscape(*class), nil, &flows); err != nil {
					return err
				}
				d, err := suggest.Rules(doc, *class, flows)
				if err != nil {
					return err
				}
				raw, err := json.Marshal(d.Policy, jsontext.WithIndent("  "))
				if err != nil {
					return err
				}
				raw = append(raw, '\n')
				if *out == "" {
					env.Stdout.Write(raw)
				} else if err := atomicfile.Write(*out, raw, 0o644); err != nil {
					return err
				}
				devices := map[string]bool{}
				for _, f := range flows {
					for _, id := range f.Devices {
						devices[id] = true
					}
				}
				w := env.Stderr
				fmt.Fprintf(w, "%d flows observed for class %s by %d devices; %d rules added\n", len(flows), *class, len(devices), len(d.Added))
				for _, r := range d.Added {
					fmt.Fprintf(w, "  + %s\n", ruleText(r))
				}
				for _, u := range d.Unmatched {
					fmt.Fprintf(w, "  not drafted: %s %s %s: %s\n", safe(u.Flow.Segment), u.Flow.Protocol, u.Flow.Target(), safe(u.Why))
				}
				if len(flows) == 0 {
					fmt.Fprintf(w, "nothing observed yet: is a monitor in the class's signed policy, and have its devices reported?\n")
				}
				return nil
			}
		},
	}
}

func ruleText(r policy.Rule) string {
	s := "segment " + r.Segment
	var hosts []string
	for _, h := range r.Hosts {
		hosts = append(hosts, h.String())
	}
	if len(hosts) > 0 {
		s += " hosts " + strings.Join(hosts, ",")
	}
	if r.Protocol != "" {
		s += " " + string(r.Protocol)
	}
	var ports []string
	for _, p := range r.Ports {
		ports = append(ports, p.String())
	}
	if len(ports) > 0 {
		s += " ports " + strings.Join(ports, ",")
	}
	return s
}
