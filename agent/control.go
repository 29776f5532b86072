package agent

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/adminapi"
	"github.com/bulkhead-edge/bulkhead/agent/controlapi"
	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/agent/spool"
	"github.com/bulkhead-edge/bulkhead/internal/boltfile"
	"github.com/bulkhead-edge/bulkhead/internal/version"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// The sync client's pacing. A poll is held by the server for syncWait when
// idle; failures back off exponentially with jitter up to backoffMax, so
// an outage of any length costs one attempt per minute and no memory.
const (
	syncWait     = 4 * time.Minute
	syncSlack    = 30 * time.Second
	backoffFirst = time.Second
	backoffMax   = time.Minute
	reportBatch  = 200
)

// channel is the control channel's part of the agent. Fields without a
// comment are owned by the event loop.
type channel struct {
	rec    *controlclient.Record
	client *controlclient.Client
	spool  *spool.Spool
	// refusedOrders are the orders control delivered that the agent
	// refused, reported with every sync (MaxRefusedOrders, newest last);
	// cleared when the sticky state changes, so control tries again.
	refusedOrders []controlapi.OrderRefusal
	// pending is the endpoint opened while an enrolment is in progress.
	pending netip.AddrPort
	// snapshot is what the next sync sends; the syncer reads it.
	snapshot atomic.Pointer[controlapi.SyncRequest]
	// synced carries answers from the syncer to the loop.
	synced chan syncResult
	// kick makes the syncer start over: the state changed or events wait.
	kick chan struct{}
	// refused are the digests of bundles control offered and the agent
	// refused (controlapi.MaxRefused, newest last).
	refused []string
	// status is the syncer's last outcome, for `bulkhead status`.
	status atomic.Pointer[adminapi.ControlStatus]
	runCtx context.Context
	// sleep, when set (by tests), replaces the syncer's pause after a
	// refused offer.
	sleep func(ctx context.Context, d time.Duration) bool
}

type syncResult struct {
	resp controlapi.SyncResponse
	// done tells the syncer the loop has acted on resp, and whether it
	// refused something in it.
	done chan bool
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
		a.ch.status.Store(&adminapi.ControlStatus{Error: err.Error()})
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
	a.ch.rec, a.ch.client, a.ch.spool = rec, client, sp
	a.ch.status.Store(&adminapi.ControlStatus{URL: rec.URL, DeviceID: rec.DeviceID})
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
	if a.ch.spool == nil {
		return
	}
	if err := a.ch.spool.Add(t, kind, detail); err != nil {
		a.log.Warn("outbox", "err", err)
	}
	a.kickSync()
}

// publish refreshes what the next sync reports and wakes the syncer when
// it changed.
func (a *Agent) publish() {
	if a.ch.rec == nil {
		return
	}
	st := controlapi.DeviceState{Mode: a.desired.Mode, PolicyVersion: a.desired.PolicyVersion, Revoked: a.sticky.RevokedPartners, AgentVersion: version.Version,
		Orders: a.sticky.Orders(), RefusedOrders: slices.Clone(a.ch.refusedOrders)}
	if len(a.desired.Why) > 0 {
		st.Why = a.desired.Why[0]
	}
	next := &controlapi.SyncRequest{PolicyVersion: a.highest(), WaitSeconds: int(syncWait / time.Second), State: st,
		RootsVersion: a.rootsVersion, Refused: slices.Clone(a.ch.refused)}
	if prev := a.ch.snapshot.Swap(next); prev != nil && !sameRequest(prev, next) {
		a.kickSync()
	}
}

func sameRequest(a, b *controlapi.SyncRequest) bool {
	return a.PolicyVersion == b.PolicyVersion && a.RootsVersion == b.RootsVersion && slices.Equal(a.Refused, b.Refused) && a.State.Mode == b.State.Mode &&
		a.State.Why == b.State.Why && a.State.PolicyVersion == b.State.PolicyVersion && maps.Equal(a.State.Revoked, b.State.Revoked) &&
		maps.Equal(a.State.Orders, b.State.Orders) && slices.Equal(a.State.RefusedOrders, b.State.RefusedOrders)
}

func (a *Agent) highest() uint64 {
	if a.store == nil {
		return 0
	}
	h, _ := a.store.Highest()
	return h
}

func (a *Agent) kickSync() {
	select {
	case a.ch.kick <- struct{}{}:
	default:
	}
}

// controlClient is the control channel's transport: the held long-poll
// and the report upload (a *controlclient.Client; tests use fakes).
type controlClient interface {
	Sync(ctx context.Context, req controlapi.SyncRequest, connected func()) (controlapi.SyncResponse, error)
	Report(ctx context.Context, req controlapi.ReportRequest) (controlapi.ReportResponse, error)
}

// startSync runs the syncer for the enrolment, once.
func (a *Agent) startSync() {
	if a.ch.client != nil && a.ch.runCtx != nil {
		go a.syncLoop(a.ch.runCtx, a.ch.client, a.ch.spool)
	}
}

// syncLoop long-polls and posts reports until ctx ends. It owns no agent
// state: answers go to the loop, which decides.
//
// A kick means the snapshot changed or events wait in the outbox. Each
// round takes the pending kick before it reads the outbox and the
// snapshot, so a kick that arrives later (an event added while the
// outbox was being posted) is still there to cut the next poll short:
// nothing waits in the outbox for a poll to end.
func (a *Agent) syncLoop(ctx context.Context, c controlClient, sp *spool.Spool) {
	backoff, reportBackoff, refusedBackoff := backoffFirst, backoffFirst, backoffFirst
	failing := false // reports are not being delivered (said once)
	for ctx.Err() == nil {
		select {
		case <-a.ch.kick:
		default:
		}
		// Reports that cannot be posted wait for a retry, but never hold
		// up the poll: orders must still arrive while the server refuses
		// reports. The retry kicks the poll short.
		var retry *time.Timer
		if err := a.flushReports(ctx, c, sp); err != nil {
			if !failing {
				a.log.Warn("reports not delivered; they stay in the outbox and are retried", "err", err)
			}
			failing = true
			retry = time.AfterFunc(jitter(reportBackoff), a.kickSync)
			reportBackoff = min(reportBackoff*2, backoffMax)
		} else {
			if failing {
				a.log.Info("reports delivered again")
			}
			failing, reportBackoff = false, backoffFirst
		}
		resp, kicked, err := a.poll(ctx, c)
		if retry != nil {
			retry.Stop()
		}
		if kicked {
			continue
		}
		if ctx.Err() != nil {
			return
		}
		st := *a.ch.status.Load()
		if err != nil {
			st.Connected, st.Error = false, err.Error()
			a.ch.status.Store(&st)
			t := time.NewTimer(jitter(backoff))
			backoff = min(backoff*2, backoffMax)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-a.ch.kick:
				t.Stop()
			case <-t.C:
			}
			continue
		}
		backoff = backoffFirst
		st.Connected, st.Error, st.LastSync = true, "", time.Now()
		a.ch.status.Store(&st)
		done := make(chan bool)
		var refused bool
		select {
		case a.ch.synced <- syncResult{resp: resp, done: done}:
			refused = <-done
		case <-ctx.Done():
			return
		}
		// An answer the device refused part of is followed by a pause
		// that grows while answers keep being refused: a server offering
		// one forged bundle after another cannot make the device refuse,
		// and audit, thousands a second (4,140 in 10 s, before).
		if !refused {
			refusedBackoff = backoffFirst
			continue
		}
		if !a.pause(ctx, jitter(refusedBackoff)) {
			return
		}
		refusedBackoff = min(refusedBackoff*2, backoffMax)
	}
}

// pause waits d, or until ctx ends (false). The loop's kicks do not cut it
// short: what it paces is the server's offers.
func (a *Agent) pause(ctx context.Context, d time.Duration) bool {
	if a.ch.sleep != nil {
		return a.ch.sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// jitter is a wait of about d: full jitter between d/2 and 3d/2, so a
// fleet coming back after an outage does not arrive at the server in one
// wave.
func jitter(d time.Duration) time.Duration {
	return time.Duration(rand.Int64N(int64(d))) + d/2
}

// poll holds one long-poll with the latest snapshot. A kick cuts it short
// (kicked): the answer, if any, is dropped, and the next round asks again
// with what changed.
func (a *Agent) poll(ctx context.Context, c controlClient) (resp controlapi.SyncResponse, kicked bool, err error) {
	req := *a.ch.snapshot.Load()
	pctx, cancel := context.WithTimeout(ctx, syncWait+syncSlack)
	defer cancel()
	cut := make(chan struct{})
	go func() {
		select {
		case <-a.ch.kick:
			close(cut)
			cancel()
		case <-pctx.Done():
		}
	}()
	resp, err = c.Sync(pctx, req, func() {
		st := *a.ch.status.Load()
		st.Connected, st.Error = true, ""
		a.ch.status.Store(&st)
	})
	cancel()
	select {
	case <-cut:
		if err == nil {
			// The whole answer arrived before the kick cut the poll
			// short: it is acted on, never dropped (it may carry an
			// order); the next poll sends the new state.
			return resp, false, nil
		}
		return resp, true, nil
	default:
		return resp, false, err
	}
}

// flushReports posts what the outbox holds, in order, until it is empty.
// An error (the server unreachable or refusing) leaves the rest in the
// outbox for a retry.
func (a *Agent) flushReports(ctx context.Context, c controlClient, sp *spool.Spool) error {
	for ctx.Err() == nil {
		req, err := sp.Pending(reportBatch)
		if err != nil {
			return fmt.Errorf("outbox: %w", err)
		}
		if len(req.Events) == 0 && req.Dropped == 0 {
			return nil
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := c.Report(rctx, req)
		cancel()
		if err != nil {
			return fmt.Errorf("report: %w", err)
		}
		if err := sp.Ack(resp.Acked, req.Dropped); err != nil {
			return fmt.Errorf("outbox: %w", err)
		}
		if len(req.Events) < reportBatch {
			return nil
		}
	}
	return ctx.Err()
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
			if err := a.ch.spool.SetRefused(a.ch.refused); err != nil {
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
	v, err := command.Verify(raw, a.roots, controlKey)
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

// enroll opens the table to the control server, enrols, and starts
// syncing. It runs on the loop (up to the enrolment timeout): enrolment is
// rare and nothing else may change the state meanwhile.
func (a *Agent) enroll(r adminapi.Request) adminapi.Response {
	if a.ch.rec != nil {
		return adminapi.Response{Error: fmt.Sprintf("already enrolled as %s with %s; to enrol again, stop the agent and remove %s",
			a.ch.rec.DeviceID, a.ch.rec.URL, filepath.Join(a.cfg.StateDir, controlclient.RecordFile))}
	}
	if a.cfg.Device.Class == "" {
		return adminapi.Response{Error: "the configuration names no device class to enrol as"}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ep, err := controlclient.Endpoint(ctx, r.URL)
	if err != nil {
		return adminapi.Response{Error: err.Error()}
	}
	a.ch.pending = ep
	a.reconcile("enrolment with " + r.URL)
	wg := ""
	if a.tun != nil {
		wg = a.tun.PublicKey().String()
	}
	rec, err := controlclient.Enroll(ctx, a.cfg.StateDir, r.URL, r.Token, r.Fingerprint, a.cfg.Device.Class, wg, ep)
	if err == nil {
		err = a.useEnrolment(rec)
	}
	a.ch.pending = netip.AddrPort{}
	if err != nil {
		a.reconcile("enrolment failed")
		a.audit("enrolment-failed", fmt.Sprintf("%s: %v", r.URL, err))
		return adminapi.Response{Error: "enrolment failed: " + err.Error()}
	}
	a.reconcile("enrolled")
	a.audit("enrolled", fmt.Sprintf("device %s with %s (CA %s)", rec.DeviceID, rec.URL, rec.Fingerprint))
	a.startSync()
	return adminapi.Response{Status: a.status()}
}
