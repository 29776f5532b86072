package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent"
	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/installer"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
)

// DefaultConfig is where the installer writes the configuration.
const DefaultConfig = installer.ConfigFile

func runCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "run",
		Summary: "Run the agent in the foreground (the service runs this). It enforces the cached\n" +
			"policy, or lockdown, before anything else, and leaves the table in place when it stops.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			configFile := fs.String("config", DefaultConfig, "configuration `FILE`")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("run takes no arguments")
				}
				cfg, err := config.Load(*configFile)
				if err != nil {
					return err
				}
				// An idle agent's heap is a few MiB that barely changes,
				// and the runtime's default lets it double before it
				// collects. Collecting at half again bounds it at 1.5
				// times the live data, for a collection of a millisecond
				// when there is garbage at all. A segment gateway keeps
				// the default: it forwards a segment's traffic, and its
				// throughput is worth more than its last MiB. GOGC in the
				// environment still decides when it is set.
				if os.Getenv("GOGC") == "" && cfg.Gateway == nil {
					debug.SetGCPercent(50)
				}
				a := agent.New(cfg)
				if err := a.Boot(); err != nil {
					return fmt.Errorf("boot: %w", err)
				}
				if err := notifyReady(); err != nil {
					fmt.Fprintf(env.Stderr, "bulkhead: telling the service manager we are ready: %v\n", err)
				}
				ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
				defer stop()
				return a.Run(ctx)
			}
		},
	}
}

// notifyReady tells systemd (the unit is Type=notify) that the table is
// in place. Units ordered after this one, network-pre.target and so the
// network itself, start only then. Without NOTIFY_SOCKET, as under OpenRC,
// SysV or a shell, it does nothing.
func notifyReady() error {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte("READY=1"))
	return err
}

func socketFlag(fs *flag.FlagSet) *string {
	return fs.String("socket", config.DefaultSocket, "the agent's admin `SOCKET`")
}

func call(socket string, req adminapi.Request) (*adminapi.Response, error) {
	return adminapi.Client{Socket: socket}.Do(req)
}

func statusCmd() *subcmd.Command {
	return &subcmd.Command{
		Name:    "status",
		Summary: "Show the mode and why, the policy version and expiry, the last apply and drift repairs.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			socket := socketFlag(fs)
			asJSON := fs.Bool("json", false, "print JSON")
			return func(env *subcmd.Env, args []string) error {
				resp, err := call(*socket, adminapi.Request{Op: adminapi.OpStatus})
				if err != nil {
					return err
				}
				if *asJSON {
					enc := json.NewEncoder(env.Stdout)
					enc.SetIndent("", "  ")
					return enc.Encode(resp.Status)
				}
				printStatus(env, resp.Status)
				return nil
			}
		},
	}
}

func printStatus(env *subcmd.Env, s *adminapi.Status) {
	w := env.Stdout
	fmt.Fprintf(w, "mode      %s\n", s.Mode)
	for _, why := range s.Why {
		fmt.Fprintf(w, "  because %s\n", why)
	}
	fmt.Fprintf(w, "device    %s %s\n", s.DeviceClass, s.DeviceID)
	if s.PolicyVersion > 0 {
		fmt.Fprintf(w, "policy    version %d, expires %s\n", s.PolicyVersion, s.PolicyExpires.UTC().Format(time.RFC3339))
	} else {
		fmt.Fprintf(w, "policy    none\n")
	}
	fmt.Fprintf(w, "roots     ops trust roots version %d\n", s.RootsVersion)
	fmt.Fprintf(w, "open      %s\n", strings.Join(append([]string{"safety floor", "control"}, s.Open...), ", "))
	if !s.LastApply.IsZero() {
		fmt.Fprintf(w, "applied   %s\n", s.LastApply.UTC().Format(time.RFC3339))
	}
	if s.ApplyError != "" {
		fmt.Fprintf(w, "APPLY FAILED %s (the previous ruleset stays in force)\n", s.ApplyError)
	}
	fmt.Fprintf(w, "repairs   %d drift repairs\n", s.DriftRepairs)
	for _, c := range s.Checks {
		state := "passing"
		if c.Failing {
			state = "FAILING (" + c.Profile.String() + ")"
		}
		fmt.Fprintf(w, "check     %s %s: observed %s, expected %s\n", c.ID, state, c.Observed, c.Expected)
	}
	if !s.NextChange.IsZero() {
		fmt.Fprintf(w, "next      %s\n", s.NextChange.UTC().Format(time.RFC3339))
	}
	printGateway(env, s.Gateway)
	printTunnel(env, s.Tunnel)
	printMonitor(env, s.Monitor)
	printRefused(env, s.Refused)
	switch c := s.Control; {
	case c == nil:
		fmt.Fprintf(w, "control   not enrolled (bulkhead enroll)\n")
	case c.Connected:
		fmt.Fprintf(w, "control   %s, connected, last sync %s\n", c.URL, c.LastSync.UTC().Format(time.RFC3339))
	default:
		fmt.Fprintf(w, "control   %s, NOT CONNECTED: %s (enforcing from the cache meanwhile)\n", c.URL, c.Error)
	}
}

func printGateway(env *subcmd.Env, g *adminapi.GatewayStatus) {
	if g == nil {
		return
	}
	w := env.Stdout
	fmt.Fprintf(w, "gateway   of %s: admits %d of %d enrolled devices (%d groups); %d orders taken\n",
		strings.Join(g.Segments, ", "), g.Admitted, g.Roster, g.Groups, g.Orders)
	for _, r := range g.Refused {
		fmt.Fprintf(w, "  not admitted %s: %s\n", r.Device, r.Reason)
	}
}

func printMonitor(env *subcmd.Env, m *adminapi.MonitorStatus) {
	if m == nil {
		return
	}
	w := env.Stdout
	if m.Until.IsZero() {
		fmt.Fprintf(w, "monitor   ended; %d flows seen\n", len(m.Flows))
	} else {
		fmt.Fprintf(w, "monitor   until %s on %s: what no rule opens is logged and passed; %d flows seen\n",
			m.Until.UTC().Format(time.RFC3339), strings.Join(m.Segments, ", "), len(m.Flows))
	}
	if m.Error != "" {
		fmt.Fprintf(w, "  FLOWS NOT READ %s (they still pass, counted in the table)\n", m.Error)
	}
	if m.Overflow > 0 || m.Lost > 0 {
		fmt.Fprintf(w, "  %d connections beyond the flow table's size not itemized, %d kernel log overruns\n", m.Overflow, m.Lost)
	}
	for _, f := range m.Flows {
		fmt.Fprintf(w, "  flow %s %s %s: %d connections, last %s\n", f.Segment, f.Protocol, f.Target(), f.Count, f.Last.UTC().Format(time.RFC3339))
	}
}

func printRefused(env *subcmd.Env, r *adminapi.RefusedStatus) {
	if r == nil {
		return
	}
	w := env.Stdout
	fmt.Fprintf(w, "refused   %d flows since start (reported to control)\n", len(r.Flows))
	if r.Error != "" {
		fmt.Fprintf(w, "  REFUSED NOT READ %s (still refused, counted by the default drop)\n", r.Error)
	}
	if r.Overflow > 0 {
		fmt.Fprintf(w, "  %d attempts beyond the flow table's size not itemized\n", r.Overflow)
	}
	for _, f := range r.Flows {
		what := fmt.Sprintf("out %s to %s", f.Protocol, f.Target())
		if f.Direction == "in" {
			what = fmt.Sprintf("in  %s from %s to port %d", f.Protocol, f.Address, f.Port)
		}
		fmt.Fprintf(w, "  %s: %d attempts, last %s\n", what, f.Count, f.Last.UTC().Format(time.RFC3339))
	}
}

func printTunnel(env *subcmd.Env, t adminapi.TunnelStatus) {
	w := env.Stdout
	if t.PublicKey == "" {
		fmt.Fprintf(w, "tunnel    %s DOWN: %s (segments stay closed)\n", t.Interface, t.Error)
		return
	}
	fmt.Fprintf(w, "tunnel    %s, public key %s, %d peers\n", t.Interface, t.PublicKey, len(t.Peers))
	if t.Error != "" {
		fmt.Fprintf(w, "  TUNNEL APPLY FAILED %s\n", t.Error)
	}
	for _, p := range t.Peers {
		hs := "no handshake yet"
		if p.HandshakeAge >= 0 {
			hs = fmt.Sprintf("handshake %s ago", time.Duration(p.HandshakeAge)*time.Second)
		}
		fmt.Fprintf(w, "  peer %s (%s) at %s: %s, rx %d B, tx %d B\n", p.PublicKey, strings.Join(p.Segments, ", "), p.Endpoint, hs, p.RxBytes, p.TxBytes)
	}
}

func rotateKeyCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "rotate-key",
		Summary: "Replace the device's WireGuard key. The old key stops working at once: every\n" +
			"gateway must be given the new public key (printed) before tunnels carry traffic again.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			socket := socketFlag(fs)
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("rotate-key takes no arguments")
				}
				resp, err := call(*socket, adminapi.Request{Op: adminapi.OpRotateKey})
				if err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "new public key %s\n", resp.PublicKey)
				return nil
			}
		},
	}
}

func explainCmd() *subcmd.Command {
	return &subcmd.Command{
		Name:    "explain",
		Summary: "Say whether this device may reach ADDR:PORT now, what decided, and why.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			socket := socketFlag(fs)
			to := fs.String("to", "", "destination `ADDR:PORT[/tcp|udp]`")
			return func(env *subcmd.Env, args []string) error {
				if *to == "" || len(args) > 0 {
					return subcmd.Usagef("explain needs --to ADDR:PORT[/tcp|udp]")
				}
				if _, _, _, err := agent.ParseTarget(*to); err != nil {
					return subcmd.Usagef("%v", err)
				}
				resp, err := call(*socket, adminapi.Request{Op: adminapi.OpExplain, To: *to})
				if err != nil {
					return err
				}
				v := resp.Verdict
				word := "deny"
				if v.Allowed {
					word = "allow"
				}
				fmt.Fprintf(env.Stdout, "%s %s (mode %s)\n  decided by %s\n  %s\n", word, *to, resp.Status.Mode, v.By, v.Reason)
				return nil
			}
		},
	}
}

func applyCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "apply", Args: "BUNDLE",
		Summary: "Hand a signed bundle, or a trust-root rotation (bulkhead-control roots sign), to the\n" +
			"running agent. A rejected one changes nothing.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			socket := socketFlag(fs)
			return func(env *subcmd.Env, args []string) error {
				if len(args) != 1 {
					return subcmd.Usagef("policy apply takes one bundle file")
				}
				raw, err := envelope.ReadFile(args[0])
				if err != nil {
					return err
				}
				resp, err := call(*socket, adminapi.Request{Op: adminapi.OpApply, Bundle: raw})
				if err != nil {
					return err
				}
				switch kind, _ := envelope.TypeOf(raw); kind {
				case bundle.RootsPayloadType:
					fmt.Fprintf(env.Stdout, "trust roots rotated to version %d; policy version %d, mode %s\n", resp.Status.RootsVersion, resp.Status.PolicyVersion, resp.Status.Mode)
					return nil
				case command.PayloadType:
					fmt.Fprintf(env.Stdout, "command obeyed (or already in force): mode %s\n", resp.Status.Mode)
					return nil
				}
				fmt.Fprintf(env.Stdout, "applied: policy version %d, mode %s\n", resp.Status.PolicyVersion, resp.Status.Mode)
				return nil
			}
		},
	}
}

func cleanupCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "cleanup",
		Summary: "Remove the agent's nftables table. The device stops enforcing policy: use it\n" +
			"only to decommission or recover a device (uninstall runs it too). It refuses while the\n" +
			"agent runs (it would put the table back): stop the service first.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("cleanup takes no arguments")
				}
				if pid, ok := runningAgent(); ok {
					return fmt.Errorf("the agent is running (bulkhead run, pid %d) and would put table inet %s back within a second; "+
						"stop it first (systemctl stop bulkhead, or rc-service bulkhead stop), then run cleanup again", pid, nft.Table)
				}
				removed, err := nft.NewEnforcer().Remove()
				switch {
				case err != nil:
					return err
				case !removed:
					fmt.Fprintf(env.Stdout, "no table inet %s to remove: this device enforces no Bulkhead policy; nothing changed\n", nft.Table)
				default:
					fmt.Fprintf(env.Stdout, "removed table inet %s: this device no longer enforces any Bulkhead policy\n", nft.Table)
				}
				return nil
			}
		},
	}
}

func recoverCacheCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "recover-cache",
		Summary: "Replace a damaged policy cache, with the agent stopped. A damaged cache keeps the device in\n" +
			"lockdown (floor and control only) until this is run. The damaged file is kept aside, the new\n" +
			"cache trusts the ops keys the configuration pins, and its audit log records the recovery.\n" +
			"Started again, the agent enforces lockdown until a policy arrives from control (the enrolment\n" +
			"is kept) or through `bulkhead policy apply`.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			configFile := fs.String("config", DefaultConfig, "configuration `FILE`")
			refuse := fs.Uint64("refuse-up-to", 0, "refuse bundles up to this `VERSION` (the one the device last ran, from\n"+
				"`bulkhead-control devices`), so an old bundle cannot be replayed into the empty cache;\n"+
				"0 starts rollback protection afresh")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 {
					return subcmd.Usagef("recover-cache takes no arguments")
				}
				cfg, err := config.Load(*configFile)
				if err != nil {
					return err
				}
				r, err := agent.RecoverCache(cfg, *refuse, time.Now())
				if err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "the damaged cache (%s) is kept at %s\n", r.Damage, r.Kept)
				fmt.Fprintf(env.Stdout, "new cache: %d ops keys pinned from the configuration (threshold %d)", r.RootsPinned, r.Threshold)
				if r.RefusedUpTo > 0 {
					fmt.Fprintf(env.Stdout, "; bundles up to version %d refused\n", r.RefusedUpTo)
				} else {
					fmt.Fprintf(env.Stdout, "; rollback protection starts afresh (give --refuse-up-to to keep old bundles out)\n")
				}
				fmt.Fprintf(env.Stdout, "recorded in the cache's audit log; start the agent: it enforces lockdown until a policy arrives\n")
				return nil
			}
		},
	}
}

func enrollCmd() *subcmd.Command {
	return &subcmd.Command{
		Name: "enroll",
		Summary: "Enrol this device with a control server, through the running agent: the agent opens its\n" +
			"table to the server, checks the server's CA against --trust-ca, presents the one-time\n" +
			"token, stores its certificate and starts syncing. Nothing is kept if any step fails.",
		Flags: func(fs *flag.FlagSet) func(*subcmd.Env, []string) error {
			socket := socketFlag(fs)
			url := fs.String("control", "", "control server `URL`, e.g. https://10.99.0.1:8443 (required)")
			token := fs.String("token", "", "one-time enrolment `TOKEN` from `bulkhead-control token create` (required)")
			fp := fs.String("trust-ca", "", "the control CA's fingerprint `SHA256:HEX`, as `bulkhead-control serve` prints it (required)")
			return func(env *subcmd.Env, args []string) error {
				if len(args) > 0 || *url == "" || *token == "" || *fp == "" {
					return subcmd.Usagef("enroll needs --control URL, --token TOKEN and --trust-ca SHA256:FP")
				}
				if _, err := controlapi.ParseFingerprint(*fp); err != nil {
					return subcmd.Usagef("%v", err)
				}
				resp, err := call(*socket, adminapi.Request{Op: adminapi.OpEnroll, URL: *url, Token: *token, Fingerprint: *fp})
				if err != nil {
					return err
				}
				fmt.Fprintf(env.Stdout, "enrolled as %s with %s\n", resp.Status.DeviceID, *url)
				return nil
			}
		},
	}
}
