package opskey

import (
	"crypto/ed25519"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestGenerateAndLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	pub, err := Generate(dir)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{PrivateFile: 0o600, PublicFile: 0o644} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, %v; want %v", name, st.Mode().Perm(), err, want)
		}
	}
	priv, err := LoadPrivate(filepath.Join(dir, PrivateFile))
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadPublic(filepath.Join(dir, PublicFile))
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Equal(pub) || !priv.Public().(ed25519.PublicKey).Equal(pub) {
		t.Error("loaded keys do not match the generated pair")
	}
	if _, err := Generate(dir); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second Generate = %v, want a refusal to overwrite", err)
	}
}

func TestLoadRefusals(t *testing.T) {
	dir := t.TempDir()
	if _, err := Generate(dir); err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(dir, PrivateFile)
	if err := os.Chmod(key, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadPrivate(key); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("LoadPrivate(0640) = %v, want a refusal", err)
	}
	pub, _ := os.ReadFile(filepath.Join(dir, PublicFile))
	tests := map[string][]byte{
		"empty":          nil,
		"private as pub": []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
		"two keys":       append(append([]byte{}, pub...), pub...),
		"garbage":        []byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
	}
	for name, data := range tests {
		if _, err := ParsePublic(data); err == nil {
			t.Errorf("ParsePublic(%s) succeeded", name)
		}
	}
}

func TestNewRoots(t *testing.T) {
	a, _, _ := ed25519.GenerateKey(nil)
	b, _, _ := ed25519.GenerateKey(nil)
	tests := []struct {
		name      string
		threshold int
		keys      []ed25519.PublicKey
		ok        bool
	}{
		{"2 of 2", 2, []ed25519.PublicKey{a, b}, true},
		{"threshold 0", 0, []ed25519.PublicKey{a, b}, false},
		{"threshold above keys", 3, []ed25519.PublicKey{a, b}, false},
		{"same key twice counts once", 2, []ed25519.PublicKey{a, a}, false},
		{"short key", 1, []ed25519.PublicKey{a[:16]}, false},
	}
	for _, tt := range tests {
		r, err := NewRoots(tt.threshold, tt.keys...)
		if (err == nil) != tt.ok {
			t.Errorf("%s: err = %v, want ok=%v", tt.name, err, tt.ok)
		}
		if err == nil {
			if _, ok := r.Key(ID(a)); !ok {
				t.Errorf("%s: key a not found by id", tt.name)
			}
		}
	}
}
