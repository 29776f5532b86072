package bench

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/agentproc"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// agentProc is the real agent (`bulkhead run`, agentproc.Agent) in a namespace.
type agentProc struct {
	*agentproc.Agent
	class string
	ops   opsKeys // what it trusts
	// PublicKey is the agent's WireGuard key.
	PublicKey string
}

// runAgent starts an agent of class in ns with the tunnel address
// tunAddr (listenPort 0 picks a free port), trusting ops (nil: a key of
// its own), and waits until its tunnel is up. It is killed, and its table
// and UAPI socket removed, at cleanup.
func runAgent(b testing.TB, ns *lab.NS, class, tunAddr string, listenPort uint16, ops *opsKeys) *agentProc {
	b.Helper()
	if ops == nil {
		ops = newOpsKeys(b, b.TempDir())
	}
	a := &agentProc{class: class, ops: *ops, Agent: agentproc.New(b, ns, config.Config{
		Device: config.Device{Class: class},
		Trust:  config.Trust{Keys: []string{ops.pubFile}},
		Tunnel: config.TunnelConfig{Addresses: []netip.Prefix{netip.MustParsePrefix(tunAddr)}, ListenPort: listenPort},
	})}
	a.Start(b)
	lab.WaitFor(b, "the agent's tunnel in "+ns.Name, 10*time.Second, func() bool {
		if st, err := a.tryStatus(); err == nil {
			a.PublicKey = st.Tunnel.PublicKey
		}
		return a.PublicKey != ""
	})
	return a
}

// apply signs doc for the agent's class and hands it to the agent.
// apply signs doc as version for the agent's class, applies it through
// the agent's socket, and returns the bundle's file.
func (a *agentProc) apply(b testing.TB, version uint64, doc policy.Document) string {
	b.Helper()
	now := time.Now().UTC()
	raw, err := bundle.Sign(bundle.Payload{Version: version, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: []string{a.class}}, Policy: doc}, a.ops.priv)
	if err != nil {
		b.Fatal(err)
	}
	file := filepath.Join(a.Dir, fmt.Sprintf("policy-%d.dsse", version))
	os.WriteFile(file, raw, 0o600)
	if out, err := a.CLI("policy apply", file); err != nil {
		b.Fatalf("policy apply: %v: %s", err, out)
	}
	return file
}

// signFile signs doc as version for classes and returns the bundle's
// file.
func (k *opsKeys) signFile(b testing.TB, version uint64, doc policy.Document, classes ...string) string {
	b.Helper()
	now := time.Now().UTC()
	raw, err := bundle.Sign(bundle.Payload{Version: version, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: classes}, Policy: doc}, k.priv)
	if err != nil {
		b.Fatal(err)
	}
	file := filepath.Join(b.TempDir(), fmt.Sprintf("policy-%d.dsse", version))
	if err := os.WriteFile(file, raw, 0o600); err != nil {
		b.Fatal(err)
	}
	return file
}

// enroll enrols the agent with ctl and returns its device id.
func (a *agentProc) enroll(b testing.TB, ctl *lab.Control) string {
	b.Helper()
	token := strings.TrimSpace(strings.Split(ctl.MustCLI(b, "token", "create", "--allow-unknown-class", "--class", a.class), "\n")[0])
	out, err := a.Agent.Enroll(ctl.URL, token, ctl.Fingerprint)
	if err != nil {
		b.Fatalf("enroll: %v %s", err, out)
	}
	st := a.status(b)
	if st.DeviceID == "" {
		b.Fatalf("no device id after enrolment: %+v", st)
	}
	return st.DeviceID
}

// agentStatus is the part of `bulkhead status --json` the benchmarks read.
type agentStatus struct {
	DeviceID string `json:"device_id"`
	Mode     string `json:"mode"`
	// Decisions say, per segment, whether it is open and why.
	Decisions []struct {
		Segment string
		Allowed bool
	} `json:"decisions"`
	Tunnel struct {
		PublicKey string `json:"public_key"`
	} `json:"tunnel"`
	Gateway *struct {
		Admitted int `json:"admitted"`
	} `json:"gateway"`
}

func (a *agentProc) tryStatus() (agentStatus, error) {
	var st agentStatus
	out, err := a.CLI("status", "--json")
	if err == nil {
		err = json.Unmarshal([]byte(out), &st)
	}
	return st, err
}

func (a *agentProc) status(b testing.TB) agentStatus {
	b.Helper()
	st, err := a.tryStatus()
	if err != nil {
		b.Fatalf("bulkhead status in %s: %v", a.NS.Name, err)
	}
	return st
}

// opsKeys is an ops signing key: in memory, and as the files agents
// trust (pubFile) and `bulkhead-control --key` signs with (privFile).
type opsKeys struct {
	priv              ed25519.PrivateKey
	pubFile, privFile string
}

// newOpsKeys makes an ops signing key in dir/ops.
func newOpsKeys(b testing.TB, dir string) *opsKeys {
	b.Helper()
	if _, err := opskey.Generate(filepath.Join(dir, "ops")); err != nil {
		b.Fatal(err)
	}
	k := &opsKeys{pubFile: filepath.Join(dir, "ops", opskey.PublicFile), privFile: filepath.Join(dir, "ops", opskey.PrivateFile)}
	var err error
	if k.priv, err = opskey.LoadPrivate(k.privFile); err != nil {
		b.Fatal(err)
	}
	return k
}
