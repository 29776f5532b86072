package server

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

// Orders are fleet state at control. Quarantine, diagnostic and partner
// revocation stay in force until ops lift them; every sync of a device
// they cover and that does not hold them yet carries them, re-signed with
// a fresh short expiry, whether the device was away for a week, enrolled
// after the order, or came back from an old cache. Re-delivering a
// tightening order is tightening: the control key signs nothing it could
// not sign the day the order was given. Lifts are the ops-signed command
// itself, delivered as signed; a device applies one past its expiry only
// to what was imposed before it was issued (command.Effect).

// DefaultCommandLifetime is how long a delivery the server signs stays
// valid.
const DefaultCommandLifetime = 15 * time.Minute

// redeliverPause is how long the server waits before delivering an order
// again to a device that did not take it (a delivery lost, or refused for
// a reason the device does not keep, such as its clock): short, because
// a lost delivery delays the order by as much; long enough that a device
// that cannot take it does not poll in a loop.
const redeliverPause = 3 * time.Second

// order is an order as stored (the name reads better in the folding
// below than the store's).
type order = store.Order

// before sorts orders as they take effect: by the time they were imposed,
// then as they arrived.
func before(a, b *order) int {
	if c := a.Command.Since().Compare(b.Command.Since()); c != 0 {
		return c
	}
	return cmp.Compare(a.Seq, b.Seq)
}

// book is the orders in effect order; replaced, never changed in place,
// so a sync reads it without a lock held.
type book struct {
	mu      sync.Mutex
	orders  []*order
	lastSeq uint64
}

func (b *book) all() []*order {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.orders
}

// replace makes orders the book, and returns those it did not hold (by
// command id).
func (b *book) replace(orders []*order) []*order {
	b.mu.Lock()
	defer b.mu.Unlock()
	held := map[string]bool{}
	for _, o := range b.orders {
		held[o.Command.ID] = true
	}
	var fresh []*order
	b.lastSeq = 0
	for _, o := range orders {
		b.lastSeq = max(b.lastSeq, o.Seq)
		if !held[o.Command.ID] {
			fresh = append(fresh, o)
		}
	}
	next := slices.Clone(orders)
	slices.SortFunc(next, before)
	b.orders = next
	return fresh
}

// last is the highest seq in the book (0: none).
func (b *book) last() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.lastSeq
}

func (b *book) add(o *order) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lastSeq = max(b.lastSeq, o.Seq)
	next := append(slices.Clip(b.orders), o)
	slices.SortFunc(next, before)
	b.orders = next
}

func (b *book) find(id string) *order {
	for _, o := range b.all() {
		if o.Command.ID == id {
			return o
		}
	}
	return nil
}

// holding is the folding of the orders that cover one device: the sticky
// state it should hold, the order deciding each slot, and why an order
// had no effect there.
type holding struct {
	state    localpolicy.Sticky
	decisive map[string]*order
	failed   map[string]error
}

// fold applies the orders covering dev, in effect order, as the device
// would: what the ratchet or the since rule refuses has no effect.
func fold(orders []*order, dev bundle.Device) holding {
	h := holding{decisive: map[string]*order{}, failed: map[string]error{}}
	for _, o := range orders {
		if !o.Command.Target.Matches(dev) {
			continue
		}
		next, changed, err := command.Effect(h.state, o.Command, o.ByOps)
		switch {
		case err != nil:
			h.failed[o.Command.ID] = err
		case changed:
			h.state, h.decisive[o.Command.Slot()] = next, o
		}
	}
	return h
}

// want is the order that should hold slot on the device ("" for none).
func (h holding) want(slot string) string { return h.state.Held[slot].Order }

// missing is what dev lacks of the orders in force for it, judged by the
// state it reported: each slot whose deciding order it does not hold, and
// has not refused.
func missing(orders []*order, dev bundle.Device, st controlapi.DeviceState) []*order {
	h := fold(orders, dev)
	var out []*order
	for _, slot := range slices.Sorted(maps.Keys(h.decisive)) {
		o := h.decisive[slot]
		if st.Orders[slot] == h.want(slot) || refusedBy(st, o.Command.ID) != "" {
			continue
		}
		out = append(out, o)
	}
	return out
}

func refusedBy(st controlapi.DeviceState, id string) string {
	for _, r := range st.RefusedOrders {
		if r.Order == id {
			return r.Reason
		}
	}
	return ""
}

// delivery is o as sent to a device at now: a lift as ops signed it; a
// tightening order as ops signed it while that is valid, else signed by
// the server for every device the order names, keeping the time it was
// imposed. The server's signature is shared while at least half its
// lifetime is left: an order to 10,000 devices is signed once, not
// 10,000 times (each device takes only what names it, and every device
// it names holds the order anyway).
func (s *Server) delivery(o *order, now time.Time) ([]byte, error) {
	s.signedMu.Lock()
	d, ok := s.signed[o.Command.ID]
	s.signedMu.Unlock()
	if ok && now.Add(s.cfg.CommandLifetime/2).Before(d.expires) && !now.Before(d.issued) {
		return d.raw, nil
	}
	raw, err := s.deliveryFor(o, o.Command.Target, now)
	if err != nil || o.Command.Kind.Loosens() || raw == nil || (o.Raw != nil && string(raw) == string(o.Raw)) {
		return raw, err
	}
	s.signedMu.Lock()
	s.signed[o.Command.ID] = signedDelivery{raw: raw, issued: now, expires: now.Add(s.cfg.CommandLifetime)}
	s.signedMu.Unlock()
	return raw, nil
}

// signedDelivery is a delivery the server signed, and its validity.
type signedDelivery struct {
	raw             []byte
	issued, expires time.Time
}

// deliveryFor is o as sent at now to the devices target names (a device
// itself, or a gateway taking it for every device the order names).
func (s *Server) deliveryFor(o *order, target command.Target, now time.Time) ([]byte, error) {
	c := o.Command
	if c.Kind.Loosens() || (o.Raw != nil && now.Add(time.Minute).Before(c.ExpiresAt)) {
		return o.Raw, nil
	}
	d := command.Command{ID: c.ID, Kind: c.Kind, Partner: c.Partner, Reason: c.Reason,
		Target:   target,
		IssuedAt: now.UTC(), ExpiresAt: now.Add(s.cfg.CommandLifetime).UTC(), OrderedAt: c.Since().UTC()}
	if d.OrderedAt.After(d.IssuedAt) {
		d.OrderedAt = d.IssuedAt
	}
	return command.Sign(d, s.cmdKey)
}

// deliveries are the orders dev misses, signed for it, except those sent
// it within redeliverPause; due is how long until the first of those may
// be sent again (0: none waits). withBundle sends every one, paused or
// not: a bundle never goes out without the orders in force for the
// device, which it applies first (a new device must not open a tunnel to
// a revoked partner, even for a moment).
func (s *Server) deliveries(dev bundle.Device, st controlapi.DeviceState, now time.Time, withBundle bool) (out [][]byte, due time.Duration, err error) {
	for _, o := range missing(s.book.all(), dev, st) {
		key := dev.ID + "\x00" + o.Command.ID
		s.mu.Lock()
		wait := redeliverPause - now.Sub(s.sent[key])
		if wait <= 0 || withBundle {
			s.sent[key] = now
		}
		s.mu.Unlock()
		if wait > 0 && !withBundle {
			if due == 0 || wait < due {
				due = wait
			}
			continue
		}
		raw, err := s.delivery(o, now)
		if err != nil {
			return nil, 0, fmt.Errorf("sign order %s for %s: %w", o.Command.ID, dev.ID, err)
		}
		out = append(out, raw)
	}
	return out, due, nil
}

// view is o as the desk sees it, with its state on every enrolled device
// it covers.
func view(o *order, orders []*order, devs []controlapi.Device) controlapi.Order {
	c := o.Command
	v := controlapi.Order{ID: c.ID, Kind: string(c.Kind), Target: c.Target.String(), Partner: c.Partner, Reason: c.Reason,
		ImposedAt: c.Since().UTC(), By: o.By, SignedByOps: o.ByOps, Devices: []controlapi.OrderDevice{}}
	superseded := 0
	for _, d := range devs {
		dev := bundle.Device{ID: d.ID, Class: d.Class}
		if !c.Target.Matches(dev) {
			continue
		}
		od := onDevice(o, fold(orders, dev), d)
		if od.State == controlapi.OrderSuperseded {
			superseded++
		}
		v.Devices = append(v.Devices, od)
	}
	v.InForce = superseded < len(v.Devices) || (len(v.Devices) == 0 && !c.Kind.Loosens())
	return v
}

// onDevice is where o stands on d, given the orders folded for it.
func onDevice(o *order, h holding, d controlapi.Device) controlapi.OrderDevice {
	od := controlapi.OrderDevice{Device: d.ID, LastSeen: d.LastSeen}
	slot := o.Command.Slot()
	if why := refusedBy(d.State, o.Command.ID); why != "" {
		od.State, od.Detail = controlapi.OrderRefused, why
		return od
	}
	if err := h.failed[o.Command.ID]; err != nil {
		od.State, od.Detail = controlapi.OrderRefused, "the device would refuse it: "+err.Error()
		return od
	}
	if dec := h.decisive[slot]; dec != nil && dec != o && before(o, dec) < 0 {
		od.State, od.Detail = controlapi.OrderSuperseded, "by "+dec.Command.ID
		return od
	}
	if d.State.Orders[slot] == h.want(slot) {
		od.State = controlapi.OrderApplied
		return od
	}
	od.State = controlapi.OrderPending
	if d.LastSeen.IsZero() {
		od.Detail = "not seen since enrolment"
	} else {
		od.Detail = "last seen " + d.LastSeen.UTC().Format(time.RFC3339)
	}
	return od
}
