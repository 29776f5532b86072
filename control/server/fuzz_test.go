package server

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

// harness is a server in a temporary directory with one enrolled device,
// called in-process: requests carry the device's verified certificate as
// TLS would.
type harness struct {
	s      *Server
	h      http.Handler
	device *x509.Certificate
}

func newHarness(t testing.TB) *harness {
	t.Helper()
	s, _, err := Open(Config{DataDir: t.TempDir(), KeepAlive: time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	h := &harness{s: s, h: s.Handler()}
	tok, err := s.db.NewToken("scanner", "", nil, time.Hour, time.Now(), "test")
	if err != nil {
		t.Fatal(err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "fuzz"}}, priv)
	body, _ := json.Marshal(controlapi.EnrollRequest{Token: tok.Token, Class: "scanner", CSR: csr})
	w := h.do(controlapi.PathEnroll, body, nil)
	var resp controlapi.EnrollResponse
	if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &resp) != nil {
		t.Fatalf("enrol: %d %s", w.Code, w.Body)
	}
	if h.device, err = x509.ParseCertificate(resp.Certificate); err != nil {
		t.Fatal(err)
	}
	return h
}

// do posts body to path, as the holder of cert (nil: no certificate).
func (h *harness) do(path string, body []byte, cert *x509.Certificate) *httptest.ResponseRecorder {
	return h.send(http.MethodPost, path, body, cert)
}

// send makes a request of the server as TLS would hand it over.
func (h *harness) send(method, path string, body []byte, cert *x509.Certificate) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, bytes.NewReader(body))
	r.RemoteAddr = "192.0.2.7:40000"
	r.TLS = &tls.ConnectionState{}
	if cert != nil {
		r.TLS.VerifiedChains = [][]*x509.Certificate{{cert}}
	}
	w := httptest.NewRecorder()
	h.h.ServeHTTP(w, r)
	return w
}

// answers reports whether the server answered with a status and JSON, as
// every handler must whatever it is sent.
func answers(t *testing.T, w *httptest.ResponseRecorder, codes ...int) {
	t.Helper()
	for _, c := range codes {
		if w.Code == c {
			if w.Body.Len() > 0 && !jsontext.Value(w.Body.Bytes()).IsValid() {
				t.Fatalf("status %d with a body that is not JSON: %q", w.Code, w.Body)
			}
			return
		}
	}
	t.Fatalf("status %d (%s), want one of %v", w.Code, w.Body, codes)
}

// FuzzEnrollRequest: whatever an unauthenticated caller sends to enrol is
// refused with a reason (never a panic, never a 500), and enrols nothing.
func FuzzEnrollRequest(f *testing.F) {
	f.Add([]byte(`{"token":"bht_0000000000000000000000000000000000000000","csr":"AA=="}`))
	f.Add([]byte(`{"token":"x","hostname":"\u001b[2J","csr":""}`))
	f.Add([]byte(`{}`))
	h := newHarness(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		w := h.do(controlapi.PathEnroll, body, nil)
		answers(t, w, http.StatusBadRequest, http.StatusForbidden, http.StatusTooManyRequests)
		h.s.refused = newRefusals(h.s.now) // every input judged afresh
	})
}

// FuzzSyncRequest: whatever an enrolled device sends to sync is answered
// or refused, and what it says of itself is stored within bounds.
func FuzzSyncRequest(f *testing.F) {
	f.Add([]byte(`{"policy_version":0,"wait_seconds":0,"state":{"mode":"normal","why":"x","orders":{"mode":"order-00000001"}}}`))
	f.Add([]byte(`{"state":{"revoked_partners":{"a":"b"}},"refused":["x"]}`))
	h := newHarness(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		answers(t, h.do(controlapi.PathSync, body, h.device), http.StatusOK, http.StatusBadRequest)
		dev, err := h.s.db.Device(deviceID(h.device))
		if err != nil {
			t.Fatal(err)
		}
		if len(dev.State.Why) > 1<<10+16 || len(dev.State.Revoked) > 64 {
			t.Fatalf("stored state out of bounds: why %d bytes, %d revoked", len(dev.State.Why), len(dev.State.Revoked))
		}
	})
}

// FuzzReportRequest: whatever an enrolled device reports is taken or
// refused, and adds at most its share of observed flows.
func FuzzReportRequest(f *testing.F) {
	f.Add([]byte(`{"events":[{"seq":1,"time":"2026-11-29T00:00:00Z","kind":"flows-observed","detail":"[{\"segment\":\"wms\",\"protocol\":\"tcp\",\"address\":\"10.0.0.1\",\"port\":443,\"count\":1}]"}]}`))
	f.Add([]byte(`{"events":[{"seq":18446744073709551615,"kind":"x","detail":""}],"dropped":5}`))
	h := newHarness(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		answers(t, h.do(controlapi.PathReport, body, h.device), http.StatusOK, http.StatusBadRequest)
		dev, err := h.s.db.Device(deviceID(h.device))
		if err != nil {
			t.Fatal(err)
		}
		if dev.FlowsAdded > store.FlowsPerDevice {
			t.Fatalf("a device added %d flows", dev.FlowsAdded)
		}
	})
}

// deviceID is the device id a certificate names.
func deviceID(c *x509.Certificate) string {
	for _, u := range c.URIs {
		if id, ok := strings.CutPrefix(u.String(), controlapi.DeviceURIPrefix); ok {
			return id
		}
	}
	return ""
}
