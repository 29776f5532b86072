// Package controlclient is the device's end of the control channel:
// enrolment against a pinned CA fingerprint, and the mutually
// authenticated TLS 1.3 client for sync and reports. It keeps the
// enrolment record on disk; deciding what to do with what arrives is the
// agent's job.
package controlclient

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/internal/atomicfile"
)

// Files in the state directory.
const (
	RecordFile   = "enrolment.json"
	IdentityFile = "identity.key"
	CertFile     = "device.crt"
)

// Record is what enrolment leaves on the device.
type Record struct {
	URL         string `json:"url"`
	Fingerprint string `json:"ca_fingerprint"`
	DeviceID    string `json:"device_id"`
	Class       string `json:"class"`
	// Endpoint is the address and port the URL resolved to at enrolment;
	// the agent's table keeps it open in every mode.
	Endpoint   netip.AddrPort `json:"endpoint"`
	CA         []byte         `json:"ca"`
	CommandKey []byte         `json:"command_key"`
	// OpsKeys and OpsThreshold are the ops trust root the server
	// published at enrolment (raw Ed25519 keys), for the installer to pin
	// in the configuration. The agent never trusts them from here.
	OpsKeys      [][]byte `json:"ops_keys,omitzero"`
	OpsThreshold int      `json:"ops_threshold,omitzero"`
	// TunnelAddress is the tunnel address control assigned, bound in the
	// certificate with the WireGuard key (none: the server has no pool).
	TunnelAddress netip.Addr `json:"tunnel_address,omitzero"`
	// TunnelPool is the pool the address came from.
	TunnelPool netip.Prefix `json:"tunnel_pool,omitzero"`
	// Role is controlapi.RoleGateway for a segment gateway, and Segments
	// the segments it fronts (the token's; "" is a device).
	Role     string   `json:"role,omitzero"`
	Segments []string `json:"segments,omitzero"`
}

// Gateway reports whether the record enrolled a segment gateway.
func (r *Record) Gateway() bool { return r != nil && r.Role == controlapi.RoleGateway }

// ErrNotEnrolled is returned by Load on a device that never enrolled.
var ErrNotEnrolled = errors.New("not enrolled")

// Endpoint resolves a control URL to the address and port the agent must
// keep open. Only literal addresses and names that resolve locally
// (/etc/hosts) work before there is any policy: DNS may be closed.
func Endpoint(ctx context.Context, raw string) (netip.AddrPort, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return netip.AddrPort{}, fmt.Errorf("control URL %q must look like https://HOST[:PORT]", raw)
	}
	port := 443
	if p := u.Port(); p != "" {
		if port, err = strconv.Atoi(p); err != nil {
			return netip.AddrPort{}, fmt.Errorf("control URL %q: bad port", raw)
		}
	}
	if a, err := netip.ParseAddr(u.Hostname()); err == nil {
		return netip.AddrPortFrom(a.Unmap(), uint16(port)), nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", u.Hostname())
	if err != nil || len(addrs) == 0 {
		return netip.AddrPort{}, fmt.Errorf("control URL %q: cannot resolve %s: %v", raw, u.Hostname(), err)
	}
	return netip.AddrPortFrom(addrs[0].Unmap(), uint16(port)), nil
}

// Who is what enrols: a device of Class, or (Segments set) a segment
// gateway fronting Segments. Control refuses a token made for anything
// else before it changes anything.
type Who struct {
	Class    string
	Segments []string
}

// Enroll presents token to the server at rawURL, trusting it only if its
// CA has the pinned fingerprint, and writes the identity key, the issued
// certificate and the record into dir. Nothing is written on failure.
func Enroll(ctx context.Context, dir, rawURL, token, fingerprint string, who Who, wgKey string, endpoint netip.AddrPort) (*Record, error) {
	class := who.Class
	fp, err := controlapi.ParseFingerprint(fingerprint)
	if err != nil {
		return nil, err
	}
	_, identity, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: host}}, identity)
	if err != nil {
		return nil, err
	}
	var seenCA *x509.Certificate
	tlsCfg := pinnedTLS(fp, &seenCA)
	c := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg, DialContext: dialTo(endpoint), DisableKeepAlives: true}} // one request
	var resp controlapi.EnrollResponse
	err = post(ctx, c, rawURL+controlapi.PathEnroll, controlapi.EnrollRequest{Token: token, Class: class, Hostname: host, CSR: csr, WireGuardKey: wgKey, Segments: who.Segments}, &resp, nil)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(resp.Certificate)
	if err != nil {
		return nil, fmt.Errorf("enrolment answer: certificate: %w", err)
	}
	if pub, ok := cert.PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(identity.Public()) {
		return nil, errors.New("enrolment answer: the certificate is not for this device's identity key")
	}
	if !bytes.Equal(resp.CA, seenCA.Raw) {
		return nil, errors.New("enrolment answer: the CA sent differs from the one the connection was pinned to")
	}
	if len(resp.CommandKey) != ed25519.PublicKeySize {
		return nil, errors.New("enrolment answer: no command key")
	}
	if resp.Class == "" || class != "" && resp.Class != class {
		return nil, fmt.Errorf("enrolment answer: enrolled as class %q, not %q", resp.Class, class)
	}
	for _, k := range resp.OpsKeys {
		if len(k) != ed25519.PublicKeySize {
			return nil, errors.New("enrolment answer: an ops key is not an Ed25519 public key")
		}
	}
	if err := checkBinding(cert, wgKey, resp.TunnelAddress, resp.Class); err != nil {
		return nil, fmt.Errorf("enrolment answer: %w", err)
	}
	rec := &Record{URL: rawURL, Fingerprint: fp, DeviceID: resp.DeviceID, Class: resp.Class, Endpoint: endpoint, CA: resp.CA,
		CommandKey: resp.CommandKey, OpsKeys: resp.OpsKeys, OpsThreshold: resp.OpsThreshold, TunnelAddress: resp.TunnelAddress,
		TunnelPool: resp.TunnelPool, Role: resp.Role, Segments: resp.Segments}
	keyDER, err := x509.MarshalPKCS8PrivateKey(identity)
	if err != nil {
		return nil, err
	}
	recJSON, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	// The record last: it is what says "enrolled".
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{IdentityFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{CertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: resp.Certificate}), 0o600},
		{RecordFile, recJSON, 0o600},
	} {
		if err := atomicfile.Write(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return nil, err
		}
	}
	return rec, nil
}

// checkBinding checks that the certificate binds the tunnel key the
// device sent (if it sent one), the address control assigned (if it
// assigned one) and the class it was enrolled as, and nothing else:
// gateways will admit the device by what its certificate binds.
func checkBinding(cert *x509.Certificate, wgKey string, addr netip.Addr, class string) error {
	b, bound, err := controlapi.BindingOf(cert)
	if err != nil {
		return err
	}
	switch {
	case wgKey == "" && bound:
		return errors.New("the certificate binds a WireGuard key the device did not send")
	case wgKey != "" && (!bound || b.Key.String() != wgKey):
		return errors.New("the certificate does not bind this device's WireGuard key")
	case b.Address != addr:
		return fmt.Errorf("the certificate binds tunnel address %s, the answer assigns %s", orNone(b.Address), orNone(addr))
	case b.Class != class:
		return fmt.Errorf("the certificate binds class %q, the device is enrolled as %q", b.Class, class)
	}
	return nil
}

func orNone(a netip.Addr) string {
	if !a.IsValid() {
		return "none"
	}
	return a.String()
}

// pinnedTLS is the client side of an enrolment: TLS 1.3, and the chain
// checked against the CA pinned by fingerprint instead of the system
// roots, so an enrolment trusts exactly one CA. The CA found is stored in
// seen.
func pinnedTLS(fp string, seen **x509.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // VerifyConnection checks against the pinned CA
		VerifyConnection: func(cs tls.ConnectionState) error {
			ca, err := pinned(cs, fp)
			*seen = ca
			return err
		},
	}
}

// Probe checks, before anything is installed or sent, that the control
// server at rawURL answers and that its CA is the one pinned by
// fingerprint. It sends no request. Its errors say which of the two
// failed.
func Probe(ctx context.Context, rawURL, fingerprint string) (netip.AddrPort, error) {
	fp, err := controlapi.ParseFingerprint(fingerprint)
	if err != nil {
		return netip.AddrPort{}, err
	}
	ep, err := Endpoint(ctx, rawURL)
	if err != nil {
		return netip.AddrPort{}, err
	}
	u, _ := url.Parse(rawURL)
	var seen *x509.Certificate
	cfg := pinnedTLS(fp, &seen)
	cfg.ServerName = u.Hostname()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", ep.String())
	var op *net.OpError
	switch {
	case err == nil:
		return ep, conn.Close()
	case seen == nil && errors.As(err, &op) && op.Op == "dial", errors.Is(err, context.DeadlineExceeded):
		return ep, fmt.Errorf("cannot reach the control server %s at %s: %w (check the URL, this device's network, and that the server runs)", rawURL, ep, err)
	default:
		return ep, fmt.Errorf("control server %s: %w", rawURL, err)
	}
}

// pinned checks that the server's chain ends in a CA with fingerprint fp
// and that the leaf is valid for the name dialled under it.
func pinned(cs tls.ConnectionState, fp string) (*x509.Certificate, error) {
	certs := cs.PeerCertificates
	if len(certs) < 2 {
		return nil, errors.New("the control server sent no CA certificate; cannot check the pinned fingerprint")
	}
	ca := certs[len(certs)-1]
	if got := controlapi.Fingerprint(ca); got != fp {
		return nil, fmt.Errorf("control server's CA is %s, not the pinned %s: refusing to talk to it", got, fp)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, DNSName: cs.ServerName, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	if err != nil {
		return nil, fmt.Errorf("control server certificate: %w", err)
	}
	return ca, nil
}

// dialTo connects to the enrolment endpoint whatever the URL's name
// resolves to later, so the connection goes where the table is open.
//
// TCP keep-alive probes are off: the long-poll itself proves the
// connection every keep-alive period (a dead one times out within the
// wait plus slack), and probes every 15 s, Go's default, would more than
// double an idle device's bytes on a metered link.
func dialTo(ep netip.AddrPort) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{KeepAlive: -1}
	return func(ctx context.Context, network, _ string) (net.Conn, error) {
		return d.DialContext(ctx, network, ep.String())
	}
}

// dialAttempt bounds one connection attempt to one control endpoint, so
// a replica whose machine is gone costs this much before the next is
// tried, not the operating system's minutes.
const dialAttempt = 5 * time.Second

// endpoints is where the client reaches control: the endpoint enrolled
// with, then the others the table keeps open (the policy's control
// list). A connection tries them in turn, from the last that answered;
// the syncer's jittered backoff spaces out rounds that all fail. With
// tls set, an endpoint has answered only once its server proved itself
// under tls: one that accepts connections but fails the handshake (a
// replica whose certificate lacks the name devices use, or a stranger
// on its address) is passed over like one that is down, instead of
// holding the device for good.
type endpoints struct {
	mu   sync.Mutex
	list []netip.AddrPort
	good int // index of the last endpoint that answered
	tls  *tls.Config
}

// set makes first, then others, the endpoints tried; the one that
// answered last stays first in turn if it is still listed.
func (e *endpoints) set(first netip.AddrPort, others []netip.AddrPort) {
	list := []netip.AddrPort{first}
	for _, ep := range others {
		if ep.IsValid() && ep.Port() != 0 && !slices.Contains(list, ep) {
			list = append(list, ep)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	good := 0
	if len(e.list) > 0 {
		if i := slices.Index(list, e.list[e.good]); i >= 0 {
			good = i
		}
	}
	e.list, e.good = list, good
}

func (e *endpoints) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	e.mu.Lock()
	list, start := e.list, e.good
	e.mu.Unlock()
	d := net.Dialer{KeepAlive: -1, Timeout: dialAttempt}
	var errs []error
	for i := range list {
		n := (start + i) % len(list)
		conn, err := d.DialContext(ctx, network, list[n].String())
		if err == nil && e.tls != nil {
			conn, err = e.handshake(ctx, conn, addr)
			if err != nil {
				err = fmt.Errorf("control endpoint %s: %w", list[n], err)
			}
		}
		if err == nil {
			e.mu.Lock()
			if slices.Equal(e.list, list) {
				e.good = n
			}
			e.mu.Unlock()
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// handshake proves the server on conn under e.tls, for the name in addr
// (the control URL's host), within dialAttempt.
func (e *endpoints) handshake(ctx context.Context, conn net.Conn, addr string) (net.Conn, error) {
	cfg := e.tls.Clone()
	if host, _, err := net.SplitHostPort(addr); err == nil && cfg.ServerName == "" {
		cfg.ServerName = host
	}
	ctx, cancel := context.WithTimeout(ctx, dialAttempt)
	defer cancel()
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return tc, nil
}

// SetEndpoints gives the control endpoints to try after the enrolled
// one: those the table keeps open.
func (c *Client) SetEndpoints(eps []netip.AddrPort) { c.eps.set(c.rec.Endpoint, eps) }

// Load reads the enrolment in dir.
func Load(dir string) (*Record, error) {
	raw, err := os.ReadFile(filepath.Join(dir, RecordFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNotEnrolled
	}
	if err != nil {
		return nil, err
	}
	var rec Record
	if err := json.Unmarshal(raw, &rec); err != nil {
		return nil, fmt.Errorf("%s: %w", RecordFile, err)
	}
	return &rec, nil
}

// Client talks to the control server as an enrolled device. Its methods
// are safe for concurrent use.
type Client struct {
	rec  *Record
	dir  string
	pool *x509.CertPool
	http *http.Client
	// cert is the client certificate presented; Renew replaces it.
	cert atomic.Pointer[tls.Certificate]
	eps  endpoints
}

// New makes a client from the enrolment in dir.
func New(dir string, rec *Record) (*Client, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, CertFile), filepath.Join(dir, IdentityFile))
	if err != nil {
		return nil, fmt.Errorf("device certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(rec.CA)
	if err != nil {
		return nil, fmt.Errorf("%s: CA: %w", RecordFile, err)
	}
	if controlapi.Fingerprint(ca) != rec.Fingerprint {
		return nil, fmt.Errorf("%s: the stored CA does not match the pinned fingerprint", RecordFile)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	c := &Client{rec: rec, dir: dir, pool: pool}
	c.cert.Store(&cert)
	c.eps.set(rec.Endpoint, nil)
	c.eps.tls = &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c.cert.Load(), nil }}
	tr := &http.Transport{
		// The endpoints dial and verify the server: a failed handshake
		// moves on to the next endpoint.
		DialTLSContext:  c.eps.dial,
		MaxIdleConns:    1,
		IdleConnTimeout: controlapi.MaxWait + time.Minute,
	}
	c.http = &http.Client{Transport: tr}
	return c, nil
}

// Renew replaces the client certificate with der, which control sent
// (SyncResponse.Certificate) after the tunnel key changed: it must be
// the control CA's, for this device and its identity key, and bind
// exactly wgKey and the tunnel address assigned at enrolment. It is
// written in place of the old one and presented from the next
// connection on; one refused changes nothing.
func (c *Client) Renew(der []byte, wgKey string) error {
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("renewed certificate: %w", err)
	}
	cur := c.cert.Load()
	if pub, ok := leaf.PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(cur.PrivateKey.(crypto.Signer).Public()) {
		return errors.New("renewed certificate: not for this device's identity key")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: c.pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("renewed certificate: %w", err)
	}
	if !slices.ContainsFunc(leaf.URIs, func(u *url.URL) bool { return u.String() == controlapi.DeviceURIPrefix+c.rec.DeviceID }) {
		return fmt.Errorf("renewed certificate: not for device %s", c.rec.DeviceID)
	}
	if err := checkBinding(leaf, wgKey, c.rec.TunnelAddress, c.rec.Class); err != nil {
		return fmt.Errorf("renewed certificate: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(c.dir, CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return err
	}
	c.cert.Store(&tls.Certificate{Certificate: [][]byte{der}, PrivateKey: cur.PrivateKey, Leaf: leaf})
	c.http.CloseIdleConnections()
	return nil
}

// Sync long-polls; ctx bounds it (the agent gives it the wait plus
// slack). The server accepts at once and answers later: connected is
// called in between.
func (c *Client) Sync(ctx context.Context, req controlapi.SyncRequest, connected func()) (controlapi.SyncResponse, error) {
	var resp controlapi.SyncResponse
	err := post(ctx, c.http, c.rec.URL+controlapi.PathSync, req, &resp, connected)
	return resp, err
}

// Report posts events from the outbox.
func (c *Client) Report(ctx context.Context, req controlapi.ReportRequest) (controlapi.ReportResponse, error) {
	var resp controlapi.ReportResponse
	err := post(ctx, c.http, c.rec.URL+controlapi.PathReport, req, &resp, nil)
	return resp, err
}

// CloseIdle drops kept-alive connections (after a network change).
func (c *Client) CloseIdle() { c.http.CloseIdleConnections() }

func post(ctx context.Context, c *http.Client, url string, body, out any, accepted func()) error {
	raw, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(raw))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if accepted != nil && resp.StatusCode == http.StatusOK {
		accepted()
	}
	if err := controlapi.ReadResponse(resp, out); err != nil {
		return fmt.Errorf("control server %s: %w", url, err)
	}
	return nil
}
