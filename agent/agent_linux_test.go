package agent

import (
	"context"
	"crypto/ed25519"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

type env struct {
	t      *testing.T
	ns     *lab.NS
	iface  string // the tunnel interface, unique per test
	dir    string
	cfg    string
	key    ed25519.PrivateKey
	doc    policy.Document
	cancel context.CancelFunc
	done   chan error
	// wall, when set, is the agent's wall clock from the next start.
	wall func() time.Time
}

func newEnv(t *testing.T) *env {
	lab.RequirePrivileged(t, "nft")
	dir := t.TempDir()
	key := newOpsKey(t, dir)
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	// The example's posture checks would judge this host (no EDR sensor
	// runs here); the tests not about posture leave them out.
	scanner := doc.Classes["scanner"]
	scanner.Checks = nil
	doc.Classes["scanner"] = scanner
	ns := lab.NewNS(t, "agent")
	iface := "bh-" + ns.Name[len(ns.Name)-6:]
	t.Cleanup(func() { os.Remove("/var/run/wireguard/" + iface + ".sock") }) // left by a killed agent
	cfg := filepath.Join(dir, "config.json")
	writeFile(t, cfg, `{
  "device": {"id": "scanner-17", "class": "scanner"},
  "trust": {"keys": ["`+filepath.Join(dir, "ops", opskey.PublicFile)+`"]},
  "safety_floor": [{"name": "plc", "cidr": "192.168.50.0/29", "protocol": "tcp", "ports": ["502"]}],
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "state_dir": "`+filepath.Join(dir, "state")+`",
  "admin_socket": "`+filepath.Join(dir, "run", "admin.sock")+`",
  "tunnel": {"interface": "`+iface+`", "addresses": ["100.64.0.2/32"], "listen_port": 51820},
  "posture": {"interval": "1s"}
}`)
	return &env{t: t, ns: ns, iface: iface, dir: dir, cfg: cfg, key: key, doc: *doc}
}

// signFor signs doc for scanners as bundle version, valid for an hour.
func signFor(t *testing.T, version uint64, doc *policy.Document, key ed25519.PrivateKey) []byte {
	t.Helper()
	return signValidFor(t, version, doc, key, time.Hour)
}

// signValidFor is signFor with a bundle valid for d from now.
func signValidFor(t *testing.T, version uint64, doc *policy.Document, key ed25519.PrivateKey, d time.Duration) []byte {
	t.Helper()
	now := time.Now().UTC().Truncate(time.Second)
	raw, err := bundle.Sign(bundle.Payload{Version: version, IssuedAt: now, ExpiresAt: now.Add(d),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: *doc}, key)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func (e *env) bundle(version uint64, issued time.Time) []byte {
	raw, err := bundle.Sign(bundle.Payload{Version: version, IssuedAt: issued, ExpiresAt: issued.Add(24 * time.Hour),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: e.doc}, e.key)
	if err != nil {
		e.t.Fatal(err)
	}
	return raw
}

func (e *env) start() {
	e.t.Helper()
	cfg, err := config.Load(e.cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	open := func(c tunnel.Config) (Tunnel, error) {
		var t Tunnel
		err := e.ns.Do(func() (err error) { t, err = openTunnel(c); return err })
		return t, err
	}
	opts := []Option{WithEnforcer(nft.NewEnforcer(nft.WithNetNS(e.ns.FD()))), WithTunnel(open), WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}
	if e.wall != nil {
		opts = append(opts, WithWallClock(e.wall))
	}
	a := New(cfg, opts...)
	if err := a.Boot(); err != nil {
		e.t.Fatalf("Boot: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel, e.done = cancel, make(chan error, 1)
	go func() { e.done <- a.Run(ctx) }()
	e.t.Cleanup(e.stop)
	lab.WaitFor(e.t, "admin socket", shortWait, func() bool { _, err := os.Stat(filepath.Join(e.dir, "run", "admin.sock")); return err == nil })
}

func (e *env) stop() {
	if e.cancel != nil {
		e.cancel()
		<-e.done
		e.cancel = nil
	}
}

func (e *env) call(req adminapi.Request) *adminapi.Response {
	e.t.Helper()
	resp, err := adminapi.Call(filepath.Join(e.dir, "run", "admin.sock"), req)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp
}

// shortWait bounds what the agent does at once (a socket coming up, an
// apply); longWait what crosses control and the tunnels.
const shortWait, longWait = 5 * time.Second, 20 * time.Second

// auditLog reads the stopped agent's audit log.
func (e *env) auditLog() []store.Event { return auditLogIn(e.t, e.dir) }

func (e *env) tableText() string {
	out, _ := e.ns.Run("nft", "list", "table", "inet", nft.Table)
	return out
}

func TestBootLockdownThenPolicyThenOfflineRestart(t *testing.T) {
	e := newEnv(t)
	e.start()
	for path, want := range map[string]os.FileMode{filepath.Join(e.dir, "run"): 0o700, filepath.Join(e.dir, "run", "admin.sock"): 0o600} {
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, %v; want %v (root-only admin socket)", path, fi.Mode().Perm(), err, want)
		}
	}
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if st.Mode != "lockdown" || !strings.Contains(strings.Join(st.Why, " "), "no policy has been accepted yet") {
		t.Fatalf("first boot status = %+v, want lockdown with the reason", st)
	}
	table := e.tableText()
	if !strings.Contains(table, "192.168.50.0/29 . tcp . 502") || !strings.Contains(table, "10.99.0.1 . tcp . 8443") || strings.Contains(table, "segments_") || strings.Contains(table, "gateways_") {
		t.Fatalf("lockdown table must hold the floor and control only:\n%s", table)
	}

	now := time.Now().UTC().Truncate(time.Second)
	resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(3, now)})
	if resp.Error != "" || resp.Status.Mode != "normal" || resp.Status.PolicyVersion != 3 {
		t.Fatalf("apply v3 = %+v / %q", resp.Status, resp.Error)
	}
	// A rejected bundle changes nothing and says why.
	before := e.tableText()
	resp = e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(2, now)})
	if !strings.Contains(resp.Error, "rollback") || e.tableText() != before {
		t.Fatalf("apply v2 after v3: error %q; table changed: %v", resp.Error, e.tableText() != before)
	}
	v := e.call(adminapi.Request{Op: adminapi.OpExplain, To: "10.30.0.10:443/tcp"}).Verdict
	if v.Allowed || v.By != "segment finance" {
		t.Errorf("explain finance for a scanner = %+v", v)
	}

	// Stop (the table stays), start again with no network: the cached
	// bundle is enforced, and the old bundle is still refused.
	e.stop()
	if e.tableText() != before {
		t.Fatal("the table changed when the agent stopped")
	}
	e.start()
	st = e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if st.PolicyVersion != 3 || st.Mode == "lockdown" {
		t.Fatalf("after restart status = %+v, want policy v3 from the cache", st)
	}
	if resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(2, now)}); !strings.Contains(resp.Error, "rollback") {
		t.Errorf("rolled-back bundle after restart: %q", resp.Error)
	}
}

// A table flushed or deleted from outside is put back as it was, and each
// repair is counted and audited. How soon is a `make bench` figure
// ("drift repaired"), not an assertion here.
func TestDriftIsRepaired(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, time.Now().UTC().Truncate(time.Second))})
	want := lab.CanonicalTable(e.tableText())
	for _, tamper := range [][]string{{"nft", "flush", "ruleset"}, {"nft", "delete", "table", "inet", nft.Table}} {
		e.ns.MustRun(t, tamper...)
		lab.WaitFor(t, "table restored after "+strings.Join(tamper, " "), shortWait, func() bool { return lab.CanonicalTable(e.tableText()) == want })
	}
	st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
	if st.DriftRepairs < 2 {
		t.Errorf("drift repairs = %d, want 2", st.DriftRepairs)
	}
	e.stop()
	events := e.auditLog()
	repaired := 0
	for _, ev := range events {
		if ev.Kind == "drift-repaired" {
			repaired++
		}
	}
	if repaired < 2 {
		t.Errorf("audit log has %d drift repairs, want 2: %+v", repaired, events)
	}
}

func TestDropDirectory(t *testing.T) {
	e := newEnv(t)
	e.start()
	inbox := filepath.Join(e.dir, "state", "inbox")
	if err := os.MkdirAll(inbox, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(inbox, "v5.dsse"), string(e.bundle(5, time.Now().UTC().Truncate(time.Second))))
	lab.WaitFor(t, "v5 from the drop directory", shortWait, func() bool { return e.call(adminapi.Request{Op: adminapi.OpStatus}).Status.PolicyVersion == 5 })
	writeFile(t, filepath.Join(inbox, "bad.dsse"), "not a bundle")
	lab.WaitFor(t, "bad.dsse set aside", shortWait, func() bool { _, err := os.Stat(filepath.Join(inbox, "bad.dsse.rejected")); return err == nil })
	if v := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status.PolicyVersion; v != 5 {
		t.Errorf("policy version after a bad drop = %d, want 5", v)
	}
}

// A FIFO (or a link, or a device) in the drop directory does not hang the
// agent: it did (opening a FIFO waits for a writer, and the event loop
// did the opening: status went unanswered and a deleted table stayed
// deleted). The file is refused, renamed and audited, and the agent goes
// on: it answers, repairs its table and takes the next bundle.
func TestSpecialFilesInTheDropDirectory(t *testing.T) {
	e := newEnv(t)
	e.start()
	now := time.Now().UTC().Truncate(time.Second)
	e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, now)})
	inbox := filepath.Join(e.dir, "state", "inbox")
	if err := os.MkdirAll(inbox, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(inbox, "fifo.dsse"), 0o600); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.dir, "elsewhere.dsse"), string(e.bundle(2, now)))
	if err := os.Symlink(filepath.Join(e.dir, "elsewhere.dsse"), filepath.Join(inbox, "link.dsse")); err != nil {
		t.Fatal(err)
	}
	lab.WaitFor(t, "the FIFO and the link set aside", shortWait, func() bool {
		_, err1 := os.Lstat(filepath.Join(inbox, "fifo.dsse.rejected"))
		_, err2 := os.Lstat(filepath.Join(inbox, "link.dsse.rejected"))
		return err1 == nil && err2 == nil
	})
	// The loop is free: it answers at once, repairs the table and takes
	// the next bundle.
	answered := make(chan *adminapi.Response, 1)
	go func() {
		r, _ := adminapi.Call(filepath.Join(e.dir, "run", "admin.sock"), adminapi.Request{Op: adminapi.OpStatus})
		answered <- r
	}()
	select {
	case r := <-answered:
		if r == nil || r.Status.PolicyVersion != 1 {
			t.Fatalf("status after the FIFO: %+v, want policy v1 (the link must not have been followed)", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the agent does not answer with a FIFO in its drop directory")
	}
	e.ns.MustRun(t, "nft", "delete", "table", "inet", nft.Table)
	lab.WaitFor(t, "the table restored", shortWait, func() bool { return strings.Contains(e.tableText(), "chain output") })
	writeFile(t, filepath.Join(inbox, "v3.dsse"), string(e.bundle(3, now)))
	lab.WaitFor(t, "v3 from the drop directory", shortWait, func() bool { return e.call(adminapi.Request{Op: adminapi.OpStatus}).Status.PolicyVersion == 3 })
	e.stop()
	refused := 0
	for _, ev := range e.auditLog() {
		if ev.Kind == "bundle-rejected" && (strings.Contains(ev.Detail, "not a regular file") || strings.Contains(ev.Detail, "symbolic link")) {
			refused++
		}
	}
	if refused != 2 {
		t.Errorf("%d refusals of the FIFO and the link audited, want 2", refused)
	}
}

// What the kernel lists is what the agent says it applied: its reported
// ruleset, loaded by nft -f into a fresh namespace, lists identically.
func TestKernelTableEqualsReportedRuleset(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, time.Now().UTC().Truncate(time.Second))})
	reported := e.call(adminapi.Request{Op: adminapi.OpRuleset}).Ruleset
	file := filepath.Join(e.dir, "reported.nft")
	writeFile(t, file, reported)
	fresh := lab.NewNS(t, "ref")
	fresh.MustRun(t, "nft", "-f", file)
	// Counters, and the order the kernel lists what was created along
	// different paths, differ by nature.
	listing := func(ns *lab.NS) string {
		return lab.CanonicalTable(ns.MustRun(t, "nft", "list", "table", "inet", nft.Table))
	}
	kernel, want := listing(e.ns), listing(fresh)
	if kernel != want {
		t.Errorf("the agent's table differs from the ruleset it reports:\n--- kernel\n%s\n--- reported\n%s", kernel, want)
	}
}
