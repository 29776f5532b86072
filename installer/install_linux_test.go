package installer_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/installer"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// site is a control server publishing one ops key, and a device host
// linked to it on which `bulkhead install` runs.
type site struct {
	ctl    *lab.Control
	host   *lab.Host
	bin    string // the agent binary, as a technician would carry it
	opsDir string
	floor  string // a safety-floor file
}

func newSite(t *testing.T) *site {
	lab.RequirePrivileged(t, "nft", "nsenter", "unshare", "setpriv")
	s := &site{bin: lab.Binary(t, "cmd/bulkhead"), opsDir: filepath.Join(t.TempDir(), "ops")}
	if _, err := opskey.Generate(s.opsDir); err != nil {
		t.Fatal(err)
	}
	ctlNS, devNS := lab.NewNS(t, "ctl"), lab.NewNS(t, "dev")
	lab.Link(t, devNS, "10.99.0.2/30", ctlNS, "10.99.0.1/30")
	s.ctl = lab.StartControl(t, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"), 0, filepath.Join(s.opsDir, opskey.PublicFile))
	s.host = lab.NewHost(t, devNS)
	t.Cleanup(func() { devNS.Run("nft", "delete", "table", "inet", "bulkhead") })
	s.floor = filepath.Join(t.TempDir(), "floor.json")
	if err := os.WriteFile(s.floor, []byte(`[{"name": "plc", "cidr": "192.168.60.10/32", "protocol": "tcp", "ports": ["502"]}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *site) token(t *testing.T) string {
	t.Helper()
	return strings.Fields(s.ctl.MustCLI(t, "token", "create", "--allow-unknown-class", "--class", "scanner", "--ttl", "1h"))[0]
}

// install runs `bulkhead install` on the host with the usual flags and
// extra ones, and returns its output and error.
func (s *site) install(t *testing.T, extra ...string) (string, error) {
	t.Helper()
	argv := append([]string{s.bin, "install", "--control", s.ctl.URL, "--trust-ca", s.ctl.Fingerprint}, extra...)
	return s.host.Run(argv...)
}

// scannerPolicy is a policy whose scanners may reach only the control
// server, judged by the posture checks given (a JSON list).
func scannerPolicy(checks string) string {
	return `{
  "schema": "bulkhead.policy/v1",
  "control": [{"address": "10.99.0.1", "port": 8443}],
  "validity": {"max_offline": "72h"},
  "segments": [{"name": "wms", "data_class": "operational", "tier": 0,
    "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}],
    "gateway": {"public_key": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=", "endpoint": "192.0.2.1:51820"}}],
  "classes": {"scanner": {"rules": [], "checks": ` + checks + `}}
}`
}

// pushPolicy signs and pushes, as an operator would, a policy for
// scanners that opens nothing but the control server.
func (s *site) pushPolicy(t *testing.T, version int) {
	t.Helper()
	dir := t.TempDir()
	doc := filepath.Join(dir, "policy.json")
	if err := os.WriteFile(doc, []byte(scannerPolicy(`[]`)), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "policy.dsse")
	s.ctl.MustCLI(t, "policy", "sign", "--key", filepath.Join(s.opsDir, opskey.PrivateFile), "--in", doc,
		"--target", "scanner", "--version", fmt.Sprint(version), "--valid-for", "24h", "--out", out)
	s.ctl.MustCLI(t, "policy", "push", out)
}

// status runs `bulkhead status` inside the host until it contains want.
func (s *site) waitStatus(t *testing.T, want string) string {
	t.Helper()
	var out string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		out, _ = s.host.Run(s.bin, "status")
		if strings.Contains(out, want) {
			return out
		}
	}
	t.Fatalf("bulkhead status never showed %q; last:\n%s", want, out)
	return ""
}

// written is what install writes that nothing else changes, as the host
// sees it: path → mode, size and digest (links: their target).
func (s *site) written(t *testing.T) map[string]string {
	t.Helper()
	got := map[string]string{}
	for _, root := range []string{"etc", "usr/local/sbin"} {
		base := filepath.Join(s.host.Dir, root)
		filepath.WalkDir(base, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			rel := "/" + root + strings.TrimPrefix(path, base)
			if !strings.Contains(rel, "bulkhead") {
				return nil
			}
			st, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			desc := st.Mode().String()
			switch {
			case st.Mode()&fs.ModeSymlink != 0:
				dest, _ := os.Readlink(path)
				desc += " -> " + dest
			case st.Mode().IsRegular():
				data, _ := os.ReadFile(path)
				sum := sha256.Sum256(data)
				desc += fmt.Sprintf(" %d %s %s", len(data), hex.EncodeToString(sum[:8]), st.ModTime().Format(time.RFC3339Nano))
			}
			got[rel] = desc
			return nil
		})
	}
	st, err := os.Stat(filepath.Join(s.host.Dir, "var/lib/bulkhead"))
	if err == nil {
		got["/var/lib/bulkhead"] = st.Mode().String()
	}
	return got
}

func (s *site) agentPID(t *testing.T) string {
	t.Helper()
	out, err := s.host.Run("cat", "/run/bulkhead.pid")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(out)
}

func TestInstallEnrolsAndIsIdempotent(t *testing.T) {
	s := newSite(t)
	out, err := s.install(t, "--token", s.token(t), "--safety-floor", s.floor)
	if err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	t.Logf("first install:\n%s", out)
	for _, want := range []string{
		"binary    /usr/local/sbin/bulkhead: copied from " + s.bin,
		"state     /var/lib/bulkhead (0700): created",
		"enrolled  as dev-",
		"ops keys  pinned 1 (threshold 1), published by the control server",
		"config    /etc/bulkhead/config.json (0600), safety floor of 1 rules: written",
		"service   bulkhead for unix-systemv at /etc/init.d/bulkhead: installed",
		"started   bulkhead",
		"agent     mode lockdown, no policy yet",
		"bulkhead status",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("install output lacks %q", want)
		}
	}
	// The files and their modes, as the host sees them.
	modes := map[string]string{
		"/etc/bulkhead/config.json": "-rw-------", "/usr/local/sbin/bulkhead": "-rwxr-xr-x",
		"/etc/init.d/bulkhead": "-rwxr-xr-x", "/var/lib/bulkhead": "drwx------",
		"/var/lib/bulkhead/wg.key": "-rw-------", "/var/lib/bulkhead/identity.key": "-rw-------",
		"/var/lib/bulkhead/device.crt": "-rw-------", "/var/lib/bulkhead/enrolment.json": "-rw-------",
	}
	for path, mode := range modes {
		if got := strings.Fields(s.host.MustRun(t, "stat", "-c", "%A", path))[0]; got != mode {
			t.Errorf("%s has mode %s, want %s", path, got, mode)
		}
	}
	cfg := s.host.MustRun(t, "cat", "/etc/bulkhead/config.json")
	if !strings.Contains(cfg, `"class": "scanner"`) || !strings.Contains(cfg, `"192.168.60.10/32"`) || !regexp.MustCompile(`/etc/bulkhead/ops-[0-9a-f]{16}\.pub`).MatchString(cfg) {
		t.Errorf("config lacks the class, the floor or the pinned key:\n%s", cfg)
	}

	// The agent runs as the service, enforces, and takes a policy signed
	// by the key pinned from control: the pin is the operator's key.
	s.waitStatus(t, "connected")
	s.pushPolicy(t, 1)
	s.waitStatus(t, "policy    version 1")
	if out := s.host.MustRun(t, "nft", "list", "table", "inet", "bulkhead"); !strings.Contains(out, "192.168.60.10") {
		t.Errorf("the table lacks the safety floor:\n%s", out)
	}

	// Twice: every step finds its work done, nothing is rewritten, and
	// the agent is not restarted.
	before, pid := s.written(t), s.agentPID(t)
	out, err = s.install(t)
	if err != nil {
		t.Fatalf("second install: %v\n%s", err, out)
	}
	t.Logf("second install:\n%s", out)
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, " ") || line == "" || strings.HasPrefix(line, "Check") || strings.HasPrefix(line, "checked") || strings.HasPrefix(line, "agent") {
			continue
		}
		if !strings.HasSuffix(line, ": unchanged") && !strings.HasSuffix(line, ": kept") {
			t.Errorf("second install changed something: %q", line)
		}
	}
	if after := s.written(t); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("second install rewrote files:\nbefore %v\nafter  %v", before, after)
	}
	if got := s.agentPID(t); got != pid || pid == "" {
		t.Errorf("agent pid %q became %q: restarted by an install that changed nothing", pid, got)
	}

	// Uninstall keeps the table (fail closed) and the state.
	out, err = s.host.Run(s.bin, "uninstall")
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	t.Logf("uninstall:\n%s", out)
	if !strings.Contains(out, "service   bulkhead stopped and removed") || !strings.Contains(out, "keeps enforcing its last policy") {
		t.Errorf("uninstall output:\n%s", out)
	}
	if _, err := s.host.Run("nft", "list", "table", "inet", "bulkhead"); err != nil {
		t.Errorf("uninstall removed the table: %v", err)
	}
	if _, err := s.host.Run(s.bin, "status"); err == nil {
		t.Error("the agent still answers after uninstall")
	}
	for _, gone := range []string{"/etc/init.d/bulkhead", "/usr/local/sbin/bulkhead", "/etc/rc2.d/S50bulkhead"} {
		if _, err := s.host.Run("test", "-e", gone); err == nil {
			t.Errorf("%s is left after uninstall", gone)
		}
	}

	// Install again: no token needed, the same device, policy from cache.
	id := regexp.MustCompile(`dev-[0-9a-z]+`).FindString(s.host.MustRun(t, "cat", "/var/lib/bulkhead/enrolment.json"))
	out, err = s.install(t)
	if err != nil {
		t.Fatalf("install after uninstall: %v\n%s", err, out)
	}
	if !strings.Contains(out, "enrolled  as "+id+" (class scanner) with "+s.ctl.URL+": kept") || !strings.Contains(out, "agent     mode normal, policy version 1") {
		t.Errorf("install after uninstall:\n%s", out)
	}

	// Purge removes the table and the state, and says so.
	out, err = s.host.Run(s.bin, "uninstall", "--purge")
	if err != nil {
		t.Fatalf("uninstall --purge: %v\n%s", err, out)
	}
	t.Logf("uninstall --purge:\n%s", out)
	for _, want := range []string{"removed   table inet bulkhead: this device no longer enforces", "removed   /etc/bulkhead", "removed   /var/lib/bulkhead"} {
		if !strings.Contains(out, want) {
			t.Errorf("uninstall --purge output lacks %q", want)
		}
	}
	if _, err := s.host.Run("nft", "list", "table", "inet", "bulkhead"); err == nil {
		t.Error("the table survived uninstall --purge")
	}
	for _, gone := range []string{"/etc/bulkhead", "/var/lib/bulkhead"} {
		if _, err := s.host.Run("test", "-e", gone); err == nil {
			t.Errorf("%s survived uninstall --purge", gone)
		}
	}
}

// Each usual field mistake stops install with a message naming it, before
// anything is written, and the token stays unused.
func TestInstallFieldMistakes(t *testing.T) {
	s := newSite(t)
	tok := s.token(t)
	wrongCA := "SHA256:" + strings.Repeat("ab", 32)
	for _, c := range []struct {
		name  string
		argv  []string
		setup func()
		want  string
	}{
		{name: "not root", want: "bulkhead install must run as root",
			argv: []string{"setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", s.bin, "install", "--control", s.ctl.URL, "--trust-ca", s.ctl.Fingerprint, "--token", tok}},
		{name: "no CAP_NET_ADMIN", want: "not permitted to use nf_tables",
			argv: []string{"setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", s.bin, "install", "--control", s.ctl.URL, "--trust-ca", s.ctl.Fingerprint, "--token", tok}},
		{name: "control unreachable", want: "cannot reach the control server https://10.99.0.1:9",
			argv: []string{s.bin, "install", "--control", "https://10.99.0.1:9", "--trust-ca", s.ctl.Fingerprint, "--token", tok}},
		{name: "wrong CA fingerprint", want: "not the pinned " + wrongCA + ": refusing to talk to it",
			argv: []string{s.bin, "install", "--control", s.ctl.URL, "--trust-ca", wrongCA, "--token", tok}},
		{name: "malformed CA fingerprint", want: "--trust-ca: CA fingerprint \"d7293e9c\" must start with SHA256:",
			argv: []string{s.bin, "install", "--control", s.ctl.URL, "--trust-ca", "d7293e9c", "--token", tok}},
		{name: "no TUN", want: "no TUN device at /dev/net/tun", setup: func() { s.host.HideTUN(t) },
			argv: []string{s.bin, "install", "--control", s.ctl.URL, "--trust-ca", s.ctl.Fingerprint, "--token", tok}},
	} {
		if c.setup != nil {
			c.setup()
		}
		out, err := s.host.Run(c.argv...)
		t.Logf("%s: %s", c.name, out)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("%s: err %v, output %q; want an error saying %q", c.name, err, out, c.want)
		}
		for _, p := range []string{"etc/bulkhead", "var/lib/bulkhead", "usr/local/sbin/bulkhead", "etc/init.d/bulkhead"} {
			if _, err := os.Lstat(filepath.Join(s.host.Dir, p)); err == nil {
				t.Errorf("%s: /%s was written", c.name, p)
			}
		}
	}
	// The token was never spent: with the mistake mended, it enrols.
	// (The one mistake a test cannot stage, a kernel without nf_tables,
	// is TestNFTablesErrors's.)
	s.host.MustRun(t, "umount", "/dev/net")
	if out, err := s.install(t, "--token", tok); err != nil {
		t.Fatalf("install after the mistakes: %v\n%s", err, out)
	}
}

// The unit is Type=notify and ordered before network-pre.target: the
// agent must say READY=1 only once its table is in the kernel.
func TestReadyOnlyOnceEnforcing(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns, dir := lab.NewNS(t, "ready"), t.TempDir()
	t.Cleanup(func() {
		ns.Run("nft", "delete", "table", "inet", "bulkhead")
		os.Remove("/var/run/wireguard/bh-ready.sock") // a killed agent leaves it
	})
	if _, err := opskey.Generate(filepath.Join(dir, "ops")); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "config.json")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`{"device": {"class": "scanner"}, "trust": {"keys": [%q]}, "state_dir": %q, "admin_socket": %q, "tunnel": {"interface": "bh-ready"}}`,
		filepath.Join(dir, "ops", opskey.PublicFile), filepath.Join(dir, "state"), filepath.Join(dir, "admin.sock"))), 0o600)
	sock := filepath.Join(dir, "notify.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := ns.Command(lab.Binary(t, "cmd/bulkhead"), "run", "--config", cfg)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ln.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 256)
	n, err := ln.Read(buf)
	if err != nil {
		t.Fatalf("no readiness notification: %v", err)
	}
	if got := string(buf[:n]); got != "READY=1" {
		t.Fatalf("notification %q, want READY=1", got)
	}
	// The agent is stopped (SIGSTOP) before looking, so what is seen is
	// what was there when it said ready, not what it did after.
	cmd.Process.Signal(syscall.SIGSTOP)
	defer cmd.Process.Signal(syscall.SIGCONT)
	out, err := ns.Run("nft", "list", "chain", "inet", "bulkhead", "output")
	if err != nil || !strings.Contains(out, "policy drop") {
		t.Fatalf("READY=1 came before the table was enforcing: %v\n%s", err, out)
	}
}

// The unit's bounding set is exactly Capabilities. Run with only those,
// the agent enforces and can judge a process check by its executable's
// digest; without CAP_SYS_PTRACE it cannot read that digest, and without
// CAP_NET_ADMIN it cannot start at all.
func TestAgentNeedsItsCapabilities(t *testing.T) {
	lab.RequirePrivileged(t, "nft", "setpriv")
	exe, err := filepath.EvalSymlinks("/usr/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	// A process of root's with every capability, as system daemons are.
	sleeper := exec.Command(exe, "300")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	doc, err := policy.Parse([]byte(scannerPolicy(fmt.Sprintf(`[{"id": "edr", "process": {"name": "sleep", "sha256": "%x"}}]`, sha256.Sum256(data)))))
	if err != nil {
		t.Fatal(err)
	}
	keyDir := filepath.Join(t.TempDir(), "ops")
	if _, err := opskey.Generate(keyDir); err != nil {
		t.Fatal(err)
	}
	key, err := opskey.LoadPrivate(filepath.Join(keyDir, opskey.PrivateFile))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	signed, err := bundle.Sign(bundle.Payload{Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: *doc}, key)
	if err != nil {
		t.Fatal(err)
	}
	bin := lab.Binary(t, "cmd/bulkhead")

	run := func(caps []string) (string, error) {
		ns, dir := lab.NewNS(t, "caps"), t.TempDir()
		defer ns.Run("nft", "delete", "table", "inet", "bulkhead")
		defer os.Remove("/var/run/wireguard/bh-caps.sock") // a killed agent leaves it
		cfg, sock, bundlePath := filepath.Join(dir, "config.json"), filepath.Join(dir, "admin.sock"), filepath.Join(dir, "b.dsse")
		os.WriteFile(bundlePath, signed, 0o600)
		os.WriteFile(cfg, []byte(fmt.Sprintf(`{"device": {"class": "scanner"}, "trust": {"keys": [%q]}, "state_dir": %q, "admin_socket": %q, "tunnel": {"interface": "bh-caps"}}`,
			filepath.Join(keyDir, opskey.PublicFile), filepath.Join(dir, "state"), sock)), 0o600)
		set := "-all"
		for _, c := range caps {
			set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
		}
		var log strings.Builder
		cmd := ns.Command("setpriv", "--bounding-set", set, "--inh-caps", "-all", bin, "run", "--config", cfg)
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		defer func() { cmd.Process.Kill(); <-exited }()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			select {
			case err := <-exited:
				exited <- err
				return log.String(), fmt.Errorf("the agent exited: %v", err)
			default:
			}
			if _, err := os.Stat(sock); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return log.String(), errors.New("no admin socket")
			}
		}
		if out, err := exec.Command(bin, "policy", "apply", "--socket", sock, bundlePath).CombinedOutput(); err != nil {
			return string(out), err
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			out, err := exec.Command(bin, "status", "--socket", sock).CombinedOutput()
			if err != nil || strings.Contains(string(out), "check     edr") || time.Now().After(deadline) {
				return string(out), err
			}
		}
	}

	out, err := run(installer.Capabilities)
	if err != nil || !strings.Contains(out, "check     edr passing") {
		t.Errorf("with %v: %v\n%s", installer.Capabilities, err, out)
	}
	out, err = run([]string{"CAP_NET_ADMIN"})
	if err != nil || !strings.Contains(out, "check     edr FAILING") {
		t.Errorf("without CAP_SYS_PTRACE the process digest was still read (so it is not needed): %v\n%s", err, out)
	}
	out, err = run([]string{"CAP_SYS_PTRACE"})
	if err == nil || !strings.Contains(out, "operation not permitted") {
		t.Errorf("without CAP_NET_ADMIN the agent still ran: %v\n%s", err, out)
	}
}
