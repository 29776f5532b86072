// Package agentproc runs the real device agent (`bulkhead run`) in a
// namespace: the one harness the agent's privileged tests, the demo's
// site and the bench drive devices with. It sits apart from lab because
// it writes the agent's configuration type, and lab is imported by the
// tests of packages below the agent.
package agentproc

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
)

// Agent is the real `bulkhead run` in a namespace. Its configuration is written from a config.Config, the type the
// agent reads, so a test states settings as data.
type Agent struct {
	NS *lab.NS
	// Dir holds its configuration (ConfigFile), state (Dir/state), drop
	// directory (Dir/state/inbox), admin socket and log.
	Dir, ConfigFile, Socket string
	// Iface is its tunnel interface, unique per namespace.
	Iface string
	bin   string
	proc  *lab.Process
}

// New writes cfg for an agent in ns, with the state directory, admin
// socket and tunnel interface (unless cfg names one) of its own; Start
// runs it. At cleanup the agent is killed and its table and WireGuard
// socket removed; a failed test logs the agent's log.
func New(t lab.T, ns *lab.NS, cfg config.Config) *Agent {
	t.Helper()
	dir := t.TempDir()
	a := &Agent{NS: ns, Dir: dir, ConfigFile: filepath.Join(dir, "config.json"), Socket: filepath.Join(dir, "admin.sock"),
		Iface: cmp.Or(cfg.Tunnel.Interface, "bh-"+ns.Name[len(ns.Name)-6:]), bin: lab.Binary(t, "cmd/bulkhead")}
	cfg.StateDir, cfg.AdminSocket, cfg.Tunnel.Interface = filepath.Join(dir, "state"), a.Socket, a.Iface
	if _, err := cfg.Resolve(); err != nil {
		t.Fatalf("agent configuration: %v", err)
	}
	raw, err := json.Marshal(cfg, jsontext.Multiline(true), jsontext.WithIndent("  "))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.ConfigFile, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(a.Inbox(), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.Kill()
		if t.Failed() {
			t.Logf("agent in %s:\n%s", ns.Name, a.LogTail(40))
		}
		ns.Run("nft", "delete", "table", "inet", "bulkhead")
		os.Remove("/var/run/wireguard/" + a.Iface + ".sock")
	})
	return a
}

// Inbox is the agent's drop directory.
func (a *Agent) Inbox() string { return filepath.Join(a.Dir, "state", "inbox") }

// Start runs the agent and waits for its admin socket. No Pdeathsig:
// it fires when the forking OS thread exits, and Go ends threads under
// its feet (lab's namespace switches end theirs).
func (a *Agent) Start(t lab.T) {
	t.Helper()
	p, err := lab.StartProcess(a.NS, filepath.Join(a.Dir, "agent.log"), a.bin, "run", "--config", a.ConfigFile)
	if err != nil {
		t.Fatal(err)
	}
	a.proc = p
	if !lab.Within(10*time.Second, func() bool { _, err := a.Admin().Status(); return err == nil }) {
		t.Fatalf("the agent in %s never opened its admin socket: %s", a.NS.Name, a.LogTail(20))
	}
}

// PID is the running agent's process id.
func (a *Agent) PID() int { return a.proc.PID() }

// Kill stops the agent as a crash or a power cut would; its table stays.
func (a *Agent) Kill() {
	a.proc.Kill()
	a.proc = nil
}

// LogTail is the last n lines the agent logged.
func (a *Agent) LogTail(n int) string {
	raw, _ := os.ReadFile(filepath.Join(a.Dir, "agent.log"))
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// Admin is the agent's admin socket.
func (a *Agent) Admin() adminapi.Client { return adminapi.Client{Socket: a.Socket} }

// Status is `bulkhead status` as data.
func (a *Agent) Status(t lab.T) *adminapi.Status {
	t.Helper()
	st, err := a.Admin().Status()
	if err != nil {
		t.Fatalf("status of the agent in %s: %v", a.NS.Name, err)
	}
	return st
}

// Enroll runs `bulkhead enroll` against the control server at url with
// token, pinning the CA fingerprint fp, and returns its output.
func (a *Agent) Enroll(url, token, fp string) (string, error) {
	out, err := a.NS.Command(a.bin, "enroll", "--socket", a.Socket, "--control", url, "--token", token, "--trust-ca", fp).CombinedOutput()
	return string(out), err
}

// CLI runs `bulkhead CMD --socket SOCKET ARGS...` on the device, cmd
// being the command's words ("status", "policy apply").
func (a *Agent) CLI(cmd string, args ...string) (string, error) {
	argv := append(append([]string{a.bin}, strings.Fields(cmd)...), "--socket", a.Socket)
	out, err := a.NS.Command(append(argv, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// Explore is the command line that runs `bulkhead CMD` on the device.
func (a *Agent) Explore(cmd string) string {
	return fmt.Sprintf("ip netns exec %s %s %s --socket %s", a.NS.Name, a.bin, cmd, a.Socket)
}

// Drop puts raw into the drop directory as NAME.dsse, waits (up to
// within) for the agent to take it up, and reports whether it accepted
// it (the file is gone) or refused it (set aside as .rejected).
func (a *Agent) Drop(t lab.T, name string, raw []byte, within time.Duration) bool {
	t.Helper()
	path := filepath.Join(a.Inbox(), name+".dsse")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	rejected := false
	lab.WaitFor(t, "the agent to take up "+name+" from its drop directory", within, func() bool {
		_, err := os.Stat(path + ".rejected")
		rejected = err == nil
		_, err = os.Stat(path)
		return rejected || errors.Is(err, os.ErrNotExist)
	})
	return !rejected
}
