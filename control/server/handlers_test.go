package server

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// The server's protocol, in-process and without root: each request
// carries the certificate TLS would have verified (see harness).

// api is a server publishing one ops key, its operator's certificate and
// that key.
type api struct {
	*harness
	ops    *x509.Certificate
	opsKey ed25519.PrivateKey
}

func newAPI(t *testing.T, keepAlive time.Duration, opts ...func(*Config)) *api {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	roots, err := opskey.NewRoots(1, pub)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := Config{DataDir: dir, KeepAlive: keepAlive, Ops: roots, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, o := range opts {
		o(&cfg)
	}
	s, _, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	a := &api{harness: &harness{s: s, h: s.Handler()}, opsKey: priv}
	if a.ops, err = pki.ReadCert(filepath.Join(dir, pki.AdminDir, pki.AdminCert)); err != nil {
		t.Fatal(err)
	}
	return a
}

// call sends v (JSON unless it is []byte) with method to path as the
// holder of cert.
func (a *api) call(method, path string, v any, cert *x509.Certificate) *httptest.ResponseRecorder {
	var body []byte
	switch b := v.(type) {
	case []byte:
		body = b
	case nil:
	default:
		body, _ = json.Marshal(v)
	}
	return a.send(method, path, body, cert)
}

// enrol enrols a device of class with a fresh token and returns its
// certificate.
func (a *api) enrol(t *testing.T, class string) *x509.Certificate {
	t.Helper()
	var tok controlapi.TokenResponse
	decodeOK(t, a.call("POST", controlapi.PathAdminTokens, controlapi.TokenRequest{Class: class, TTLSeconds: 3600, AllowUnknownClass: true}, a.ops), &tok)
	return enrolWith(t, a, tok.Token, class)
}

func enrolWith(t *testing.T, a *api, token, class string) *x509.Certificate {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, priv)
	var resp controlapi.EnrollResponse
	decodeOK(t, a.call("POST", controlapi.PathEnroll, controlapi.EnrollRequest{Token: token, Class: class, CSR: csr}, nil), &resp)
	cert, err := x509.ParseCertificate(resp.Certificate)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func decodeOK(t *testing.T, w *httptest.ResponseRecorder, out any) {
	t.Helper()
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	if out != nil {
		if err := json.Unmarshal(w.Body.Bytes(), out); err != nil {
			t.Fatalf("answer %s: %v", w.Body, err)
		}
	}
}

func (a *api) bundle(t *testing.T, version uint64, class string) []byte {
	t.Helper()
	return signBundle(t, version, class, a.opsKey)
}

// signBundle signs a small valid policy for class as version with key.
func signBundle(t *testing.T, version uint64, class string, key ed25519.PrivateKey) []byte {
	t.Helper()
	doc, err := policy.Parse([]byte(`{"schema": "bulkhead.policy/v1",
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "validity": {"max_offline": "72h"},
  "segments": [{"name": "wms", "data_class": "operational", "tier": 0,
    "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}],
    "gateway": {"public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "endpoint": "192.0.2.1:51820"}}],
  "classes": {"` + class + `": {"rules": [{"segment": "wms"}]}}}`))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	raw, err := bundle.Sign(bundle.Payload{Version: version, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: []string{class}}, Policy: *doc}, key)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// A token enrols one device, once; the admin API wants an operator's
// certificate, not a device's.
func TestEnrolmentAndWhoMayCallWhat(t *testing.T) {
	a := newAPI(t, time.Millisecond)
	var tok controlapi.TokenResponse
	decodeOK(t, a.call("POST", controlapi.PathAdminTokens, controlapi.TokenRequest{Class: "scanner", TTLSeconds: 60, AllowUnknownClass: true}, a.ops), &tok)
	dev := enrolWith(t, a, tok.Token, "scanner")
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, priv)
	if w := a.call("POST", controlapi.PathEnroll, controlapi.EnrollRequest{Token: tok.Token, CSR: csr}, nil); w.Code != http.StatusForbidden {
		t.Errorf("a spent token enrolled again: %d %s", w.Code, w.Body)
	}
	for _, tc := range []struct {
		who  string
		cert *x509.Certificate
		want int
	}{{"nobody", nil, http.StatusUnauthorized}, {"a device", dev, http.StatusUnauthorized}, {"an operator", a.ops, http.StatusOK}} {
		if w := a.call("GET", controlapi.PathAdminDevices, nil, tc.cert); w.Code != tc.want {
			t.Errorf("devices asked by %s: %d, want %d", tc.who, w.Code, tc.want)
		}
	}
	if w := a.call("POST", controlapi.PathSync, controlapi.SyncRequest{}, a.ops); w.Code != http.StatusUnauthorized {
		t.Errorf("an operator synced as a device: %d", w.Code)
	}
}

// flushes is a ResponseWriter that says when the handler flushed its
// headers: a held long-poll does so at once.
type flushes struct {
	*httptest.ResponseRecorder
	flushed chan struct{}
}

func (f flushes) Flush() {
	f.ResponseRecorder.Flush()
	select {
	case f.flushed <- struct{}{}:
	default:
	}
}

// A held long-poll wakes for an order given meanwhile and carries it; a
// device holding the order is not sent it again.
func TestHeldSyncWakesForAnOrder(t *testing.T) {
	a := newAPI(t, time.Hour)
	dev := a.enrol(t, "scanner")
	body, _ := json.Marshal(controlapi.SyncRequest{WaitSeconds: 3600})
	r := httptest.NewRequest("POST", controlapi.PathSync, bytes.NewReader(body))
	r.TLS = &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{dev}}}
	w := flushes{httptest.NewRecorder(), make(chan struct{}, 1)}
	done := make(chan struct{})
	go func() { a.h.ServeHTTP(w, r); close(done) }()
	<-w.flushed // held
	var order controlapi.CommandResponse
	decodeOK(t, a.call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{deviceID(dev)}, Reason: "INC-1"}, a.ops), &order)
	// The keep-alive is an hour: only a wake-up answers within the test's
	// time limit, so no bound of its own is needed.
	<-done
	var resp controlapi.SyncResponse
	decodeOK(t, w.ResponseRecorder, &resp)
	if len(resp.Commands) != 1 {
		t.Fatalf("the woken sync carried %d commands, want the order", len(resp.Commands))
	}
	// Holding it, the device is sent nothing; a keep-alive answers empty.
	a.s.cfg.KeepAlive = time.Millisecond
	st := controlapi.DeviceState{Orders: map[string]string{"mode": order.ID}}
	var again controlapi.SyncResponse
	decodeOK(t, a.call("POST", controlapi.PathSync, controlapi.SyncRequest{State: st}, dev), &again)
	if len(again.Commands) != 0 {
		t.Errorf("a device holding the order was sent %d commands", len(again.Commands))
	}
}

// A bundle is offered until the device holds it; one the device names as
// refused is not offered again.
func TestRefusedBundleIsNotOfferedAgain(t *testing.T) {
	a := newAPI(t, time.Millisecond)
	dev := a.enrol(t, "scanner")
	raw := a.bundle(t, 1, "scanner")
	decodeOK(t, a.call("POST", controlapi.PathAdminBundles, raw, a.ops), nil)
	sync := func(req controlapi.SyncRequest) controlapi.SyncResponse {
		var resp controlapi.SyncResponse
		decodeOK(t, a.call("POST", controlapi.PathSync, req, dev), &resp)
		return resp
	}
	if !bytes.Equal(sync(controlapi.SyncRequest{}).Bundle, raw) {
		t.Fatal("the pushed bundle was not offered")
	}
	if sync(controlapi.SyncRequest{PolicyVersion: 1}).Bundle != nil {
		t.Error("a bundle the device holds was offered again")
	}
	if sync(controlapi.SyncRequest{Refused: []string{controlapi.BundleDigest(raw)}}).Bundle != nil {
		t.Error("a bundle the device refused was offered again")
	}
	// A bundle no ops key signed is refused at the push, its version left free.
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	forged := signBundle(t, 2, "scanner", other)
	if w := a.call("POST", controlapi.PathAdminBundles, forged, a.ops); w.Code == http.StatusOK {
		t.Error("a forged bundle was stored")
	}
	decodeOK(t, a.call("POST", controlapi.PathAdminBundles, a.bundle(t, 2, "scanner"), a.ops), nil)
}

// Reports are acknowledged up to the last taken, and an event sent again
// (after a lost acknowledgement) is stored once.
func TestReportsAreTakenOnce(t *testing.T) {
	a := newAPI(t, time.Millisecond)
	dev := a.enrol(t, "scanner")
	now := time.Now().UTC()
	events := []controlapi.Event{{Seq: 1, Time: now, Kind: "mode-changed", Detail: "quarantine"}, {Seq: 2, Time: now, Kind: "drift-repaired"}}
	var ack controlapi.ReportResponse
	decodeOK(t, a.call("POST", controlapi.PathReport, controlapi.ReportRequest{Events: events}, dev), &ack)
	if ack.Acked != 2 {
		t.Fatalf("acked %d, want 2", ack.Acked)
	}
	decodeOK(t, a.call("POST", controlapi.PathReport, controlapi.ReportRequest{Events: events[1:]}, dev), &ack)
	var d controlapi.Device
	decodeOK(t, a.call("GET", controlapi.PathAdminDevices+"/"+deviceID(dev), nil, a.ops), &d)
	if len(d.Reports) != 2 || d.Reports[0].Seq != 1 || d.Reports[1].Seq != 2 {
		t.Errorf("reports stored: %+v, want events 1 and 2 once each", d.Reports)
	}
}

// enrolKeyed enrols a device of class with a fresh token and tunnel key
// key, from any goroutine: it returns what went wrong instead of failing
// the test.
func (a *api) enrolKeyed(token, class string, key policy.Key, segments ...string) (*x509.Certificate, controlapi.EnrollResponse, error) {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, priv)
	w := a.call("POST", controlapi.PathEnroll, controlapi.EnrollRequest{Token: token, Class: class, CSR: csr, WireGuardKey: key.String(), Segments: segments}, nil)
	var resp controlapi.EnrollResponse
	if w.Code != http.StatusOK {
		return nil, resp, fmt.Errorf("status %d: %s", w.Code, w.Body)
	}
	if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil {
		return nil, resp, err
	}
	cert, err := x509.ParseCertificate(resp.Certificate)
	return cert, resp, err
}

func (a *api) token(t *testing.T, class string) string {
	t.Helper()
	var tok controlapi.TokenResponse
	decodeOK(t, a.call("POST", controlapi.PathAdminTokens, controlapi.TokenRequest{Class: class, TTLSeconds: 3600, AllowUnknownClass: true}, a.ops), &tok)
	return tok.Token
}

// Control gives each device the next free address of its pool and
// binds it, with the device's WireGuard key, in the device's certificate:
// enrolments at once never share an address, and a full pool refuses the
// enrolment and leaves its token unspent.
func TestEnrolmentAssignsBoundTunnelAddresses(t *testing.T) {
	pool := netip.MustParsePrefix("100.80.0.0/29") // .1 to .6; .0 and .7 are never assigned
	a := newAPI(t, time.Millisecond, func(c *Config) { c.TunnelPool = pool })
	tokens := make([]string, 6)
	for i := range tokens {
		tokens[i] = a.token(t, "scanner")
	}
	type enrolled struct {
		key  policy.Key
		cert *x509.Certificate
		resp controlapi.EnrollResponse
		err  error
	}
	results := make([]enrolled, len(tokens))
	var wg sync.WaitGroup
	for i, tok := range tokens {
		wg.Go(func() {
			r := &results[i]
			rand.Read(r.key[:])
			r.cert, r.resp, r.err = a.enrolKeyed(tok, "scanner", r.key)
		})
	}
	wg.Wait()
	var got []string
	for _, r := range results {
		if r.err != nil {
			t.Fatal(r.err)
		}
		b, ok, err := controlapi.BindingOf(r.cert)
		if err != nil || !ok || b.Key != r.key || b.Address != r.resp.TunnelAddress || b.Class != "scanner" {
			t.Fatalf("device %s: certificate binds %v (bound %v, %v); want key %v, address %v and class scanner", r.resp.DeviceID, b, ok, err, r.key, r.resp.TunnelAddress)
		}
		var d controlapi.Device
		decodeOK(t, a.call("GET", controlapi.PathAdminDevices+"/"+r.resp.DeviceID, nil, a.ops), &d)
		if d.TunnelAddress != r.resp.TunnelAddress {
			t.Errorf("device %s: record says %v, answer %v", d.ID, d.TunnelAddress, r.resp.TunnelAddress)
		}
		got = append(got, r.resp.TunnelAddress.String())
	}
	slices.Sort(got)
	if want := []string{"100.80.0.1", "100.80.0.2", "100.80.0.3", "100.80.0.4", "100.80.0.5", "100.80.0.6"}; !slices.Equal(got, want) {
		t.Fatalf("addresses assigned %v, want each of %v once", got, want)
	}
	last := a.token(t, "scanner")
	if _, _, err := a.enrolKeyed(last, "scanner", policy.Key{7}); err == nil || !strings.Contains(err.Error(), "the tunnel address pool 100.80.0.0/29 is exhausted") {
		t.Fatalf("an enrolment into a full pool: %v", err)
	}
	if err := a.s.db.CheckToken(last, "scanner", nil, time.Now()); err != nil {
		t.Errorf("the refused enrolment spent its token: %v", err)
	}
}

// Without a pool, a device names its own address: its certificate binds
// its key and no address.
func TestEnrolmentWithoutAPoolBindsTheKeyOnly(t *testing.T) {
	a := newAPI(t, time.Millisecond)
	cert, resp, err := a.enrolKeyed(a.token(t, "scanner"), "scanner", policy.Key{9})
	if err != nil {
		t.Fatal(err)
	}
	if b, ok, err := controlapi.BindingOf(cert); err != nil || !ok || b.Key != (policy.Key{9}) || b.Address.IsValid() || resp.TunnelAddress.IsValid() {
		t.Fatalf("binding %v (bound %v, %v), answer's address %v: want the key and no address", b, ok, err, resp.TunnelAddress)
	}
}

func TestCheckTunnelPool(t *testing.T) {
	for pool, want := range map[string]string{
		"100.80.0.0/16":   "",
		"fd7a:115c::/64":  "",
		"100.80.0.1/16":   "host bits set (did you mean 100.80.0.0/16?)",
		"100.80.0.0/30":   "too small",
		"fd7a:115c::/127": "too small",
	} {
		err := CheckTunnelPool(netip.MustParsePrefix(pool))
		if (want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), want) {
			t.Errorf("CheckTunnelPool(%s) = %v, want %q", pool, err, want)
		}
	}
}

// A device that reports a new tunnel key (it ran `bulkhead rotate-key`)
// gets, in the same answer, a certificate binding that key and its
// address for the same identity; the record takes the key, audited.
// Presenting that certificate with that key, it gets none; a malformed
// key is refused.
func TestANewTunnelKeyIsBoundAtOnce(t *testing.T) {
	a := newAPI(t, time.Millisecond, func(c *Config) { c.TunnelPool = netip.MustParsePrefix("100.80.0.0/29") })
	cert, enrolled, err := a.enrolKeyed(a.token(t, "scanner"), "scanner", policy.Key{1})
	if err != nil {
		t.Fatal(err)
	}
	sync := func(c *x509.Certificate, key string) *httptest.ResponseRecorder {
		return a.call("POST", controlapi.PathSync, controlapi.SyncRequest{WireGuardKey: key}, c)
	}
	answer := func(w *httptest.ResponseRecorder) controlapi.SyncResponse {
		t.Helper()
		var resp controlapi.SyncResponse
		decodeOK(t, w, &resp)
		return resp
	}
	if r := answer(sync(cert, policy.Key{1}.String())); r.Certificate != nil {
		t.Fatal("a certificate was sent for the key it already binds")
	}
	r := answer(sync(cert, policy.Key{2}.String()))
	renewed, err := x509.ParseCertificate(r.Certificate)
	if err != nil {
		t.Fatalf("no certificate for the new key: %v", err)
	}
	b, bound, err := controlapi.BindingOf(renewed)
	if err != nil || !bound || b.Key != (policy.Key{2}) || b.Address != enrolled.TunnelAddress || b.Class != "scanner" {
		t.Fatalf("the new certificate binds %v (%v, %v); want the new key and %v", b, bound, err, enrolled.TunnelAddress)
	}
	if !renewed.PublicKey.(ed25519.PublicKey).Equal(cert.PublicKey) || deviceID(renewed) != enrolled.DeviceID {
		t.Fatalf("the new certificate is for %s and another identity key", deviceID(renewed))
	}
	var d controlapi.Device
	decodeOK(t, a.call("GET", controlapi.PathAdminDevices+"/"+enrolled.DeviceID, nil, a.ops), &d)
	if d.WireGuardKey != (policy.Key{2}).String() {
		t.Errorf("the record's key is %s, want the new one", d.WireGuardKey)
	}
	if w := a.call("GET", controlapi.PathAdminAudit, nil, a.ops); !strings.Contains(w.Body.String(), "wireguard-key-changed") {
		t.Errorf("no wireguard-key-changed in the audit: %s", w.Body)
	}
	if r := answer(sync(renewed, policy.Key{2}.String())); r.Certificate != nil {
		t.Error("a certificate was sent again for the key the presented one binds")
	}
	if w := sync(renewed, "not a key"); w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "wireguard_key") {
		t.Errorf("a malformed key: %d %s", w.Code, w.Body)
	}
}
