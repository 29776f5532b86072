package storetest

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

// Filled is what Fill wrote that only the writer knows.
type Filled struct {
	Unused string // a token not spent
	Pool   netip.Prefix
}

// Fill writes some of everything a store keeps into s: what a
// migration must carry whole.
func Fill(t *testing.T, s store.Store) Filled {
	t.Helper()
	f := Filled{Pool: netip.MustParsePrefix("100.64.0.0/24")}
	var devs []controlapi.Device
	for i := range 4 {
		devs = append(devs, enrol(t, s, fmt.Sprint("class", i%2), f.Pool))
	}
	gw, err := s.NewToken("segment-gateway", controlapi.RoleGateway, []string{"wms"}, time.Hour, now, "ops")
	must(t, err)
	_, err = s.Enroll(gw.Token, "", []string{"wms"}, f.Pool, now, issue)
	must(t, err)
	unused, err := s.NewToken("class0", "", nil, time.Hour, now, "ops")
	must(t, err)
	f.Unused = unused.Token
	must(t, s.Rebind(devs[0].ID, "key-0", []byte("cert again"), now))
	_, err = s.Revoke(devs[1].ID, "stolen", "ops", now)
	must(t, err)
	must(t, s.SetStates(map[string]controlapi.DeviceState{devs[2].ID: {Why: "ops said so"}}, now))
	must(t, s.Touch(map[string]time.Time{devs[3].ID: now.Add(time.Hour)}))
	for _, v := range []uint64{3, 4} {
		must(t, s.PushBundle(v, fmt.Appendf(nil, "bundle %d", v), now, "ops", "x"))
	}
	must(t, s.PushRoots(2, []byte("roots 2"), now, "ops"))
	for _, id := range []string{"order-1", "order-2"} {
		must(t, s.AddOrder(order(id), now, "d"))
	}
	_, err = s.AddReports(devs[0].ID, controlapi.ReportRequest{Events: []controlapi.Event{{Seq: 1, Time: now, Kind: "mode"}, {Seq: 2, Time: now, Kind: controlapi.EventFlows}}, Dropped: 3},
		func(controlapi.Event) []controlapi.ObservedFlow {
			return []controlapi.ObservedFlow{flow(443), flow(80)}
		})
	must(t, err)
	_, err = s.Claim("ca-fingerprint", "fp")
	must(t, err)
	return f
}

// Same checks that b holds what a holds, as every call reads it, and
// that b goes on numbering, assigning and refusing where a left off.
func Same(t *testing.T, a, b store.Store, f Filled) {
	t.Helper()
	sorted := func(s store.Store) []controlapi.Device {
		devs, err := s.Devices()
		must(t, err)
		slices.SortFunc(devs, func(x, y controlapi.Device) int { return cmp.Compare(x.ID, y.ID) })
		return devs
	}
	same := func(what string, x, y any) {
		t.Helper()
		if d := diff(x, y); d != "" {
			t.Errorf("%s (-from +to):\n%s", what, d)
		}
	}
	devs := sorted(a)
	same("devices", devs, sorted(b))
	for _, d := range devs {
		ra, err := a.Reports(d.ID, 100)
		must(t, err)
		rb, err := b.Reports(d.ID, 100)
		must(t, err)
		same("reports of "+d.ID, ra, rb)
	}
	roster := func(s store.Store) []controlapi.Device {
		devs, _, _, err := s.Roster(0, 100)
		must(t, err)
		return devs
	}
	same("roster", roster(a), roster(b))
	bundles := func(s store.Store) (out []string) {
		must(t, s.Bundles(func(v uint64, raw []byte) { out = append(out, fmt.Sprint(v, string(raw))) }))
		return out
	}
	same("bundles", bundles(a), bundles(b))
	roots := func(s store.Store) [][]byte {
		r, err := s.RootsAbove(0, func([]byte) bool { return false })
		must(t, err)
		return r
	}
	same("roots", roots(a), roots(b))
	orders := func(s store.Store) []*store.Order {
		o, err := s.OrdersAfter(0)
		must(t, err)
		return o
	}
	same("orders", orders(a), orders(b))
	flows := func(s store.Store) []controlapi.ObservedFlow {
		f, err := s.Flows("class0")
		must(t, err)
		return f
	}
	same("flows", flows(a), flows(b))
	audit := func(s store.Store) []controlapi.AuditEntry {
		page, _, err := s.AuditPage(0, 1000)
		must(t, err)
		return page
	}
	same("audit", audit(a), audit(b))
	claim, err := b.Claim("ca-fingerprint", "other")
	must(t, err)
	same("claim", "fp", claim)

	// b goes on where a left off.
	must(t, b.CheckToken(f.Unused, "class0", nil, now))
	dev, err := b.Enroll(f.Unused, "class0", nil, f.Pool, now, issue)
	must(t, err)
	if want := netip.MustParseAddr("100.64.0.6"); dev.TunnelAddress != want {
		t.Errorf("the next device got %v, want %v (five are taken)", dev.TunnelAddress, want)
	}
	last := devs[0].Rev
	for _, d := range devs {
		last = max(last, d.Rev)
	}
	if dev.Rev <= last {
		t.Errorf("the next device's rev %d is not above the last, %d", dev.Rev, last)
	}
	is(t, b.AddOrder(order("order-1"), now, "again"), store.ErrOrderGiven)
	o := order("order-3")
	must(t, b.AddOrder(o, now, "d"))
	if have := orders(a); o.Seq <= have[len(have)-1].Seq {
		t.Errorf("the next order's seq %d is not above the last, %d", o.Seq, have[len(have)-1].Seq)
	}
	entries := audit(b)
	if n := len(entries); n < 2 || entries[n-1].Seq <= entries[n-2].Seq {
		t.Errorf("audit numbering after the move: %+v", entries[max(0, n-2):])
	}
	is(t, b.PushBundle(4, []byte("again"), now, "ops", "x"), store.ErrPushed)
}
