package server_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/control/server"
	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
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

// The gate holds back floods, not fleets: devices enrolling from one
// address (a depot behind NAT, a staging bench), each with its own
// client that would keep its connection alive, are all served. The 17th
// was refused ("bad certificate") while the first sixteen's idle
// connections held the address's places for minutes.
func TestEnrolmentsDoNotHoldTheGate(t *testing.T) {
	lab.RequirePrivileged(t)
	ns := lab.NewNS(t, "ctl")
	ctl := lab.StartControl(t, ns, ctlAddr, 0)
	const n = 24
	tokens := strings.Fields(ctl.MustCLI(t, "token", "create", "--allow-unknown-class", "--class", "scanner", "--count", fmt.Sprint(n)))[:n]
	for i, token := range tokens {
		c := ctl.HTTPClient(t, nil)
		c.Transport.(*http.Transport).DisableKeepAlives = false // as a browser or a library default would
		t.Cleanup(c.CloseIdleConnections)
		_, priv, _ := ed25519.GenerateKey(rand.Reader)
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "bench"}}, priv)
		if err != nil {
			t.Fatal(err)
		}
		req := controlapi.EnrollRequest{Token: token, Class: "scanner", Hostname: fmt.Sprintf("scanner-%d", i), CSR: csr}
		if code, body := post(t, c, ctl.URL+controlapi.PathEnroll, req); code != http.StatusOK {
			t.Fatalf("enrolment %d of %d from one address: %d %s", i+1, n, code, body)
		}
	}
}

// enrolRogue enrols a device as its own code would, with a real token,
// and returns a client carrying its certificate: a device under an
// attacker's control, saying whatever it likes.
func enrolRogue(t *testing.T, ctl *lab.Control, class string) *http.Client {
	t.Helper()
	token := strings.Fields(ctl.MustCLI(t, "token", "create", "--allow-unknown-class", "--class", class))[0]
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

// opsKeys makes n ops keys with the real CLI and returns their key files
// and public files.
func opsKeys(t *testing.T, ctlBin string, n int) (keys, pubs []string) {
	t.Helper()
	for i := range n {
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("ops%d", i))
		if out, err := exec.Command(ctlBin, "keygen", "--out", dir).CombinedOutput(); err != nil {
			t.Fatalf("keygen: %v %s", err, out)
		}
		keys, pubs = append(keys, filepath.Join(dir, opskey.PrivateFile)), append(pubs, filepath.Join(dir, opskey.PublicFile))
	}
	return keys, pubs
}

// sign signs the example policy as version v with keys, by the real CLI.
func sign(t *testing.T, ctlBin string, v uint64, keys ...string) string {
	t.Helper()
	doc := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(doc, examples.Site(), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), fmt.Sprintf("v%d.dsse", v))
	args := []string{"policy", "sign", "--in", doc, "--version", fmt.Sprint(v), "--valid-for", "1h", "--target", "scanner", "--out", out}
	for _, k := range keys {
		args = append(args, "--key", k)
	}
	if o, err := exec.Command(ctlBin, args...).CombinedOutput(); err != nil {
		t.Fatalf("policy sign: %v %s", err, o)
	}
	return out
}

// Control stores only what devices take. A bundle signed by a key it does
// not publish, one under the ops threshold, an expired one, and a
// rotation the new keys did not sign were accepted with exit 0 (a device
// refused each, and a forged version burned its number for good); each is
// now refused with the reason, and the version stays free. A bundle
// stored before the server checked (forged, at a higher version) is no
// longer offered, and ops can withdraw a pushed bundle.
func TestControlStoresOnlyWhatDevicesTake(t *testing.T) {
	lab.RequirePrivileged(t)
	bin := lab.Binary(t, "cmd/bulkhead-control")
	keys, pubs := opsKeys(t, bin, 3) // two ops keys, threshold 2; one attacker's
	ns := lab.NewNS(t, "ctl")
	ctl := lab.StartControlWith(t, ns, ctlAddr, lab.ControlOptions{OpsPub: pubs[:2], Args: []string{"--ops-threshold", "2"}})
	refused := func(what, file, want string) {
		t.Helper()
		out, err := ctl.CLI("policy", "push", file)
		if err == nil || !strings.Contains(out, want) {
			t.Errorf("%s: push %v: %s; want refused with %q", what, err, out, want)
		}
	}
	refused("a bundle signed by a key control does not publish", sign(t, bin, 5, keys[2]), "not a trusted ops key")
	refused("a bundle with one of the two signatures required", sign(t, bin, 5, keys[0]), "not enough signatures")
	priv, err := opskey.LoadPrivate(keys[0])
	if err != nil {
		t.Fatal(err)
	}
	priv2, _ := opskey.LoadPrivate(keys[1])
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-48 * time.Hour).UTC().Truncate(time.Second)
	expired, err := bundle.Sign(bundle.Payload{Version: 5, IssuedAt: past, ExpiresAt: past.Add(time.Hour), Target: bundle.Target{Classes: []string{"scanner"}}, Policy: *doc}, priv, priv2)
	if err != nil {
		t.Fatal(err)
	}
	expiredFile := filepath.Join(t.TempDir(), "expired.dsse")
	os.WriteFile(expiredFile, expired, 0o600)
	refused("an expired bundle", expiredFile, "expired")
	newKeys, newPubs := opsKeys(t, bin, 1)
	rotation := filepath.Join(t.TempDir(), "rotation.dsse")
	// Signed by the current keys only: the new key never agreed.
	if out, err := exec.Command(bin, "roots", "sign", "--version", "2", "--pub", newPubs[0], "--threshold", "1",
		"--key", keys[0], "--key", keys[1], "--out", rotation).CombinedOutput(); err != nil {
		t.Logf("roots sign refused to make a rotation the new key does not sign (%v: %s); making it by hand", err, out)
		newKey, _ := opskey.LoadPrivate(newKeys[0])
		set := bundle.NewRootSet(2, mustRoots(t, 1, newKey))
		raw, err := bundle.SignRoots(set, priv, priv2)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(rotation, raw, 0o600)
	}
	refused("a rotation the new key did not sign", rotation, "not enough signatures")
	if out := ctl.MustCLI(t, "policy", "push", sign(t, bin, 5, keys[0], keys[1])); !strings.Contains(out, "pushed policy version 5") {
		t.Errorf("a valid v5 after the refusals: %s", out)
	}
	if audit := ctl.MustCLI(t, "audit"); strings.Count(audit, "policy-pushed") != 1 {
		t.Errorf("the audit shows refused pushes as pushed:\n%s", audit)
	}

	// A forged bundle already in the store (pushed before control
	// checked) at a higher version is not offered; the valid one is.
	ctl.Terminate()
	forged, err := bundle.Sign(bundle.Payload{Version: 9, IssuedAt: time.Now().UTC().Truncate(time.Second), ExpiresAt: time.Now().Add(time.Hour).UTC(),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: *doc}, mustKey(t, keys[2]))
	if err != nil {
		t.Fatal(err)
	}
	storeBundle(t, filepath.Join(ctl.Data, server.DBFile), 9, forged)
	ctl.Start(t)
	rogue := enrolRogue(t, ctl, "scanner")
	code, body := post(t, rogue, ctl.URL+controlapi.PathSync, controlapi.SyncRequest{})
	var resp controlapi.SyncResponse
	if code != http.StatusOK || json.Unmarshal([]byte(body), &resp) != nil {
		t.Fatalf("sync: %d %s", code, body)
	}
	if p, err := bundle.Peek(resp.Bundle); err != nil || p.Version != 5 {
		t.Errorf("offered %v (%v), want the valid v5, not the forged v9", p.Version, err)
	}
	if out, err := ctl.CLI("policy", "push", sign(t, bin, 9, keys[0], keys[1])); err == nil || !strings.Contains(out, "withdraw it first") {
		t.Errorf("a valid v9 over the stored forged one: %v %s", err, out)
	}
	ctl.MustCLI(t, "policy", "withdraw", "9", "--reason", "forged, pushed before control checked")
	ctl.MustCLI(t, "policy", "push", sign(t, bin, 9, keys[0], keys[1]))
	ctl.MustCLI(t, "policy", "withdraw", "9", "--reason", "pushed by mistake")
	code, body = post(t, rogue, ctl.URL+controlapi.PathSync, controlapi.SyncRequest{})
	resp = controlapi.SyncResponse{}
	json.Unmarshal([]byte(body), &resp)
	if p, err := bundle.Peek(resp.Bundle); err != nil || p.Version != 5 {
		t.Errorf("after withdrawing v9, offered %v (%v), want v5", p.Version, err)
	}
	if out, err := ctl.CLI("policy", "withdraw", "9", "--reason", "again"); err == nil || !strings.Contains(out, "no such policy bundle") {
		t.Errorf("withdrawing a withdrawn bundle: %v %s", err, out)
	}
	if audit := ctl.MustCLI(t, "audit"); strings.Count(audit, "policy-withdrawn") != 2 {
		t.Errorf("withdrawals not audited:\n%s", audit)
	}
}

func mustKey(t *testing.T, file string) ed25519.PrivateKey {
	t.Helper()
	k, err := opskey.LoadPrivate(file)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustRoots(t *testing.T, threshold int, keys ...ed25519.PrivateKey) opskey.Roots {
	t.Helper()
	var pubs []ed25519.PublicKey
	for _, k := range keys {
		pubs = append(pubs, k.Public().(ed25519.PublicKey))
	}
	r, err := opskey.NewRoots(threshold, pubs...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// storeBundle writes a bundle into a stopped server's store, as a server
// that did not check pushes would have stored it.
func storeBundle(t *testing.T, dbFile string, version uint64, raw []byte) {
	t.Helper()
	db, err := bolt.Open(dbFile, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("bundles")).Put(binary.BigEndian.AppendUint64(nil, version), raw)
	}); err != nil {
		t.Fatal(err)
	}
}

// report posts events as the device behind c.
func report(t *testing.T, c *http.Client, ctl *lab.Control, events ...controlapi.Event) {
	t.Helper()
	if code, body := post(t, c, ctl.URL+controlapi.PathReport, controlapi.ReportRequest{Events: events}); code != http.StatusOK {
		t.Fatalf("report: %d %s", code, body)
	}
}

func flowsEvent(t *testing.T, seq uint64, segment string, n int) controlapi.Event {
	t.Helper()
	now := time.Now().UTC()
	var flows []controlapi.ObservedFlow
	for i := range n {
		flows = append(flows, controlapi.ObservedFlow{Flow: controlapi.Flow{Segment: segment, Protocol: policy.TCP,
			Address: netip.AddrFrom4([4]byte{10, 30, byte(i >> 8), byte(i)}), Port: 443}, Count: 1, First: now, Last: now})
	}
	raw, err := json.Marshal(flows)
	if err != nil {
		t.Fatal(err)
	}
	return controlapi.Event{Seq: seq, Time: now, Kind: controlapi.EventFlows, Detail: string(raw)}
}

// observed is how many flows `policy suggest` reports for a class.
func observed(t *testing.T, ctl *lab.Control, class string) int {
	t.Helper()
	out, _ := ctl.CLI("policy", "suggest", "--class", class, writeExample(t))
	for _, line := range strings.Split(out, "\n") {
		var n int
		if _, err := fmt.Sscanf(line, "%d flows observed", &n); err == nil {
			return n
		}
	}
	return 0
}

// drafted reports whether `policy suggest` drafts a rule for scanners on
// segment (its "  + " lines).
func drafted(t *testing.T, ctl *lab.Control, segment string) bool {
	t.Helper()
	out, _ := ctl.CLI("policy", "suggest", "--class", "scanner", writeExample(t))
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "  + ") && strings.Contains(line, segment) {
			return true
		}
	}
	return false
}

func writeExample(t *testing.T) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(f, examples.Site(), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// Discovery takes only what a device's signed policy has it monitor. A
// device not in monitor mode posted flows to finance and `policy suggest`
// drafted a rule opening finance; two reports of 5,000 junk flows filled
// the class-wide cap of 10,000. Now flows count only on segments the
// device's bundle monitors, and each device adds at most 1,000.
func TestDiscoveryTakesOnlyMonitoredFlows(t *testing.T) {
	lab.RequirePrivileged(t)
	bin := lab.Binary(t, "cmd/bulkhead-control")
	keys, pubs := opsKeys(t, bin, 1)
	ns := lab.NewNS(t, "ctl")
	ctl := lab.StartControlWith(t, ns, ctlAddr, lab.ControlOptions{OpsPub: pubs})
	ctl.MustCLI(t, "policy", "push", sign(t, bin, 1, keys[0]))
	rogue := enrolRogue(t, ctl, "scanner")
	if code, body := post(t, rogue, ctl.URL+controlapi.PathSync, controlapi.SyncRequest{PolicyVersion: 1, State: controlapi.DeviceState{PolicyVersion: 1}}); code != http.StatusOK {
		t.Fatalf("sync: %d %s", code, body)
	}
	report(t, rogue, ctl, flowsEvent(t, 1, "finance", 3))
	if n := observed(t, ctl, "scanner"); n != 0 {
		t.Errorf("a device not in monitor mode added %d flows to discovery", n)
	}
	if drafted(t, ctl, "finance") {
		t.Error("suggest drafted a rule opening finance from an unmonitored device")
	}

	// v2 monitors wms for scanners: flows there count, finance's do not,
	// and one device adds at most 1,000.
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	c := doc.Classes["scanner"]
	c.Monitor = &policy.Monitor{Until: time.Now().Add(time.Hour).UTC().Truncate(time.Second), Segments: []string{"wms"}}
	doc.Classes["scanner"] = c
	now := time.Now().UTC().Truncate(time.Second)
	raw, err := bundle.Sign(bundle.Payload{Version: 2, IssuedAt: now, ExpiresAt: now.Add(time.Hour), Target: bundle.Target{Classes: []string{"scanner"}}, Policy: *doc}, mustKey(t, keys[0]))
	if err != nil {
		t.Fatal(err)
	}
	v2 := filepath.Join(t.TempDir(), "v2.dsse")
	os.WriteFile(v2, raw, 0o600)
	ctl.MustCLI(t, "policy", "push", v2)
	post(t, rogue, ctl.URL+controlapi.PathSync, controlapi.SyncRequest{PolicyVersion: 2, State: controlapi.DeviceState{PolicyVersion: 2}})
	report(t, rogue, ctl, flowsEvent(t, 2, "finance", 3), flowsEvent(t, 3, "wms", 5000))
	report(t, rogue, ctl, flowsEvent(t, 4, "wms", 5000))
	if n := observed(t, ctl, "scanner"); n != 1000 {
		t.Errorf("a monitored device flooding wms added %d flows, want its share of 1000", n)
	}
	if drafted(t, ctl, "finance") {
		t.Error("suggest drafted a rule opening finance, which the monitor does not cover")
	}
}
