package agent

import (
	"context"
	"crypto/ed25519"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// The decision tests run the whole agent (boot, the event loop, the
// store, the sampler, the drop directory) with in-memory edges
// (fakes_test.go) and no root. Each runs in a synctest bubble: time is
// the bubble's, starting at midnight UTC on 2000-01-01, and moves only
// when every goroutine of the test waits, so an hour of schedule passes
// at once and no assertion depends on how fast the machine is.

// decisionPolicy opens wms (10.20.1.0/24) from 01:00 to 02:00 UTC and
// diagnostics (10.50.0.0/28) always; a running telnetd quarantines.
const decisionPolicy = `{
  "schema": "bulkhead.policy/v1",
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "validity": {"max_offline": "72h"},
  "segments": [
    {"name": "wms", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": "5p2fPOTJKkll/Ed47AnOR2v5sJGQzt1u2YTxkfOVjzQ=", "endpoint": "10.10.0.21:51820"}},
    {"name": "diagnostics", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.50.0.0/28", "protocol": "tcp", "ports": ["22"]}],
     "gateway": {"public_key": "SXKy/LKolDhhWm4jr/AmtT32BvKWEtxvkPMWgWq492A=", "endpoint": "10.10.0.23:51820"}}
  ],
  "schedules": {"one-to-two": {"zone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "01:00", "end": "02:00"}},
  "classes": {"scanner": {
    "rules": [{"segment": "wms", "schedule": "one-to-two"}, {"segment": "diagnostics"}],
    "profiles": {"diagnostic": ["diagnostics"]},
    "checks": [{"id": "no-remote-shell", "forbidden_process": {"name": "telnetd"}, "profile": "quarantine"}]
  }}
}`

const (
	wmsDst   = "10.20.1.0/24 . 6 . 443"
	diagDst  = "10.50.0.0/28 . 6 . 22"
	floorDst = "192.168.50.0/29 . 6 . 502"
	wmsKey   = "5p2fPOTJKkll/Ed47AnOR2v5sJGQzt1u2YTxkfOVjzQ="
	diagKey  = "SXKy/LKolDhhWm4jr/AmtT32BvKWEtxvkPMWgWq492A="
)

// device is one device's disk (its configuration, ops key and state
// directory), which outlives the agents started on it.
type device struct {
	t   *testing.T
	dir string
	key ed25519.PrivateKey // the pinned ops key
	doc *policy.Document
}

func newDevice(t *testing.T) *device {
	dir := t.TempDir()
	doc, err := policy.Parse([]byte(decisionPolicy))
	if err != nil {
		t.Fatal(err)
	}
	d := &device{t: t, dir: dir, key: newOpsKey(t, dir), doc: doc}
	if err := os.MkdirAll(d.inbox(), 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *device) inbox() string { return filepath.Join(d.dir, "state", "inbox") }

func (d *device) config() *config.Config {
	d.t.Helper()
	floor := policy.Destination{CIDR: netip.MustParsePrefix("192.168.50.0/29"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 502, Last: 502}}}
	cfg, err := config.Config{
		Device:      config.Device{ID: "scanner-17", Class: "scanner"},
		Trust:       config.Trust{Keys: []string{filepath.Join(d.dir, "ops", opskey.PublicFile)}},
		SafetyFloor: []localpolicy.FloorRule{{Name: "plc", Destination: floor}},
		StateDir:    filepath.Join(d.dir, "state"),
		AdminSocket: filepath.Join(d.dir, "run", "admin.sock"),
		Posture:     config.PostureConfig{Interval: policy.Duration(10 * time.Minute)},
	}.Resolve()
	if err != nil {
		d.t.Fatal(err)
	}
	return cfg
}

// bundle signs the decision policy as version v, issued now and valid a
// day, with key (the pinned one when nil).
func (d *device) bundle(v uint64, key ed25519.PrivateKey) []byte {
	d.t.Helper()
	if key == nil {
		key = d.key
	}
	now := time.Now().UTC()
	raw, err := bundle.Sign(bundle.Payload{Version: v, IssuedAt: now, ExpiresAt: now.Add(24 * time.Hour),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: *d.doc}, key)
	if err != nil {
		d.t.Fatal(err)
	}
	return raw
}

// command signs a command for this device, issued now, with key.
func (d *device) command(id string, kind command.Kind, key ed25519.PrivateKey) []byte {
	now := time.Now().UTC()
	return sign(d.t, command.Command{ID: id, Kind: kind, Target: command.Target{Devices: []string{"scanner-17"}},
		Reason: "decision test", IssuedAt: now, ExpiresAt: now.Add(10 * time.Minute)}, key)
}

// auditKinds reads the audit log of a device whose agent has stopped.
func (d *device) auditKinds() []string { return kinds(auditLogIn(d.t, d.dir)) }

// running is one agent on a device, with in-memory edges.
type running struct {
	t      *testing.T
	a      *Agent
	edges  *edges
	table  *memTable
	tun    *memTunnel
	host   *memPosture
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// boot boots an agent on d as after a power cycle (no table in the
// kernel); its loop is not running yet.
func (d *device) boot(host *memPosture) *running {
	d.t.Helper()
	e := &edges{}
	r := &running{t: d.t, edges: e, table: &memTable{edges: e}, tun: &memTunnel{}, host: host, done: make(chan struct{})}
	r.a = New(d.config(), WithEnforcer(r.table), WithTunnel(r.tun.open(e)), WithPosture(host), WithFlowLog(openMemFlowLog),
		WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err := r.a.Boot(); err != nil {
		d.t.Fatalf("Boot: %v", err)
	}
	return r
}

// start boots an agent and runs its loop until the test ends or stop.
func (d *device) start(host *memPosture) *running {
	r := d.boot(host)
	r.run()
	return r
}

// enforcing starts an agent and gives it policy v1.
func (d *device) enforcing(host *memPosture) *running {
	d.t.Helper()
	r := d.start(host)
	if err := r.apply(d.bundle(1, nil)); err != "" {
		d.t.Fatal(err)
	}
	return r
}

// run runs a booted agent's loop until the test ends or stop.
func (r *running) run() {
	r.ctx, r.cancel = context.WithCancel(context.Background())
	go func() { r.a.loop(r.ctx); close(r.done) }()
	r.t.Cleanup(r.stop)
	synctest.Wait()
}

func (r *running) stop() {
	if r.cancel != nil {
		r.cancel()
		<-r.done
		r.cancel = nil
	}
}

// do asks the loop as the admin socket does, and waits for what it set
// off (a sample, a reconcile) to settle.
func (r *running) do(req adminapi.Request) adminapi.Response {
	resp := r.a.Do(r.ctx, req)
	synctest.Wait()
	return resp
}

func (r *running) status() *adminapi.Status {
	r.t.Helper()
	resp := r.do(adminapi.Request{Op: adminapi.OpStatus})
	if resp.Status == nil {
		r.t.Fatalf("status: %s", resp.Error)
	}
	return resp.Status
}

// apply offers raw through the admin socket, as `bulkhead policy apply`.
func (r *running) apply(raw []byte) string {
	return r.do(adminapi.Request{Op: adminapi.OpApply, Bundle: raw}).Error
}

// want fails the test unless the agent is in mode with exactly the
// segments open, in its status, its table and its tunnel's peers.
func (r *running) want(what, mode string, open ...string) {
	r.t.Helper()
	st := r.status()
	if st.Mode != mode || !slices.Equal(st.Open, open) {
		r.t.Fatalf("%s: mode %s with %v open (%v); want %s with %v", what, st.Mode, st.Open, st.Why, mode, open)
	}
	table := r.table.text()
	dsts := map[string]string{"wms": wmsDst, "diagnostics": diagDst}
	keys := map[string]string{"wms": wmsKey, "diagnostics": diagKey}
	var peers []string
	for seg, dst := range dsts {
		if in := slices.Contains(open, seg); in != strings.Contains(table, dst) {
			r.t.Fatalf("%s: %s open %v, but the table says otherwise:\n%s", what, seg, in, table)
		}
		if slices.Contains(open, seg) {
			peers = append(peers, keys[seg])
		}
	}
	slices.Sort(peers)
	if got := r.tun.gateways(); !slices.Equal(got, peers) {
		r.t.Fatalf("%s: tunnel peers %v, want %v", what, got, peers)
	}
	if !strings.Contains(table, floorDst) {
		r.t.Fatalf("%s: the safety floor is not in the table:\n%s", what, table)
	}
}

// At 00:00 the wms schedule is closed: a device on the decision policy has
// diagnostics open alone.
const closedHours = "diagnostics"

func TestDecideBootLockdownThenCacheBeforeTunnel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.start(newMemPosture("init"))
		r.want("first boot", "lockdown")
		if why := strings.Join(r.status().Why, "; "); !strings.Contains(why, "no policy has been accepted yet") {
			t.Fatalf("first boot: why %q, want the reason", why)
		}
		if got := r.edges.list(); len(got) < 2 || got[0] != "table applied" || got[1] != "tunnel up" {
			t.Fatalf("first boot touched %q; want the lockdown table before the tunnel", got)
		}
		if err := r.apply(d.bundle(1, nil)); err != "" {
			t.Fatal(err)
		}
		r.want("policy v1", "normal", closedHours)
		r.stop()

		// Power cycle: the kernel holds no table. The cached policy is
		// enforced by Boot itself, before the loop runs and before the
		// tunnel exists; the static lockdown table comes first of all.
		r = d.boot(newMemPosture("init"))
		got, applied := r.edges.list(), r.table.applied
		if len(got) < 3 || !slices.Equal(got[:3], []string{"table applied", "table applied", "tunnel up"}) || strings.Contains(applied[0], diagDst) ||
			!strings.Contains(applied[0], floorDst) || !strings.Contains(applied[1], diagDst) {
			t.Fatalf("boot from cache did %q, applying:\n%s\nwant the lockdown table, then the cached policy, then the tunnel",
				got, strings.Join(applied, "\n---\n"))
		}
		r.run()
		r.want("restart from cache", "normal", closedHours)
		if st := r.status(); st.PolicyVersion != 1 {
			t.Fatalf("restart from cache: policy v%d, want v1", st.PolicyVersion)
		}
	})
}

func TestDecideDamagedCacheBootsIntoLockdown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.enforcing(newMemPosture("init"))
		r.stop()
		db := filepath.Join(d.dir, "state", "state.db")
		if err := os.WriteFile(db, []byte(strings.Repeat("not a bbolt file ", 512)), 0o600); err != nil {
			t.Fatal(err)
		}
		r = d.start(newMemPosture("init"))
		r.want("damaged cache", "lockdown")
		if err := r.apply(d.bundle(2, nil)); !strings.Contains(err, "policy cache unusable") {
			t.Fatalf("a bundle offered with no usable cache: %q, want it refused", err)
		}
		r.want("bundle offered to a damaged cache", "lockdown")
	})
}

func TestDecideBundleAcceptedOrRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.start(newMemPosture("init"))
		if err := r.apply(d.bundle(2, nil)); err != "" {
			t.Fatal(err)
		}
		other := newOpsKey(t, t.TempDir())
		stale := d.bundle(1, nil)
		for name, raw := range map[string][]byte{
			"signed by a key not pinned":  d.bundle(3, other),
			"older than the one in force": stale,
			"not a bundle":                []byte(`{"payloadType": "x"}`),
		} {
			err := r.apply(raw)
			if !strings.Contains(err, "bundle rejected, previous policy still enforced") {
				t.Errorf("%s: %q, want it rejected", name, err)
			}
			r.want(name, "normal", closedHours)
			if v := r.status().PolicyVersion; v != 2 {
				t.Errorf("%s: policy v%d in force, want v2", name, v)
			}
		}
	})
}

func TestDecideCommandObeyedOrRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.enforcing(newMemPosture("init"))
		other := newOpsKey(t, t.TempDir())
		if err := r.apply(d.command("quarantine-by-stranger", command.Quarantine, other)); !strings.Contains(err, "command refused") {
			t.Fatalf("a quarantine signed by an unknown key: %q, want it refused", err)
		}
		r.want("a forged quarantine", "normal", closedHours)

		if err := r.apply(d.command("quarantine-0001", command.Diagnostic, d.key)); err != "" {
			t.Fatal(err)
		}
		r.want("diagnostic order", "diagnostic", "diagnostics")
		release := d.command("release-by-stranger", command.Release, other)
		if err := r.apply(release); !strings.Contains(err, "command refused") {
			t.Fatalf("a release signed by an unknown key: %q, want it refused", err)
		}
		r.want("a forged release", "diagnostic", "diagnostics")
		if err := r.apply(d.command("release-0001", command.Release, d.key)); err != "" {
			t.Fatal(err)
		}
		r.want("released", "normal", closedHours)
		r.stop()
		audit := d.auditKinds()
		if n := count(audit, "command-rejected"); n != 2 {
			t.Errorf("audit %v: %d refused commands, want 2", audit, n)
		}
		if n := count(audit, "command-obeyed"); n != 2 {
			t.Errorf("audit %v: %d obeyed commands, want 2", audit, n)
		}
	})
}

func TestDecideScheduleEdges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.enforcing(newMemPosture("init"))
		r.want("00:00", "normal", closedHours)
		opens := time.Date(2000, 1, 1, 1, 0, 0, 0, time.UTC)
		if next := r.status().NextChange; !next.Equal(opens) {
			t.Fatalf("next change %v, want %v", next, opens)
		}
		time.Sleep(time.Until(opens) - time.Nanosecond)
		synctest.Wait()
		r.want("an instant before 01:00", "normal", closedHours)
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		r.want("01:00", "normal", "diagnostics", "wms")
		time.Sleep(time.Hour)
		synctest.Wait()
		r.want("02:00", "normal", closedHours)
	})
}

func TestDecideFailingCheckAndRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		host := newMemPosture("init")
		r := d.enforcing(host)
		r.want("clean host", "normal", closedHours)
		host.run("init", "telnetd")
		time.Sleep(time.Second) // the sampler spaces samples a change triggers
		synctest.Wait()
		r.want("telnetd running", "quarantine")
		if c := r.status().Checks; len(c) != 1 || !c[0].Failing || c[0].ID != "no-remote-shell" {
			t.Fatalf("checks %+v, want no-remote-shell failing", c)
		}
		host.run("init")
		time.Sleep(time.Second)
		synctest.Wait()
		r.want("telnetd gone", "normal", closedHours)
		r.stop()
		audit := d.auditKinds()
		if !slices.Contains(audit, "check-failed") || !slices.Contains(audit, "check-recovered") {
			t.Errorf("audit %v: want the failure and the recovery", audit)
		}
	})
}

func TestDecideDriftRepaired(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.enforcing(newMemPosture("init"))
		r.table.tamper("rule accept added to chain output")
		time.Sleep(driftCheckEvery)
		synctest.Wait()
		if got := r.edges.list(); got[len(got)-1] != "table repaired" {
			t.Fatalf("after tampering the table, the agent did %q; want it repaired", got[len(got)-1])
		}
		if st := r.status(); st.DriftRepairs != 1 {
			t.Fatalf("drift repairs %d, want 1", st.DriftRepairs)
		}
		r.want("repaired", "normal", closedHours)
		r.stop()
		if audit := d.auditKinds(); !slices.Contains(audit, "drift-repaired") {
			t.Errorf("audit %v: no drift-repaired", audit)
		}
	})
}

func TestDecideDropDirectory(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.start(newMemPosture("init"))
		// Files copied in a while ago: one the agent must take, one
		// signed by a stranger it must refuse and set aside.
		good, bad := filepath.Join(d.inbox(), "v1.dsse"), filepath.Join(d.inbox(), "forged.dsse")
		writeFile(t, good, string(d.bundle(1, nil)))
		writeFile(t, bad, string(d.command("quarantine-forged", command.Quarantine, newOpsKey(t, t.TempDir()))))
		for _, f := range []string{good, bad} {
			then := time.Now().Add(-time.Minute)
			if err := os.Chtimes(f, then, then); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(2 * dropScanEvery)
		synctest.Wait()
		r.want("after the drop", "normal", closedHours)
		if _, err := os.Stat(good); !os.IsNotExist(err) {
			t.Errorf("an accepted file stays in the drop directory: %v", err)
		}
		if _, err := os.Stat(bad + ".rejected"); err != nil {
			t.Errorf("a refused file is not set aside: %v", err)
		}
		// A file still being copied in (modified within the scan period)
		// waits for the next scan.
		writeFile(t, filepath.Join(d.inbox(), "v2.dsse"), string(d.bundle(2, nil)))
		now := time.Now()
		if err := os.Chtimes(filepath.Join(d.inbox(), "v2.dsse"), now, now); err != nil {
			t.Fatal(err)
		}
		time.Sleep(dropScanEvery / 2)
		synctest.Wait()
		if v := r.status().PolicyVersion; v != 1 {
			t.Fatalf("a file still being written was taken: policy v%d", v)
		}
		time.Sleep(2 * dropScanEvery)
		synctest.Wait()
		if v := r.status().PolicyVersion; v != 2 {
			t.Fatalf("policy v%d after the copy settled, want v2", v)
		}
	})
}

func count(s []string, v string) int {
	n := 0
	for _, x := range s {
		if x == v {
			n++
		}
	}
	return n
}

// Enrolment runs off the loop: while the server keeps the device waiting
// (up to enrolTimeout), the loop answers status, refuses a second
// enrolment and repairs drift; the table lets the server through only
// while the enrolment lasts. Before, the whole exchange ran on the loop:
// status waited for it, and so did drift repair.
func TestDecideEnrolmentDoesNotHoldTheLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newDevice(t)
		r := d.boot(newMemPosture("init"))
		release := make(chan error)
		r.a.enrol = func(ctx context.Context, _, _, _, _ string, _ controlclient.Who, _ string, _ netip.AddrPort) (*controlclient.Record, error) {
			select {
			case err := <-release:
				return nil, err
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		r.run()
		if err := r.apply(d.bundle(1, nil)); err != "" {
			t.Fatal(err)
		}
		const server = "10.77.0.9"
		if strings.Contains(r.table.text(), server) {
			t.Fatalf("the table lets %s through before any enrolment:\n%s", server, r.table.text())
		}
		enrolled := make(chan adminapi.Response)
		go func() {
			enrolled <- r.a.Do(r.ctx, adminapi.Request{Op: adminapi.OpEnroll, URL: "https://" + server + ":8443", Token: "t", Fingerprint: "f"})
		}()
		synctest.Wait() // the exchange is under way, held by the server
		if !strings.Contains(r.table.text(), server) {
			t.Fatalf("the table does not let the server through during the enrolment:\n%s", r.table.text())
		}
		if resp := r.do(adminapi.Request{Op: adminapi.OpEnroll, URL: "https://10.77.0.10:8443"}); !strings.Contains(resp.Error, "an enrolment with https://10.77.0.9:8443 is in progress") {
			t.Fatalf("a second enrolment during the first: %q", resp.Error)
		}
		r.table.tamper("rule accept added to chain output")
		time.Sleep(driftCheckEvery)
		synctest.Wait()
		if st := r.status(); st.DriftRepairs != 1 {
			t.Fatalf("during the enrolment: drift repairs %d, want 1", st.DriftRepairs)
		}
		release <- errors.New("the server hung up")
		if resp := <-enrolled; resp.Error != "enrolment failed: the server hung up" {
			t.Fatalf("failed enrolment answered %q", resp.Error)
		}
		synctest.Wait()
		if strings.Contains(r.table.text(), server) {
			t.Fatalf("the table still lets the server through after the enrolment failed:\n%s", r.table.text())
		}
		r.want("after the failed enrolment", "normal", closedHours)
		r.stop()
		if audit := d.auditKinds(); !slices.Contains(audit, "enrolment-failed") {
			t.Errorf("audit %v: no enrolment-failed", audit)
		}
	})
}
