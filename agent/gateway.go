package agent

import (
	"crypto/ed25519"
	"crypto/x509"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/admit"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
)

// gateway is the segment-gateway role: what a gateway holds of control's
// roster (each member verified from its certificate), the orders it took
// (verified, kept, and folded per device under the same ratchet the
// devices use), how far it has taken both, and its latest decision. An
// agent enrolled with a gateway token has one; a device has none. Owned
// by the event loop.
type gateway struct {
	segments []string
	ca       *x509.Certificate
	members  map[string]admit.Member
	orders   []command.Verified
	cursor   controlapi.GatewayCursor
	desired  admit.Desired
}

// loadGateway sets up the gateway role when the enrolment is a gateway's,
// from what the cache holds: every certificate and order is verified
// again, so a cache edited on disk admits nobody new.
func (a *Agent) loadGateway() error {
	a.gw = nil
	rec := a.ch.rec
	if !rec.Gateway() {
		return nil
	}
	ca, err := x509.ParseCertificate(rec.CA)
	if err != nil {
		return fmt.Errorf("gateway: the enrolment's CA: %w", err)
	}
	g := &gateway{segments: slices.Clone(rec.Segments), ca: ca, members: map[string]admit.Member{}}
	a.gw = g
	if a.store == nil {
		return nil // admits nobody: the cache cannot be trusted
	}
	st, err := a.store.Gateway()
	if err != nil {
		return fmt.Errorf("gateway: cached roster: %w", err)
	}
	for _, id := range slices.Sorted(maps.Keys(st.Roster)) {
		a.admitMember(id, st.Roster[id])
	}
	for _, raw := range st.Orders {
		if v, err := command.Verify(raw, a.commandRoots(), a.controlKey()); err == nil {
			g.orders = append(g.orders, *v)
		} else {
			a.audit("command-rejected", "cached gateway order: "+err.Error())
		}
	}
	g.cursor = controlapi.GatewayCursor{Roster: st.RosterCursor, Orders: st.OrderCursor}
	a.log.Info("segment gateway", "segments", strings.Join(g.segments, ","), "roster", len(g.members), "orders", len(g.orders))
	return nil
}

func (a *Agent) controlKey() ed25519.PublicKey {
	if a.ch.rec == nil {
		return nil
	}
	return a.ch.rec.CommandKey
}

// admitMember takes a roster entry into the roster, or drops the device
// from it when its certificate does not check out: a device whose new
// certificate is refused loses what its old one gave it.
func (a *Agent) admitMember(id string, der []byte) {
	m, err := controlclient.Member(a.gw.ca, id, der)
	if err != nil {
		delete(a.gw.members, id)
		a.log.Warn("roster entry refused", "err", err)
		a.audit("roster-entry-refused", err.Error())
		return
	}
	a.gw.members[id] = m
}

// takeGateway takes a gateway update from control: roster entries and
// orders, each verified here, kept in the cache with the cursors so a
// gateway cut off from control enforces what it last had.
func (a *Agent) takeGateway(u *controlapi.GatewayUpdate) {
	if a.gw == nil || u == nil {
		return
	}
	roster := map[string][]byte{}
	for _, e := range u.Roster {
		if e.Revoked {
			delete(a.gw.members, e.ID)
			roster[e.ID] = nil
			a.log.Info("gateway: device revoked", "id", e.ID)
			a.audit("device-revoked", "gateway: "+e.ID+" is out of the roster")
			continue
		}
		a.admitMember(e.ID, e.Certificate)
		roster[e.ID] = e.Certificate
	}
	var kept []store.GatewayOrder
	now := a.clock.Now()
	for _, o := range u.Orders {
		v, err := command.Verify(o.Raw, a.commandRoots(), a.controlKey())
		if err == nil {
			err = command.Current(v, now)
		}
		if err != nil {
			a.log.Warn("gateway order rejected", "seq", o.Seq, "err", err)
			a.audit("command-rejected", fmt.Sprintf("gateway order %d: %v", o.Seq, err))
			continue
		}
		a.gw.orders = append(a.gw.orders, *v)
		kept = append(kept, store.GatewayOrder{Seq: o.Seq, Raw: o.Raw})
		a.log.Info("gateway took order", "id", v.ID, "kind", v.Kind, "target", v.Target.String(), "signer", v.Signer())
		a.audit("command-obeyed", fmt.Sprintf("gateway: %s %s for %s, signed by the %s: %s", v.Kind, v.ID, v.Target, v.Signer(), v.Reason))
	}
	a.gw.cursor = controlapi.GatewayCursor{Roster: u.RosterCursor, Orders: u.OrderCursor}
	if a.store != nil {
		if err := a.store.TakeGateway(roster, kept, u.RosterCursor, u.OrderCursor); err != nil {
			a.log.Warn("persist gateway roster", "err", err)
		}
	}
}

// gatewayStatus is the role's part of `bulkhead status` (nil: a device).
func (a *Agent) gatewayStatus() *adminapi.GatewayStatus {
	g := a.gw
	if g == nil {
		return nil
	}
	st := &adminapi.GatewayStatus{Segments: g.segments, Roster: len(g.members), Admitted: g.desired.Admitted(), Groups: len(g.desired.Groups),
		Orders: len(g.orders), OrderCursor: g.cursor.Orders, RosterCursor: g.cursor.Roster}
	for _, v := range g.desired.Verdicts {
		if !v.Admitted && len(st.Refused) < 100 {
			st.Refused = append(st.Refused, adminapi.GatewayRefusal{Device: v.ID, Reason: v.Reason})
		}
	}
	return st
}

// decideGateway is the gateway's decision on the inputs of in.
func (a *Agent) decideGateway(in localpolicy.Input) {
	members := make([]admit.Member, 0, len(a.gw.members))
	for _, m := range a.gw.members {
		members = append(members, m)
	}
	prev := a.gw.desired.Admitted()
	a.gw.desired = admit.Decide(admit.Input{Bundle: in.Bundle, NoPolicy: in.NoPolicy, Segments: a.gw.segments, Roster: members,
		Orders: a.gw.orders, Now: in.Now, LastContact: in.LastContact})
	if n := a.gw.desired.Admitted(); n != prev {
		a.log.Info("gateway admits", "devices", n, "of", len(members), "groups", len(a.gw.desired.Groups))
	}
}
