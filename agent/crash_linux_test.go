package agent

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// crashKills is how many times the agent is killed mid-work.
const crashKills = 200

// The agent is killed with SIGKILL at random points while it boots and
// applies new bundles. After every kill the table is exactly the old or the
// new ruleset (never absent, never partial), and the restarted agent comes
// back to exactly the ruleset of the version its cache holds.
func TestSIGKILLLeavesOldOrNewRuleset(t *testing.T) {
	e := newEnv(t)
	bin := lab.Binary(t, "cmd/bulkhead")
	docB := e.doc
	docB.Classes = map[string]policy.Class{}
	for k, v := range e.doc.Classes {
		docB.Classes[k] = v
	}
	scanner := docB.Classes["scanner"]
	scanner.Rules = append(append([]policy.Rule{}, scanner.Rules...), policy.Rule{Segment: "dock-scheduling"})
	docB.Classes["scanner"] = scanner
	issued := time.Now().UTC().Truncate(time.Second)
	sign := func(version uint64) []byte {
		doc := e.doc
		if version%2 == 0 {
			doc = docB
		}
		raw, err := bundle.Sign(bundle.Payload{Version: version, IssuedAt: issued, ExpiresAt: issued.Add(time.Hour),
			Target: bundle.Target{Classes: []string{"scanner"}}, Policy: doc}, e.key)
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	socket := filepath.Join(e.dir, "run", "admin.sock")
	table := func() string { return lab.CanonicalTable(e.tableText()) }
	start := func() *exec.Cmd {
		os.Remove(socket)
		cmd := e.ns.Command(bin, "run", "--config", e.cfg)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	kill := func(cmd *exec.Cmd) {
		cmd.Process.Kill()
		cmd.Wait()
	}
	up := func() {
		lab.WaitFor(t, "agent socket", shortWait, func() bool {
			_, err := adminapi.Call(socket, adminapi.Request{Op: adminapi.OpStatus})
			return err == nil
		})
	}

	// Learn the two rulesets from a calm agent.
	cmd := start()
	up()
	snap := map[uint64]string{}
	for v := uint64(1); v <= 2; v++ {
		if resp, err := adminapi.Call(socket, adminapi.Request{Op: adminapi.OpApply, Bundle: sign(v)}); err != nil || resp.Error != "" {
			t.Fatalf("apply v%d: %v %v", v, err, resp)
		}
		snap[v%2] = table()
	}
	kill(cmd)
	if snap[0] == snap[1] {
		t.Fatal("the two rulesets are identical; the test could not tell them apart")
	}

	version := uint64(2)
	outcomes := map[string]int{}
	// The kill lands up to window after the apply is sent. How long an
	// apply takes depends on the machine and its load, so the window
	// follows the outcomes: a kill that found the old ruleset widens
	// it, one that found the new narrows it. It settles around the
	// apply's duration, so kills land on both sides of it wherever the
	// test runs.
	window := 4 * time.Millisecond
	for i := range crashKills {
		cmd := start()
		if i%4 == 3 {
			// Kill during boot, before or while it re-applies the cache.
			// (The cache may be one version ahead of the table: a kill
			// between the cache commit and the kernel apply. The next
			// start reconciles that, and is checked below.)
			time.Sleep(time.Duration(rand.IntN(15_000)) * time.Microsecond)
			kill(cmd)
			if got := table(); got != snap[0] && got != snap[1] {
				t.Fatalf("kill %d during boot: the table is neither ruleset:\n%s", i, got)
			}
			outcomes["during boot"]++
			continue
		}
		up()
		resp, err := adminapi.Call(socket, adminapi.Request{Op: adminapi.OpStatus})
		if err != nil {
			t.Fatal(err)
		}
		cached := resp.Status.PolicyVersion
		if got := table(); got != snap[cached%2] {
			t.Fatalf("kill %d: restarted agent with v%d in its cache enforces a different ruleset:\n%s", i, cached, got)
		}
		version = cached + 1
		go adminapi.Call(socket, adminapi.Request{Op: adminapi.OpApply, Bundle: sign(version)})
		time.Sleep(rand.N(window))
		kill(cmd)
		switch got := table(); got {
		case snap[version%2]:
			outcomes["new ruleset"]++
			window = max(window*4/5, 500*time.Microsecond)
		case snap[cached%2]:
			outcomes["old ruleset"]++
			window = min(window*5/4, 2*time.Second)
		default:
			t.Fatalf("kill %d (applying v%d): the table is neither ruleset:\n%s", i, version, got)
		}
	}
	t.Logf("%d kills: %v (kill window at the end: %v)", crashKills, outcomes, window)
	if outcomes["new ruleset"] == 0 || outcomes["old ruleset"] == 0 {
		t.Errorf("kills never landed on both sides of an apply (%v); the test proved less than it claims", outcomes)
	}
}

// Only an explicit cleanup removes the table, and it tells the truth: it
// refuses while the agent runs (which would put the table back), and says
// so when there is no table.
func TestCleanupTellsTheTruth(t *testing.T) {
	e := newEnv(t)
	bin := lab.Binary(t, "cmd/bulkhead")
	p, err := lab.StartProcess(e.ns, filepath.Join(e.dir, "agent.log"), bin, "run", "--config", e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	lab.WaitFor(t, "agent socket", shortWait, func() bool {
		_, err := adminapi.Call(filepath.Join(e.dir, "run", "admin.sock"), adminapi.Request{Op: adminapi.OpStatus})
		return err == nil
	})
	out, err := e.ns.Command(bin, "cleanup").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "agent is running") || !strings.Contains(string(out), "stop") {
		t.Errorf("cleanup with the agent running: err %v, output %q", err, out)
	}
	if !strings.Contains(e.tableText(), "chain output") {
		t.Fatal("cleanup removed the table while the agent runs")
	}
	p.Kill()
	if !strings.Contains(e.tableText(), "chain output") {
		t.Fatal("no table after the agent stopped")
	}
	out2 := e.ns.MustRun(t, bin, "cleanup")
	if !strings.Contains(out2, "removed table") || !strings.Contains(out2, "no longer enforces") {
		t.Errorf("cleanup output %q does not say the device stopped enforcing", out2)
	}
	if strings.Contains(e.tableText(), "chain output") {
		t.Error("table still present after cleanup")
	}
	out3 := e.ns.MustRun(t, bin, "cleanup")
	if !strings.Contains(out3, "no table inet bulkhead to remove") || strings.Contains(out3, "removed table") {
		t.Errorf("cleanup with no table said %q", out3)
	}
}
