package site

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
)

// Agent is the real `bulkhead run` on one device of the site, configured
// by hand as an installer would (a state directory, the pinned ops key,
// the safety floor) and enrolled with a token.
type Agent struct {
	Name   string // what the demo calls it: "dock gateway"
	Class  string
	NS     *lab.NS
	Dir    string
	Config string
	Socket string
	Iface  string
	// Tunnel is the device's address in the tunnels (gateways route
	// replies to it).
	Tunnel string
	// LAN is its address on the site's network.
	LAN netip.Addr
	// ID is the device id control gave it at enrolment.
	ID   string
	bin  string
	proc *lab.Process
	// link is the router's end of the device's link to the site.
	link string
}

// AgentConfig is what differs between the site's devices.
type AgentConfig struct {
	Name, Class, Tunnel string
	Floor               []map[string]any // the safety floor, as in config.json
	GPSD                string           // gpsd's host:port, for a moving device
}

// newAgent writes the agent's configuration; Start runs it.
func newAgent(t lab.T, ns *lab.NS, c AgentConfig, opsPub string, control map[string]any) *Agent {
	dir := t.TempDir()
	a := &Agent{Name: c.Name, Class: c.Class, NS: ns, Dir: dir, Config: filepath.Join(dir, "config.json"),
		Socket: filepath.Join(dir, "admin.sock"), Iface: "bh-" + ns.Name[len(ns.Name)-6:], Tunnel: c.Tunnel,
		bin: lab.Binary(t, "cmd/bulkhead")}
	cfg := map[string]any{
		"device":       map[string]any{"class": c.Class},
		"trust":        map[string]any{"keys": []string{opsPub}},
		"control":      []any{control},
		"state_dir":    filepath.Join(dir, "state"),
		"drop_dir":     filepath.Join(dir, "inbox"),
		"admin_socket": a.Socket,
		"tunnel":       map[string]any{"interface": a.Iface, "addresses": []string{c.Tunnel}},
		"posture":      map[string]any{"interval": "1s"},
	}
	if c.Floor != nil {
		cfg["safety_floor"] = c.Floor
	}
	if c.GPSD != "" {
		cfg["location"] = map[string]any{"gpsd": c.GPSD}
	}
	raw, _ := json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(a.Config, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "inbox"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.Kill()
		ns.Run("nft", "delete", "table", "inet", "bulkhead")
		os.Remove("/var/run/wireguard/" + a.Iface + ".sock")
	})
	return a
}

// Start runs the agent and waits for its admin socket. No Pdeathsig:
// it fires when the forking OS thread exits, and Go ends threads under
// its feet (lab's namespace switches end theirs).
func (a *Agent) Start(t lab.T) {
	p, err := lab.StartProcess(a.NS, filepath.Join(a.Dir, "agent.log"), a.bin, "run", "--config", a.Config)
	if err != nil {
		t.Fatal(err)
	}
	a.proc = p
	if !lab.Within(10*time.Second, func() bool { _, err := a.admin().Status(); return err == nil }) {
		t.Fatalf("the %s's agent never opened its admin socket: %s", a.Name, a.LogTail(20))
	}
}

// LogTail is the last n lines the agent logged.
func (a *Agent) LogTail(n int) string {
	raw, _ := os.ReadFile(filepath.Join(a.Dir, "agent.log"))
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// Kill stops the agent as a crash or a power cut would; its table stays.
func (a *Agent) Kill() {
	a.proc.Kill()
	a.proc = nil
}

func (a *Agent) admin() adminapi.Client { return adminapi.Client{Socket: a.Socket} }

// Status is `bulkhead status` as data.
func (a *Agent) Status(t lab.T) *adminapi.Status {
	st, err := a.admin().Status()
	if err != nil {
		t.Fatalf("status of the %s: %v", a.Name, err)
	}
	return st
}

// Enroll runs `bulkhead enroll` with token.
func (a *Agent) Enroll(t lab.T, ctl *lab.Control, token string) {
	out, err := a.NS.Command(a.bin, "enroll", "--socket", a.Socket, "--control", ctl.URL, "--token", token, "--trust-ca", ctl.Fingerprint).CombinedOutput()
	if err != nil {
		t.Fatalf("enrolling the %s: %v: %s", a.Name, err, out)
	}
	a.ID = a.Status(t).DeviceID
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
