package bundle

import (
	"crypto/ed25519"
	"encoding/base64"
	"fmt"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// RootsPayloadType marks a DSSE envelope as a trust-root rotation.
const RootsPayloadType = "application/vnd.bulkhead.roots+json"

// RootSet is a trust-root set as signed in a rotation: a new set replaces
// the old one only when a threshold of each has signed it.
type RootSet struct {
	Version   uint64   `json:"version"`
	Threshold int      `json:"threshold"`
	Keys      []string `json:"keys"` // base64 of the 32-byte Ed25519 public keys
}

// Roots builds the verifier set the document describes.
func (s RootSet) Roots() (opskey.Roots, error) {
	keys := make([]ed25519.PublicKey, len(s.Keys))
	for i, k := range s.Keys {
		b, err := base64.StdEncoding.Strict().DecodeString(k)
		if err != nil || len(b) != ed25519.PublicKeySize {
			return opskey.Roots{}, fmt.Errorf("%w: keys[%d] is not a base64 Ed25519 public key", ErrInvalid, i)
		}
		keys[i] = b
	}
	r, err := opskey.NewRoots(s.Threshold, keys...)
	if err != nil {
		return opskey.Roots{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return r, nil
}

// NewRootSet describes roots as a rotation document of the given version.
func NewRootSet(version uint64, roots opskey.Roots) RootSet {
	s := RootSet{Version: version, Threshold: roots.Threshold}
	for _, k := range roots.Keys() {
		s.Keys = append(s.Keys, base64.StdEncoding.EncodeToString(k))
	}
	return s
}

// SignRoots signs a rotation. It must be signed by a threshold of the
// current roots and a threshold of the new ones, so pass keys of both.
func SignRoots(s RootSet, keys ...ed25519.PrivateKey) ([]byte, error) {
	if _, err := s.Roots(); err != nil {
		return nil, err
	}
	body, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("encode root set: %w", err)
	}
	return envelope.Sign(RootsPayloadType, body, keys...)
}

// PeekRotation reads a trust-root rotation without verifying it: for a
// control server routing it, or an agent telling it from a bundle. Nothing
// it returns may be trusted.
func PeekRotation(raw []byte) (RootSet, error) {
	var s RootSet
	unverified, err := envelope.PeekUnverified(raw, RootsPayloadType)
	if err != nil {
		return s, err
	}
	if err := strictjson.Unmarshal(unverified, &s); err != nil {
		return s, fmt.Errorf("root set: %w", err)
	}
	return s, nil
}

// VerifyRotation accepts a new trust-root set only when a threshold of the
// current roots and a threshold of the new roots both signed it, and its
// version is above the current one. A thief holding only old keys, or only
// new ones, cannot rotate.
func VerifyRotation(raw []byte, current opskey.Roots, currentVersion uint64) (opskey.Roots, RootSet, error) {
	// The new set is only known after reading the payload, so it is read
	// first and trusted only once both sets' signatures check out.
	s, err := PeekRotation(raw)
	if err != nil {
		return opskey.Roots{}, s, err
	}
	next, err := s.Roots()
	if err != nil {
		return opskey.Roots{}, s, err
	}
	// A stale version is refused before signatures are checked: rejecting
	// needs no trust, and "not above the current" is the useful message for
	// a replayed rotation.
	if s.Version <= currentVersion {
		return opskey.Roots{}, s, fmt.Errorf("%w: root set version %d is not above the current %d", ErrRollback, s.Version, currentVersion)
	}
	if _, err := envelope.Open(raw, RootsPayloadType, current, next); err != nil {
		return opskey.Roots{}, s, err
	}
	return next, s, nil
}
