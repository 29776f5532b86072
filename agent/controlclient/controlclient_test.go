package controlclient

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// control is a control server over real TLS 1.3 with its own CA: it
// enrols any CSR (or answers as answer says), and echoes what an enrolled
// device's sync and report requests carried, and whose certificate they
// came with.
type control struct {
	t      *testing.T
	ca     *pki.CA
	srv    *httptest.Server
	url    string
	fp     string
	answer func(*control, *controlapi.EnrollResponse) // bends the enrolment answer
	// addr is the tunnel address the server assigns (none: no pool); it
	// binds it, and the WireGuard key the device sends, as control does.
	addr netip.Addr
	// peer is the client certificate on the latest sync or report.
	peer *x509.Certificate
}

func newControl(t *testing.T) *control {
	t.Helper()
	ca, _, err := pki.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &control{t: t, ca: ca, fp: controlapi.Fingerprint(ca.Cert)}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+controlapi.PathEnroll, c.enroll)
	mux.HandleFunc("POST "+controlapi.PathSync, func(w http.ResponseWriter, r *http.Request) {
		var req controlapi.SyncRequest
		c.read(w, r, &req)
		c.write(w, controlapi.SyncResponse{Commands: [][]byte{[]byte(req.State.Why)}})
	})
	mux.HandleFunc("POST "+controlapi.PathReport, func(w http.ResponseWriter, r *http.Request) {
		var req controlapi.ReportRequest
		c.read(w, r, &req)
		if len(req.Events) == 0 {
			http.Error(w, `{"error": "no events"}`, http.StatusBadRequest)
			return
		}
		c.write(w, controlapi.ReportResponse{Acked: req.Events[len(req.Events)-1].Seq})
	})
	c.srv = httptest.NewUnstartedServer(mux)
	cert, err := ca.ServerCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	c.srv.TLS = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: ca.Pool()}
	c.srv.StartTLS()
	t.Cleanup(c.srv.Close)
	c.url = c.srv.URL
	return c
}

func (c *control) enroll(w http.ResponseWriter, r *http.Request) {
	var req controlapi.EnrollRequest
	c.read(w, r, &req)
	csr, err := x509.ParseCertificateRequest(req.CSR)
	if err != nil {
		http.Error(w, `{"error": "bad csr"}`, http.StatusBadRequest)
		return
	}
	uris, ips := []string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI(req.Class)}, []netip.Addr{}
	if req.WireGuardKey != "" {
		var k policy.Key
		if err := k.UnmarshalText([]byte(req.WireGuardKey)); err != nil {
			c.t.Error(err)
		}
		uris = append(uris, controlapi.TunnelBinding{Key: k}.URI())
	}
	if c.addr.IsValid() {
		ips = append(ips, c.addr)
	}
	der, err := c.ca.ClientCert(csr.PublicKey, "dev-1", uris, ips...)
	if err != nil {
		c.t.Error(err)
	}
	cmd, _, _ := ed25519.GenerateKey(rand.Reader)
	resp := controlapi.EnrollResponse{DeviceID: "dev-1", Class: req.Class, Certificate: der, CA: c.ca.Cert.Raw, CommandKey: cmd, TunnelAddress: c.addr}
	if c.answer != nil {
		c.answer(c, &resp)
	}
	c.write(w, resp)
}

func (c *control) read(w http.ResponseWriter, r *http.Request, v any) {
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		c.peer = r.TLS.PeerCertificates[0]
	}
	if err := json.UnmarshalRead(r.Body, v); err != nil {
		c.t.Errorf("%s: %v", r.URL.Path, err)
	}
}

func (c *control) write(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.MarshalWrite(w, v); err != nil {
		c.t.Error(err)
	}
}

func (c *control) endpoint() netip.AddrPort {
	c.t.Helper()
	ep, err := Endpoint(context.Background(), c.url)
	if err != nil {
		c.t.Fatal(err)
	}
	return ep
}

// enrolIn enrols into dir as a scanner with the pinned fingerprint fp,
// and wgKey as its tunnel key, if any.
func (c *control) enrolIn(dir, fp string, wgKey ...string) (*Record, error) {
	return Enroll(context.Background(), dir, c.url, "token", fp, Who{Class: "scanner"}, strings.Join(wgKey, ""), c.endpoint())
}

func TestEnrolThenSyncAndReportOverMutualTLS(t *testing.T) {
	c := newControl(t)
	dir := t.TempDir()
	rec, err := c.enrolIn(dir, c.fp)
	if err != nil {
		t.Fatal(err)
	}
	if rec.DeviceID != "dev-1" || rec.Class != "scanner" || rec.Fingerprint != c.fp || rec.Endpoint != c.endpoint() {
		t.Fatalf("record %+v", rec)
	}
	for _, f := range []string{IdentityFile, CertFile, RecordFile} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v, %v; want it written 0600", f, fi, err)
		}
	}
	loaded, err := Load(dir)
	if err != nil || loaded.DeviceID != rec.DeviceID || loaded.Endpoint != rec.Endpoint || string(loaded.CA) != string(rec.CA) {
		t.Fatalf("Load = %+v, %v; want what Enroll returned", loaded, err)
	}
	client, err := New(dir, loaded)
	if err != nil {
		t.Fatal(err)
	}
	connected := false
	resp, err := client.Sync(context.Background(), controlapi.SyncRequest{State: controlapi.DeviceState{Why: "echo"}}, func() { connected = true })
	if err != nil || !connected || len(resp.Commands) != 1 || string(resp.Commands[0]) != "echo" {
		t.Fatalf("Sync = %+v, %v (connected %v)", resp, err, connected)
	}
	if c.peer == nil {
		t.Fatal("the sync came with no client certificate")
	}
	if len(c.peer.URIs) == 0 || c.peer.URIs[0].String() != controlapi.DeviceURIPrefix+"dev-1" {
		t.Fatalf("the sync came with a certificate for %v, want the enrolled device's", c.peer.URIs)
	}
	rr, err := client.Report(context.Background(), controlapi.ReportRequest{Events: []controlapi.Event{{Seq: 7, Kind: "inventory"}}})
	if err != nil || rr.Acked != 7 {
		t.Fatalf("Report = %+v, %v", rr, err)
	}
	if _, err := client.Report(context.Background(), controlapi.ReportRequest{}); err == nil || !strings.Contains(err.Error(), "no events") {
		t.Fatalf("a refused report: %v, want the server's reason", err)
	}
}

const testWGKey = "5p2fPOTJKkll/Ed47AnOR2v5sJGQzt1u2YTxkfOVjzQ="

// rebind issues the certificate der again, for the same key, with the
// device and class (scanner) URIs and extra as its URI SANs.
func (c *control) rebind(der []byte, extra ...string) []byte {
	return c.reissue(der, append([]string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI("scanner")}, extra...)...)
}

// reissue issues the certificate der again, for the same key, with uris
// as its URI SANs.
func (c *control) reissue(der []byte, uris ...string) []byte {
	c.t.Helper()
	orig, err := x509.ParseCertificate(der)
	if err != nil {
		c.t.Fatal(err)
	}
	out, err := c.ca.ClientCert(orig.PublicKey, "dev-1", uris)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// A device enrolled with its tunnel key gets a certificate binding that
// key and the address control assigned, and keeps the address.
func TestEnrolmentBindsTheTunnel(t *testing.T) {
	c := newControl(t)
	c.addr = netip.MustParseAddr("100.80.0.7")
	rec, err := c.enrolIn(t.TempDir(), c.fp, testWGKey)
	if err != nil {
		t.Fatal(err)
	}
	if rec.TunnelAddress != c.addr {
		t.Fatalf("recorded tunnel address %v, want %v", rec.TunnelAddress, c.addr)
	}
}

func TestEnrolmentRefusesWhatItCannotTrust(t *testing.T) {
	other, _, err := pki.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		fp     func(*control) string
		answer func(*control, *controlapi.EnrollResponse)
		wgKey  string
		want   string
	}{
		{name: "another CA pinned", fp: func(*control) string { return controlapi.Fingerprint(other.Cert) }, want: "not the pinned"},
		{name: "a certificate for another key", answer: func(_ *control, r *controlapi.EnrollResponse) {
			pub, _, _ := ed25519.GenerateKey(rand.Reader)
			r.Certificate, _ = other.ClientCert(pub, "dev-1", []string{controlapi.DeviceURIPrefix + "dev-1"})
		}, want: "not for this device's identity key"},
		{name: "a CA other than the pinned one", answer: func(_ *control, r *controlapi.EnrollResponse) { r.CA = other.Cert.Raw }, want: "differs from the one the connection was pinned to"},
		{name: "no command key", answer: func(_ *control, r *controlapi.EnrollResponse) { r.CommandKey = nil }, want: "no command key"},
		{name: "another class", answer: func(_ *control, r *controlapi.EnrollResponse) { r.Class = "gateway" }, want: `enrolled as class "gateway"`},
		{name: "a short ops key", answer: func(_ *control, r *controlapi.EnrollResponse) { r.OpsKeys = [][]byte{{1, 2, 3}} }, want: "not an Ed25519 public key"},
		// Gateways admit a device by what its certificate binds: it must
		// bind exactly the key the device sent and the address assigned.
		{name: "an address the certificate does not bind", answer: func(_ *control, r *controlapi.EnrollResponse) {
			r.TunnelAddress = netip.MustParseAddr("100.80.0.1")
		}, want: "the certificate binds tunnel address none, the answer assigns 100.80.0.1"},
		{name: "a WireGuard key the device did not send", answer: func(c *control, r *controlapi.EnrollResponse) {
			r.Certificate = c.rebind(r.Certificate, controlapi.TunnelBinding{Key: policy.Key{1}}.URI())
		}, want: "binds a WireGuard key the device did not send"},
		{name: "another WireGuard key", wgKey: testWGKey, answer: func(c *control, r *controlapi.EnrollResponse) {
			r.Certificate = c.rebind(r.Certificate, controlapi.TunnelBinding{Key: policy.Key{1}}.URI())
		}, want: "does not bind this device's WireGuard key"},
		{name: "no WireGuard key", wgKey: testWGKey, answer: func(c *control, r *controlapi.EnrollResponse) {
			r.Certificate = c.rebind(r.Certificate)
		}, want: "does not bind this device's WireGuard key"},
		{name: "a certificate binding another class", answer: func(c *control, r *controlapi.EnrollResponse) {
			r.Certificate = c.reissue(r.Certificate, controlapi.DeviceURIPrefix+"dev-1", controlapi.ClassURI("gateway"))
		}, want: `the certificate binds class "gateway", the device is enrolled as "scanner"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newControl(t)
			c.answer = tc.answer
			fp := c.fp
			if tc.fp != nil {
				fp = tc.fp(c)
			}
			dir := t.TempDir()
			_, err := c.enrolIn(dir, fp, tc.wgKey)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Enroll: %v, want %q", err, tc.want)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Fatalf("a refused enrolment left %v behind", entries)
			}
			if _, err := Load(dir); err != ErrNotEnrolled {
				t.Fatalf("Load after a refused enrolment: %v, want ErrNotEnrolled", err)
			}
		})
	}
}

func TestProbeSaysWhichCheckFailed(t *testing.T) {
	c := newControl(t)
	if _, err := Probe(context.Background(), c.url, c.fp); err != nil {
		t.Fatalf("Probe of the pinned server: %v", err)
	}
	other, _, _ := pki.LoadOrCreate(t.TempDir())
	if _, err := Probe(context.Background(), c.url, controlapi.Fingerprint(other.Cert)); err == nil || !strings.Contains(err.Error(), "not the pinned") {
		t.Fatalf("Probe with another CA pinned: %v", err)
	}
	c.srv.Close()
	if _, err := Probe(context.Background(), c.url, c.fp); err == nil || !strings.Contains(err.Error(), "cannot reach the control server") {
		t.Fatalf("Probe of a stopped server: %v", err)
	}
	if _, err := Probe(context.Background(), c.url, "md5:00"); err == nil || !strings.Contains(err.Error(), "must start with SHA256:") {
		t.Fatalf("Probe with a malformed fingerprint: %v", err)
	}
}

func TestEndpoint(t *testing.T) {
	for raw, want := range map[string]string{
		"https://10.99.0.1:8443": "10.99.0.1:8443",
		"https://10.99.0.1":      "10.99.0.1:443",
		"https://[fd00::1]:8443": "[fd00::1]:8443",
		"https://localhost:9":    "", // resolved; either loopback
		"http://10.99.0.1:8443":  "error",
		"10.99.0.1:8443":         "error",
		"https://10.99.0.1:x":    "error",
	} {
		ep, err := Endpoint(context.Background(), raw)
		switch {
		case want == "error":
			if err == nil {
				t.Errorf("Endpoint(%q) = %v, want an error", raw, ep)
			}
		case err != nil:
			t.Errorf("Endpoint(%q): %v", raw, err)
		case want == "":
			if !ep.Addr().IsLoopback() || ep.Port() != 9 {
				t.Errorf("Endpoint(%q) = %v, want loopback port 9", raw, ep)
			}
		case ep.String() != want:
			t.Errorf("Endpoint(%q) = %v, want %s", raw, ep, want)
		}
	}
}

func TestNewRefusesAStoredCAThatIsNotThePinnedOne(t *testing.T) {
	c := newControl(t)
	dir := t.TempDir()
	rec, err := c.enrolIn(dir, c.fp)
	if err != nil {
		t.Fatal(err)
	}
	other, _, _ := pki.LoadOrCreate(t.TempDir())
	rec.CA = other.Cert.Raw
	if _, err := New(dir, rec); err == nil || !strings.Contains(err.Error(), "does not match the pinned fingerprint") {
		t.Fatalf("New with a swapped CA: %v", err)
	}
}

// A certificate control sends after the tunnel key changed replaces the
// device's only when it is the pinned CA's, for this device and identity
// key, and binds exactly the new key and the assigned address; it is then
// written and presented from the next request on. One refused leaves the
// old one in use and on disk.
func TestRenewTakesOnlyABindingCertificate(t *testing.T) {
	c := newControl(t)
	c.addr = netip.MustParseAddr("100.80.0.7")
	dir := t.TempDir()
	rec, err := c.enrolIn(dir, c.fp, testWGKey)
	if err != nil {
		t.Fatal(err)
	}
	client, err := New(dir, rec)
	if err != nil {
		t.Fatal(err)
	}
	identity := func() crypto.PublicKey {
		leaf, err := x509.ParseCertificate(client.cert.Load().Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		return leaf.PublicKey
	}()
	other, _, err := pki.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	newKey := policy.Key{2}
	device, bindNew, class := controlapi.DeviceURIPrefix+"dev-1", controlapi.TunnelBinding{Key: newKey}.URI(), controlapi.ClassURI("scanner")
	stranger, _, _ := ed25519.GenerateKey(rand.Reader)
	issue := func(ca *pki.CA, pub crypto.PublicKey, uris []string, ips ...netip.Addr) []byte {
		der, err := ca.ClientCert(pub, "dev", uris, ips...)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	before, _ := os.ReadFile(filepath.Join(dir, CertFile))
	for _, tc := range []struct {
		name string
		der  []byte
		want string
	}{
		{"another identity key", issue(c.ca, stranger, []string{device, class, bindNew}, c.addr), "not for this device's identity key"},
		{"another CA", issue(other, identity, []string{device, class, bindNew}, c.addr), "unknown authority"},
		{"another device", issue(c.ca, identity, []string{controlapi.DeviceURIPrefix + "dev-2", class, bindNew}, c.addr), "not for device dev-1"},
		{"the old key", issue(c.ca, identity, []string{device, class, controlapi.TunnelBinding{Key: policy.Key{9}}.URI()}, c.addr), "does not bind this device's WireGuard key"},
		{"another address", issue(c.ca, identity, []string{device, class, bindNew}, netip.MustParseAddr("100.80.0.8")), "binds tunnel address 100.80.0.8"},
		{"another class", issue(c.ca, identity, []string{device, controlapi.ClassURI("gateway"), bindNew}, c.addr), `binds class "gateway"`},
	} {
		if err := client.Renew(tc.der, newKey.String()); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Renew = %v, want %q", tc.name, err, tc.want)
		}
	}
	if after, _ := os.ReadFile(filepath.Join(dir, CertFile)); string(after) != string(before) {
		t.Fatal("a refused certificate was written")
	}
	good := issue(c.ca, identity, []string{device, class, bindNew}, c.addr)
	if err := client.Renew(good, newKey.String()); err != nil {
		t.Fatalf("Renew of a certificate binding the new key: %v", err)
	}
	if _, err := client.Sync(context.Background(), controlapi.SyncRequest{}, func() {}); err != nil {
		t.Fatal(err)
	}
	if c.peer == nil || string(c.peer.Raw) != string(good) {
		t.Fatal("the next sync did not present the renewed certificate")
	}
	if again, err := New(dir, rec); err != nil || string(again.cert.Load().Certificate[0]) != string(good) {
		t.Fatalf("after a restart the device presents another certificate (%v)", err)
	}
}
