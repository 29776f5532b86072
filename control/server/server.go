// Package server is the reference control server: it enrols devices
// against one-time tokens and issues their client certificates, stores
// ops-signed policy bundles and forwards them untouched, routes signed
// commands, answers devices' long-poll syncs the moment something is
// waiting for them, ingests their reports, and serves the ops API. All
// state is a control/store: one bbolt file, or a PostgreSQL database that
// any number of replicas share (replicas.go); transport is TLS 1.3 with
// its own CA.
package server

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/control/store"
	"github.com/bulkhead-edge/bulkhead/control/store/boltstore"
	"github.com/bulkhead-edge/bulkhead/control/store/pgstore"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// Files in the data directory.
const (
	DBFile         = "control.db"
	CommandKeyFile = "command.key"
)

// DefaultKeepAlive is how long an idle sync is held open. A device costs
// one small request and answer per period when nothing happens: 4 minutes
// keeps a cellular NAT mapping alive and stays far under 1 MB a day.
const DefaultKeepAlive = 4 * time.Minute

// maxBody bounds every request body but bundle pushes.
const maxBody = 1 << 20

// Config is how a server runs.
type Config struct {
	DataDir string
	// Names are the DNS names and addresses devices use to reach the
	// server; its certificate carries them.
	Names     []string
	KeepAlive time.Duration
	Logger    *slog.Logger
	// Ops is the ops trust root the server publishes to enrolling devices
	// for their installer to pin (empty: none; devices then need their
	// ops keys from elsewhere).
	Ops opskey.Roots
	// ClockOffset shifts the server's clock: what it stamps, and the time
	// it tells devices. Drills and tests use it to play a server whose
	// clock is wrong, or to let command lifetimes run out; zero in
	// production.
	ClockOffset time.Duration
	// CommandLifetime is how long a delivery of an order the server signs
	// stays valid (DefaultCommandLifetime when zero). The order itself
	// stays in force until ops lift it.
	CommandLifetime time.Duration
	// Database is the PostgreSQL address (postgres://…) of the store
	// replicas share; empty: one bbolt file in DataDir, for one process.
	Database string
	// TunnelPool is where devices' tunnel addresses are assigned from at
	// enrolment, each bound in the device's certificate with its
	// WireGuard key (zero: none assigned; devices name their own).
	TunnelPool netip.Prefix
}

// Server is a running control server.
type Server struct {
	cfg    Config
	db     store.Store
	ca     *pki.CA
	cmdKey ed25519.PrivateKey
	log    *slog.Logger
	// waits wakes the held polls a change concerns (waiters.go).
	waits *waiters
	mu    sync.Mutex
	// lastSeen is kept in memory; a write per poll would wear the disk.
	seen map[string]time.Time
	// gate and refused bound what callers without a certificate get.
	gate    *gate
	refused *refusals
	// touched is who synced since seen was last recorded; guarded by mu.
	touched map[string]time.Time
	// trust is the ops trust root pushes are judged by.
	trust *trust
	// catalog is the stored bundles and rotations (replicas.go).
	catalog catalog
	// reloadMu makes reloads and order catch-ups take turns.
	reloadMu sync.Mutex
	// monitors are the stored bundles' monitors, for judging reports.
	monitors monitors
	// book is the orders given, in effect order.
	book book
	// sent is when each order was last delivered to each device
	// (device NUL order); guarded by mu.
	sent map[string]time.Time
	// signed are the deliveries the server signed, by order.
	signedMu sync.Mutex
	signed   map[string]signedDelivery
	// known is the records of the devices calling (known.go).
	known *known
	// states are what devices report, written in batches (states.go).
	states *stateLog
}

// Open loads (or on first start creates) the CA, the command key, the
// first operator's credentials and the database. It reports whether the
// CA was created.
func Open(cfg Config) (*Server, bool, error) {
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = DefaultKeepAlive
	}
	if cfg.CommandLifetime == 0 {
		cfg.CommandLifetime = DefaultCommandLifetime
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if cfg.TunnelPool.IsValid() {
		if err := CheckTunnelPool(cfg.TunnelPool); err != nil {
			return nil, false, err
		}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, false, err
	}
	d, err := openStore(cfg)
	if err != nil {
		return nil, false, err
	}
	s, created, err := open(cfg, d)
	if err != nil {
		d.Close()
		return nil, false, err
	}
	return s, created, nil
}

func openStore(cfg Config) (store.Store, error) {
	if cfg.Database == "" {
		return boltstore.Open(filepath.Join(cfg.DataDir, DBFile))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return pgstore.Open(ctx, cfg.Database, cfg.Logger)
}

func open(cfg Config, d store.Store) (*Server, bool, error) {
	if _, err := os.Stat(filepath.Join(cfg.DataDir, pki.CertFile)); errors.Is(err, os.ErrNotExist) {
		if fp, err := d.Claim(claimCA, ""); err != nil || fp != "" {
			return nil, false, errors.Join(err, fmt.Errorf("the store already serves a fleet whose CA has fingerprint %s, and %s holds no CA: "+
				"every replica needs the same %s, %s and %s; copy them from a running replica (docs/control.md, Replicas)", fp, cfg.DataDir, pki.CertFile, pki.KeyFile, CommandKeyFile))
		}
	}
	ca, created, err := pki.LoadOrCreate(cfg.DataDir)
	if err != nil {
		return nil, false, err
	}
	key, err := loadOrCreateCommandKey(filepath.Join(cfg.DataDir, CommandKeyFile))
	if err != nil {
		return nil, false, err
	}
	if err := ensureAdmin(ca, filepath.Join(cfg.DataDir, pki.AdminDir)); err != nil {
		return nil, false, err
	}
	for _, c := range []struct{ name, what, value string }{
		{claimCA, "CA (" + pki.CertFile + ", " + pki.KeyFile + ")", controlapi.Fingerprint(ca.Cert)},
		{claimCommandKey, "command key (" + CommandKeyFile + ")", hex.EncodeToString(key.Public().(ed25519.PublicKey))},
	} {
		have, err := d.Claim(c.name, c.value)
		if err != nil {
			return nil, false, err
		}
		if have != c.value {
			return nil, false, fmt.Errorf("the %s in %s is not the one the store's fleet uses (%s, not %s): every replica needs the same; copy it from a running replica (docs/control.md, Replicas)", c.what, cfg.DataDir, have, c.value)
		}
	}
	s := &Server{cfg: cfg, db: d, ca: ca, cmdKey: key, log: cfg.Logger, waits: newWaiters(), seen: map[string]time.Time{}, touched: map[string]time.Time{},
		gate: newGate(), sent: map[string]time.Time{}, signed: map[string]signedDelivery{}, trust: &trust{}}
	s.refused = newRefusals(s.now)
	s.known = newKnown(d)
	if err := s.catchUpOrders(); err != nil {
		return nil, false, err
	}
	// The trust root follows the stored rotations, and every stored bundle
	// that verifies under none of the root sets it has held is set aside:
	// one pushed before the server checked pushes, which devices refuse,
	// and which kept them in a loop of refusals (nine of them starved a
	// valid bundle for good). Set aside, not deleted: the server no longer
	// offers it, and a mistaken --ops-pub at one start loses nothing.
	if err := s.reload(); err != nil {
		return nil, false, err
	}
	s.states = newStateLog(d.SetStates, s.now, s.log)
	return s, created, nil
}

// What replicas sharing a store must agree on (store.Claim).
const (
	claimCA         = "ca-fingerprint"
	claimCommandKey = "command-key"
)

func (s *Server) isUnverified(version uint64) bool {
	b, ok := s.catalog.bundle(version)
	return ok && b.unverified
}

// auditRefusals writes one audit row per window in which enrolments were
// refused, until ctx ends (and one for the last window then): a flood of
// bad tokens costs one row a minute, not one each.
func (s *Server) auditRefusals(ctx context.Context) {
	t := time.NewTicker(refusalWindow)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		if detail := s.refused.summary(); detail != "" {
			if err := s.db.Audit(s.now(), "enrolment", "enrolment-refused", detail); err != nil {
				s.log.Error("audit", "err", err)
			}
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// Fingerprint is the CA fingerprint devices pin.
func (s *Server) Fingerprint() string { return controlapi.Fingerprint(s.ca.Cert) }

// Close releases the database.
func (s *Server) Close() error {
	s.states.close()
	return s.db.Close()
}

func loadOrCreateCommandKey(path string) (ed25519.PrivateKey, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		if err := pki.WriteKey(path, priv); err != nil {
			return nil, err
		}
	}
	k, err := pki.ReadKey(path)
	if err != nil {
		return nil, err
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s is not an Ed25519 key", path)
	}
	return priv, nil
}

// ensureAdmin issues the first operator's client certificate into dir.
func ensureAdmin(ca *pki.CA, dir string) error {
	if _, err := os.Stat(filepath.Join(dir, pki.AdminCert)); err == nil {
		return nil
	}
	return IssueOps(ca, dir, "admin")
}

// IssueOps writes an operator's key, certificate and the CA certificate
// into dir: what the ops CLI needs to reach the admin API.
func IssueOps(ca *pki.CA, dir, name string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	der, err := ca.ClientCert(priv.Public(), "operator "+name, []string{controlapi.OpsURIPrefix + name})
	if err != nil {
		return err
	}
	if err := pki.WriteKey(filepath.Join(dir, pki.AdminKey), priv); err != nil {
		return err
	}
	if err := pki.WriteCert(filepath.Join(dir, pki.CertFile), ca.Cert.Raw); err != nil {
		return err
	}
	return pki.WriteCert(filepath.Join(dir, pki.AdminCert), der)
}

// Serve listens and serves until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	cert, err := s.ca.ServerCert(s.cfg.Names)
	if err != nil {
		return err
	}
	base := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    s.ca.Pool(),
	}
	srv := &http.Server{
		Handler: s.Handler(),
		TLSConfig: &tls.Config{
			MinVersion: tls.VersionTLS13,
			// Each handshake learns where it comes from, so one without a
			// client certificate is counted against its address and
			// refused over the bound (gate), before any request is read.
			GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
				cfg := base.Clone()
				remote := hello.Conn.RemoteAddr()
				cfg.VerifyConnection = func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) > 0 {
						return nil
					}
					return s.gate.admit(remote)
				}
				return cfg, nil
			},
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				s.gate.release(c.RemoteAddr().String())
			}
		},
		// A request must arrive whole within these: a caller that sends a
		// body slowly, or nothing, is cut off. A device's long-poll reads
		// its small body at once and then extends its own write deadline
		// for as long as it is held.
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       controlapi.MaxWait + time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	var bg sync.WaitGroup
	bg.Go(func() { s.auditRefusals(ctx) })
	bg.Go(func() { s.follow(ctx) })
	flush := time.Duration(0) // one process: last seen is written once, at the end
	if s.cfg.Database != "" {
		flush = seenFlush
	}
	bg.Go(func() { s.flushSeen(ctx, flush) })
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		srv.Close()
	}()
	err = srv.ServeTLS(ln, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		// The last minute's refusals and last-seen times are written
		// before Serve returns (and the caller closes the store).
		bg.Wait()
		return nil
	}
	return err
}

// Handler routes every path.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+controlapi.PathEnroll, s.enroll)
	mux.HandleFunc("POST "+controlapi.PathSync, s.device(s.sync))
	mux.HandleFunc("POST "+controlapi.PathReport, s.device(s.report))
	mux.HandleFunc("GET "+controlapi.PathAdminDevices, s.ops(s.listDevices))
	mux.HandleFunc("GET "+controlapi.PathAdminDevices+"/{id}", s.ops(s.showDevice))
	mux.HandleFunc("POST "+controlapi.PathAdminDevices+"/{id}/revoke", s.ops(s.revokeDevice))
	mux.HandleFunc("POST "+controlapi.PathAdminTokens, s.ops(s.createToken))
	mux.HandleFunc("POST "+controlapi.PathAdminBundles, s.ops(s.pushBundle))
	mux.HandleFunc("DELETE "+controlapi.PathAdminBundles+"/{version}", s.ops(s.withdrawBundle))
	mux.HandleFunc("POST "+controlapi.PathAdminCommands, s.ops(s.command))
	mux.HandleFunc("GET "+controlapi.PathAdminOrders, s.ops(s.listOrders))
	mux.HandleFunc("GET "+controlapi.PathAdminOrders+"/{id}", s.ops(s.showOrder))
	mux.HandleFunc("GET "+controlapi.PathAdminAudit, s.ops(s.audit))
	mux.HandleFunc("GET "+controlapi.PathAdminFlows, s.ops(s.flows))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) == 0 {
			// One request per connection without a certificate: kept
			// alive, each would hold a place in the gate (16 an
			// address) for minutes after its answer.
			w.Header().Set("Connection", "close")
		}
		mux.ServeHTTP(w, r)
	})
}

// peer returns the verified client certificate's URI with prefix, minus
// the prefix.
func peer(r *http.Request, prefix string) (string, bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return "", false
	}
	for _, u := range r.TLS.VerifiedChains[0][0].URIs {
		if rest, ok := strings.CutPrefix(u.String(), prefix); ok && rest != "" {
			return rest, true
		}
	}
	return "", false
}

// device admits only enrolled devices with their certificate.
func (s *Server) device(h func(w http.ResponseWriter, r *http.Request, id string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, ok := peer(r, controlapi.DeviceURIPrefix)
		if !ok {
			fail(w, http.StatusUnauthorized, "a device certificate is required (enrol first)")
			return
		}
		dev, err := s.known.device(id)
		switch {
		case err != nil:
			fail(w, http.StatusForbidden, "device "+id+" is not enrolled here")
			return
		case !dev.RevokedAt.IsZero():
			fail(w, http.StatusForbidden, "device "+id+" was revoked: "+dev.RevokedWhy)
			return
		}
		h(w, r, id)
	}
}

// ops admits only operators with their certificate. An unauthenticated
// caller learns nothing but that.
func (s *Server) ops(h func(w http.ResponseWriter, r *http.Request, actor string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name, ok := peer(r, controlapi.OpsURIPrefix)
		if !ok {
			fail(w, http.StatusUnauthorized, "an operator certificate is required")
			return
		}
		h(w, r, "ops "+name)
	}
}

func fail(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.MarshalWrite(w, controlapi.Error{Error: msg})
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.MarshalWrite(w, v)
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.UnmarshalRead(http.MaxBytesReader(w, r.Body, maxBody), v); err != nil {
		fail(w, http.StatusBadRequest, "request body: "+err.Error())
		return false
	}
	return true
}

// maxEnrolBody bounds an enrolment request: a token, a class, a hostname,
// a certificate request of a few hundred bytes and a WireGuard key.
const maxEnrolBody = 16 << 10

// enroll admits a device against a one-time token. The caller has no
// certificate yet, so everything it can make the server do is bounded:
// an address whose refusals used its budget is answered 429 before any
// work; the body is capped; every field is checked for size and form; the
// token is looked up before the certificate request is parsed; and a
// refusal is counted for the minute's one audit row, never written alone.
func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	ip := remoteIP(r)
	if !s.refused.allow(ip) {
		fail(w, http.StatusTooManyRequests, "too many refused enrolments from this address; wait a minute")
		return
	}
	refuse := func(code int, reason, msg string) {
		s.refused.record(ip, reason)
		fail(w, code, msg)
	}
	var req controlapi.EnrollRequest
	if err := json.UnmarshalRead(http.MaxBytesReader(w, r.Body, maxEnrolBody), &req); err != nil {
		refuse(http.StatusBadRequest, "malformed request", "request body: "+err.Error())
		return
	}
	if problem := checkEnrolFields(req); problem != "" {
		refuse(http.StatusBadRequest, "malformed request", problem)
		return
	}
	now := s.now()
	if err := s.db.CheckToken(req.Token, req.Class, req.Segments, now); err != nil {
		refuse(http.StatusForbidden, tokenReason(err), err.Error())
		return
	}
	csr, err := x509.ParseCertificateRequest(req.CSR)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		refuse(http.StatusBadRequest, "bad certificate request", "certificate request: "+err.Error())
		return
	}
	var der []byte
	dev, err := s.db.Enroll(req.Token, req.Class, req.Segments, s.cfg.TunnelPool, now, func(id string, t store.Token, addr netip.Addr) (controlapi.Device, error) {
		var err error
		der, err = s.deviceCert(csr.PublicKey, id, t.Class, req.WireGuardKey, addr)
		return controlapi.Device{ID: id, Class: t.Class, Hostname: req.Hostname, WireGuardKey: req.WireGuardKey, TunnelAddress: addr,
			Certificate: der, EnrolledAt: now.UTC()}, err
	})
	switch {
	case isTokenError(err):
		refuse(http.StatusForbidden, tokenReason(err), err.Error())
		return
	case err != nil:
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	s.log.Info("device enrolled", "id", dev.ID, "class", dev.Class, "hostname", dev.Hostname, "role", dev.Role)
	s.rosterChanged(dev.ID) // gateways learn the new device
	resp := controlapi.EnrollResponse{DeviceID: dev.ID, Class: dev.Class, TunnelAddress: dev.TunnelAddress, Certificate: der, CA: s.ca.Cert.Raw,
		CommandKey: s.cmdKey.Public().(ed25519.PublicKey), OpsThreshold: s.cfg.Ops.Threshold, Role: dev.Role, Segments: dev.Segments}
	if dev.TunnelAddress.IsValid() {
		resp.TunnelPool = s.cfg.TunnelPool
	}
	for _, k := range s.cfg.Ops.Keys() {
		resp.OpsKeys = append(resp.OpsKeys, k)
	}
	reply(w, resp)
}

// checkEnrolFields says what is wrong with an enrolment's fields, by
// size and form, or "".
func checkEnrolFields(req controlapi.EnrollRequest) string {
	switch {
	case !tokenForm.MatchString(req.Token):
		return "token: not a Bulkhead enrolment token (bht_ and 40 hex digits)"
	case req.Class != "" && !classForm.MatchString(req.Class):
		return "class: 1-32 characters of a-z, 0-9, '-' or '_'"
	case len(req.Hostname) > 253 || strings.ContainsFunc(req.Hostname, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return "hostname: at most 253 printable characters"
	case len(req.CSR) == 0 || len(req.CSR) > 4096:
		return "csr: a certificate request of at most 4 KiB is required"
	case req.WireGuardKey != "" && !wgKeyForm.MatchString(req.WireGuardKey):
		return "wireguard_key: a base64 Curve25519 public key (44 characters)"
	case len(req.Segments) > 64 || slices.ContainsFunc(req.Segments, func(s string) bool { return s == "" || len(s) > 64 }):
		return "segments: at most 64 names of 1-64 characters"
	}
	return ""
}

var (
	tokenForm = regexp.MustCompile(`^bht_[0-9a-f]{40}$`)
	classForm = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)
	wgKeyForm = regexp.MustCompile(`^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$`)
)

func isTokenError(err error) bool {
	return errors.Is(err, store.ErrTokenUnknown) || errors.Is(err, store.ErrTokenUsed) || errors.Is(err, store.ErrTokenExpired) || errors.Is(err, store.ErrTokenClass) ||
		errors.Is(err, store.ErrTokenRole)
}

// tokenReason names a token refusal for the audit summary.
func tokenReason(err error) string {
	for _, e := range []error{store.ErrTokenUnknown, store.ErrTokenUsed, store.ErrTokenExpired, store.ErrTokenClass, store.ErrTokenRole} {
		if errors.Is(err, e) {
			return e.Error()
		}
	}
	return "token refused"
}

func (s *Server) sync(w http.ResponseWriter, r *http.Request, id string) {
	var req controlapi.SyncRequest
	if !decode(w, r, &req) {
		return
	}
	now := s.now()
	s.mu.Lock()
	s.seen[id], s.touched[id] = now, now
	s.mu.Unlock()
	dev, err := s.known.device(id)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	req.State = boundState(req.State)
	s.states.put(id, req.State)
	if _, _, err := parseWGKey(req.WireGuardKey); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	cert, err := s.rebind(r.TLS.VerifiedChains[0][0], dev, req.WireGuardKey, now)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	wait := min(time.Duration(req.WaitSeconds)*time.Second, s.cfg.KeepAlive, controlapi.MaxWait)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	// Held for up to wait: the server's write deadline is for answers
	// given at once.
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(wait + 30*time.Second))
	// The headers go out at once: the device knows it is connected while
	// the answer is held. A failure after this aborts the connection,
	// which the device sees as an error.
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	http.NewResponseController(w).Flush()
	for {
		woken := s.waits.wait(id, dev.Class, dev.Role == controlapi.RoleGateway) // before looking, so nothing slips between
		resp, due, err := s.look(id, dev, req, cert)
		switch {
		case errors.Is(err, errRevokedWhileHeld):
			// The poll ends, and the next one is refused.
			panic(http.ErrAbortHandler)
		case err != nil:
			// The store is out of reach (a database restart): the poll
			// stays held and looks again, and ends only at its
			// deadline, as any request to a stalled control does.
			s.log.Debug("sync: the store is out of reach; the poll stays held", "device", id, "err", err)
			due = lookAgain
		case resp != nil:
			reply(w, resp)
			return
		}
		var again <-chan time.Time
		if due > 0 {
			again = time.After(due)
		}
		select {
		case <-again:
		case <-woken.device:
		case <-woken.class:
		case <-woken.gateways:
		case <-woken.all:
		case <-timer.C:
			if err != nil {
				panic(http.ErrAbortHandler)
			}
			reply(w, &controlapi.SyncResponse{ServerTime: s.now().UTC()})
			return
		case <-r.Context().Done():
			return
		}
	}
}

// errRevokedWhileHeld ends a held poll: its device was revoked (or is
// gone) meanwhile.
var errRevokedWhileHeld = errors.New("revoked while held")

// lookAgain is how soon a held poll whose look failed looks again.
const lookAgain = 5 * time.Second

// look is a held poll's answer, if it has one now (nil otherwise), and
// how long until an order paused for the device may be sent again. An
// error other than errRevokedWhileHeld is the store's.
func (s *Server) look(id string, dev controlapi.Device, req controlapi.SyncRequest, cert []byte) (*controlapi.SyncResponse, time.Duration, error) {
	if now, err := s.known.device(id); errors.Is(err, store.ErrNoDevice) || err == nil && !now.RevokedAt.IsZero() {
		return nil, 0, errRevokedWhileHeld
	} else if err != nil {
		return nil, 0, err
	}
	resp, due, err := s.pending(req, bundle.Device{ID: id, Class: dev.Class})
	if err != nil {
		return nil, 0, err
	}
	if dev.Role == controlapi.RoleGateway && req.Gateway != nil {
		if resp.Gateway, err = s.gatewayUpdate(*req.Gateway, s.now()); err != nil {
			return nil, 0, err
		}
	}
	if resp.Bundle != nil || len(resp.Roots) > 0 || len(resp.Commands) > 0 || cert != nil || resp.Gateway != nil {
		resp.Certificate = cert
		return &resp, due, nil
	}
	return nil, due, nil
}

// boundState cuts what a device says about itself to sizes a desk can
// show: the record is written to disk and printed to operators.
func boundState(st controlapi.DeviceState) controlapi.DeviceState {
	const maxText, maxPartners = 1 << 10, 64
	if len(st.Why) > maxText {
		st.Why = st.Why[:maxText] + "… (cut)"
	}
	if len(st.AgentVersion) > 64 {
		st.AgentVersion = st.AgentVersion[:64]
	}
	if len(st.Revoked) > maxPartners {
		kept := map[string]string{}
		for _, p := range slices.Sorted(maps.Keys(st.Revoked))[:maxPartners] {
			kept[p] = st.Revoked[p]
		}
		st.Revoked = kept
	}
	for p, why := range st.Revoked {
		if len(p) > 64 || len(why) > maxText {
			delete(st.Revoked, p)
		}
	}
	for slot, id := range st.Orders {
		if len(st.Orders) > maxPartners+1 || len(slot) > 80 || len(id) > 64 {
			delete(st.Orders, slot)
		}
	}
	st.RefusedOrders = st.RefusedOrders[max(0, len(st.RefusedOrders)-controlapi.MaxRefusedOrders):]
	for i, r := range st.RefusedOrders {
		if len(r.Order) > 64 {
			r.Order = r.Order[:64]
		}
		if len(r.Reason) > maxText {
			r.Reason = r.Reason[:maxText] + "… (cut)"
		}
		st.RefusedOrders[i] = r
	}
	return st
}

// pending is what a device is missing: the newest bundle meant for it and
// the orders in force for it that the state it reported does not hold.
// due is how long until an order paused for the device may be sent again.
func (s *Server) pending(req controlapi.SyncRequest, dev bundle.Device) (resp controlapi.SyncResponse, due time.Duration, err error) {
	now := s.now()
	resp = controlapi.SyncResponse{ServerTime: now.UTC()}
	resp.Bundle = s.catalog.newest(req.PolicyVersion, func(b storedBundle) bool {
		return !b.unverified && b.target.Matches(dev) && !slices.Contains(req.Refused, b.digest)
	})
	resp.Roots = s.catalog.rootsAbove(req.RootsVersion, req.Refused)
	resp.Commands, due, err = s.deliveries(dev, req.State, now, resp.Bundle != nil || len(resp.Roots) > 0)
	return resp, due, err
}

func (s *Server) report(w http.ResponseWriter, r *http.Request, id string) {
	var req controlapi.ReportRequest
	if !decode(w, r, &req) {
		return
	}
	// The store's record, with the state the device reported last (the
	// flows are judged by the policy it runs).
	dev, err := s.db.Device(id)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	dev = s.withSeen(dev)
	acked, err := s.db.AddReports(id, req, func(e controlapi.Event) []controlapi.ObservedFlow { return s.monitoredFlows(dev, e.Detail) })
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, controlapi.ReportResponse{Acked: acked})
}

func (s *Server) withSeen(dev controlapi.Device) controlapi.Device {
	dev.Certificate = nil // gateways' business; the desk sees the binding fields
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.seen[dev.ID]; ok && t.After(dev.LastSeen) {
		dev.LastSeen = t.UTC()
	}
	if st, ok := s.states.latest(dev.ID); ok {
		dev.State = st
	}
	return dev
}

// devices are the enrolled devices, each last seen as of its latest sync.
func (s *Server) devices() ([]controlapi.Device, error) {
	devs, err := s.db.Devices()
	for i := range devs {
		devs[i] = s.withSeen(devs[i])
	}
	return devs, err
}

func (s *Server) listDevices(w http.ResponseWriter, _ *http.Request, _ string) {
	devs, err := s.devices()
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, devs)
}

func (s *Server) showDevice(w http.ResponseWriter, r *http.Request, _ string) {
	dev, err := s.db.Device(r.PathValue("id"))
	if errors.Is(err, store.ErrNoDevice) {
		fail(w, http.StatusNotFound, err.Error())
		return
	}
	if err == nil {
		dev.Reports, err = s.db.Reports(dev.ID, 50)
	}
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, s.withSeen(dev))
}

func (s *Server) createToken(w http.ResponseWriter, r *http.Request, actor string) {
	var req controlapi.TokenRequest
	if !decode(w, r, &req) {
		return
	}
	ttl := time.Duration(req.TTLSeconds) * time.Second
	if req.Role == controlapi.RoleGateway && req.Class == "" {
		req.Class = GatewayClass
	}
	switch {
	case req.Class == "" || ttl <= 0 || ttl > 30*24*time.Hour:
		fail(w, http.StatusBadRequest, "a token needs a class and a ttl between 1s and 30 days")
		return
	case !classForm.MatchString(req.Class):
		fail(w, http.StatusBadRequest, "class: 1-32 characters of a-z, 0-9, '-' or '_'")
		return
	case req.Role != "" && req.Role != controlapi.RoleDevice && req.Role != controlapi.RoleGateway:
		fail(w, http.StatusBadRequest, fmt.Sprintf("role %q is neither %s nor %s", req.Role, controlapi.RoleDevice, controlapi.RoleGateway))
		return
	case req.Role == controlapi.RoleGateway && len(req.Segments) == 0:
		fail(w, http.StatusBadRequest, "a gateway token names the segments the gateway fronts (--segment)")
		return
	case req.Role != controlapi.RoleGateway && len(req.Segments) > 0:
		fail(w, http.StatusBadRequest, "segments are for a gateway token (--role gateway)")
		return
	}
	if req.Role == controlapi.RoleDevice {
		req.Role = ""
	}
	n, err := s.names(nil)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	var bad []string
	for _, seg := range req.Segments {
		bad = append(bad, unknownName("segment", seg, n.segments)...)
	}
	if bad != nil {
		fail(w, http.StatusNotFound, strings.Join(bad, "; ")+" in the stored policies")
		return
	}
	if req.Role != controlapi.RoleGateway && !req.AllowUnknownClass {
		if bad := unknownName("class", req.Class, n.classes); bad != nil {
			fail(w, http.StatusNotFound, bad[0]+" in the stored policies; a device enrolled with it would sit in lockdown (--allow-unknown-class issues it anyway)")
			return
		}
	}
	slices.Sort(req.Segments)
	resp, err := s.db.NewToken(req.Class, req.Role, slices.Compact(req.Segments), ttl, s.now(), actor)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, resp)
}

// pushBundle stores a bundle (or a trust-root rotation) as signed, after
// checking it as a device will: against the ops keys the server publishes,
// moved on by the rotations it accepted, with their threshold, and for a
// bundle its validity now. What a device would refuse is refused here with
// the reason, and its version stays free: a forged push can no longer burn
// version numbers, nor sit in the store to be offered to devices.
func (s *Server) pushBundle(w http.ResponseWriter, r *http.Request, actor string) {
	raw, err := envelope.ReadAll(r.Body)
	if err != nil {
		fail(w, http.StatusRequestEntityTooLarge, err.Error())
		return
	}
	kind, err := envelope.TypeOf(raw)
	if err != nil {
		fail(w, http.StatusBadRequest, "neither a policy bundle nor a trust-root rotation: "+err.Error())
		return
	}
	if kind == bundle.RootsPayloadType {
		next, err := s.trust.checkRotation(raw)
		if err != nil {
			fail(w, http.StatusUnprocessableEntity, "trust-root rotation refused: "+err.Error())
			return
		}
		if err := s.db.PushRoots(next.version, raw, s.now(), actor); err != nil {
			fail(w, http.StatusConflict, err.Error())
			return
		}
		s.log.Info("trust-root rotation pushed", "version", next.version, "by", actor)
		s.changed(store.Change{Kind: store.ChangeRoots, Seq: next.version})
		reply(w, map[string]any{"roots_version": next.version})
		return
	}
	if kind != bundle.PayloadType {
		fail(w, http.StatusBadRequest, fmt.Sprintf("neither a policy bundle nor a trust-root rotation: payload type %q (a command is given with quarantine, release, ...)", kind))
		return
	}
	b, err := s.trust.checkBundle(raw, s.now())
	if err != nil {
		fail(w, http.StatusUnprocessableEntity, "policy bundle refused: "+err.Error())
		return
	}
	p := b.Payload
	if p.Version == 0 || (len(p.Target.Classes) == 0 && len(p.Target.Devices) == 0) {
		fail(w, http.StatusBadRequest, "bundle has no version or no target")
		return
	}
	if s.isUnverified(p.Version) {
		fail(w, http.StatusConflict, fmt.Sprintf("version %d is taken by a stored bundle that does not verify (it is not offered to devices); withdraw it first: bulkhead-control policy withdraw %d --reason ...", p.Version, p.Version))
		return
	}
	if err := s.db.PushBundle(p.Version, raw, s.now(), actor, p.Target.String()); err != nil {
		fail(w, http.StatusConflict, err.Error())
		return
	}
	s.log.Info("policy pushed", "version", p.Version, "target", p.Target.String(), "by", actor)
	s.changed(store.Change{Kind: store.ChangeBundle, Seq: p.Version})
	reply(w, map[string]uint64{"version": p.Version})
}

// withdrawBundle removes a pushed bundle: devices that do not have it are
// no longer offered it (those that do keep it, as devices keep the
// highest version they accepted). ?reason= is required.
func (s *Server) withdrawBundle(w http.ResponseWriter, r *http.Request, actor string) {
	v, err := strconv.ParseUint(r.PathValue("version"), 10, 64)
	if err != nil || v == 0 {
		fail(w, http.StatusBadRequest, "version: a policy version number")
		return
	}
	reason := r.URL.Query().Get("reason")
	if strings.TrimSpace(reason) == "" {
		fail(w, http.StatusBadRequest, "reason: say why the bundle is withdrawn")
		return
	}
	if err := s.db.WithdrawBundle(v, s.now(), actor, reason); err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, store.ErrNoBundle) {
			code = http.StatusNotFound
		}
		fail(w, code, err.Error())
		return
	}
	s.changed(store.Change{Kind: store.ChangeBundle, Seq: v})
	s.log.Info("policy withdrawn", "version", v, "by", actor, "reason", reason)
	reply(w, map[string]uint64{"withdrawn": v})
}

func (s *Server) command(w http.ResponseWriter, r *http.Request, actor string) {
	var req controlapi.CommandRequest
	if !decode(w, r, &req) {
		return
	}
	now := s.now()
	o, code, err := s.orderFrom(req, now, actor)
	if err != nil {
		fail(w, code, err.Error())
		return
	}
	c := o.Command
	if s.book.find(c.ID) != nil {
		fail(w, http.StatusConflict, fmt.Sprintf("order %s was already given; an order is given once (sign a new one to give it again)", c.ID))
		return
	}
	// Only ids and classes: an order to a fleet must not first read the
	// fleet's records.
	classes, err := s.db.DeviceClasses()
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	n, err := s.names(classes)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	if err := n.check(c); err != nil {
		fail(w, http.StatusNotFound, err.Error())
		return
	}
	var ids []string
	for _, id := range slices.Sorted(maps.Keys(classes)) {
		if c.Target.Matches(bundle.Device{ID: id, Class: classes[id]}) {
			ids = append(ids, id)
		}
	}
	if c.Kind.Loosens() {
		if err := s.checkLift(o, ids, classes); err != nil {
			fail(w, http.StatusConflict, err.Error())
			return
		}
	}
	if req.DryRun {
		reply(w, controlapi.CommandResponse{ID: c.ID, Devices: ids, DryRun: true})
		return
	}
	signer := "control key"
	if o.ByOps {
		signer = "ops keys"
	}
	what := string(c.Kind)
	if c.Partner != "" {
		what += " partner " + c.Partner
	}
	detail := fmt.Sprintf("%s %s for %s (%d devices enrolled now), signed by the %s; reason: %s", c.ID, what, c.Target, len(ids), signer, c.Reason)
	if err := s.db.AddOrder(o, now, detail); err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, store.ErrOrderGiven) {
			code = http.StatusConflict
		}
		fail(w, code, err.Error())
		return
	}
	// Committed: the order is acknowledged, and this replica's polls are
	// woken from the store, as every other replica's are.
	s.log.Info("order given", "detail", detail, "by", actor)
	if err := s.catchUpOrders(); err != nil {
		s.log.Error("read the order back", "order", c.ID, "err", err)
	}
	reply(w, controlapi.CommandResponse{ID: c.ID, Devices: ids})
}

// orderFrom reads the order a request gives: an ops-signed command checked
// as a device would check it now, or one the server builds and may sign
// only if it tightens.
func (s *Server) orderFrom(req controlapi.CommandRequest, now time.Time, actor string) (*order, int, error) {
	if req.Signed != nil {
		v, err := s.trust.checkCommand(req.Signed, now)
		if err != nil {
			return nil, http.StatusBadRequest, err
		}
		return &order{Command: v.Command, ByOps: true, Raw: req.Signed, By: actor}, 0, nil
	}
	c := command.Command{ID: store.RandomID("order-", 8), Kind: command.Kind(req.Kind), Partner: req.Partner, Reason: req.Reason,
		Target:   command.Target{All: req.All, Classes: req.Classes, Devices: req.Devices},
		IssuedAt: now.UTC(), ExpiresAt: now.Add(s.cfg.CommandLifetime).UTC()}
	if c.Kind.Loosens() {
		return nil, http.StatusForbidden, fmt.Errorf("%s loosens access and needs the ops keys: sign it with --key (the control server's key may only tighten)", c.Kind)
	}
	if err := c.Validate(); err != nil {
		return nil, http.StatusBadRequest, err
	}
	return &order{Command: c, By: actor}, 0, nil
}

// checkLift refuses a lift that would lift nothing on any device it
// covers, saying why: nothing it names is in force, or what is in force
// was imposed after it was issued.
func (s *Server) checkLift(o *order, ids []string, classes map[string]string) error {
	orders := s.book.all()
	with := append(slices.Clone(orders), o)
	slices.SortFunc(with, before)
	var why error
	for _, id := range ids {
		h := fold(with, bundle.Device{ID: id, Class: classes[id]})
		if h.decisive[o.Command.Slot()] == o {
			return nil
		}
		if err := h.failed[o.Command.ID]; err != nil && why == nil {
			why = err
		}
	}
	// A class or the fleet may hold the order for devices to come: a
	// lift covering such an order lifts it for them.
	for _, p := range orders {
		if p.Command.Slot() == o.Command.Slot() && !p.Command.Kind.Loosens() && before(p, o) < 0 && o.Command.Target.Covers(p.Command.Target) && !lifted(orders, p) {
			return nil
		}
	}
	if why != nil {
		return fmt.Errorf("%s %s would lift nothing: %v; nothing was ordered", o.Command.Kind, o.Command.ID, why)
	}
	return fmt.Errorf("%s %s would lift nothing: no device it names (%s) is under such an order; nothing was ordered", o.Command.Kind, o.Command.ID, o.Command.Target)
}

// lifted reports whether a later lift covering p's whole target lifted it.
func lifted(orders []*order, p *order) bool {
	for _, l := range orders {
		if l.Command.Kind.Loosens() && l.Command.Slot() == p.Command.Slot() && before(p, l) < 0 && l.Command.Target.Covers(p.Command.Target) {
			return true
		}
	}
	return false
}

func (s *Server) listOrders(w http.ResponseWriter, r *http.Request, _ string) {
	if !s.caughtUpForDesk(w) {
		return
	}
	devs, err := s.devices()
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	all := r.URL.Query().Get("all") != ""
	orders := s.book.all()
	out := []controlapi.Order{}
	for _, o := range orders {
		if v := view(o, orders, devs); all || v.InForce {
			out = append(out, v)
		}
	}
	reply(w, out)
}

func (s *Server) showOrder(w http.ResponseWriter, r *http.Request, _ string) {
	id := r.PathValue("id")
	if !s.caughtUpForDesk(w) {
		return
	}
	o := s.book.find(id)
	if o == nil {
		fail(w, http.StatusNotFound, fmt.Sprintf("no order %q (bulkhead-control orders --all lists them)", id))
		return
	}
	devs, err := s.devices()
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, view(o, s.book.all(), devs))
}

// caughtUpForDesk reads the orders committed since the book's last, so
// an operator who gave an order on one replica sees it on any other at
// once, not when the change feed brings it; false: it failed, and said
// so.
func (s *Server) caughtUpForDesk(w http.ResponseWriter) bool {
	if err := s.catchUpOrders(); err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return false
	}
	return true
}

// auditPageMax bounds one page of the audit log.
const auditPageMax = 5000

// audit answers a page of the audit log: ?after=SEQ (default 0) and
// ?limit=N (default and most auditPageMax).
func (s *Server) audit(w http.ResponseWriter, r *http.Request, _ string) {
	after, limit := uint64(0), auditPageMax
	if v := r.URL.Query().Get("after"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			fail(w, http.StatusBadRequest, "after: not a sequence number")
			return
		}
		after = n
	}
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > auditPageMax {
			fail(w, http.StatusBadRequest, fmt.Sprintf("limit: a number from 1 to %d", auditPageMax))
			return
		}
		limit = n
	}
	entries, next, err := s.db.AuditPage(after, limit)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, controlapi.AuditPage{Entries: entries, Next: next})
}

// flows answers the observed flows of ?class=, for policy suggest.
func (s *Server) flows(w http.ResponseWriter, r *http.Request, _ string) {
	class := r.URL.Query().Get("class")
	if class == "" {
		fail(w, http.StatusBadRequest, "name a device class: ?class=CLASS")
		return
	}
	flows, err := s.db.Flows(class)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	reply(w, flows)
}

// now is the server's clock, shifted by the configured offset.
func (s *Server) now() time.Time { return time.Now().Add(s.cfg.ClockOffset) }
