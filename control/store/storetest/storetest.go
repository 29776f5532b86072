// Package storetest is the conformance suite every control store passes:
// the same calls, the same answers, on every backend. A backend's test
// calls Run with a way to open a fresh, empty store, and, when several
// processes can share one store, a way to open another handle on it.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Backend opens stores for the suite.
type Backend struct {
	// Open returns a fresh, empty store, closed when t ends.
	Open func(t *testing.T) store.Store
	// Share, when set, returns another handle on the store Open
	// returned, as another replica would hold it, closed when t ends.
	Share func(t *testing.T, s store.Store) store.Store
}

var now = time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)

// Run runs the suite.
func Run(t *testing.T, b Backend) {
	t.Run("Tokens", func(t *testing.T) { testTokens(t, b.Open(t)) })
	t.Run("EnrolmentIsAllOrNothing", func(t *testing.T) { testEnrolAtomic(t, b.Open(t)) })
	t.Run("Addresses", func(t *testing.T) { testAddresses(t, b.Open(t)) })
	t.Run("Devices", func(t *testing.T) { testDevices(t, b.Open(t)) })
	t.Run("Roster", func(t *testing.T) { testRoster(t, b.Open(t)) })
	t.Run("Bundles", func(t *testing.T) { testBundles(t, b.Open(t)) })
	t.Run("Roots", func(t *testing.T) { testRoots(t, b.Open(t)) })
	t.Run("Orders", func(t *testing.T) { testOrders(t, b.Open(t)) })
	t.Run("Reports", func(t *testing.T) { testReports(t, b.Open(t)) })
	t.Run("Flows", func(t *testing.T) { testFlows(t, b.Open(t)) })
	t.Run("Audit", func(t *testing.T) { testAudit(t, b.Open(t)) })
	t.Run("Claims", func(t *testing.T) { testClaims(t, b) })
	t.Run("Listen", func(t *testing.T) { testListen(t, b) })
	t.Run("ConcurrentWritersKeepCursorsWhole", func(t *testing.T) { testCursors(t, b) })
	t.Run("StateBatchesLoseNoRevocation", func(t *testing.T) { testStateBatches(t, b) })
}

// diff is cmp.Diff with addresses compared as values.
func diff(want, got any) string {
	return cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func is(t *testing.T, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("err = %v, want %v", err, want)
	}
}

// enrol enrols a device of class with a fresh token.
func enrol(t *testing.T, s store.Store, class string, pool netip.Prefix) controlapi.Device {
	t.Helper()
	dev, err := tryEnrol(s, class, pool)
	must(t, err)
	return dev
}

// tryEnrol is enrol for other goroutines than the test's.
func tryEnrol(s store.Store, class string, pool netip.Prefix) (controlapi.Device, error) {
	tok, err := s.NewToken(class, "", nil, time.Hour, now, "ops test")
	if err != nil {
		return controlapi.Device{}, err
	}
	return s.Enroll(tok.Token, class, nil, pool, now, issue)
}

func issue(id string, tk store.Token, addr netip.Addr) (controlapi.Device, error) {
	return controlapi.Device{ID: id, Class: tk.Class, Hostname: "h-" + id, TunnelAddress: addr, Certificate: []byte("cert " + id), EnrolledAt: now}, nil
}

func actions(t *testing.T, s store.Store) []string {
	t.Helper()
	var out []string
	var after uint64
	for {
		page, next, err := s.AuditPage(after, 100)
		must(t, err)
		for _, e := range page {
			out = append(out, e.Actor+": "+e.Action)
		}
		if next == 0 {
			return out
		}
		after = next
	}
}

func testTokens(t *testing.T, s store.Store) {
	tok, err := s.NewToken("scanner", "", nil, time.Hour, now, "ops alice")
	must(t, err)
	if !strings.HasPrefix(tok.Token, "bht_") || tok.Class != "scanner" || !tok.ExpiresAt.Equal(now.Add(time.Hour)) {
		t.Fatalf("token = %+v", tok)
	}
	must(t, s.CheckToken(tok.Token, "scanner", nil, now))
	must(t, s.CheckToken(tok.Token, "", nil, now))
	is(t, s.CheckToken(tok.Token, "truck", nil, now), store.ErrTokenClass)
	is(t, s.CheckToken(tok.Token, "scanner", []string{"wms"}, now), store.ErrTokenRole)
	is(t, s.CheckToken(tok.Token, "scanner", nil, now.Add(time.Hour)), store.ErrTokenExpired)
	is(t, s.CheckToken("bht_nope", "scanner", nil, now), store.ErrTokenUnknown)
	_, err = s.Enroll(tok.Token, "scanner", nil, netip.Prefix{}, now.Add(time.Hour), issue)
	is(t, err, store.ErrTokenExpired)

	dev, err := s.Enroll(tok.Token, "", nil, netip.Prefix{}, now, issue)
	must(t, err)
	if !strings.HasPrefix(dev.ID, "dev-") || dev.Class != "scanner" || dev.Rev == 0 {
		t.Fatalf("enrolled %+v", dev)
	}
	is(t, s.CheckToken(tok.Token, "scanner", nil, now), store.ErrTokenUsed)
	_, err = s.Enroll(tok.Token, "scanner", nil, netip.Prefix{}, now, issue)
	is(t, err, store.ErrTokenUsed)

	gw, err := s.NewToken("segment-gateway", controlapi.RoleGateway, []string{"wms", "yard"}, time.Hour, now, "ops alice")
	must(t, err)
	is(t, s.CheckToken(gw.Token, "", nil, now), store.ErrTokenRole)
	is(t, s.CheckToken(gw.Token, "", []string{"wms"}, now), store.ErrTokenRole)
	g, err := s.Enroll(gw.Token, "", []string{"yard", "wms"}, netip.Prefix{}, now, issue)
	must(t, err)
	if g.Role != controlapi.RoleGateway || !slices.Equal(g.Segments, []string{"wms", "yard"}) {
		t.Fatalf("gateway enrolled as %+v", g)
	}
	want := []string{"ops alice: token-created", "device " + dev.ID + ": enrolled", "ops alice: token-created", "device " + g.ID + ": enrolled"}
	if d := diff(want, actions(t, s)); d != "" {
		t.Errorf("audit (-want +got):\n%s", d)
	}
}

func testEnrolAtomic(t *testing.T, s store.Store) {
	pool := netip.MustParsePrefix("100.64.0.0/29")
	tok, err := s.NewToken("scanner", "", nil, time.Hour, now, "ops")
	must(t, err)
	boom := errors.New("signing failed")
	_, err = s.Enroll(tok.Token, "scanner", nil, pool, now, func(string, store.Token, netip.Addr) (controlapi.Device, error) {
		return controlapi.Device{}, boom
	})
	is(t, err, boom)
	must(t, s.CheckToken(tok.Token, "scanner", nil, now)) // still unspent
	dev, err := s.Enroll(tok.Token, "scanner", nil, pool, now, issue)
	must(t, err)
	if got, want := dev.TunnelAddress, netip.MustParseAddr("100.64.0.1"); got != want {
		t.Errorf("after a failed enrolment the next got %v, want %v (the failed one took nothing)", got, want)
	}
	devs, err := s.Devices()
	must(t, err)
	if len(devs) != 1 {
		t.Errorf("%d devices stored, want 1", len(devs))
	}
}

func testAddresses(t *testing.T, s store.Store) {
	pool := netip.MustParsePrefix("100.64.0.0/29")
	var mu sync.Mutex
	got := map[netip.Addr]string{}
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			dev, err := tryEnrol(s, "scanner", pool)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, ok := got[dev.TunnelAddress]; ok {
				t.Errorf("%v assigned to %s and %s", dev.TunnelAddress, other, dev.ID)
			}
			got[dev.TunnelAddress] = dev.ID
		})
	}
	wg.Wait()
	for i := 1; i <= 6; i++ {
		if a := netip.AddrFrom4([4]byte{100, 64, 0, byte(i)}); got[a] == "" {
			t.Errorf("%v not assigned: %v", a, got)
		}
	}
	tok, err := s.NewToken("scanner", "", nil, time.Hour, now, "ops")
	must(t, err)
	_, err = s.Enroll(tok.Token, "scanner", nil, pool, now, issue)
	if err == nil || !strings.Contains(err.Error(), "exhausted") {
		t.Fatalf("7th enrolment in a /29: %v, want exhausted", err)
	}
	must(t, s.CheckToken(tok.Token, "scanner", nil, now))

	v6 := netip.MustParsePrefix("fd00:b::/126")
	a, b := enrol(t, s, "scanner", v6), enrol(t, s, "scanner", v6)
	if a.TunnelAddress != netip.MustParseAddr("fd00:b::1") || b.TunnelAddress != netip.MustParseAddr("fd00:b::2") {
		t.Errorf("IPv6 pool assigned %v, %v", a.TunnelAddress, b.TunnelAddress)
	}
}

func testDevices(t *testing.T, s store.Store) {
	a, b := enrol(t, s, "scanner", netip.Prefix{}), enrol(t, s, "truck", netip.Prefix{})
	got, err := s.Device(a.ID)
	must(t, err)
	if d := diff(a, got); d != "" {
		t.Errorf("Device (-enrolled +stored):\n%s", d)
	}
	_, err = s.Device("dev-nope")
	is(t, err, store.ErrNoDevice)

	// States are written in batches: one not enrolled is skipped, and one
	// the same as stored leaves the record (its last-seen time) alone.
	st := controlapi.DeviceState{Mode: localpolicy.Quarantine, Why: "ops", PolicyVersion: 3, Orders: map[string]string{"mode": "order-1"}}
	must(t, s.SetStates(map[string]controlapi.DeviceState{b.ID: st, "dev-nope": st, a.ID: a.State}, now.Add(time.Second)))
	got, err = s.Device(b.ID)
	must(t, err)
	if d := diff(st, got.State); d != "" {
		t.Errorf("state (-want +got):\n%s", d)
	}
	if !got.LastSeen.Equal(now.Add(time.Second)) {
		t.Errorf("a changed state: last seen %v, want %v", got.LastSeen, now.Add(time.Second))
	}
	must(t, s.SetStates(map[string]controlapi.DeviceState{b.ID: st}, now.Add(time.Hour)))
	if got, err = s.Device(b.ID); err != nil || !got.LastSeen.Equal(now.Add(time.Second)) {
		t.Errorf("the same state again: last seen %v (%v), want it left at %v", got.LastSeen, err, now.Add(time.Second))
	}
	if got, err = s.Device(a.ID); err != nil || !got.LastSeen.IsZero() {
		t.Errorf("a device whose state did not change: last seen %v (%v), want none", got.LastSeen, err)
	}

	must(t, s.Touch(map[string]time.Time{a.ID: now.Add(time.Minute), "dev-gone": now}))
	must(t, s.Touch(map[string]time.Time{a.ID: now})) // older: no change
	got, err = s.Device(a.ID)
	must(t, err)
	if !got.LastSeen.Equal(now.Add(time.Minute)) {
		t.Errorf("last seen %v, want %v", got.LastSeen, now.Add(time.Minute))
	}
	devs, err := s.Devices()
	must(t, err)
	ids := []string{}
	for _, d := range devs {
		ids = append(ids, d.ID)
	}
	slices.Sort(ids)
	if want := slices.Sorted(slices.Values([]string{a.ID, b.ID})); !slices.Equal(ids, want) {
		t.Errorf("devices %v, want %v", ids, want)
	}
	classes, err := s.DeviceClasses()
	must(t, err)
	if d := diff(map[string]string{a.ID: "scanner", b.ID: "truck"}, classes); d != "" {
		t.Errorf("DeviceClasses (-want +got):\n%s", d)
	}

	// Rebind: a new rev; only a changed key is audited.
	must(t, s.Rebind(a.ID, "key-1", []byte("cert 2"), now))
	r1, err := s.Device(a.ID)
	must(t, err)
	must(t, s.Rebind(a.ID, "key-1", []byte("cert 3"), now))
	r2, err := s.Device(a.ID)
	must(t, err)
	if r1.Rev <= b.Rev || r2.Rev <= r1.Rev || r2.WireGuardKey != "key-1" || string(r2.Certificate) != "cert 3" {
		t.Errorf("rebinds: revs %d then %d after %d; %+v", r1.Rev, r2.Rev, b.Rev, r2)
	}
	is(t, s.Rebind("dev-nope", "k", nil, now), store.ErrNoDevice)

	// Revoke: once, with a new rev.
	rv, err := s.Revoke(b.ID, "stolen", "ops bob", now)
	must(t, err)
	again, err := s.Revoke(b.ID, "again", "ops bob", now.Add(time.Hour))
	must(t, err)
	if rv.Rev <= r2.Rev || !rv.RevokedAt.Equal(now) || again.RevokedWhy != "stolen" || again.Rev != rv.Rev {
		t.Errorf("revoked %+v, then %+v", rv, again)
	}
	_, err = s.Revoke("dev-nope", "x", "ops", now)
	is(t, err, store.ErrNoDevice)
	n := 0
	for _, a := range actions(t, s) {
		if strings.HasSuffix(a, "device-revoked") || strings.HasSuffix(a, "wireguard-key-changed") {
			n++
		}
	}
	if n != 2 {
		t.Errorf("%d revocation and key-change entries, want 2: %q", n, actions(t, s))
	}
}

func testRoster(t *testing.T, s store.Store) {
	var want []string
	for i := range 7 {
		d := enrol(t, s, fmt.Sprint("c", i%2), netip.Prefix{})
		want = append(want, d.ID)
	}
	gw, err := s.NewToken("gw", controlapi.RoleGateway, []string{"wms"}, time.Hour, now, "ops")
	must(t, err)
	_, err = s.Enroll(gw.Token, "", []string{"wms"}, netip.Prefix{}, now, issue)
	must(t, err)
	// A device without a certificate is not in the roster until revoked.
	tok, err := s.NewToken("bare", "", nil, time.Hour, now, "ops")
	must(t, err)
	bare, err := s.Enroll(tok.Token, "", nil, netip.Prefix{}, now, func(id string, t store.Token, _ netip.Addr) (controlapi.Device, error) {
		return controlapi.Device{ID: id, Class: t.Class}, nil
	})
	must(t, err)
	// Rebinding the first moves it last.
	must(t, s.Rebind(want[0], "k", []byte("new cert"), now))
	want = append(want[1:], want[0])
	_, err = s.Revoke(bare.ID, "scrapped", "ops", now)
	must(t, err)
	want = append(want, bare.ID)

	var got []string
	var cursor uint64
	for pages := 0; ; pages++ {
		devs, next, more, err := s.Roster(cursor, 3)
		must(t, err)
		if len(devs) > 3 || pages > 5 {
			t.Fatalf("page of %d, page %d", len(devs), pages)
		}
		for _, d := range devs {
			got = append(got, d.ID)
			if d.Rev <= cursor {
				t.Errorf("rev %d at or below cursor %d", d.Rev, cursor)
			}
		}
		if len(devs) > 0 && next != devs[len(devs)-1].Rev {
			t.Errorf("cursor %d, last rev %d", next, devs[len(devs)-1].Rev)
		}
		cursor = next
		if !more {
			break
		}
	}
	if d := diff(want, got); d != "" {
		t.Errorf("roster (-want +got):\n%s", d)
	}
	devs, same, more, err := s.Roster(cursor, 3)
	must(t, err)
	if len(devs) != 0 || same != cursor || more {
		t.Errorf("past the end: %d devices, cursor %d, more %v", len(devs), same, more)
	}
}

func testBundles(t *testing.T, s store.Store) {
	for _, v := range []uint64{2, 5, 3} {
		must(t, s.PushBundle(v, fmt.Appendf(nil, "bundle %d", v), now, "ops", "class scanner"))
	}
	is(t, s.PushBundle(5, []byte("again"), now, "ops", "x"), store.ErrPushed)
	raw, err := s.Bundle(5)
	must(t, err)
	if string(raw) != "bundle 5" {
		t.Errorf("Bundle(5) = %q", raw)
	}
	if raw, err := s.Bundle(4); err != nil || raw != nil {
		t.Errorf("Bundle(4) = %q, %v, want nil", raw, err)
	}
	var versions []uint64
	must(t, s.Bundles(func(v uint64, raw []byte) {
		versions = append(versions, v)
		if string(raw) != fmt.Sprint("bundle ", v) {
			t.Errorf("bundle %d is %q", v, raw)
		}
	}))
	if !slices.Equal(versions, []uint64{2, 3, 5}) {
		t.Errorf("Bundles gave %v", versions)
	}
	newest := func(have uint64, skip ...uint64) string {
		raw, err := s.NewestBundle(have, func(v uint64, raw []byte) bool { return !slices.Contains(skip, v) })
		must(t, err)
		return string(raw)
	}
	if got := newest(0); got != "bundle 5" {
		t.Errorf("newest above 0: %q", got)
	}
	if got := newest(0, 5); got != "bundle 3" {
		t.Errorf("newest above 0 but 5: %q", got)
	}
	if got := newest(3, 5); got != "" {
		t.Errorf("newest above 3 but 5: %q", got)
	}
	must(t, s.WithdrawBundle(5, now, "ops", "broken"))
	is(t, s.WithdrawBundle(5, now, "ops", "broken"), store.ErrNoBundle)
	if got := newest(0); got != "bundle 3" {
		t.Errorf("newest after withdrawal: %q", got)
	}
	if d := diff([]string{"ops: policy-pushed", "ops: policy-pushed", "ops: policy-pushed", "ops: policy-withdrawn"}, actions(t, s)); d != "" {
		t.Errorf("audit (-want +got):\n%s", d)
	}
}

func testRoots(t *testing.T, s store.Store) {
	must(t, s.PushRoots(2, []byte("r2"), now, "ops"))
	must(t, s.PushRoots(3, []byte("r3"), now, "ops"))
	is(t, s.PushRoots(3, []byte("again"), now, "ops"), store.ErrPushed)
	got, err := s.RootsAbove(1, func(raw []byte) bool { return false })
	must(t, err)
	if d := diff([][]byte{[]byte("r2"), []byte("r3")}, got); d != "" {
		t.Errorf("RootsAbove(1) (-want +got):\n%s", d)
	}
	got, err = s.RootsAbove(2, func(raw []byte) bool { return false })
	must(t, err)
	if len(got) != 1 || string(got[0]) != "r3" {
		t.Errorf("RootsAbove(2) = %q", got)
	}
	got, err = s.RootsAbove(0, func(raw []byte) bool { return string(raw) == "r2" })
	must(t, err)
	if len(got) != 1 || string(got[0]) != "r3" {
		t.Errorf("RootsAbove(0) skipping r2 = %q", got)
	}
}

func order(id string) *store.Order {
	return &store.Order{By: "ops carol", Command: command.Command{ID: id, Kind: command.Quarantine, Reason: "test",
		Target: command.Target{Classes: []string{"truck"}}, IssuedAt: now, ExpiresAt: now.Add(time.Hour)}}
}

func testOrders(t *testing.T, s store.Store) {
	signed := order("order-b")
	signed.ByOps, signed.Raw = true, []byte{0, 1, 2, 0xff}
	var seqs []uint64
	for _, o := range []*store.Order{order("order-a"), signed, order("order-c")} {
		must(t, s.AddOrder(o, now, "detail "+o.Command.ID))
		seqs = append(seqs, o.Seq)
	}
	if !(seqs[0] > 0 && seqs[0] < seqs[1] && seqs[1] < seqs[2]) {
		t.Fatalf("seqs %v", seqs)
	}
	dup := order("order-a")
	is(t, s.AddOrder(dup, now, "again"), store.ErrOrderGiven)
	all, err := s.OrdersAfter(0)
	must(t, err)
	if len(all) != 3 {
		t.Fatalf("%d orders stored", len(all))
	}
	if d := diff(signed, all[1]); d != "" {
		t.Errorf("stored order (-given +stored):\n%s", d)
	}
	rest, err := s.OrdersAfter(seqs[1])
	must(t, err)
	if len(rest) != 1 || rest[0].Command.ID != "order-c" {
		t.Errorf("after %d: %+v", seqs[1], rest)
	}
	if d := diff([]string{"ops carol: quarantine", "ops carol: quarantine", "ops carol: quarantine"}, actions(t, s)); d != "" {
		t.Errorf("audit (-want +got):\n%s", d)
	}
}

func testReports(t *testing.T, s store.Store) {
	dev := enrol(t, s, "scanner", netip.Prefix{})
	ev := func(from, to uint64) []controlapi.Event {
		var out []controlapi.Event
		for i := from; i <= to; i++ {
			out = append(out, controlapi.Event{Seq: i, Time: now, Kind: "mode", Detail: fmt.Sprint(i)})
		}
		return out
	}
	none := func(controlapi.Event) []controlapi.ObservedFlow { return nil }
	acked, err := s.AddReports(dev.ID, controlapi.ReportRequest{Events: ev(1, 3), Dropped: 2}, none)
	must(t, err)
	if acked != 3 {
		t.Errorf("acked %d", acked)
	}
	// A resent batch is stored once.
	acked, err = s.AddReports(dev.ID, controlapi.ReportRequest{Events: ev(2, 4), Dropped: 1}, none)
	must(t, err)
	got, err := s.Reports(dev.ID, 10)
	must(t, err)
	if acked != 4 || len(got) != 4 || got[3].Detail != "4" {
		t.Errorf("acked %d, reports %+v", acked, got)
	}
	d, err := s.Device(dev.ID)
	must(t, err)
	if d.ReportsDropped != 3 {
		t.Errorf("dropped %d, want 3", d.ReportsDropped)
	}
	_, err = s.AddReports(dev.ID, controlapi.ReportRequest{Events: ev(5, store.ReportsKept+10)}, none)
	must(t, err)
	got, err = s.Reports(dev.ID, 2*store.ReportsKept)
	must(t, err)
	if len(got) != store.ReportsKept || got[0].Seq != 11 || got[len(got)-1].Seq != store.ReportsKept+10 {
		t.Errorf("kept %d reports, %d..%d", len(got), got[0].Seq, got[len(got)-1].Seq)
	}
	got, err = s.Reports(dev.ID, 2)
	must(t, err)
	if len(got) != 2 || got[1].Seq != store.ReportsKept+10 {
		t.Errorf("newest 2: %+v", got)
	}
	other, err := s.Reports("dev-other", 10)
	must(t, err)
	if len(other) != 0 {
		t.Errorf("another device has %d reports", len(other))
	}
}

func flow(port uint16) controlapi.ObservedFlow {
	return controlapi.ObservedFlow{Flow: controlapi.Flow{Protocol: policy.TCP, Address: netip.MustParseAddr("10.1.0.5"), Port: port}, Count: 2, First: now, Last: now.Add(time.Minute)}
}

func testFlows(t *testing.T, s store.Store) {
	a, b := enrol(t, s, "scanner", netip.Prefix{}), enrol(t, s, "scanner", netip.Prefix{})
	report := func(dev string, seq uint64, flows ...controlapi.ObservedFlow) {
		t.Helper()
		_, err := s.AddReports(dev, controlapi.ReportRequest{Events: []controlapi.Event{{Seq: seq, Time: now, Kind: controlapi.EventFlows}}},
			func(controlapi.Event) []controlapi.ObservedFlow { return flows })
		must(t, err)
	}
	early := flow(443)
	early.First, early.Last = now.Add(-time.Hour), now.Add(-time.Hour)
	report(a.ID, 1, flow(443), flow(80))
	report(b.ID, 1, early)
	got, err := s.Flows("scanner")
	must(t, err)
	slices.SortFunc(got, func(x, y controlapi.ObservedFlow) int { return int(x.Port) - int(y.Port) })
	want := []controlapi.ObservedFlow{flow(80), flow(443)}
	want[0].Devices = []string{a.ID}
	want[1].Count, want[1].First, want[1].Devices = 4, now.Add(-time.Hour), slices.Sorted(slices.Values([]string{a.ID, b.ID}))
	if d := diff(want, got); d != "" {
		t.Errorf("flows (-want +got):\n%s", d)
	}
	if none, err := s.Flows("truck"); err != nil || none == nil || len(none) != 0 {
		t.Errorf("another class: %v, %v (want an empty list)", none, err)
	}
	// One device adds at most FlowsPerDevice new flows (b added none:
	// its flow was a's).
	var many []controlapi.ObservedFlow
	for p := range store.FlowsPerDevice + 5 {
		many = append(many, flow(uint16(1000+p)))
	}
	report(a.ID, 2, many...)
	got, err = s.Flows("scanner")
	must(t, err)
	d, err := s.Device(a.ID)
	must(t, err)
	if d.FlowsAdded != store.FlowsPerDevice || len(got) != store.FlowsPerDevice {
		t.Errorf("device added %d flows, class has %d; want %d and %d", d.FlowsAdded, len(got), store.FlowsPerDevice, store.FlowsPerDevice)
	}
}

func testAudit(t *testing.T, s store.Store) {
	for i := range 25 {
		must(t, s.Audit(now.Add(time.Duration(i)*time.Second), "ops", "act", fmt.Sprint(i)))
	}
	must(t, s.Audit(now, "ops", "long", strings.Repeat("x", store.MaxAuditDetail+100)))
	page, next, err := s.AuditPage(0, 10)
	must(t, err)
	if len(page) != 10 || page[0].Detail != "0" || next != page[9].Seq || !page[3].Time.Equal(now.Add(3*time.Second)) {
		t.Fatalf("first page %+v next %d", page, next)
	}
	var all []controlapi.AuditEntry
	for after := uint64(0); ; {
		page, next, err := s.AuditPage(after, 10)
		must(t, err)
		all = append(all, page...)
		if next == 0 {
			break
		}
		after = next
	}
	if len(all) != 26 {
		t.Fatalf("%d entries", len(all))
	}
	for i := 1; i < len(all); i++ {
		if all[i].Seq <= all[i-1].Seq {
			t.Errorf("seq %d after %d", all[i].Seq, all[i-1].Seq)
		}
	}
	if d := all[25].Detail; len(d) > store.MaxAuditDetail+20 || !strings.HasSuffix(d, "(cut)") {
		t.Errorf("long detail kept as %d bytes", len(d))
	}
}

func testClaims(t *testing.T, b Backend) {
	s := b.Open(t)
	other := s
	if b.Share != nil {
		other = b.Share(t, s)
	}
	check := func(s store.Store, name, value, want string) {
		t.Helper()
		got, err := s.Claim(name, value)
		must(t, err)
		if got != want {
			t.Errorf("Claim(%q, %q) = %q, want %q", name, value, got, want)
		}
	}
	check(s, "ca", "", "")
	check(s, "ca", "fp-1", "fp-1")
	check(other, "ca", "fp-2", "fp-1")
	check(other, "ca", "", "fp-1")
	check(other, "key", "k", "k")
}

// testListen checks that each write another handle commits reaches a
// listener as the change it is, and nothing uncommitted does.
func testListen(t *testing.T, b Backend) {
	s := b.Open(t)
	ctx, cancel := context.WithCancel(context.Background())
	changes := make(chan store.Change, 100)
	caught := make(chan struct{}, 10)
	done := make(chan error, 1)
	go func() {
		done <- s.Listen(ctx, func(c store.Change) { changes <- c }, func() { caught <- struct{}{} })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Listen: %v", err)
		}
	})
	<-caught
	if b.Share == nil {
		return // one process only: nobody else writes
	}
	other := b.Share(t, s)
	dev := enrol(t, other, "scanner", netip.Prefix{})
	o := order("order-l")
	must(t, other.AddOrder(o, now, "d"))
	must(t, other.PushBundle(7, []byte("b"), now, "ops", "x"))
	must(t, other.PushRoots(2, []byte("r"), now, "ops"))
	must(t, other.Rebind(dev.ID, "k", []byte("c"), now))
	_, err := other.Revoke(dev.ID, "why", "ops", now)
	must(t, err)
	must(t, other.WithdrawBundle(7, now, "ops", "why"))
	// Refused writes tell nobody.
	is(t, other.AddOrder(order("order-l"), now, "d"), store.ErrOrderGiven)
	must(t, other.PushBundle(7, []byte("b"), now, "ops", "x")) // withdrawn: may be pushed again
	want := []store.Change{
		{Kind: store.ChangeRoster, Device: dev.ID},
		{Kind: store.ChangeOrder, Seq: o.Seq},
		{Kind: store.ChangeBundle, Seq: 7},
		{Kind: store.ChangeRoots, Seq: 2},
		{Kind: store.ChangeRoster, Device: dev.ID},
		{Kind: store.ChangeRoster, Device: dev.ID},
		{Kind: store.ChangeBundle, Seq: 7},
		{Kind: store.ChangeBundle, Seq: 7},
	}
	var got []store.Change
	timeout := time.After(30 * time.Second)
	for len(got) < len(want) {
		select {
		case c := <-changes:
			got = append(got, c)
		case <-timeout:
			t.Fatalf("changes heard: %v, want %v", got, want)
		}
	}
	if d := diff(want, got); d != "" {
		t.Errorf("changes (-want +got):\n%s", d)
	}
}

// testCursors is the attack on cursors: writers on several handles
// commit orders and enrolments at once while a reader pages by cursor.
// A number taken by one writer and committed after a higher one would be
// skipped by a reader already past it: a gateway would never learn that
// order or that device.
func testCursors(t *testing.T, b Backend) {
	s := b.Open(t)
	handles := []store.Store{s}
	if b.Share != nil {
		handles = append(handles, b.Share(t, s), b.Share(t, s))
	}
	const each = 15
	var wg sync.WaitGroup
	for h, hs := range handles {
		for w := range 2 {
			wg.Go(func() {
				for i := range each {
					if err := hs.AddOrder(order(fmt.Sprintf("order-%d-%d-%d", h, w, i)), now, "d"); err != nil {
						t.Error(err)
						return
					}
					if _, err := tryEnrol(hs, "scanner", netip.Prefix{}); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
	}
	stop := make(chan struct{})
	var seenOrders, seenDevices []string
	var readers sync.WaitGroup
	readers.Go(func() {
		var orderCursor, rosterCursor uint64
		for last := false; !last; {
			select {
			case <-stop:
				last = true // one more pass after the writers are done
			default:
			}
			os, err := s.OrdersAfter(orderCursor)
			if err != nil {
				t.Error(err)
				return
			}
			for _, o := range os {
				seenOrders = append(seenOrders, o.Command.ID)
				orderCursor = o.Seq
			}
			for {
				devs, next, more, err := s.Roster(rosterCursor, 7)
				if err != nil {
					t.Error(err)
					return
				}
				for _, d := range devs {
					seenDevices = append(seenDevices, d.ID)
				}
				rosterCursor = next
				if !more {
					break
				}
			}
		}
	})
	wg.Wait()
	close(stop)
	readers.Wait()
	total := len(handles) * 2 * each
	all, err := s.OrdersAfter(0)
	must(t, err)
	devs, err := s.Devices()
	must(t, err)
	if len(all) != total || len(devs) != total {
		t.Fatalf("%d orders and %d devices stored, want %d", len(all), len(devs), total)
	}
	if len(seenOrders) != total || len(seenDevices) != total {
		t.Errorf("a reader paging by cursor saw %d of %d orders and %d of %d devices", len(seenOrders), total, len(seenDevices), total)
	}
}

// testStateBatches is the attack on batched state writes: replicas write
// the states their devices report, in overlapping batches, while ops
// revoke and devices rebind those devices on other handles. A batch that
// wrote back records read before those commits would un-revoke a device,
// and batches locking the same rows in different orders would deadlock.
func testStateBatches(t *testing.T, b Backend) {
	s := b.Open(t)
	handles := []store.Store{s}
	if b.Share != nil {
		handles = append(handles, b.Share(t, s), b.Share(t, s))
	}
	var devs []controlapi.Device
	for range 20 {
		devs = append(devs, enrol(t, s, "scanner", netip.Prefix{}))
	}
	const rounds = 10
	var wg sync.WaitGroup
	for h, hs := range handles {
		wg.Go(func() {
			for r := range rounds {
				states := map[string]controlapi.DeviceState{}
				for _, d := range devs {
					states[d.ID] = controlapi.DeviceState{Why: fmt.Sprintf("handle %d round %d", h, r)}
				}
				if err := hs.SetStates(states, now); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	ops := handles[len(handles)-1]
	wg.Go(func() {
		for i, d := range devs {
			if err := ops.Rebind(d.ID, fmt.Sprintf("key-%d", i), []byte("cert"), now); err != nil {
				t.Error(err)
			}
			if _, err := ops.Revoke(d.ID, "stolen", "ops", now); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	for i, d := range devs {
		got, err := s.Device(d.ID)
		must(t, err)
		if got.RevokedAt.IsZero() || got.WireGuardKey != fmt.Sprintf("key-%d", i) || !strings.HasSuffix(got.State.Why, fmt.Sprintf("round %d", rounds-1)) {
			t.Errorf("device %d: revoked at %v, key %q, state %q: a state batch undid a revocation or a rebinding", i, got.RevokedAt, got.WireGuardKey, got.State.Why)
		}
	}
}
