package server

import (
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

var t0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

func testOrder(seq uint64, id string, kind command.Kind, at time.Time, target command.Target) *order {
	c := command.Command{ID: id, Kind: kind, Target: target, Reason: "r", IssuedAt: at, ExpiresAt: at.Add(time.Minute)}
	if kind == command.RevokePartner || kind == command.ReinstatePartner {
		c.Partner = "acme"
	}
	return &order{Seq: seq, Command: c, ByOps: kind.Loosens(), By: "ops"}
}

func booked(orders ...*order) []*order {
	var b book
	for _, o := range orders {
		b.add(o)
	}
	return b.all()
}

// What a device misses is judged by what it reports holding: an order is
// delivered until the device holds it, a lift until it holds nothing, and
// what it refused is not offered again.
func TestMissingFollowsWhatTheDeviceHolds(t *testing.T) {
	truck := bundle.Device{ID: "dev-1", Class: "truck"}
	fleet := command.Target{Classes: []string{"truck"}}
	q1 := testOrder(1, "order-q1", command.Quarantine, t0, command.Target{Devices: []string{"dev-1"}})
	rp := testOrder(2, "order-rp", command.RevokePartner, t0.Add(time.Minute), command.Target{All: true})
	r1 := testOrder(3, "order-r1", command.Release, t0.Add(2*time.Minute), fleet)
	q2 := testOrder(4, "order-q2", command.Quarantine, t0.Add(3*time.Minute), fleet)
	ids := func(os []*order) string {
		var s []string
		for _, o := range os {
			s = append(s, o.Command.ID)
		}
		return strings.Join(s, " ")
	}
	for _, tc := range []struct {
		name   string
		orders []*order
		st     controlapi.DeviceState
		want   string
	}{
		{"new device", booked(q1, rp), controlapi.DeviceState{}, "order-q1 order-rp"},
		{"holds them", booked(q1, rp), controlapi.DeviceState{Orders: map[string]string{localpolicy.SlotMode: "order-q1", localpolicy.PartnerSlot("acme"): "order-rp"}}, ""},
		{"released, still holding q1", booked(q1, rp, r1), controlapi.DeviceState{Orders: map[string]string{localpolicy.SlotMode: "order-q1", localpolicy.PartnerSlot("acme"): "order-rp"}}, "order-r1"},
		{"released, holds nothing", booked(q1, rp, r1), controlapi.DeviceState{Orders: map[string]string{localpolicy.PartnerSlot("acme"): "order-rp"}}, ""},
		{"a later quarantine, not the old release", booked(q1, rp, r1, q2), controlapi.DeviceState{Orders: map[string]string{localpolicy.SlotMode: "order-q1", localpolicy.PartnerSlot("acme"): "order-rp"}}, "order-q2"},
		{"refused", booked(q1), controlapi.DeviceState{RefusedOrders: []controlapi.OrderRefusal{{Order: "order-q1", Reason: "x"}}}, ""},
		{"arrival order does not matter", booked(q2, r1, rp, q1), controlapi.DeviceState{}, "order-q2 order-rp"},
	} {
		if got := ids(missing(tc.orders, truck, tc.st)); got != tc.want {
			t.Errorf("%s: missing %q, want %q", tc.name, got, tc.want)
		}
	}
	// Another class is not covered by the class orders.
	if got := ids(missing(booked(r1, q2), bundle.Device{ID: "dev-2", Class: "scanner"}, controlapi.DeviceState{})); got != "" {
		t.Errorf("a scanner misses %q", got)
	}
}

// The desk's view: applied means the device reported it, pending says
// when it was last seen, superseded names what replaced it.
func TestOrderView(t *testing.T) {
	q1 := testOrder(1, "order-q1", command.Quarantine, t0, command.Target{Classes: []string{"truck"}})
	r1 := testOrder(2, "order-r1", command.Release, t0.Add(time.Minute), command.Target{Devices: []string{"dev-1"}})
	orders := booked(q1, r1)
	devs := []controlapi.Device{
		{ID: "dev-1", Class: "truck", LastSeen: t0, State: controlapi.DeviceState{Orders: map[string]string{localpolicy.SlotMode: "order-q1"}}},
		{ID: "dev-2", Class: "truck", State: controlapi.DeviceState{Orders: map[string]string{localpolicy.SlotMode: "order-q1"}}},
		{ID: "dev-3", Class: "truck", LastSeen: t0, State: controlapi.DeviceState{RefusedOrders: []controlapi.OrderRefusal{{Order: "order-q1", Reason: "no"}}}},
		{ID: "dev-4", Class: "scanner"},
	}
	v := view(q1, orders, devs)
	got := map[string]string{}
	for _, d := range v.Devices {
		got[d.Device] = d.State + " " + d.Detail
	}
	want := map[string]string{
		"dev-1": "superseded by order-r1",
		"dev-2": "applied ",
		"dev-3": "refused no",
	}
	if len(got) != len(want) || !v.InForce {
		t.Errorf("view of q1: %v (in force %v), want %v", got, v.InForce, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("q1 on %s: %q, want %q", k, got[k], w)
		}
	}
	r := view(r1, orders, devs)
	if len(r.Devices) != 1 || r.Devices[0].State != controlapi.OrderPending || !strings.Contains(r.Devices[0].Detail, "last seen") {
		t.Errorf("view of r1: %+v", r.Devices)
	}
}

func TestUnknownNameListsTheClosest(t *testing.T) {
	known := map[string]bool{"northline-freight": true, "acme-freight": true, "finance": true}
	got := unknownName("partner", "northline", known)
	if len(got) != 1 || !strings.Contains(got[0], `closest: northline-freight`) {
		t.Errorf("unknownName = %q", got)
	}
	if got := unknownName("partner", "acme-freight", known); got != nil {
		t.Errorf("a known name: %q", got)
	}
	if got := unknownName("class", "scaner", map[string]bool{}); len(got) != 1 || !strings.Contains(got[0], "none is known") {
		t.Errorf("no names known: %q", got)
	}
}
