package bench

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// agentProc is the real agent (`bulkhead run`) in a namespace.
type agentProc struct {
	ns       *lab.NS
	bin, dir string
	sock     string
	class    string
	pid      int
	ops      opsKeys // what it trusts
	// PublicKey is the agent's WireGuard key.
	PublicKey string
}

// runAgent starts an agent of class in ns with the tunnel address
// tunAddr (listenPort 0 picks a free port), trusting ops (nil: a key of
// its own), and waits until its tunnel is up. It is killed, and its table
// and UAPI socket removed, at cleanup.
func runAgent(b testing.TB, ns *lab.NS, class, tunAddr string, listenPort uint16, ops *opsKeys) *agentProc {
	b.Helper()
	a := &agentProc{ns: ns, bin: lab.Binary(b, "cmd/bulkhead"), dir: b.TempDir(), class: class}
	if ops == nil {
		ops = newOpsKeys(b, a.dir)
	}
	a.ops = *ops
	pubFile := a.ops.pubFile
	iface := "bh-" + ns.Name[len(ns.Name)-6:]
	a.sock = filepath.Join(a.dir, "admin.sock")
	cfg := filepath.Join(a.dir, "config.json")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`{"device": {"class": %q}, "trust": {"keys": [%q]}, "state_dir": %q, "admin_socket": %q,
  "tunnel": {"interface": %q, "addresses": [%q], "listen_port": %d}}`,
		class, pubFile, filepath.Join(a.dir, "state"), a.sock, iface, tunAddr, listenPort)), 0o600)
	cmd := ns.Command(a.bin, "run", "--config", cfg)
	logf, _ := os.Create(filepath.Join(a.dir, "agent.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	a.pid = cmd.Process.Pid
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		ns.Run("nft", "delete", "table", "inet", nft.Table)
		os.Remove("/var/run/wireguard/" + iface + ".sock")
	})
	deadline := time.Now().Add(10 * time.Second)
	for a.PublicKey == "" {
		if st, err := a.tryStatus(); err == nil {
			a.PublicKey = st.Tunnel.PublicKey
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			b.Fatalf("agent in %s did not come up: %s", ns.Name, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
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
	file := filepath.Join(a.dir, fmt.Sprintf("policy-%d.dsse", version))
	os.WriteFile(file, raw, 0o600)
	if out, err := exec.Command(a.bin, "policy", "apply", "--socket", a.sock, file).CombinedOutput(); err != nil {
		b.Fatalf("policy apply: %v: %s", err, out)
	}
	return file
}

// enroll enrols the agent with ctl and returns its device id.
func (a *agentProc) enroll(b testing.TB, ctl *lab.Control) string {
	b.Helper()
	token := strings.TrimSpace(strings.Split(ctl.MustCLI(b, "token", "create", "--allow-unknown-class", "--class", a.class), "\n")[0])
	out, err := a.ns.Command(a.bin, "enroll", "--socket", a.sock, "--control", ctl.URL, "--token", token, "--trust-ca", ctl.Fingerprint).CombinedOutput()
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
}

func (a *agentProc) tryStatus() (agentStatus, error) {
	var st agentStatus
	out, err := exec.Command(a.bin, "status", "--json", "--socket", a.sock).Output()
	if err == nil {
		err = json.Unmarshal(out, &st)
	}
	return st, err
}

func (a *agentProc) status(b testing.TB) agentStatus {
	b.Helper()
	st, err := a.tryStatus()
	if err != nil {
		b.Fatalf("bulkhead status in %s: %v", a.ns.Name, err)
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
