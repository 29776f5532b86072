package agent

import (
	"crypto/ed25519"
	"os"
	"path/filepath"
	"testing"

	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
)

// Helpers shared by the decision tests and the privileged ones.

// newOpsKey makes an ops signing key in dir/ops (ops.key, ops.pub).
func newOpsKey(t *testing.T, dir string) ed25519.PrivateKey {
	t.Helper()
	if _, err := opskey.Generate(filepath.Join(dir, "ops")); err != nil {
		t.Fatal(err)
	}
	key, err := opskey.LoadPrivate(filepath.Join(dir, "ops", opskey.PrivateFile))
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// sign signs a command with key.
func sign(t *testing.T, c command.Command, key ed25519.PrivateKey) []byte {
	t.Helper()
	raw, err := command.Sign(c, key)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func kinds(events []store.Event) []string {
	var out []string
	for _, e := range events {
		out = append(out, e.Kind)
	}
	return out
}

// auditLogIn reads the audit log in dir/state of an agent that stopped.
func auditLogIn(t *testing.T, dir string) []store.Event {
	t.Helper()
	s, err := store.Open(filepath.Join(dir, "state", "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	events, err := s.AuditLog()
	if err != nil {
		t.Fatal(err)
	}
	return events
}
