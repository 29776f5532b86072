package server_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/lab"
)

// The binaries the tests build (lab.Binary) are removed when they end.
func TestMain(m *testing.M) { lab.Main(m) }

var ctlAddr = netip.MustParseAddrPort("127.0.0.1:8443")

// post sends body to path and returns the status and answer.
func post(t *testing.T, c *http.Client, url string, body any) (int, string) {
	t.Helper()
	raw, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Post(url, "application/json", bytes.NewReader(raw))
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

func rss(t *testing.T, pid int) float64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// A caller with no certificate gets bounded work. A flood of refused
// enrolments, each carrying a 1 MiB hostname, grew control.db from 16 to
// 91 MB in 75 requests (one audit row each, hostname included) until the
// audit could no longer be read; now the body is capped, the address is
// answered 429 once its failures are spent, and the refusals become one
// audit row a minute. 400 TLS connections that sent part of a body and
// stalled took the server from 191 to 740 MB and all stayed open; now a
// connection without a certificate is counted against its address and
// refused over 16, and a stalled request is cut off. Devices and
// operators are served throughout.
func TestUnauthenticatedCallersGetBoundedWork(t *testing.T) {
	lab.RequirePrivileged(t)
	ns := lab.NewNS(t, "ctl")
	ctl := lab.StartControl(t, ns, ctlAddr, 0)
	db := filepath.Join(ctl.Data, server.DBFile)
	before, err := os.Stat(db)
	if err != nil {
		t.Fatal(err)
	}
	anon := ctl.HTTPClient(t, nil)
	huge := strings.Repeat("x", 1<<20)
	statuses := map[int]int{}
	for i := range 75 {
		req := controlapi.EnrollRequest{Token: "bht_" + strings.Repeat("0", 40), Hostname: huge, CSR: []byte{1}}
		if i%2 == 1 {
			req.Hostname = "scanner-17" // small and well formed: refused on its token
		}
		code, _ := post(t, anon, ctl.URL+controlapi.PathEnroll, req)
		statuses[code]++
	}
	if statuses[http.StatusTooManyRequests] == 0 || statuses[http.StatusOK] != 0 {
		t.Errorf("answers to 75 refused enrolments: %v, want refusals and then 429", statuses)
	}
	after, err := os.Stat(db)
	if err != nil {
		t.Fatal(err)
	}
	if grew := after.Size() - before.Size(); grew > 256<<10 {
		t.Errorf("control.db grew by %d bytes from 75 refused enrolments", grew)
	}
	if audit := ctl.MustCLI(t, "audit"); strings.Contains(audit, "enrolment-refused") {
		t.Errorf("refused enrolments were audited one by one:\n%s", audit)
	}

	// Stalled connections without a certificate, from one address.
	idle := rss(t, ctl.Pid())
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	caPool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(filepath.Join(ctl.Data, pki.CertFile))
	caPool.AppendCertsFromPEM(caPEM)
	admitted := 0
	for range 400 {
		raw, err := ns.DialContext(context.Background(), "tcp", ctlAddr.String())
		if err != nil {
			t.Fatal(err)
		}
		c := tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: caPool, ServerName: ctlAddr.Addr().String()})
		held = append(held, c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := c.Handshake(); err != nil {
			continue
		}
		// Part of a request that promises a megabyte, then nothing.
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", controlapi.PathEnroll, 1<<20)
		// TLS 1.3 reports a refused certificate check after the
		// handshake: a connection the server turned away reads EOF.
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && strings.Contains(err.Error(), "timeout") {
			admitted++
		}
	}
	if admitted > 16 {
		t.Errorf("%d of 400 connections without a certificate from one address held open, want at most 16", admitted)
	}
	if grew := rss(t, ctl.Pid()) - idle; grew > 64 {
		t.Errorf("the server grew by %.0f MiB under 400 stalled connections", grew)
	}
	start := time.Now()
	if out, err := ctl.CLI("devices"); err != nil {
		t.Errorf("an operator is not served during the flood: %v %s", err, out)
	}
	t.Logf("answers %v; %d of 400 stalled connections admitted; an operator's call took %s", statuses, admitted, time.Since(start))

	// The minute's refusals are one audit row (written at the latest
	// when the server stops).
	ctl.Restart(t)
	rows := 0
	for _, line := range strings.Split(ctl.MustCLI(t, "audit"), "\n") {
		if strings.Contains(line, "enrolment-refused") {
			rows++
		}
	}
	if rows != 1 {
		t.Errorf("%d enrolment-refused rows in the audit, want one summary", rows)
	}
}

// enrolRogue enrols a device as its own code would, with a real token,
// and returns a client carrying its certificate: a device under an
// attacker's control, saying whatever it likes.
func enrolRogue(t *testing.T, ctl *lab.Control, class string) *http.Client {
	t.Helper()
	token := strings.Fields(ctl.MustCLI(t, "token", "create", "--class", class))[0]
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "rogue"}}, priv)
	if err != nil {
		t.Fatal(err)
	}
	code, body := post(t, ctl.HTTPClient(t, nil), ctl.URL+controlapi.PathEnroll, controlapi.EnrollRequest{Token: token, Class: class, Hostname: "rogue", CSR: csr})
	if code != http.StatusOK {
		t.Fatalf("enrol: %d %s", code, body)
	}
	var resp controlapi.EnrollResponse
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{resp.Certificate}, PrivateKey: priv}
	return ctl.HTTPClient(t, &cert)
}

// A device's reason for its mode, printed by `bulkhead-control devices`,
// cannot drive the operator's terminal or forge a row of the table: it
// did (an escape sequence cleared the screen, and a newline added a row
// of the attacker's choosing).
func TestDeviceTextCannotDriveTheTerminal(t *testing.T) {
	lab.RequirePrivileged(t)
	ns := lab.NewNS(t, "ctl")
	ctl := lab.StartControl(t, ns, ctlAddr, 0)
	rogue := enrolRogue(t, ctl, "scanner")
	why := "fine\x1b[2J\x1b]0;owned\x07\r\ndev-000000  scanner  normal  v9  just now  all clear"
	code, body := post(t, rogue, ctl.URL+controlapi.PathSync, controlapi.SyncRequest{State: controlapi.DeviceState{Why: why}})
	if code != http.StatusOK {
		t.Fatalf("sync: %d %s", code, body)
	}
	out := ctl.MustCLI(t, "devices")
	if strings.ContainsAny(out, "\x1b\x07\r") {
		t.Errorf("devices prints control characters a device sent:\n%q", out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "dev-000000") {
			t.Errorf("a device forged a row of the table:\n%s", out)
		}
	}
}
