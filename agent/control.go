package agent

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/agent/spool"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/internal/boltfile"
	"github.com/bulkhead-edge/bulkhead/internal/version"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// channel is the loop's side of the control channel: the enrolment and
// what the device refused. Owned by the event loop; the syncer
// (syncer.go) talks to control.
type channel struct {
	rec    *controlclient.Record
	client *controlclient.Client // the syncer's transport; the loop renews its certificate
	sync   *syncer               // nil until enrolled
	// answers carries answers from the syncer to the loop.
	answers chan syncResult
	// refusedOrders are the orders control delivered that the agent
	// refused, reported with every sync (MaxRefusedOrders, newest last);
	// cleared when the sticky state changes, so control tries again.
	refusedOrders []controlapi.OrderRefusal
	// refused are the digests of bundles control offered and the agent
	// refused (controlapi.MaxRefused, newest last).
	refused []string
	// enrolling is the URL of an enrolment in progress (enrol.go), and
	// pending the endpoint the table opens for it.
	enrolling string
	pending   netip.AddrPort
	// unusable is why the enrolment record could not be used.
	unusable string
}

// device is the identity bundles and commands are targeted at: the id
// control assigned at enrolment, else the configured one.
func (a *Agent) device() bundle.Device {
	d := a.cfg.Identity()
	if a.ch.rec != nil {
		d.ID = a.ch.rec.DeviceID
	}
	return d
}

// controlEndpoints are the configured ones plus the enrolled server (or
// the one being enrolled with): the table keeps them open in every mode.
func (a *Agent) controlEndpoints() []policy.Endpoint {
	eps := a.cfg.Control
	for _, ap := range []netip.AddrPort{a.ch.pending, a.enrolledEndpoint()} {
		if ap.IsValid() {
			eps = append(eps[:len(eps):len(eps)], policy.Endpoint{Address: ap.Addr(), Port: ap.Port()})
		}
	}
	return eps
}

func (a *Agent) enrolledEndpoint() netip.AddrPort {
	if a.ch.rec == nil {
		return netip.AddrPort{}
	}
	return a.ch.rec.Endpoint
}

// loadEnrolment reads the enrolment record at boot; a device that never
// enrolled runs from its cache and drop directory alone.
func (a *Agent) loadEnrolment() {
	rec, err := controlclient.Load(a.cfg.StateDir)
	if errors.Is(err, controlclient.ErrNotEnrolled) {
		return
	}
	if err == nil {
		err = a.useEnrolment(rec)
	}
	if err != nil {
		a.log.Error("enrolment unusable; running without control", "err", err)
		a.ch.unusable = err.Error()
	}
}

func (a *Agent) useEnrolment(rec *controlclient.Record) error {
	client, err := controlclient.New(a.cfg.StateDir, rec)
	if err != nil {
		return err
	}
	sp, err := a.openSpool(filepath.Join(a.cfg.StateDir, "channel.db"))
	if err != nil {
		return err
	}
	// What was refused before a restart stays refused: the server is not
	// given a second round of offers to audit.
	if a.ch.refused, err = sp.Refused(); err != nil {
		sp.Close()
		return err
	}
	a.ch.rec, a.ch.client, a.ch.unusable = rec, client, ""
	if err := a.loadGateway(); err != nil {
		sp.Close()
		a.ch.rec, a.ch.client = nil, nil
		return err
	}
	a.ch.sync = newSyncer(client, sp, adminapi.ControlStatus{URL: rec.URL, DeviceID: rec.DeviceID}, a.ch.answers, a.log)
	a.publish()
	return nil
}

// openSpool opens the outbox. A damaged one is kept aside and replaced by
// an empty one: losing unsent reports and the refused digests costs less than losing the control channel, and with it the
// kill-switch.
func (a *Agent) openSpool(path string) (*spool.Spool, error) {
	sp, err := spool.Open(path, spool.DefaultLimit)
	if !errors.Is(err, boltfile.ErrDamaged) {
		return sp, err
	}
	damage := err
	aside := path + ".damaged-" + a.wall().UTC().Format("20060102T150405Z")
	if err := os.Rename(path, aside); err != nil {
		return nil, errors.Join(damage, err)
	}
	a.log.Error("report outbox damaged; kept aside, starting an empty one", "err", damage, "kept", aside)
	if sp, err = spool.Open(path, spool.DefaultLimit); err != nil {
		return nil, err
	}
	a.audit("outbox-damaged", fmt.Sprintf("unsent reports lost; the damaged file is kept at %s (%v)", aside, damage))
	return sp, nil
}

// audit records an event in the local audit log, whose hook (report)
// queues it for control; with no usable cache it goes to control alone.
func (a *Agent) audit(kind, detail string) {
	now := a.clock.Now()
	if a.store == nil {
		a.report(now, kind, detail)
		return
	}
	if err := a.store.Audit(now, kind, detail); err != nil {
		a.log.Warn("audit log", "err", err)
	}
}

// report queues an audit event for control. The store calls it for every
// event it commits, its own bundle verdicts included.
func (a *Agent) report(t time.Time, kind, detail string) {
	if a.ch.sync == nil {
		return
	}
	if err := a.ch.sync.queue(t, kind, detail); err != nil {
		a.log.Warn("outbox", "err", err)
	}
}

// controlStatus is the control channel in `bulkhead status`: nil for a
// device that never enrolled.
func (a *Agent) controlStatus() *adminapi.ControlStatus {
	switch {
	case a.ch.sync != nil:
		return a.ch.sync.state()
	case a.ch.unusable != "":
		return &adminapi.ControlStatus{Error: a.ch.unusable}
	}
	return nil
}

// publish refreshes what the next sync reports; the syncer starts over
// when it changed.
func (a *Agent) publish() {
	if a.ch.sync == nil {
		return
	}
	st := controlapi.DeviceState{Mode: a.desired.Mode, PolicyVersion: a.desired.PolicyVersion, Revoked: a.sticky.RevokedPartners, AgentVersion: version.Version,
		Orders: a.sticky.Orders(), RefusedOrders: slices.Clone(a.ch.refusedOrders)}
	if len(a.desired.Why) > 0 {
		st.Why = a.desired.Why[0]
	}
	next := &controlapi.SyncRequest{PolicyVersion: a.highest(), WaitSeconds: int(syncWait / time.Second), State: st,
		RootsVersion: a.rootsVersion(), Refused: slices.Clone(a.ch.refused), WireGuardKey: a.link.publicKey()}
	if a.gw != nil {
		cursor := a.gw.cursor
		next.Gateway = &cursor
	}
	a.ch.sync.offer(next)
}

func (a *Agent) highest() uint64 {
	if a.store == nil {
		return 0
	}
	h, _ := a.store.Highest()
	return h
}

// handleSync acts on an answer: a newer bundle is installed (or refused)
// and each command obeyed (or refused), in order.
func (a *Agent) handleSync(resp controlapi.SyncResponse) (refused bool) {
	// The answer came over the pinned, mutually authenticated channel,
	// from a server whose key may only tighten: its time moves no trusted
	// time. It feeds the clock-skew check, and dates the contact, never
	// later than the device's own time: neither a server's clock nor the
	// device's running ahead can hold off the offline deadline.
	a.ctlTime, a.ctlAt = resp.ServerTime, a.wall()
	contact := a.clock.Now()
	if resp.ServerTime.Before(contact) {
		contact = resp.ServerTime
	}
	a.contact(contact)
	// Rotations first: the bundle and the orders may be signed by the new
	// keys. Orders before the bundle: a device enrolled after a partner's
	// revocation gets both in its first answer, and never holds a tunnel
	// to that partner. The store audits every verdict on a bundle; what is
	// refused is named in every later sync, so the server stops offering
	// it.
	for _, raw := range resp.Roots {
		if !a.installOffered(raw) {
			refused = true
		}
	}
	for _, raw := range resp.Commands {
		if err := a.obey(raw); err != nil {
			a.refuseOrder(raw, err)
		}
	}
	if resp.Bundle != nil && !a.installOffered(resp.Bundle) {
		refused = true
	}
	if resp.Certificate != nil {
		a.renewCertificate(resp.Certificate)
	}
	a.takeGateway(resp.Gateway)
	a.reconcile("contact with control") // an offline device is back
	a.publish()
	return refused
}

// installOffered installs a bundle or rotation control offered, and names
// a refused one in later syncs.
func (a *Agent) installOffered(raw []byte) bool {
	if _, err := a.install(raw); err != nil {
		if d := controlapi.BundleDigest(raw); !slices.Contains(a.ch.refused, d) {
			a.ch.refused = append(a.ch.refused, d)[max(0, len(a.ch.refused)+1-controlapi.MaxRefused):]
			if err := a.ch.sync.keepRefused(a.ch.refused); err != nil {
				a.log.Warn("persist refused bundles", "err", err)
			}
		}
		a.publish()
		return false
	}
	return true
}

// refuseOrder tells control, in every later sync, that the agent refused
// an order it delivered, unless the refusal is one time may undo (a
// delivery not yet valid or expired in transit, a cache not usable now):
// control then shows it refused and stops delivering it.
func (a *Agent) refuseOrder(raw []byte, err error) {
	c, perr := command.Peek(raw)
	if perr != nil || errors.Is(err, command.ErrNotYetValid) || errors.Is(err, command.ErrExpired) || a.store == nil {
		return
	}
	why := err.Error()
	kept := slices.DeleteFunc(a.ch.refusedOrders, func(r controlapi.OrderRefusal) bool { return r.Order == c.ID })
	kept = append(kept, controlapi.OrderRefusal{Order: c.ID, Reason: why})
	a.ch.refusedOrders = kept[max(0, len(kept)-controlapi.MaxRefusedOrders):]
	a.publish()
}

// contact records an authenticated answer from control at t. The cache
// learns of it only once it has moved on by a sixteenth of max_offline (a
// write every few hours, not every poll): after a restart the device goes
// offline that much sooner at worst, never later.
func (a *Agent) contact(t time.Time) {
	if t.IsZero() || !t.After(a.lastContact) {
		return
	}
	a.lastContact = t
	step := time.Hour
	if a.bundle != nil {
		step = max(time.Duration(a.bundle.Policy.Validity.MaxOffline)/16, time.Minute)
	}
	if a.store == nil || t.Sub(a.savedContact) < step {
		return
	}
	if err := a.store.RecordContact(t); err != nil {
		a.log.Warn("persist last contact", "err", err)
		return
	}
	a.savedContact = t
}

// obey verifies one command and applies it; a refused one changes
// nothing and is audited with the reason. One that changes nothing (an
// order delivered again, a lift with nothing left to lift) is neither.
func (a *Agent) obey(raw []byte) error {
	var controlKey ed25519.PublicKey
	if a.ch.rec != nil {
		controlKey = a.ch.rec.CommandKey
	}
	v, err := command.Verify(raw, a.commandRoots(), controlKey)
	if err == nil && a.store == nil {
		err = errors.New("policy cache unusable; commands cannot be remembered safely")
	}
	if err != nil {
		a.log.Warn("command rejected", "err", err)
		a.audit("command-rejected", err.Error())
		return err
	}
	now := a.clock.Now()
	next, changed, err := command.Decide(v, a.sticky, now, a.device())
	if err == nil && !changed {
		a.log.Debug("command already in force", "id", v.ID, "kind", v.Kind)
		return nil
	}
	if err == nil {
		// Remembered for at least as long as a command may live: a
		// lift applied past its expiry is still refused as a replay.
		err = a.store.Obey(v.ID, later(v.ExpiresAt, now.Add(command.MaxLifetime)), now, next)
	}
	if err != nil {
		a.log.Warn("command rejected", "id", v.ID, "kind", v.Kind, "err", err)
		a.audit("command-rejected", fmt.Sprintf("%s %s: %v", v.Kind, v.ID, err))
		return err
	}
	a.sticky = next
	a.ch.refusedOrders = nil // control may try what was refused again
	if v.ByOps && a.clock.Observe(v.IssuedAt) {
		// Signed by the ops keys: the device is at least that late.
		if err := a.store.AdvanceTrustedTime(a.clock.Floor()); err != nil {
			a.log.Warn("persist trusted time", "err", err)
		}
	}
	what := string(v.Kind)
	if v.Partner != "" {
		what += " " + v.Partner
	}
	a.log.Info("command obeyed", "id", v.ID, "command", what, "signer", v.Signer(), "reason", v.Reason)
	a.audit("command-obeyed", fmt.Sprintf("%s %s signed by the %s: %s", what, v.ID, v.Signer(), v.Reason))
	if err := a.reconcile("command " + v.ID); err != nil {
		a.log.Warn("apply after command", "id", v.ID, "err", err)
	}
	a.publish() // control learns which order holds what
	return nil
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// renewCertificate takes the certificate control sent after the tunnel
// key changed; one that does not bind the key the tunnel has now is
// refused (audited) and the old one kept.
func (a *Agent) renewCertificate(der []byte) {
	key := a.link.publicKey()
	if err := a.ch.client.Renew(der, key); err != nil {
		a.log.Warn("certificate from control refused", "err", err)
		a.audit("certificate-refused", err.Error())
		return
	}
	a.log.Info("certificate renewed: it binds the tunnel key", "public_key", key)
	a.audit("certificate-renewed", "binds tunnel key "+key)
}
