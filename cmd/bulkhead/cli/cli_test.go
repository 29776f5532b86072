package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bulkhead-edge/bulkhead/control/opscli"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
)

type result struct {
	code           int
	stdout, stderr string
}

func run(root *subcmd.Command, args ...string) result {
	var out, errb bytes.Buffer
	code := subcmd.Run(root, args, &subcmd.Env{Stdout: &out, Stderr: &errb})
	return result{code, out.String(), errb.String()}
}

func ops(t *testing.T, args ...string) result {
	t.Helper()
	r := run(opscli.Root(), args...)
	if r.code != 0 {
		t.Fatalf("bulkhead-control %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r
}

// The ops workflow end to end through both command lines: keygen, sign
// with two keys, verify on the device side, and every way verify refuses.
func TestSignAndVerify(t *testing.T) {
	dir := t.TempDir()
	k1, k2, k3 := filepath.Join(dir, "k1"), filepath.Join(dir, "k2"), filepath.Join(dir, "k3")
	for _, k := range []string{k1, k2, k3} {
		ops(t, "keygen", "--out", k)
	}
	if st, err := os.Stat(filepath.Join(k1, "ops.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("ops.key mode = %v, %v; want 0600", st.Mode().Perm(), err)
	}
	bundlePath := filepath.Join(dir, "bundle.dsse")
	ops(t, "policy", "sign", "--key", k1+"/ops.key", "--key", k2+"/ops.key",
		"--in", "../../../examples/logistics-site.json", "--version", "7",
		"--target", "scanner", "--valid-for", "720h", "--out", bundlePath)

	good := run(Root(), "policy", "verify", "--trust", k1+"/ops.pub", "--trust", k2+"/ops.pub", bundlePath)
	if good.code != 0 {
		t.Fatalf("verify: exit %d: %s", good.code, good.stderr)
	}
	for _, want := range []string{"version 7", "class scanner", "expires"} {
		if !strings.Contains(good.stdout, want) {
			t.Errorf("verify output does not mention %q:\n%s", want, good.stdout)
		}
	}

	raw, err := os.ReadFile(bundlePath)
	if err != nil {
		t.Fatal(err)
	}
	tampered := filepath.Join(dir, "tampered.dsse")
	bad := bytes.Clone(raw)
	i := bytes.Index(bad, []byte(`"payload":"`)) + len(`"payload":"`) + 40
	bad[i] ^= 0x01
	if err := os.WriteFile(tampered, bad, 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantMsg  string
	}{
		{"tampered payload", []string{"--trust", k1 + "/ops.pub", "--trust", k2 + "/ops.pub", tampered}, 1, "does not match the payload"},
		{"signer not trusted", []string{"--trust", k1 + "/ops.pub", "--trust", k3 + "/ops.pub", bundlePath}, 1, "is not a trusted ops key"},
		{"below threshold", []string{"--trust", k1 + "/ops.pub", "--trust", k2 + "/ops.pub", "--trust", k3 + "/ops.pub", bundlePath}, 1, "2 valid signature(s) from trusted keys, 3 of 3 required"},
		{"threshold given", []string{"--trust", k1 + "/ops.pub", "--trust", k2 + "/ops.pub", "--trust", k3 + "/ops.pub", "--threshold", "2", bundlePath}, 0, ""},
		{"wrong class", []string{"--trust", k1 + "/ops.pub", "--trust", k2 + "/ops.pub", "--class", "telematics", bundlePath}, 1, "not this device"},
		{"expired", []string{"--trust", k1 + "/ops.pub", "--trust", k2 + "/ops.pub", "--at", "2099-01-01T00:00:00Z", bundlePath}, 1, "expired"},
		{"no trust", []string{bundlePath}, 2, "needs at least one --trust"},
		{"missing file", []string{"--trust", k1 + "/ops.pub", filepath.Join(dir, "nope")}, 1, "no such file"},
		{"trust file is not a key", []string{"--trust", bundlePath, bundlePath}, 1, "not a PEM"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := run(Root(), append([]string{"policy", "verify"}, tt.args...)...)
			if r.code != tt.wantCode {
				t.Fatalf("exit %d, want %d; stderr %q", r.code, tt.wantCode, r.stderr)
			}
			if !strings.Contains(r.stderr, tt.wantMsg) {
				t.Errorf("stderr %q does not say %q", r.stderr, tt.wantMsg)
			}
			if tt.wantCode != 0 && strings.Count(r.stderr, "\n") != 1 {
				t.Errorf("the reason is not one line: %q", r.stderr)
			}
		})
	}
}

func TestOpsRefusals(t *testing.T) {
	dir := t.TempDir()
	ops(t, "keygen", "--out", dir)
	key := filepath.Join(dir, "ops.key")
	bad := filepath.Join(dir, "bad.json")
	data, err := os.ReadFile("../../../examples/logistics-site.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, bytes.Replace(data, []byte(`{"segment": "finance"}`), []byte(`{"segment": "finanse"}`), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "b.dsse")
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantMsg  string
	}{
		{"keygen refuses to overwrite", []string{"keygen", "--out", dir}, 1, "refusing to overwrite"},
		{"sign refuses an invalid policy", []string{"policy", "sign", "--key", key, "--in", bad, "--version", "1", "--target", "scanner", "--valid-for", "1h", "--out", out}, 1, `names unknown segment "finanse"`},
		{"sign needs a version", []string{"policy", "sign", "--key", key, "--in", bad, "--target", "scanner", "--valid-for", "1h", "--out", out}, 2, "--version"},
		{"sign refuses an unknown target class", []string{"policy", "sign", "--key", key, "--in", "../../../examples/logistics-site.json", "--version", "1", "--target", "forklift", "--valid-for", "1h", "--out", out}, 1, `target class "forklift"`},
		{"validate names the problem", []string{"policy", "validate", bad}, 1, `classes.dock-gateway.rules[4].segment`},
		{"unknown command", []string{"polcy"}, 2, `unknown command "polcy"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := run(opscli.Root(), tt.args...)
			if r.code != tt.wantCode || !strings.Contains(r.stderr, tt.wantMsg) {
				t.Fatalf("exit %d, stderr %q; want exit %d saying %q", r.code, r.stderr, tt.wantCode, tt.wantMsg)
			}
		})
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("a refused sign left a bundle behind")
	}

	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	r := run(opscli.Root(), "policy", "sign", "--key", key, "--in", "../../../examples/logistics-site.json", "--version", "1", "--target", "scanner", "--valid-for", "1h", "--out", out)
	if r.code != 1 || !strings.Contains(r.stderr, "chmod 600") {
		t.Errorf("signing with a world-readable key: exit %d, %q; want a refusal naming chmod 600", r.code, r.stderr)
	}
}

func TestRootRotationCommand(t *testing.T) {
	dir := t.TempDir()
	for _, k := range []string{"old", "new"} {
		ops(t, "keygen", "--out", filepath.Join(dir, k))
	}
	r := ops(t, "roots", "sign", "--key", filepath.Join(dir, "old/ops.key"), "--key", filepath.Join(dir, "new/ops.key"),
		"--pub", filepath.Join(dir, "new/ops.pub"), "--version", "2", "--out", filepath.Join(dir, "roots.dsse"))
	if !strings.Contains(r.stdout, "root set version 2") {
		t.Errorf("roots sign output: %q", r.stdout)
	}
}
