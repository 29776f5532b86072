// Package agent owns the device daemon: the boot sequence that enforces
// the cached policy before any network activity, the one event loop that
// owns all state, and the root-only admin socket that the CLI talks to.
// Its side effects go through the small interfaces in seams.go.
package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
	"github.com/bulkhead-edge/bulkhead/localpolicy/trustedtime"
	"github.com/bulkhead-edge/bulkhead/posture"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// How often the kernel is compared with what was applied. The table is
// verified twice a second, so drift is repaired within a second; that costs
// one generation query while nothing in the namespace changes, and a whole
// comparison after anything does (nft.Enforcer.Verify). The whole comparison
// also runs unconditionally every few minutes, not trusting the generation
// alone. Tunnel peers and routes are restored every ten seconds.
const (
	driftCheckEvery  = 500 * time.Millisecond
	deepCheckEvery   = 5 * time.Minute
	tunnelCheckEvery = 10 * time.Second
	dropScanEvery    = time.Second
)

// Agent is the daemon. Everything below the configuration is owned by the
// goroutine running Run; other goroutines reach it through requests.
type Agent struct {
	cfg         *config.Config
	log         *slog.Logger
	openFlowLog func() (FlowLog, error)
	posture     Posture
	wall        func() time.Time
	reqs        chan request
	enrolments  chan enrolStep
	// enrol is the exchange with the server (controlclient.Enroll; the
	// decision tests hold it).
	enrol func(ctx context.Context, dir, url, token, fingerprint string, who controlclient.Who, wgKey string, ep netip.AddrPort) (*controlclient.Record, error)

	// Owned by the event loop.
	// store is the one owner of the cached bundle, the trust roots, the
	// sticky state, trusted time and the last contact; nil when the cache
	// cannot be opened.
	store     *store.Store
	clock     *trustedtime.Clock
	bundle    *bundle.Bundle
	noPolicy  string
	sticky    localpolicy.Sticky
	desired   localpolicy.Desired
	evaluated bool // desired holds an evaluation (false until the boot apply)
	// ctlTime is control's time in its latest answer, and ctlAt the
	// wall() reading (with its monotonic part) when it arrived.
	ctlTime, ctlAt time.Time
	// lastContact is the latest authenticated answer from control;
	// savedContact what the cache holds of it (written only when it has
	// moved on by a fraction of max_offline: flash wears).
	lastContact, savedContact time.Time
	tracker                   posture.Tracker
	checks                    []localpolicy.Check // every check's state after the latest sample
	// lastInventory is the inventory last reported.
	lastInventory string

	// The components: each owns its state (and goroutine, if it has one).
	table  table       // the kernel table
	link   link        // the WireGuard tunnel
	ch     channel     // the control channel (its goroutine: the syncer)
	sample *sampler    // posture sampling
	loc    locator     // the device's position
	mon    flowMonitor // the table's log
	gw     *gateway    // the segment-gateway role; nil on a device
}

// Option adjusts an Agent; tests use them.
type Option func(*Agent)

// WithEnforcer replaces the enforcer (a test enforces in its own
// namespace, or in memory).
func WithEnforcer(e Enforcer) Option { return func(a *Agent) { a.table.kernel = e } }

// WithTunnel replaces how the tunnel is opened (a test opens it in its own
// namespace, or in memory).
func WithTunnel(open func(tunnel.Config) (Tunnel, error)) Option {
	return func(a *Agent) { a.link.open = open }
}

// WithFlowLog replaces how the table's log is bound (by default in the
// enforcer's network namespace).
func WithFlowLog(open func() (FlowLog, error)) Option {
	return func(a *Agent) { a.openFlowLog = open }
}

// WithPosture replaces what gathers the device's facts.
func WithPosture(p Posture) Option { return func(a *Agent) { a.posture = p } }

// WithWallClock replaces the wall clock (time.Now) the agent's trusted
// time starts from; tests set it ahead or behind. The monotonic clock
// that carries trusted time stays the real one.
func WithWallClock(wall func() time.Time) Option { return func(a *Agent) { a.wall = wall } }

// WithLogger replaces the logger.
func WithLogger(l *slog.Logger) Option { return func(a *Agent) { a.log = l } }

// New makes an agent; it touches nothing until Boot.
func New(cfg *config.Config, opts ...Option) *Agent {
	a := &Agent{
		cfg: cfg, table: table{kernel: nft.NewEnforcer()}, link: link{open: openTunnel}, posture: hostPosture{}, wall: time.Now,
		log:  slog.New(slog.NewTextHandler(os.Stderr, nil)),
		reqs: make(chan request), enrolments: make(chan enrolStep), enrol: controlclient.Enroll,
	}
	a.ch.answers = make(chan syncResult)
	for _, o := range opts {
		o(a)
	}
	if a.openFlowLog == nil {
		a.openFlowLog = kernelFlowLog(a.table.kernel)
	}
	a.mon = newFlowMonitor(a.openFlowLog, a.log)
	a.link.log, a.loc = a.log, newLocator(cfg.Location)
	a.table.log, a.table.wall = a.log, a.wall
	a.sample = newSampler(a.posture, time.Duration(cfg.Posture.Interval), a.log)
	return a
}

// Boot enforces before anything else happens: open the cache, verify the
// cached bundle from its signed bytes, and apply its ruleset, or lockdown
// when there is none or it cannot be trusted. Only then does the tunnel
// come up (its first network activity) and get its peers. A tunnel that
// cannot come up is reported and retried; it never stops enforcement.
func (a *Agent) Boot() error {
	a.clock = trustedtime.New(time.Time{}, a.wall)
	if err := a.lockdownFirst(); err != nil {
		return err
	}
	if err := a.openStore(); err != nil {
		a.noPolicy = err.Error()
		a.log.Error("policy cache unusable; enforcing lockdown", "err", err)
	} else {
		a.loadEnrolment()
		a.loadBundle()
	}
	if err := a.reconcile("boot"); err != nil {
		return err
	}
	if a.link.up(a.tunnelConfig()) {
		// Gateways may now reach the tunnel's port.
		return a.reconcile("tunnel up")
	}
	return nil
}

// lockdownFirst puts the static lockdown table in place when the kernel
// holds none (the first start since the device booted, or after someone
// deleted it): the safety floor and control only, built from the
// configuration and the enrolment record, before the cache is opened. Any
// failure after this point (a damaged cache, a crash) leaves the device
// closed. A table that is there (this agent's, from before a restart) is
// left alone: its flows keep flowing until the boot apply decides.
func (a *Agent) lockdownFirst() error {
	present, err := a.table.kernel.Present()
	if err != nil || present {
		return err
	}
	eps := a.cfg.Control
	if rec, err := controlclient.Load(a.cfg.StateDir); err == nil && rec.Endpoint.IsValid() {
		eps = append(eps[:len(eps):len(eps)], policy.Endpoint{Address: rec.Endpoint.Addr(), Port: rec.Endpoint.Port()})
	}
	d := localpolicy.Evaluate(localpolicy.Input{NoPolicy: "starting: the policy cache is not read yet", Device: a.cfg.Identity(),
		Now: a.wall(), Floor: a.cfg.SafetyFloor, Control: eps})
	if _, err := a.table.apply(nft.Build(d, a.nftOptions())); err != nil {
		return fmt.Errorf("static lockdown table: %w", err)
	}
	a.log.Info("static lockdown table in place before the cache is read")
	return nil
}

// nftOptions are the device-local table options: from the configuration,
// and the tunnel's port once it is up (the configured one before: a
// device with a fixed port gets the same table before and after).
func (a *Agent) nftOptions() nft.Options {
	o := nft.Options{DHCP: *a.cfg.DHCP, Tunnel: a.cfg.Tunnel.Interface, ListenPort: a.cfg.Tunnel.ListenPort}
	if a.link.tun != nil {
		o.ListenPort = a.link.tun.ListenPort()
	}
	return o
}

// tunnelConfig is the tunnel as configured, with the address control
// assigned at enrolment when the configuration names none.
func (a *Agent) tunnelConfig() tunnel.Config {
	cfg := a.cfg.WireGuard()
	if p, ok := a.assignedAddress(); ok && len(cfg.Addresses) == 0 {
		cfg.Addresses = []netip.Prefix{p}
	}
	return cfg
}

// assignedAddress is the tunnel address control assigned at enrolment,
// as a single-address prefix.
func (a *Agent) assignedAddress() (netip.Prefix, bool) {
	if a.ch.rec == nil || !a.ch.rec.TunnelAddress.IsValid() {
		return netip.Prefix{}, false
	}
	addr := a.ch.rec.TunnelAddress
	if pool := a.ch.rec.TunnelPool; a.ch.rec.Gateway() && pool.IsValid() {
		// A gateway is on the link of every device in the pool.
		return netip.PrefixFrom(addr, pool.Bits()), true
	}
	return netip.PrefixFrom(addr, addr.BitLen()), true
}

func (a *Agent) openStore() error {
	if err := os.MkdirAll(a.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	st, err := store.Open(filepath.Join(a.cfg.StateDir, "state.db"))
	if err != nil {
		return err
	}
	a.store = st
	st.OnAudit(func(e store.Event) { a.report(e.Time, e.Kind, e.Detail) })
	if err := st.PinRoots(a.cfg.PinnedRoots); err != nil {
		return err
	}
	if _, _, err := st.CurrentRoots(); err != nil {
		return err
	}
	if a.sticky, err = st.Sticky(); err != nil {
		return err
	}
	floor, err := st.TrustedTime()
	if err != nil {
		return err
	}
	a.clock = trustedtime.New(floor, a.wall)
	contact, err := st.Contact()
	if err != nil {
		return err
	}
	// A contact recorded while the clock ran ahead cannot lie in the
	// future of this boot: that would hold off the offline deadline.
	a.lastContact, a.savedContact = contact, contact
	if now := a.clock.Now(); contact.After(now) {
		a.lastContact = now
	}
	return nil
}

func (a *Agent) loadBundle() {
	b, err := a.store.Load(a.device())
	switch {
	case err == nil:
		a.bundle, a.noPolicy = b, ""
	case errors.Is(err, store.ErrNoBundle):
		a.noPolicy = err.Error()
	default:
		a.noPolicy = "cached policy rejected: " + err.Error()
		a.log.Error("cached policy cannot be trusted; enforcing lockdown", "err", err)
		a.audit("cache-rejected", err.Error())
	}
}

// reconcile evaluates the current inputs and applies the result. An
// unchanged result costs an evaluation and a string comparison, no kernel
// call.
func (a *Agent) reconcile(why string) error {
	in := localpolicy.Input{
		NoPolicy: a.noPolicy, Device: a.device(), Now: a.clock.Now(), LastContact: a.lastContact,
		Sticky: a.sticky, Floor: a.cfg.SafetyFloor, Control: a.controlEndpoints(), Checks: a.currentChecks(),
	}
	if a.bundle != nil {
		in.Bundle = &a.bundle.Payload
	}
	for _, p := range a.link.traffic {
		in.Traffic = append(in.Traffic, localpolicy.PeerTraffic{PublicKey: p.PublicKey, LastHandshake: p.LastHandshake, RxBytes: p.RxBytes, TxBytes: p.TxBytes})
	}
	prev, known := a.desired.Mode, a.evaluated
	a.desired, a.evaluated = localpolicy.Evaluate(in), true
	opts := a.nftOptions()
	if a.gw != nil {
		// A gateway's peers are the devices it admits, and its table
		// judges their packets; its own class opens nothing beyond.
		a.decideGateway(in)
		opts.Gateway = &a.gw.desired
	}
	// Peers change with the table. Either order is safe: segment rules
	// accept only packets on the tunnel interface, so a destination whose
	// peer is gone (its route falls back to the uplink) is already dropped;
	// a gateway's table drops what no admitted device sends.
	a.link.apply(a.peers())
	a.syncFlowLog()
	changed, err := a.table.apply(nft.Build(a.desired, opts))
	if err != nil {
		a.log.Error("apply failed; the previous ruleset stays in force", "err", err)
		return err
	}
	if a.ch.client != nil {
		// Control replicas the table now opens are where the channel
		// fails over to.
		eps := make([]netip.AddrPort, 0, len(a.desired.Control))
		for _, e := range a.desired.Control {
			eps = append(eps, netip.AddrPortFrom(e.Address, e.Port))
		}
		a.ch.client.SetEndpoints(eps)
	}
	if changed {
		a.log.Info("enforcing", "why", why, "mode", a.desired.Mode, "policy", a.desired.PolicyVersion, "segments", len(a.desired.Segments))
	}
	if known && a.desired.Mode != prev { // boot has no mode to change from
		a.audit("mode-changed", fmt.Sprintf("%s to %s (%s): %s", prev, a.desired.Mode, why, strings.Join(a.desired.Why, "; ")))
	}
	a.publish()
	if a.desired.Mode != prev && a.store != nil {
		// A mode change is an instant worth remembering: after a restart
		// with the clock set back, time cannot run behind it.
		if err := a.store.AdvanceTrustedTime(a.clock.Floor()); err != nil {
			a.log.Warn("persist trusted time", "err", err)
		}
	}
	return nil
}

// Run serves the admin socket and runs the event loop until ctx ends. The
// table stays in the kernel when Run returns: the device keeps enforcing.
func (a *Agent) Run(ctx context.Context) error {
	ln, err := listenAdmin(a.cfg.AdminSocket)
	if err != nil {
		return err
	}
	defer ln.Close()
	go serveAdmin(ctx, ln, a.Do, a.log)
	a.loop(ctx)
	return nil
}

// Do hands an admin request to the event loop and returns its answer; the
// admin socket calls it for each request, tests call it directly.
func (a *Agent) Do(ctx context.Context, req adminapi.Request) adminapi.Response {
	r := request{Request: req, reply: make(chan answer, 1)}
	select {
	case a.reqs <- r:
	case <-ctx.Done():
		return adminapi.Response{Error: "agent is stopping"}
	}
	select {
	case ans := <-r.reply:
		if ans.live != nil {
			ans.live(&ans.Status.Tunnel)
		}
		return ans.Response
	case <-ctx.Done():
		return adminapi.Response{Error: "agent is stopping"}
	}
}

// loop is the event loop: it owns the agent's state until ctx ends, and
// then closes what it holds. Every other goroutine reaches it by message.
func (a *Agent) loop(ctx context.Context) {
	if a.ch.sync != nil {
		a.ch.sync.start(ctx)
	}
	a.kickSample() // the first sample gathers for the policy booted with
	go a.sample.run(ctx)
	a.loc.start(ctx, a.log)
	if a.cfg.Gateway == nil {
		startTrimmer(ctx) // a device's memory, not a gateway's (see memory.go)
	}
	a.mon.start(ctx)
	a.syncFlowLog() // a monitor applied at boot

	drift := time.NewTicker(driftCheckEvery)
	defer drift.Stop()
	deep := time.NewTicker(deepCheckEvery)
	defer deep.Stop()
	peers := time.NewTicker(tunnelCheckEvery)
	defer peers.Stop()
	drops := make(chan dropped)
	go watchDrops(ctx, a.cfg.DropDir, dropScanEvery, a.wall, drops)
	flows := time.NewTicker(flowReportEvery)
	defer flows.Stop()
	next := time.NewTimer(a.untilNextChange())
	defer next.Stop()
	for {
		select {
		case <-ctx.Done():
			a.reportFlows() // what was logged since the last report
			if a.store != nil {
				a.store.Close()
			}
			a.table.kernel.Close()
			a.link.close()
			a.mon.close()
			if a.ch.sync != nil {
				a.ch.sync.close()
			}
			return
		case r := <-a.reqs:
			if r.Op == adminapi.OpEnroll {
				a.beginEnrol(ctx, r) // answered when it is done
			} else {
				r.reply <- a.answer(a.handle(r))
			}
		case s := <-a.enrolments:
			a.enrolStepped(ctx, s)
		case s := <-a.sample.samples:
			a.observe(s)
		case p := <-a.loc.fixes:
			if a.loc.update(p, a.postureChecks()) {
				a.kickSample()
			}
		case <-a.loc.stale:
			a.kickSample()
		case res := <-a.ch.answers:
			res.done <- a.handleSync(res.resp)
		case <-next.C:
			a.reconcile("scheduled change")
		case <-drift.C:
			a.checkDrift(false)
		case <-deep.C:
			a.checkDrift(true)
		case <-peers.C:
			if a.link.up(a.tunnelConfig()) {
				a.reconcile("tunnel up")
			}
			a.link.apply(a.peers()) // also restores peers edited by hand
			a.syncFlowLog()         // retries a group that could not be bound
		case f := <-drops:
			f.verdict <- a.dropFile(f)
		case f := <-a.mon.flows:
			a.mon.add(f, a.clock.Now())
		case <-flows.C:
			a.reportFlows()
		}
		next.Reset(a.untilNextChange())
	}
}

// peers are the tunnel peers wanted now: a device's gateways, or a
// gateway's admitted devices.
func (a *Agent) peers() []localpolicy.Peer {
	if a.gw != nil {
		return a.gw.desired.Peers
	}
	return a.desired.Peers
}

func (a *Agent) untilNextChange() time.Duration {
	next := a.desired.NextChange
	if a.gw != nil && !a.gw.desired.NextChange.IsZero() && (next.IsZero() || a.gw.desired.NextChange.Before(next)) {
		next = a.gw.desired.NextChange
	}
	if next.IsZero() {
		return time.Hour
	}
	return max(next.Sub(a.clock.Now()), 0)
}

// checkDrift compares the kernel's table with what was applied and
// restores it after an outside change.
func (a *Agent) checkDrift(deep bool) {
	drift, repaired := a.table.check(deep)
	if drift == nil {
		return
	}
	// A table_intact check judges this at once, not at the next tick.
	a.kickSample()
	if repaired && a.store != nil {
		a.audit("drift-repaired", drift.Error())
	}
}

// install accepts a bundle, a trust-root rotation or a command offered
// through the socket or the drop directory (a release carried to a device
// cut off from control); a rejected one changes nothing.
func (a *Agent) install(raw []byte) (*bundle.Bundle, error) {
	kind, _ := envelope.TypeOf(raw) // a malformed one is refused by the bundle's verifier
	if kind == command.PayloadType {
		return a.bundle, a.obey(raw)
	}
	if a.store == nil {
		return nil, fmt.Errorf("policy cache unusable (%s); no bundle can be accepted safely", a.noPolicy)
	}
	if kind == bundle.RootsPayloadType {
		return a.bundle, a.rotateRoots(raw)
	}
	b, err := a.store.Install(bytes.NewReader(raw), a.clock.Now(), a.device())
	if err != nil {
		a.log.Warn("bundle rejected", "err", err)
		return nil, err
	}
	a.clock.Observe(b.IssuedAt)
	a.bundle, a.noPolicy = b, ""
	a.log.Info("bundle accepted", "version", b.Version, "expires", b.ExpiresAt)
	a.kickSample()
	err = a.reconcile(fmt.Sprintf("policy v%d accepted", b.Version))
	// Verifying and applying a large bundle makes tens of MiB of garbage
	// at once; on a 256 MiB scanner it should go back to the system now,
	// not whenever the scavenger gets to it. Bundles are rare; a full
	// collection costs milliseconds.
	debug.FreeOSMemory()
	return b, err
}

// rotateRoots replaces the ops trust roots with a rotation signed by a
// threshold of the current keys and of the new ones (the store audits
// either verdict). New bundles and commands are judged by the new keys;
// the bundle in force stays valid (the store verifies it against the
// roots it was accepted under) until one signed by the new keys replaces
// it.
func (a *Agent) rotateRoots(raw []byte) error {
	roots, err := a.store.Rotate(raw, a.clock.Now())
	if err != nil {
		a.log.Warn("trust-root rotation rejected", "err", err)
		return fmt.Errorf("trust-root rotation rejected: %w", err)
	}
	_, v, err := a.store.CurrentRoots()
	if err != nil {
		return err
	}
	a.log.Info("trust roots rotated", "version", v, "keys", roots.Len(), "threshold", roots.Threshold)
	a.publish()
	return nil
}

// rootsVersion is the version of the trust roots in force (1: the keys
// pinned at install; 0: no usable cache).
func (a *Agent) rootsVersion() uint64 {
	if a.store == nil {
		return 0
	}
	_, v, _ := a.store.CurrentRoots()
	return v
}

// commandRoots are the ops keys a command is verified against: those in
// force, or with no usable cache the keys pinned at install (a command is
// then refused anyway, for the cache, once its signature is judged).
func (a *Agent) commandRoots() opskey.Roots {
	if a.store != nil {
		if roots, _, err := a.store.CurrentRoots(); err == nil {
			return roots
		}
	}
	roots, _ := a.cfg.PinnedRoots()
	return roots
}

// dropFile installs a file from the drop directory (read by watchDrops,
// off the loop) and says whether it was accepted. A file that could not
// be read is audited as a refused bundle, as a refused one is.
func (a *Agent) dropFile(f dropped) error {
	if f.err != nil {
		a.log.Warn("bundle rejected", "err", f.err)
		if a.store != nil {
			a.audit("bundle-rejected", f.err.Error())
		}
		return f.err
	}
	_, err := a.install(f.raw)
	return err
}
