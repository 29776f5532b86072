package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
)

// A damaged cache keeps the device closed, whatever the damage, including
// after a reboot (the table gone before the agent starts): the agent comes
// up, stays up, enforces lockdown (the floor and control only) and says
// why. 2 KB of 0xff over the first page crashed it on every start, and
// after a reboot the device had no table at all. Recovery is a deliberate
// command, with the agent stopped, that keeps the damaged file and refuses
// what the device ran before.
func TestDamagedCacheKeepsTheDeviceClosed(t *testing.T) {
	e := newEnv(t)
	bin := lab.Binary(t, "cmd/bulkhead")
	cache := filepath.Join(e.dir, "state", CacheFile)
	socket := filepath.Join(e.dir, "run", "admin.sock")
	var agent *exec.Cmd
	start := func() {
		t.Helper()
		os.Remove(socket)
		agent = e.ns.Command(bin, "run", "--config", e.cfg)
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		lab.WaitFor(t, "the agent's socket", shortWait, func() bool {
			_, err := adminapi.Call(socket, adminapi.Request{Op: adminapi.OpStatus})
			return err == nil
		})
	}
	stop := func() { agent.Process.Kill(); agent.Wait() }

	start()
	if resp, err := adminapi.Call(socket, adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, time.Now().UTC().Truncate(time.Second))}); err != nil || resp.Error != "" {
		t.Fatalf("apply v1: %v %v", err, resp)
	}
	stop()
	good, err := os.ReadFile(cache)
	if err != nil {
		t.Fatal(err)
	}
	fill := func(off, n int, v byte) func([]byte) []byte {
		return func(b []byte) []byte {
			for i := off; i < off+n && i < len(b); i++ {
				b[i] = v
			}
			return b
		}
	}
	for _, p := range []struct {
		name    string
		corrupt func([]byte) []byte
	}{
		{"0xff over the first 2 KB", fill(0, 2048, 0xff)},
		{"0xff over both meta pages", fill(0, 8192, 0xff)},
		{"zeros over the data pages", fill(8192, 1<<30, 0)},
		{"truncated mid-page", func(b []byte) []byte { return b[:len(b)/2+100] }},
	} {
		if err := os.WriteFile(cache, p.corrupt(append([]byte(nil), good...)), 0o600); err != nil {
			t.Fatal(err)
		}
		e.ns.Run("nft", "delete", "table", "inet", "bulkhead") // a reboot
		start()
		time.Sleep(1500 * time.Millisecond) // a few drift checks: a crash would show
		st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status
		table := e.tableText()
		if agent.ProcessState != nil {
			t.Fatalf("%s: the agent exited", p.name)
		}
		if st.Mode != "lockdown" || !strings.Contains(strings.Join(st.Why, " "), "corrupt") {
			t.Errorf("%s: mode %s (%v), want lockdown naming the damaged cache", p.name, st.Mode, st.Why)
		}
		if !strings.Contains(table, "192.168.50.0/29 . tcp . 502") || !strings.Contains(table, "10.99.0.1 . tcp . 8443") ||
			strings.Contains(table, "segments_") || strings.Contains(table, "gateways_") {
			t.Errorf("%s: the table is not lockdown (floor and control only):\n%s", p.name, table)
		}
		stop()
	}

	// Recovery refuses a running agent, keeps the damaged file, and the
	// device then refuses the bundle it ran before and takes a newer one.
	start()
	if out, err := exec.Command(bin, "recover-cache", "--config", e.cfg).CombinedOutput(); err == nil || !strings.Contains(string(out), "stop it first") {
		t.Errorf("recover-cache with the agent running: %v %s", err, out)
	}
	stop()
	out, err := exec.Command(bin, "recover-cache", "--config", e.cfg, "--refuse-up-to", "1").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "kept at") {
		t.Fatalf("recover-cache: %v %s", err, out)
	}
	if kept, _ := filepath.Glob(cache + ".damaged-*"); len(kept) != 1 {
		t.Errorf("damaged files kept: %v, want one", kept)
	}
	if out, err := exec.Command(bin, "recover-cache", "--config", e.cfg).CombinedOutput(); err == nil || !strings.Contains(string(out), "not damaged") {
		t.Errorf("recover-cache of a sound cache: %v %s", err, out)
	}
	start()
	if st := e.call(adminapi.Request{Op: adminapi.OpStatus}).Status; st.Mode != "lockdown" || !strings.Contains(strings.Join(st.Why, " "), "no policy has been accepted") {
		t.Errorf("after recovery: mode %s (%v), want lockdown until a policy arrives", st.Mode, st.Why)
	}
	now := time.Now().UTC().Truncate(time.Second)
	if resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(1, now)}); !strings.Contains(resp.Error, "rollback") {
		t.Errorf("v1 replayed into the recovered cache: %q, want a rollback refusal", resp.Error)
	}
	if resp := e.call(adminapi.Request{Op: adminapi.OpApply, Bundle: e.bundle(2, now)}); resp.Error != "" || resp.Status.Mode != "normal" {
		t.Errorf("v2 after recovery: %q %+v", resp.Error, resp.Status)
	}
	stop()
	if events := e.auditLog(); len(events) == 0 || events[0].Kind != "cache-recovered" {
		t.Errorf("the recovered cache's audit log does not start with the recovery: %v", kinds(events))
	}
}
