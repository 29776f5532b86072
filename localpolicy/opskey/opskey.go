// Package opskey owns the security-operations signing keys: Ed25519 keys in
// PEM files (PKCS#8 private, PKIX public, so openssl can read them too),
// their key ids, and trust-root sets with a k-of-n threshold.
package opskey

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
)

// File names keygen writes.
const (
	PrivateFile = "ops.key"
	PublicFile  = "ops.pub"
)

// ID names a public key: the hex SHA-256 of its 32 raw bytes. It is what the
// "keyid" of a DSSE signature carries.
func ID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:])
}

// Generate writes a new key pair into dir (created 0700 if missing): ops.key
// with mode 0600 and ops.pub with mode 0644. It refuses to overwrite an
// existing key, because losing an ops key can strand a fleet.
func Generate(dir string) (ed25519.PublicKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create key directory: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	keyPath := filepath.Join(dir, PrivateFile)
	if err := writeNew(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	if err := writeNew(filepath.Join(dir, PublicFile), EncodePublic(pub), 0o644); err != nil {
		os.Remove(keyPath)
		return nil, err
	}
	return pub, nil
}

func writeNew(path string, data []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s already exists; refusing to overwrite a key (move it away first)", path)
	}
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

// LoadPrivate reads an ops.key file. A key readable by group or others is
// refused: a signing key anyone on the host can read is not a secret.
func LoadPrivate(path string) (ed25519.PrivateKey, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("read signing key: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("signing key %s has mode %04o; it must not be readable by others (chmod 600 %s)", path, st.Mode().Perm(), path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read signing key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s is not a PEM \"PRIVATE KEY\" file (write one with bulkhead-control keygen)", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s holds a %T, not an Ed25519 key", path, k)
	}
	return priv, nil
}

// EncodePublic is an ops.pub file's content for pub: a PEM "PUBLIC KEY"
// block (PKIX), which ParsePublic reads back.
func EncodePublic(pub ed25519.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		panic(err) // only fails for key types it does not know
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// ParsePublic reads a PEM "PUBLIC KEY" block holding an Ed25519 key.
func ParsePublic(data []byte) (ed25519.PublicKey, error) {
	block, rest := pem.Decode(data)
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, errors.New("not a PEM \"PUBLIC KEY\" file (bulkhead-control keygen writes ops.pub)")
	}
	if extra, _ := pem.Decode(rest); extra != nil {
		return nil, errors.New("holds more than one PEM block; give one key per file")
	}
	k, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("holds a %T, not an Ed25519 key", k)
	}
	return pub, nil
}

// LoadPublic reads an ops.pub file.
func LoadPublic(path string) (ed25519.PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read trust key: %w", err)
	}
	pub, err := ParsePublic(data)
	if err != nil {
		return nil, fmt.Errorf("trust key %s: %w", path, err)
	}
	return pub, nil
}

// LoadPublicKeys reads several ops.pub files.
func LoadPublicKeys(paths []string) ([]ed25519.PublicKey, error) {
	keys := make([]ed25519.PublicKey, 0, len(paths))
	for _, p := range paths {
		k, err := LoadPublic(p)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// Roots is a set of trusted ops keys and how many of them must sign.
type Roots struct {
	Threshold int
	keys      map[string]ed25519.PublicKey
}

// OrAll is the threshold a setting left at 0 means: every one of n keys.
func OrAll(threshold, n int) int {
	if threshold == 0 {
		return n
	}
	return threshold
}

// NewRoots builds a trust-root set. The threshold must be between 1 and the
// number of distinct keys.
func NewRoots(threshold int, keys ...ed25519.PublicKey) (Roots, error) {
	r := Roots{Threshold: threshold, keys: make(map[string]ed25519.PublicKey, len(keys))}
	for _, k := range keys {
		if len(k) != ed25519.PublicKeySize {
			return Roots{}, fmt.Errorf("trust key of %d bytes is not an Ed25519 public key", len(k))
		}
		id := ID(k)
		if _, dup := r.keys[id]; dup {
			return Roots{}, fmt.Errorf("trust key %s is given twice", id)
		}
		r.keys[id] = k
	}
	if threshold < 1 || threshold > len(r.keys) {
		return Roots{}, fmt.Errorf("threshold %d is impossible with %d trust keys (want 1 to %d)", threshold, len(r.keys), len(r.keys))
	}
	return r, nil
}

// Key returns the trusted key with the given id.
func (r Roots) Key(id string) (ed25519.PublicKey, bool) {
	k, ok := r.keys[id]
	return k, ok
}

// Keys returns the trusted keys ordered by id.
func (r Roots) Keys() []ed25519.PublicKey {
	ids := r.IDs()
	out := make([]ed25519.PublicKey, len(ids))
	for i, id := range ids {
		out[i] = r.keys[id]
	}
	return out
}

// IDs returns the ids of the trusted keys, sorted.
func (r Roots) IDs() []string {
	ids := make([]string, 0, len(r.keys))
	for id := range r.keys {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Len is the number of trusted keys.
func (r Roots) Len() int { return len(r.keys) }
