// Package bundle owns the signed documents a device accepts from security
// operations: policy bundles (a policy plus version, validity and target)
// and trust-root rotations. It decides whether one may be enforced on this
// device now; storing it is someone else's job.
package bundle

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// PayloadType marks a DSSE envelope as a Bulkhead policy bundle.
const PayloadType = "application/vnd.bulkhead.policy+json"

// ClockSkew is how far ahead of this device's clock a bundle's issue time may
// be before the bundle counts as not yet valid.
const ClockSkew = 5 * time.Minute

// Errors of admission, each with its own cause. Envelope and document errors
// come from the envelope, strictjson and policy packages.
var (
	ErrRollback    = errors.New("rollback")
	ErrWrongTarget = errors.New("wrong target")
	ErrExpired     = errors.New("expired")
	ErrNotYetValid = errors.New("not yet valid")
	ErrInvalid     = errors.New("invalid bundle")
)

// Target names the devices a bundle is for: any device of one of the classes
// or with one of the ids.
type Target struct {
	Classes []string `json:"classes,omitzero"`
	Devices []string `json:"devices,omitzero"`
}

// Matches reports whether dev is targeted.
func (t Target) Matches(dev Device) bool {
	return (dev.Class != "" && slices.Contains(t.Classes, dev.Class)) ||
		(dev.ID != "" && slices.Contains(t.Devices, dev.ID))
}

func (t Target) String() string {
	var parts []string
	for _, c := range t.Classes {
		parts = append(parts, "class "+c)
	}
	for _, d := range t.Devices {
		parts = append(parts, "device "+d)
	}
	return strings.Join(parts, ", ")
}

// Payload is what the ops keys sign.
type Payload struct {
	Version   uint64          `json:"version"`
	IssuedAt  time.Time       `json:"issued_at"`
	ExpiresAt time.Time       `json:"expires_at"`
	Target    Target          `json:"target"`
	Policy    policy.Document `json:"policy"`
}

// Bundle is a verified policy bundle.
type Bundle struct {
	Payload
	// Raw is the envelope exactly as received; it is what gets cached, so
	// the cache can be verified again from the signed bytes.
	Raw     []byte
	Signers []string
}

// Device identifies the device a bundle is admitted on.
type Device struct {
	ID    string
	Class string
}

// Read verifies a bundle from r, reading at most envelope.MaxEnvelope bytes.
func Read(r io.Reader, roots opskey.Roots) (*Bundle, error) {
	raw, err := envelope.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return Verify(raw, roots)
}

// Peek reads the payload inside raw without checking any signature: for
// those who route bundles and never enforce them (the control server).
func Peek(raw []byte) (Payload, error) {
	var p Payload
	payload, err := envelope.PeekUnverified(raw, PayloadType)
	if err == nil {
		err = json.Unmarshal(payload, &p)
	}
	return p, err
}

// Verify checks raw's signatures against roots and decodes and validates its
// payload. It does not judge time, version or target: see Admit.
func Verify(raw []byte, roots opskey.Roots) (*Bundle, error) {
	signed, err := envelope.Open(raw, PayloadType, roots)
	if err != nil {
		return nil, err
	}
	var p Payload
	if err := strictjson.Unmarshal(signed.Payload, &p); err != nil {
		return nil, fmt.Errorf("bundle payload: %w", err)
	}
	if err := p.validate(); err != nil {
		return nil, err
	}
	return &Bundle{Payload: p, Raw: raw, Signers: signed.Signers}, nil
}

func (p *Payload) validate() error {
	if p.Version == 0 {
		return fmt.Errorf("%w: version must be 1 or more", ErrInvalid)
	}
	if p.IssuedAt.IsZero() || !p.ExpiresAt.After(p.IssuedAt) {
		return fmt.Errorf("%w: expires_at %s is not after issued_at %s", ErrInvalid, stamp(p.ExpiresAt), stamp(p.IssuedAt))
	}
	if len(p.Target.Classes) == 0 && len(p.Target.Devices) == 0 {
		return fmt.Errorf("%w: the target names no device class and no device", ErrInvalid)
	}
	if err := p.Policy.Validate(); err != nil {
		return err
	}
	for _, c := range p.Target.Classes {
		if _, ok := p.Policy.Classes[c]; !ok {
			return fmt.Errorf("%w: target class %q has no entry in the policy's classes", ErrInvalid, c)
		}
	}
	return nil
}

// Admit decides whether this verified bundle may replace the one enforced on
// dev: it must be newer than every bundle the device ever accepted, meant
// for this device, and valid at now.
func (b *Bundle) Admit(now time.Time, highest uint64, dev Device) error {
	if b.Version <= highest {
		return fmt.Errorf("%w: version %d is not above %d, the highest this device has accepted", ErrRollback, b.Version, highest)
	}
	return b.check(now, dev)
}

// CheckCached decides whether this bundle, read back from the device's
// cache, is still the one the device accepted. Expiry is not judged here:
// an expired cached bundle still defines the offline profile.
func (b *Bundle) CheckCached(highest uint64, dev Device) error {
	if b.Version != highest {
		return fmt.Errorf("%w: cached bundle is version %d but the device accepted version %d; the cache was rolled back or corrupted", ErrRollback, b.Version, highest)
	}
	if !b.Target.Matches(dev) {
		return fmt.Errorf("%w: cached bundle targets %s, not this device (%s)", ErrWrongTarget, b.Target, describe(dev))
	}
	return nil
}

func (b *Bundle) check(now time.Time, dev Device) error {
	if !b.Target.Matches(dev) {
		return fmt.Errorf("%w: bundle targets %s, not this device (%s)", ErrWrongTarget, b.Target, describe(dev))
	}
	return b.CheckTime(now)
}

// CheckTime reports whether the bundle is valid at now, judging neither
// version nor target.
func (b *Bundle) CheckTime(now time.Time) error {
	if now.Before(b.IssuedAt.Add(-ClockSkew)) {
		return fmt.Errorf("%w: issued at %s, which is after this device's time %s", ErrNotYetValid, stamp(b.IssuedAt), stamp(now))
	}
	if !now.Before(b.ExpiresAt) {
		return fmt.Errorf("%w: expired at %s (device time %s)", ErrExpired, stamp(b.ExpiresAt), stamp(now))
	}
	return nil
}

func describe(d Device) string {
	switch {
	case d.ID != "" && d.Class != "":
		return "device " + d.ID + ", class " + d.Class
	case d.ID != "":
		return "device " + d.ID
	}
	return "class " + d.Class
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// Sign validates p and signs it with every key. It refuses a payload a
// device would refuse, so a mistake shows at the ops desk, not on the fleet.
func Sign(p Payload, keys ...ed25519.PrivateKey) ([]byte, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	body, err := json.Marshal(p, json.Deterministic(true))
	if err != nil {
		return nil, fmt.Errorf("encode payload: %w", err)
	}
	return envelope.Sign(PayloadType, body, keys...)
}
