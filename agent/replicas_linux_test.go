package agent

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/agentproc"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// replicaSite is a control plane of three replicas sharing one
// PostgreSQL, each on a machine (namespace) of its own behind a router,
// and two scanner agents enrolled with the first replica. Everything
// runs as the real binaries.
type replicaSite struct {
	ctl    []*lab.Control
	db     *lab.Postgres
	agents []*agentproc.Agent
	ids    []string
	opsKey string // ops.key file
	priv   ed25519.PrivateKey
}

var replicaAddrs = []netip.AddrPort{
	netip.MustParseAddrPort("10.98.2.2:8443"), netip.MustParseAddrPort("10.98.2.6:8443"), netip.MustParseAddrPort("10.98.2.10:8443"),
}

func newReplicaSite(t *testing.T) *replicaSite {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go")
	s := &replicaSite{}
	dir := t.TempDir()
	s.priv = newOpsKey(t, dir)
	opsPub := filepath.Join(dir, "ops", opskey.PublicFile)
	s.opsKey = filepath.Join(dir, "ops", opskey.PrivateFile)

	router := lab.NewNS(t, "rtr")
	router.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	// hang puts a new namespace on the router's n-th /30 of base.
	hang := func(prefix, base string, n int) *lab.NS {
		ns := lab.NewNS(t, prefix)
		b := netip.MustParsePrefix(base).Addr().As4()
		b[3] = byte(4 * n)
		gw := netip.AddrFrom4(b).Next()
		lab.Link(t, router, gw.String()+"/30", ns, gw.Next().String()+"/30")
		ns.MustRun(t, "ip", "route", "add", "default", "via", gw.String())
		return ns
	}
	s.db = lab.StartPostgres(t, hang("db", "10.98.3.0/24", 0), netip.MustParseAddrPort("10.98.3.2:5432"))
	opts := lab.ControlOptions{OpsPub: []string{opsPub}, Database: s.db.URL}
	for i, addr := range replicaAddrs {
		ns := hang(fmt.Sprint("ctl", i), "10.98.2.0/24", i)
		if i > 0 {
			opts.SecretsFrom, opts.Names = s.ctl[0].Data, []string{replicaAddrs[0].Addr().String()}
		}
		s.ctl = append(s.ctl, lab.StartControlWith(t, ns, addr, opts))
	}
	for i := range 2 {
		a := agentproc.New(t, hang("agent", "10.98.1.0/24", i), config.Config{
			Device: config.Device{Class: "scanner"}, Trust: config.Trust{Keys: []string{opsPub}},
		})
		a.Start(t)
		tok := strings.Fields(s.ctl[0].MustCLI(t, "token", "create", "--allow-unknown-class", "--class", "scanner", "--ttl", "1h"))[0]
		if out, err := a.Enroll(s.ctl[0].URL, tok, s.ctl[0].Fingerprint); err != nil {
			t.Fatalf("enroll: %v %s", err, out)
		}
		s.agents, s.ids = append(s.agents, a), append(s.ids, a.Status(t).DeviceID)
	}
	// The policy lists every replica: the agents' tables keep them open,
	// and their control channels fail over between them.
	s.ctl[1].MustCLI(t, "policy", "push", s.bundle(t))
	for _, a := range s.agents {
		lab.WaitFor(t, "policy v1 through a replica", longWait, func() bool { return a.Status(t).PolicyVersion == 1 })
	}
	return s
}

// bundle is policy v1: wms and acme-freight's finance for scanners, the
// three replicas as control. The gateways named are never reached: what
// is tested is that the orders land.
func (s *replicaSite) bundle(t *testing.T) string {
	t.Helper()
	key := func() string {
		k := make([]byte, 32)
		rand.Read(k)
		return base64.StdEncoding.EncodeToString(k)
	}
	var control []string
	for _, a := range replicaAddrs {
		control = append(control, fmt.Sprintf(`{"address": %q, "port": %d}`, a.Addr(), a.Port()))
	}
	doc, err := policy.Parse([]byte(fmt.Sprintf(`{
  "schema": "bulkhead.policy/v1",
  "control": [%s],
  "validity": {"max_offline": "72h"},
  "segments": [
    {"name": "wms", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": %q, "endpoint": "10.98.9.1:51820"}},
    {"name": "finance", "data_class": "financial", "tier": 1, "partner": "acme-freight",
     "destinations": [{"cidr": "10.30.0.0/24", "protocol": "tcp", "ports": ["443"]}],
     "gateway": {"public_key": %q, "endpoint": "10.98.9.5:51820"}}
  ],
  "classes": {"scanner": {"rules": [{"segment": "wms"}, {"segment": "finance"}]}}
}`, strings.Join(control, ", "), key(), key())))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "policy.dsse")
	if err := os.WriteFile(path, signFor(t, 1, doc, s.priv), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// applied reports whether every device holds order id, as replica c
// shows it.
func (s *replicaSite) applied(t *testing.T, c *lab.Control, id string) bool {
	out, err := c.CLI("orders", "--json", id)
	if err != nil {
		return false
	}
	var os []controlapi.Order
	if err := json.Unmarshal([]byte(out), &os); err != nil || len(os) != 1 {
		t.Fatalf("orders --json: %v\n%s", err, out)
	}
	o := os[0]
	n := 0
	for _, d := range o.Devices {
		if d.State == controlapi.OrderApplied {
			n++
		}
	}
	return n == len(s.agents) && len(o.Devices) == n
}

// The replica every device holds its poll on is killed (SIGKILL) right
// after a partner revocation committed on another: every device still
// applies it. With that replica still down, an order given through
// another reaches the devices that were connected to it. PostgreSQL
// then crashes under the replicas: the devices enforce throughout, and
// once it is back the replicas reconnect by themselves and orders land
// again.
func TestControlReplicasFailOver(t *testing.T) {
	s := newReplicaSite(t)
	a, b, c := s.ctl[0], s.ctl[1], s.ctl[2]
	for _, ag := range s.agents {
		if st := ag.Status(t).Control; st == nil || !st.Connected {
			t.Fatalf("agent not connected to control: %+v", st)
		}
	}

	out := c.MustCLI(t, "revoke-partner", "acme-freight", "--reason", "INC-300 partner breach")
	a.Stop()
	id := orderID(t, out)
	for _, ag := range s.agents {
		lab.WaitFor(t, "the revocation on a device whose replica died", longWait, func() bool { return revoked(t, ag) })
	}
	lab.WaitFor(t, "every device to report the revocation to the replicas left", longWait, func() bool { return s.applied(t, b, id) })

	// Given while their first replica is still down.
	b.MustCLI(t, "quarantine", s.ids[0], "--reason", "INC-301")
	lab.WaitFor(t, "a quarantine given while the replica was down", longWait, func() bool { return s.agents[0].Status(t).Mode == "quarantine" })

	// The database crashes: control refuses orders, devices enforce.
	s.db.Stop(t)
	if out, err := c.CLI("quarantine", s.ids[1], "--reason", "INC-302"); err == nil {
		t.Errorf("an order was acknowledged with the database down: %s", out)
	}
	for i, ag := range s.agents {
		st := ag.Status(t)
		want := map[int]string{0: "quarantine", 1: "normal"}[i]
		// (A quarantined device opens no segment, so shows no revocation.)
		if st.Mode != want || (i == 1 && !revoked(t, ag)) {
			t.Errorf("agent %d with the database down: mode %s, partner revoked %v; want %s (and revoked)", i, st.Mode, revoked(t, ag), want)
		}
		if _, err := ag.NS.Run("nft", "list", "table", "inet", "bulkhead"); err != nil {
			t.Errorf("agent %d's table with the database down: %v", i, err)
		}
	}
	s.db.Start(t)
	t.Cleanup(func() {
		if t.Failed() {
			for i, c := range s.ctl {
				log, _ := os.ReadFile(filepath.Join(c.Data, "serve.log"))
				t.Logf("DEBUG replica %d:\n%s", i, log)
			}
			st, _ := s.agents[0].CLI("status")
			t.Logf("DEBUG agent 0:\n%s", st)
		}
	})

	// Back: an ops-signed release given through another replica lands.
	lab.WaitFor(t, "an order accepted after the restart", longWait, func() bool {
		_, err := c.CLI("release", s.ids[0], "--reason", "INC-301 closed", "--key", s.opsKey)
		return err == nil
	})
	lab.WaitFor(t, "the release after the database restart", longWait, func() bool { return s.agents[0].Status(t).Mode == "normal" })
	if got := s.agents[1].Status(t).Mode; got != "normal" {
		t.Errorf("the other agent is in %s", got)
	}
}

// orderID is the order a command's output names.
func orderID(t *testing.T, out string) string {
	t.Helper()
	for _, f := range strings.Fields(out) {
		if strings.HasPrefix(f, "order-") {
			return f
		}
	}
	t.Fatalf("no order id in %q", out)
	return ""
}
