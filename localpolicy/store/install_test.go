package store

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// A rejected bundle is audited with its reason and leaves the enforced
// bundle exactly as it was.
func TestInstallAuditsAndKeepsPreviousPolicy(t *testing.T) {
	f := newFixture(t)
	s := f.open(t, filepath.Join(t.TempDir(), "cache.db"))
	now := t0.Add(time.Minute)
	v5 := f.bundle(t, 5, time.Hour)
	if _, err := s.Install(bytes.NewReader(v5.Raw), now, scanner); err != nil {
		t.Fatalf("Install(v5): %v", err)
	}
	tampered := bytes.Clone(f.bundle(t, 6, time.Hour).Raw)
	tampered[bytes.Index(tampered, []byte(`"payload":"`))+100] ^= 0x01
	rejects := []struct {
		raw  []byte
		want error
	}{
		{f.bundle(t, 4, time.Hour).Raw, bundle.ErrRollback},
		{tampered, envelope.ErrBadSignature},
		{[]byte("not a bundle"), envelope.ErrMalformed},
	}
	for _, r := range rejects {
		if _, err := s.Install(bytes.NewReader(r.raw), now, scanner); !errors.Is(err, r.want) {
			t.Errorf("Install = %v, want %v", err, r.want)
		}
	}
	got, err := s.Load(scanner)
	if err != nil || !bytes.Equal(got.Raw, v5.Raw) {
		t.Fatalf("after rejects the cache holds %v, %v; want v5 unchanged", got, err)
	}
	events, err := s.AuditLog()
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range events {
		kinds = append(kinds, e.Kind)
	}
	want := "bundle-accepted bundle-rejected bundle-rejected bundle-rejected"
	if strings.Join(kinds, " ") != want {
		t.Fatalf("audit kinds = %v, want %s", kinds, want)
	}
	if !strings.Contains(events[1].Detail, "rollback") || !strings.Contains(events[2].Detail, "does not match the payload") {
		t.Errorf("reject reasons not audited: %q, %q", events[1].Detail, events[2].Detail)
	}
}

func TestRotate(t *testing.T) {
	f := newFixture(t)
	s := open(t, filepath.Join(t.TempDir(), "cache.db"))
	if _, err := s.Rotate(nil, t0); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Rotate without pinned roots = %v, want ErrCorrupt", err)
	}
	if _, err := s.SetRoots(bundle.NewRootSet(1, f.roots)); err != nil {
		t.Fatal(err)
	}
	newPub, newPriv, next := newKeySet(t)
	onlyNew, err := bundle.SignRoots(bundle.NewRootSet(2, next), newPriv)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Rotate(onlyNew, t0); !errors.Is(err, envelope.ErrThreshold) {
		t.Fatalf("Rotate signed only by the new key = %v, want ErrThreshold", err)
	}
	both, err := bundle.SignRoots(bundle.NewRootSet(2, next), f.key, newPriv)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Rotate(both, t0); err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	roots, version, err := s.CurrentRoots()
	if err != nil || version != 2 {
		t.Fatalf("CurrentRoots = v%d, %v; want v2", version, err)
	}
	if _, ok := roots.Key(opskey.ID(newPub)); !ok {
		t.Error("the new key is not trusted after rotation")
	}
	if _, err := s.Rotate(both, t0); !errors.Is(err, bundle.ErrRollback) {
		t.Errorf("replaying the rotation = %v, want ErrRollback", err)
	}
}

// A rotation does not lock the device out of the policy it runs: the
// cached bundle, accepted under the old keys, still loads (it is verified
// against the roots it was accepted under) after a restart with only the
// new keys in force; a new bundle from the old keys is refused.
func TestRotationKeepsTheCachedBundle(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(t.TempDir(), "cache.db")
	s := f.open(t, path)
	dev := scanner
	if _, err := s.Install(bytes.NewReader(f.bundle(t, 1, time.Hour).Raw), t0, dev); err != nil {
		t.Fatal(err)
	}
	_, newPriv, next := newKeySet(t)
	rotation, err := bundle.SignRoots(bundle.NewRootSet(2, next), f.key, newPriv)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Rotate(rotation, t0); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = f.open(t, path) // pins nothing: the rotated set is stored
	if _, v, err := s.CurrentRoots(); err != nil || v != 2 {
		t.Fatalf("trust roots after a rotation and a restart: version %d, %v", v, err)
	}
	if b, err := s.Load(dev); err != nil || b.Version != 1 {
		t.Fatalf("the cached bundle after a rotation and a restart: %v", err)
	}
	if _, err := s.Install(bytes.NewReader(f.bundle(t, 2, time.Hour).Raw), t0, dev); !errors.Is(err, envelope.ErrUnknownSigner) {
		t.Errorf("a new bundle from the retired key = %v, want refused", err)
	}
}

// newKeySet is a fresh ops key and the one-key root set it makes.
func newKeySet(t *testing.T) (ed25519.PublicKey, ed25519.PrivateKey, opskey.Roots) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := opskey.NewRoots(1, pub)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv, roots
}
