package installer

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/bulkhead-edge/bulkhead/lab"
)

// A kernel without nf_tables cannot be staged in a test; what its errors
// are taken to mean can.
func TestNFTablesErrors(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{nil, ""},
		{syscall.EPROTONOSUPPORT, "this kernel has no nf_tables support"},
		{fmt.Errorf("receive: %w", syscall.EINVAL), "this kernel has no nf_tables support"},
		{syscall.EOPNOTSUPP, "this kernel has no nf_tables support"},
		{syscall.EPERM, "not permitted to use nf_tables"},
		{syscall.EBUSY, "nf_tables: device or resource busy"},
	} {
		got := nftError(c.err)
		if (got == nil) != (c.want == "") || got != nil && !strings.Contains(got.Error(), c.want) {
			t.Errorf("nftError(%v) = %v, want %q", c.err, got, c.want)
		}
	}
}

func TestTUNErrors(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{&os.PathError{Op: "open", Path: TUNDevice, Err: syscall.ENOENT}, "no TUN device at /dev/net/tun"},
		{&os.PathError{Op: "open", Path: TUNDevice, Err: syscall.ENODEV}, "exists but this kernel has no TUN driver"},
		{&os.PathError{Op: "open", Path: TUNDevice, Err: syscall.EACCES}, "not permitted to open /dev/net/tun"},
	} {
		if got := tunError(TUNDevice, c.err); !strings.Contains(got.Error(), c.want) {
			t.Errorf("tunError(%v) = %v, want %q", c.err, got, c.want)
		}
	}
}

// The unit passes systemd's own checks: systemd-analyze verify prints
// nothing for it (it exits 0 even on directives it ignores, so its output
// is what is checked), and its exposure score stays at most 5.0.
func TestSystemdUnitVerifies(t *testing.T) {
	lab.RequirePrivileged(t, "systemd-analyze") // Debian package systemd
	dir := t.TempDir()
	bin := filepath.Join(dir, "bulkhead")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(dir, "bulkhead.service")
	if err := os.WriteFile(unit, []byte(SystemdUnit(bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, err := exec.Command("systemd-analyze", "security", "--offline=yes", unit).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	var score float64
	if i := strings.Index(string(out), "Overall exposure level for bulkhead.service: "); i < 0 {
		t.Fatalf("no exposure level in:\n%s", out)
	} else if _, err := fmt.Sscanf(string(out[i:]), "Overall exposure level for bulkhead.service: %g", &score); err != nil {
		t.Fatal(err)
	}
	t.Logf("exposure level %.1f", score)
	if score > 5.0 {
		t.Errorf("exposure level %.1f, above 5.0:\n%s", score, out)
	}
	// A unit systemd would parse differently is caught: the check can fail.
	bad := filepath.Join(dir, "bad.service")
	os.WriteFile(bad, []byte(strings.Replace(SystemdUnit(bin), "ProtectSystem=strict", "ProtectSystem=strictly", 1)), 0o644)
	if out, _ := exec.Command("systemd-analyze", "verify", bad).CombinedOutput(); len(out) == 0 {
		t.Error("systemd-analyze verify says nothing about a bad directive; this test cannot fail")
	}
}

func TestSystemdUnitHardening(t *testing.T) {
	unit := SystemdUnit("/usr/sbin/bulkhead")
	for _, want := range []string{
		"ExecStart=/usr/sbin/bulkhead run --config /etc/bulkhead/config.json",
		"CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_PTRACE\n",
		"NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/bulkhead\n",
		"Restart=always", "Type=notify", "Before=network-pre.target", "DefaultDependencies=no",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	// Stopping must not remove the table: no stop command at all.
	if strings.Contains(unit, "ExecStop") || strings.Contains(unit, "cleanup") {
		t.Error("the unit removes something when it stops")
	}
	// kardianos renders scripts as templates: ours must hold no actions,
	// so that the file written is exactly the script.
	for name, s := range map[string]string{"systemd": unit, "openrc": OpenRCScript("/usr/sbin/bulkhead"), "sysv": SysVScript("/usr/sbin/bulkhead")} {
		if strings.Contains(s, "{{") {
			t.Errorf("the %s script holds a template action", name)
		}
	}
}

// The OpenRC and SysV scripts are at least valid sh; the SysV one is run
// for real by TestInstallEnrolsAndIsIdempotent.
func TestInitScriptsParse(t *testing.T) {
	for name, s := range map[string]string{"openrc": OpenRCScript("/usr/sbin/bulkhead"), "sysv": SysVScript("/usr/sbin/bulkhead")} {
		if out, err := exec.Command("sh", "-n", "-c", s).CombinedOutput(); err != nil {
			t.Errorf("%s script: %v: %s", name, err, out)
		}
	}
}
