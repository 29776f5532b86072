package opscli

import (
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

// defaultWait is how long --wait waits when given no duration.
const defaultWait = 2 * time.Minute

// waitFlag is --wait [DURATION]: a switch that may take a duration, given
// as --wait=5m or as the argument after it.
type waitFlag struct {
	set bool
	d   time.Duration
}

func (w *waitFlag) IsBoolFlag() bool { return true }
func (w *waitFlag) String() string   { return "" }
func (w *waitFlag) Set(v string) error {
	switch v {
	case "true":
		w.set, w.d = true, defaultWait
		return nil
	case "false":
		w.set = false
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return fmt.Errorf("--wait %q: want a duration such as 30s or 5m", v)
	}
	w.set, w.d = true, d
	return nil
}

// commandCmd builds quarantine, diagnostic, release, revoke-partner and
// reinstate-partner. With --key the command is signed here by the ops
// keys; without, the server signs it with its own key, which it does only
// for orders that tighten. Either way it is an order at control: in force
// for every device it covers, now and later, until ops lift it.
func commandCmd(kind command.Kind, summary string) *subcmd.Command {
	args := "ID..."
	if kind == command.RevokePartner || kind == command.ReinstatePartner {
		args = "PARTNER"
	}
	return &subcmd.Command{
		Name: string(kind), Args: args, Summary: summary,
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			var classes, keys subcmd.Strings
			reason := fs.String("reason", "", "why, for the audit logs and the device's status (required)")
			fs.Var(&keys, "key", "ops signing key `FILE`; repeat up to the devices' threshold. Required for release and reinstate-partner")
			if args == "ID..." {
				fs.Var(&classes, "class", "every device of `CLASS`, now and enrolled later; repeatable")
			}
			validFor := fs.Duration("valid-for", 15*time.Minute, "with --key: how long the signed command is valid (at most 1h). The order stays in force until lifted; a device away longer gets it again from control, and a release past this time lifts only what was imposed before it")
			var wait waitFlag
			fs.Var(&wait, "wait", "wait up to `DURATION` (default 2m) for every device to apply the order, printing each as it does; exit 1 naming those that did not")
			dryRun := fs.Bool("dry-run", false, "list the devices the order would cover and change nothing")
			out := fs.String("out", "", "with --key: also write the signed command to `FILE` (to carry to a device's drop directory)")
			return func(env *subcmd.Env, rest []string) error {
				validForSet := false
				fs.Visit(func(f *flag.Flag) { validForSet = validForSet || f.Name == "valid-for" })
				if wait.set {
					// --wait 5m: the duration arrives as an argument.
					for i, a := range rest {
						if d, err := time.ParseDuration(a); err == nil && d > 0 {
							wait.d, rest = d, slices.Delete(slices.Clone(rest), i, i+1)
							break
						}
					}
				}
				req := controlapi.CommandRequest{Kind: string(kind), Reason: *reason, DryRun: *dryRun}
				if args == "PARTNER" {
					if len(rest) != 1 {
						return subcmd.Usagef("%s takes one partner id, got %q", kind, rest)
					}
					req.Partner, req.All = rest[0], true
				} else {
					if len(rest) == 0 && len(classes) == 0 {
						return subcmd.Usagef("%s needs device ids or --class CLASS", kind)
					}
					req.Devices, req.Classes = rest, classes
				}
				switch {
				case strings.TrimSpace(*reason) == "":
					return subcmd.Usagef("%s needs --reason", kind)
				case kind.Loosens() && len(keys) == 0:
					return subcmd.Usagef("%s loosens access and must be signed by the ops keys: give --key ops.key", kind)
				case validForSet && len(keys) == 0:
					return subcmd.Usagef("--valid-for sets how long an ops-signed command is valid and needs --key; without it the server signs each delivery itself (serve --command-lifetime), and the order stays in force until lifted")
				case *out != "" && len(keys) == 0:
					return subcmd.Usagef("--out writes the ops-signed command and needs --key")
				case *validFor <= 0 || *validFor > command.MaxLifetime:
					return subcmd.Usagef("--valid-for must be between 1s and %v", command.MaxLifetime)
				case wait.set && *dryRun:
					return subcmd.Usagef("--dry-run gives no order to wait for; drop --wait")
				}
				if len(keys) > 0 {
					privs, err := loadKeys(keys)
					if err != nil {
						return err
					}
					now := time.Now().UTC()
					c := command.Command{ID: newCommandID(), Kind: kind, Partner: req.Partner, Reason: req.Reason,
						Target:   command.Target{All: req.All, Classes: req.Classes, Devices: req.Devices},
						IssuedAt: now, ExpiresAt: now.Add(*validFor)}
					if req.Signed, err = command.Sign(c, privs...); err != nil {
						return err
					}
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var resp controlapi.CommandResponse
				if err := a.Call("POST", controlapi.PathAdminCommands, req, &resp); err != nil {
					return err
				}
				if resp.DryRun {
					fmt.Fprintf(env.Stdout, "%s would cover %d enrolled device(s), and every device it names that enrols later: %s\nnothing was ordered (--dry-run)\n",
						kind, len(resp.Devices), safe(strings.Join(resp.Devices, " ")))
					return nil
				}
				if *out != "" {
					if err := os.WriteFile(*out, req.Signed, 0o600); err != nil {
						return fmt.Errorf("order %s was given, but --out: %w", resp.ID, err)
					}
				}
				fmt.Fprintf(env.Stdout, "%s %s in force for %d enrolled device(s), and every device it names that enrols later: %s\n",
					kind, resp.ID, len(resp.Devices), safe(strings.Join(resp.Devices, " ")))
				if !wait.set {
					return nil
				}
				return waitFor(env, a, resp.ID, wait.d)
			}
		},
	}
}

// waitFor follows an order until every device it covers applied it or
// the deadline passed, printing a line per device as its state settles.
// It fails naming the devices that did not apply it.
func waitFor(env *subcmd.Env, a *admin, id string, d time.Duration) error {
	deadline := time.Now().Add(d)
	told := map[string]string{}
	for {
		var o controlapi.Order
		if err := a.Call("GET", controlapi.PathAdminOrders+"/"+url.PathEscape(id), nil, &o); err != nil {
			return err
		}
		var open []controlapi.OrderDevice
		for _, dev := range o.Devices {
			switch dev.State {
			case controlapi.OrderApplied, controlapi.OrderRefused, controlapi.OrderSuperseded:
				if told[dev.Device] != dev.State {
					told[dev.Device] = dev.State
					fmt.Fprintf(env.Stdout, "  %s\t%s\n", safe(dev.Device), deviceLine(dev))
				}
				if dev.State != controlapi.OrderApplied {
					open = append(open, dev)
				}
			default:
				open = append(open, dev)
			}
		}
		pending := slices.ContainsFunc(open, func(d controlapi.OrderDevice) bool { return d.State == controlapi.OrderPending })
		if !pending || !time.Now().Before(deadline) {
			if len(open) == 0 {
				fmt.Fprintf(env.Stdout, "%s applied on all %d device(s)\n", id, len(o.Devices))
				return nil
			}
			var names []string
			for _, dev := range open {
				if dev.State == controlapi.OrderPending {
					fmt.Fprintf(env.Stdout, "  %s\t%s\n", safe(dev.Device), deviceLine(dev))
				}
				names = append(names, safe(dev.Device))
			}
			return fmt.Errorf("%s not applied on %d of %d device(s) after %v: %s (it stays in force; bulkhead-control orders %s follows it)",
				id, len(open), len(o.Devices), d, strings.Join(names, " "), id)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func deviceLine(d controlapi.OrderDevice) string {
	if d.Detail == "" {
		return d.State
	}
	return d.State + ": " + safe(d.Detail)
}

func newCommandID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return "order-" + hex.EncodeToString(b)
}

func ordersCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "orders", Args: "[ID]",
		Summary: "List the orders in force (quarantine, diagnostic, partner revocations and the lifts still\n" +
			"landing), each with its devices: applied, pending (with last seen), refused (with why).",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			connect := adminFlags(fs)
			all := fs.Bool("all", false, "also list orders a later order superseded everywhere")
			asJSON := fs.Bool("json", false, "print JSON")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 1 {
					return subcmd.Usagef("orders takes at most one order id, got %q", args)
				}
				a, err := connect()
				if err != nil {
					return err
				}
				var orders []controlapi.Order
				if len(args) == 1 {
					var o controlapi.Order
					if err := a.Call("GET", controlapi.PathAdminOrders+"/"+url.PathEscape(args[0]), nil, &o); err != nil {
						return err
					}
					orders = []controlapi.Order{o}
				} else {
					path := controlapi.PathAdminOrders
					if *all {
						path += "?all=1"
					}
					if err := a.Call("GET", path, nil, &orders); err != nil {
						return err
					}
				}
				if *asJSON {
					return printJSON(env, orders)
				}
				if len(orders) == 0 {
					fmt.Fprintln(env.Stdout, "no orders in force")
					return nil
				}
				w := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
				for _, o := range orders {
					what := o.Kind
					if o.Partner != "" {
						what += " " + o.Partner
					}
					signer := "control key"
					if o.SignedByOps {
						signer = "ops keys"
					}
					fmt.Fprintf(w, "%s\t%s for %s\timposed %s by %s (%s)\treason: %s\n", o.ID, safe(what), safe(o.Target),
						o.ImposedAt.Format(time.RFC3339), safe(o.By), signer, safe(o.Reason))
					if len(o.Devices) == 0 {
						fmt.Fprintln(w, "  (no enrolled device yet)\t\t\t")
					}
					for _, d := range o.Devices {
						fmt.Fprintf(w, "  %s\t%s\t\t\n", safe(d.Device), deviceLine(d))
					}
				}
				return w.Flush()
			}
		},
	}
}
