package tunnel

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/bulkhead-edge/bulkhead/internal/atomicfile"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// PrivateKey is the device's WireGuard key. It prints as "(hidden)" so that
// no log line, error or status can carry it; only the key file and the
// device hold its bytes.
type PrivateKey struct{ b [32]byte }

// GenerateKey makes a new random key.
func GenerateKey() (PrivateKey, error) {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return PrivateKey{}, fmt.Errorf("wireguard key: %w", err)
	}
	var p PrivateKey
	copy(p.b[:], k.Bytes())
	return p, nil
}

// Public is the key gateways know the device by.
func (k PrivateKey) Public() policy.Key {
	priv, err := ecdh.X25519().NewPrivateKey(k.b[:])
	if err != nil {
		return policy.Key{} // unreachable: every 32-byte string is an X25519 key
	}
	var pub policy.Key
	copy(pub[:], priv.PublicKey().Bytes())
	return pub
}

// String hides the key.
func (k PrivateKey) String() string { return "(hidden)" }

// GoString hides the key from %#v too.
func (k PrivateKey) GoString() string { return "tunnel.PrivateKey(hidden)" }

func (k PrivateKey) uapiHex() string { return hex.EncodeToString(k.b[:]) }

// LoadOrCreateKey reads the key file (base64, as `wg genkey` writes it, so
// `wg pubkey < file` works), or creates it with mode 0600 when it does not
// exist. A key file readable by group or others is refused rather than
// trusted: whoever read it can impersonate the device.
func LoadOrCreateKey(path string) (k PrivateKey, created bool, err error) {
	k, err = readKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return k, false, err
	}
	if k, err = GenerateKey(); err != nil {
		return PrivateKey{}, false, err
	}
	if err := WriteKey(path, k); err != nil {
		return PrivateKey{}, false, err
	}
	return k, true, nil
}

func readKey(path string) (PrivateKey, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return PrivateKey{}, fmt.Errorf("wireguard key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return PrivateKey{}, fmt.Errorf("wireguard key %s: mode %v lets others read it; run chmod 600 %s, or delete it to make a new key (gateways must then learn the new public key)", path, fi.Mode().Perm(), path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return PrivateKey{}, fmt.Errorf("wireguard key: %w", err)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(data)))
	if err != nil || len(raw) != 32 {
		return PrivateKey{}, fmt.Errorf("wireguard key %s: not a base64 32-byte key as `wg genkey` writes", path)
	}
	var k PrivateKey
	copy(k.b[:], raw)
	return k, nil
}

// WriteKey stores k at path with mode 0600, replacing any old key in one
// rename so that a crash leaves either key whole, never half of one.
func WriteKey(path string, k PrivateKey) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("wireguard key: %w", err)
	}
	if err := atomicfile.Write(path, []byte(base64.StdEncoding.EncodeToString(k.b[:])+"\n"), 0o600); err != nil {
		return fmt.Errorf("wireguard key: %w", err)
	}
	return nil
}
