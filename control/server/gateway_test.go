package server

import (
	"crypto/ed25519"
	"crypto/x509"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// gatewayToken makes a gateway token for segments, or says why not.
func (a *api) gatewayToken(t *testing.T, segments ...string) (string, *http.Response) {
	t.Helper()
	w := a.call("POST", controlapi.PathAdminTokens, controlapi.TokenRequest{Role: controlapi.RoleGateway, Segments: segments, TTLSeconds: 3600}, a.ops)
	var tok controlapi.TokenResponse
	if w.Code == http.StatusOK {
		decodeOK(t, w, &tok)
	}
	return tok.Token, w.Result()
}

// A gateway token names segments the stored policies declare; a
// mistyped one is refused by name, and a device token takes none.
func TestGatewayTokensNameKnownSegments(t *testing.T) {
	a := newAPI(t, time.Millisecond)
	decodeOK(t, a.call("POST", controlapi.PathAdminBundles, a.bundle(t, 1, "scanner"), a.ops), nil)
	if _, r := a.gatewayToken(t, "wsm"); r.StatusCode != http.StatusNotFound {
		t.Errorf("a mistyped segment: %d, want 404", r.StatusCode)
	}
	if _, r := a.gatewayToken(t); r.StatusCode != http.StatusBadRequest {
		t.Errorf("a gateway token without segments: %d, want 400", r.StatusCode)
	}
	w := a.call("POST", controlapi.PathAdminTokens, controlapi.TokenRequest{Class: "scanner", Segments: []string{"wms"}, TTLSeconds: 60}, a.ops)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "gateway") {
		t.Errorf("a device token with segments: %d %s", w.Code, w.Body)
	}
	tok, r := a.gatewayToken(t, "wms")
	if r.StatusCode != http.StatusOK {
		t.Fatalf("gateway token for wms: %d", r.StatusCode)
	}
	// The token enrols a gateway of wms, and nothing else: a device, or
	// a gateway of other segments, is refused before anything changes.
	for _, segs := range [][]string{nil, {"finance"}, {"wms", "finance"}} {
		if _, _, err := a.enrolKeyed(tok, "", policy.Key{9}, segs...); err == nil || !strings.Contains(err.Error(), "another role") {
			t.Errorf("a gateway token enrolled %v: %v", segs, err)
		}
	}
	if _, _, err := a.enrolKeyed(a.token(t, "scanner"), "", policy.Key{8}, "wms"); err == nil || !strings.Contains(err.Error(), "enrols a device") {
		t.Errorf("a device token enrolled a gateway: %v", err)
	}
	_, resp, err := a.enrolKeyed(tok, "", policy.Key{9}, "wms")
	if err != nil || resp.Role != controlapi.RoleGateway || !slices.Equal(resp.Segments, []string{"wms"}) || resp.Class != GatewayClass {
		t.Fatalf("gateway enrolment: %+v, %v", resp, err)
	}
}

// gatewayAndScanner is a server with a tunnel pool and a policy for
// scanners, a gateway of wms enrolled with key 9 and a scanner with key 1.
func gatewayAndScanner(t *testing.T) (a *api, gw *x509.Certificate, gwResp controlapi.EnrollResponse, dev *x509.Certificate, devResp controlapi.EnrollResponse) {
	t.Helper()
	a = newAPI(t, time.Millisecond, func(c *Config) { c.TunnelPool = netip.MustParsePrefix("100.80.0.0/24") })
	decodeOK(t, a.call("POST", controlapi.PathAdminBundles, a.bundle(t, 1, "scanner"), a.ops), nil)
	tok, _ := a.gatewayToken(t, "wms")
	gw, gwResp, err := a.enrolKeyed(tok, "", policy.Key{9}, "wms")
	if err != nil {
		t.Fatal(err)
	}
	if dev, devResp, err = a.enrolKeyed(a.token(t, "scanner"), "scanner", policy.Key{1}); err != nil {
		t.Fatal(err)
	}
	return a, gw, gwResp, dev, devResp
}

// A gateway learns every enrolled device by its certificate, and every
// order, signed for the devices it names; each sync carries only what is
// past the gateway's cursors. A device asking for the same gets nothing.
func TestGatewaysLearnTheRosterAndTheOrders(t *testing.T) {
	a, gw, gwResp, dev, devResp := gatewayAndScanner(t)
	sync := func(c *x509.Certificate, have controlapi.GatewayCursor) *controlapi.GatewayUpdate {
		t.Helper()
		var resp controlapi.SyncResponse
		decodeOK(t, a.call("POST", controlapi.PathSync, controlapi.SyncRequest{Gateway: &have}, c), &resp)
		return resp.Gateway
	}
	if u := sync(dev, controlapi.GatewayCursor{}); u != nil {
		t.Fatalf("a device was sent the roster: %+v", u)
	}
	u := sync(gw, controlapi.GatewayCursor{})
	if u == nil || len(u.Roster) != 1 || u.Roster[0].ID != devResp.DeviceID || u.More {
		t.Fatalf("first gateway sync: %+v, want the scanner alone (not the gateway itself)", u)
	}
	cert, err := x509.ParseCertificate(u.Roster[0].Certificate)
	if err != nil {
		t.Fatal(err)
	}
	b, bound, err := controlapi.BindingOf(cert)
	if err != nil || !bound || b.Key != (policy.Key{1}) || b.Address != devResp.TunnelAddress || b.Class != "scanner" {
		t.Fatalf("roster certificate binds %+v (%v, %v)", b, bound, err)
	}
	have := controlapi.GatewayCursor{Roster: u.RosterCursor, Orders: u.OrderCursor}
	if u := sync(gw, have); u != nil {
		t.Fatalf("a gateway holding everything was sent %+v", u)
	}
	if !gwResp.TunnelPool.IsValid() || !gwResp.TunnelPool.Contains(gwResp.TunnelAddress) {
		t.Errorf("the gateway's enrolment says pool %v for address %v", gwResp.TunnelPool, gwResp.TunnelAddress)
	}

	// A quarantine reaches the gateway signed by the control key, for
	// the device it names; a rotated key comes back as a new entry.
	var order controlapi.CommandResponse
	decodeOK(t, a.call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{devResp.DeviceID}, Reason: "INC-7"}, a.ops), &order)
	u = sync(gw, have)
	if u == nil || len(u.Orders) != 1 || len(u.Roster) != 0 {
		t.Fatalf("after the order: %+v", u)
	}
	roots, _ := opskey.NewRoots(1, a.opsKey.Public().(ed25519.PublicKey))
	v, err := command.Verify(u.Orders[0].Raw, roots, a.s.cmdKey.Public().(ed25519.PublicKey))
	if err != nil || v.ID != order.ID || !slices.Equal(v.Target.Devices, []string{devResp.DeviceID}) {
		t.Fatalf("the order as the gateway got it: %+v, %v", v, err)
	}
	have.Orders = u.OrderCursor
	a.call("POST", controlapi.PathSync, controlapi.SyncRequest{WireGuardKey: policy.Key{2}.String()}, dev)
	u = sync(gw, have)
	if u == nil || len(u.Roster) != 1 || len(u.Orders) != 0 {
		t.Fatalf("after the key rotation: %+v", u)
	}
	cert, _ = x509.ParseCertificate(u.Roster[0].Certificate)
	if b, _, _ := controlapi.BindingOf(cert); b.Key != (policy.Key{2}) {
		t.Errorf("the rotated device's entry binds %v, want the new key", b.Key)
	}
}

// A revoked device leaves every gateway's roster and gets no answer from
// control; revoking needs an operator and a reason, and names an
// enrolled device.
func TestRevokedDevicesLeaveTheRoster(t *testing.T) {
	a, gw, _, dev, enrolled := gatewayAndScanner(t)
	var first controlapi.SyncResponse
	decodeOK(t, a.call("POST", controlapi.PathSync, controlapi.SyncRequest{Gateway: &controlapi.GatewayCursor{}}, gw), &first)
	have := controlapi.GatewayCursor{Roster: first.Gateway.RosterCursor, Orders: first.Gateway.OrderCursor}

	path := controlapi.PathAdminDevices + "/" + enrolled.DeviceID + "/revoke"
	if w := a.call("POST", path, controlapi.RevokeRequest{Reason: "stolen"}, dev); w.Code != http.StatusUnauthorized {
		t.Errorf("a device revoked itself: %d", w.Code)
	}
	if w := a.call("POST", path, controlapi.RevokeRequest{}, a.ops); w.Code != http.StatusBadRequest {
		t.Errorf("a revocation without a reason: %d", w.Code)
	}
	if w := a.call("POST", controlapi.PathAdminDevices+"/dev-nosuch/revoke", controlapi.RevokeRequest{Reason: "x"}, a.ops); w.Code != http.StatusNotFound {
		t.Errorf("revoking an unknown device: %d", w.Code)
	}
	decodeOK(t, a.call("POST", path, controlapi.RevokeRequest{Reason: "INC-12 stolen truck"}, a.ops), nil)
	var resp controlapi.SyncResponse
	decodeOK(t, a.call("POST", controlapi.PathSync, controlapi.SyncRequest{Gateway: &have}, gw), &resp)
	if u := resp.Gateway; u == nil || len(u.Roster) != 1 || u.Roster[0].ID != enrolled.DeviceID || !u.Roster[0].Revoked || u.Roster[0].Certificate != nil {
		t.Fatalf("after the revocation the gateway got %+v", resp.Gateway)
	}
	if w := a.call("POST", controlapi.PathSync, controlapi.SyncRequest{}, dev); w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "revoked") {
		t.Errorf("a revoked device's sync: %d %s", w.Code, w.Body)
	}
	if w := a.call("GET", controlapi.PathAdminAudit, nil, a.ops); !strings.Contains(w.Body.String(), "device-revoked") {
		t.Error("no device-revoked in the audit")
	}
}
