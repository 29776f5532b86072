package bundle

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

var t0 = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func newKeys(t testing.TB, n int) ([]ed25519.PublicKey, []ed25519.PrivateKey) {
	t.Helper()
	var pubs []ed25519.PublicKey
	var privs []ed25519.PrivateKey
	for range n {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		pubs = append(pubs, pub)
		privs = append(privs, priv)
	}
	return pubs, privs
}

func roots(t testing.TB, k int, pubs ...ed25519.PublicKey) opskey.Roots {
	t.Helper()
	r, err := opskey.NewRoots(k, pubs...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func examplePolicy(t testing.TB) policy.Document {
	t.Helper()
	d, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	return *d
}

func payload(t testing.TB, version uint64) Payload {
	return Payload{
		Version:   version,
		IssuedAt:  t0,
		ExpiresAt: t0.Add(7 * 24 * time.Hour),
		Target:    Target{Classes: []string{"scanner"}},
		Policy:    examplePolicy(t),
	}
}

func sign(t testing.TB, p Payload, keys ...ed25519.PrivateKey) []byte {
	t.Helper()
	raw, err := Sign(p, keys...)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

var scanner = Device{ID: "dev-1", Class: "scanner"}

func TestVerifyAndAdmit(t *testing.T) {
	pubs, privs := newKeys(t, 3)
	r := roots(t, 2, pubs...)
	raw := sign(t, payload(t, 7), privs[2], privs[0])
	b, err := Verify(raw, r)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if err := b.Admit(t0.Add(time.Hour), 6, scanner); err != nil {
		t.Fatalf("Admit: %v", err)
	}
	if !bytes.Equal(b.Raw, raw) {
		t.Error("Bundle.Raw is not the bytes that were verified")
	}
	if got, want := len(b.Signers), 2; got != want {
		t.Errorf("signers = %d, want %d", got, want)
	}
}

// Every rejection the device makes has its own cause, and each is tested
// here against a bundle that differs from a good one in that respect only.
func TestRejections(t *testing.T) {
	pubs, privs := newKeys(t, 3)
	trusted := roots(t, 2, pubs[0], pubs[1])
	good := payload(t, 7)
	withBody := func(body string) []byte {
		raw, err := envelope.Sign(PayloadType, []byte(body), privs[0], privs[1])
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	goodBody := string(bytes.TrimSpace(mustPayload(t, sign(t, good, privs[0]))))

	tests := []struct {
		name    string
		raw     []byte
		now     time.Time
		highest uint64
		dev     Device
		want    error
	}{
		{name: "unknown signer", raw: sign(t, good, privs[0], privs[2]), want: envelope.ErrUnknownSigner},
		{name: "below threshold", raw: sign(t, good, privs[0]), want: envelope.ErrThreshold},
		{name: "no signatures", raw: []byte(`{"payloadType":"` + PayloadType + `","payload":"e30=","signatures":[]}`), want: envelope.ErrThreshold},
		{name: "same version as accepted", raw: sign(t, good, privs[0], privs[1]), highest: 7, want: ErrRollback},
		{name: "older version", raw: sign(t, good, privs[0], privs[1]), highest: 9, want: ErrRollback},
		{name: "wrong target", raw: sign(t, good, privs[0], privs[1]), dev: Device{ID: "dev-9", Class: "telematics"}, want: ErrWrongTarget},
		{name: "expired", raw: sign(t, good, privs[0], privs[1]), now: good.ExpiresAt, want: ErrExpired},
		{name: "not yet valid", raw: sign(t, good, privs[0], privs[1]), now: t0.Add(-ClockSkew - time.Second), want: ErrNotYetValid},
		{name: "payload over 4 MiB", raw: oversize(), want: envelope.ErrTooLarge},
		{name: "not json", raw: []byte("bundle"), want: envelope.ErrMalformed},
		{name: "wrong payload type", raw: []byte(`{"payloadType":"text/plain","payload":"e30=","signatures":[{"keyid":"a","sig":"AA=="}]}`), want: envelope.ErrMalformed},
		{name: "payload not base64", raw: []byte(`{"payloadType":"` + PayloadType + `","payload":"%%%","signatures":[{"keyid":"a","sig":"AA=="}]}`), want: envelope.ErrMalformed},
		{name: "unknown envelope field", raw: bytes.Replace(sign(t, good, privs[0], privs[1]), []byte(`{"payloadType"`), []byte(`{"extra":1,"payloadType"`), 1), want: strictjson.ErrUnknownField},
		{name: "unknown payload field", raw: withBody(strings.Replace(goodBody, `{"version"`, `{"priority":1,"version"`, 1)), want: strictjson.ErrUnknownField},
		{name: "unknown policy field", raw: withBody(strings.Replace(goodBody, `"schema":`, `"schemas":1,"schema":`, 1)), want: strictjson.ErrUnknownField},
		{name: "trailing data after envelope", raw: append(sign(t, good, privs[0], privs[1]), []byte(`{"payloadType":"x"}`)...), want: strictjson.ErrTrailingData},
		{name: "trailing data after payload", raw: withBody(goodBody + `{"version":99}`), want: strictjson.ErrTrailingData},
		{name: "invalid policy", raw: withBody(strings.Replace(goodBody, `"segment":"finance"`, `"segment":"fin"`, 1)), want: policy.ErrInvalid},
		{name: "version zero", raw: withBody(strings.Replace(goodBody, `"version":7`, `"version":0`, 1)), want: ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.now.IsZero() {
				tt.now = t0.Add(time.Hour)
			}
			if tt.dev == (Device{}) {
				tt.dev = scanner
			}
			b, err := Verify(tt.raw, trusted)
			if err == nil {
				err = b.Admit(tt.now, tt.highest, tt.dev)
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("got error %v, want %v", err, tt.want)
			}
			t.Logf("%v", err)
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error spans lines: %q", err)
			}
		})
	}
}

func mustPayload(t *testing.T, raw []byte) []byte {
	t.Helper()
	p, err := envelope.PeekUnverified(raw, PayloadType)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// oversize is an envelope whose payload is one byte over the limit; it is
// refused for its size before any signature is looked at.
func oversize() []byte {
	p := base64.StdEncoding.EncodeToString(make([]byte, envelope.MaxPayload+1))
	return []byte(fmt.Sprintf(`{"payloadType":%q,"payload":%q,"signatures":[{"keyid":"a","sig":"AA=="}]}`, PayloadType, p))
}

func TestReadCapsInput(t *testing.T) {
	pubs, _ := newKeys(t, 1)
	// An endless stream must be refused after a bounded read.
	endless := io.MultiReader(strings.NewReader(`{"payload":"`), zeros{})
	if _, err := Read(endless, roots(t, 1, pubs...)); !errors.Is(err, envelope.ErrTooLarge) {
		t.Fatalf("Read(endless) = %v, want ErrTooLarge", err)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'A'
	}
	return len(p), nil
}

// A bundle altered in any byte after signing must not verify: the payload,
// a signature, a key id, or the JSON around them.
func TestTamperedByteAnywhere(t *testing.T) {
	pubs, privs := newKeys(t, 2)
	r := roots(t, 2, pubs...)
	raw := sign(t, payload(t, 3), privs...)
	for i := range raw {
		for _, bit := range []byte{0x01, 0x20} {
			bad := bytes.Clone(raw)
			bad[i] ^= bit
			if _, err := Verify(bad, r); err == nil {
				t.Fatalf("flipping bit %#x of byte %d (%q in %q) still verifies", bit, i, raw[i], context(raw, i))
			}
		}
	}
}

func context(b []byte, i int) string {
	return string(b[max(0, i-20):min(len(b), i+20)])
}

// The same proof, field by field, with the error each must give.
func TestTamperedFields(t *testing.T) {
	pubs, privs := newKeys(t, 1)
	r := roots(t, 1, pubs...)
	raw := sign(t, payload(t, 3), privs...)
	body := mustPayload(t, raw)
	sigStart := bytes.Index(raw, []byte(`"sig":"`)) + len(`"sig":"`)
	keyStart := bytes.Index(raw, []byte(`"keyid":"`)) + len(`"keyid":"`)
	tests := []struct {
		name string
		edit func([]byte) []byte
		want error
	}{
		{"payload", func(b []byte) []byte {
			altered := bytes.Replace(body, []byte(`"version":3`), []byte(`"version":4`), 1)
			return bytes.Replace(b, []byte(base64.StdEncoding.EncodeToString(body)), []byte(base64.StdEncoding.EncodeToString(altered)), 1)
		}, envelope.ErrBadSignature},
		{"signature", func(b []byte) []byte { b[sigStart+5] = flipBase64(b[sigStart+5]); return b }, envelope.ErrBadSignature},
		{"key id", func(b []byte) []byte { b[keyStart+3] = flipHex(b[keyStart+3]); return b }, envelope.ErrUnknownSigner},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Verify(tt.edit(bytes.Clone(raw)), r)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func flipBase64(c byte) byte {
	if c == 'A' {
		return 'B'
	}
	return 'A'
}

func flipHex(c byte) byte {
	if c == '0' {
		return '1'
	}
	return '0'
}

func TestCheckCached(t *testing.T) {
	pubs, privs := newKeys(t, 1)
	b, err := Verify(sign(t, payload(t, 5), privs...), roots(t, 1, pubs...))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.CheckCached(5, scanner); err != nil {
		t.Errorf("CheckCached(5) = %v, want nil", err)
	}
	if err := b.CheckCached(6, scanner); !errors.Is(err, ErrRollback) {
		t.Errorf("CheckCached(6) = %v, want ErrRollback", err)
	}
	if err := b.CheckCached(5, Device{Class: "telematics"}); !errors.Is(err, ErrWrongTarget) {
		t.Errorf("CheckCached(other class) = %v, want ErrWrongTarget", err)
	}
}

func TestSignRefusesWhatDevicesRefuse(t *testing.T) {
	_, privs := newKeys(t, 1)
	p := payload(t, 1)
	p.Target = Target{Classes: []string{"forklift"}}
	if _, err := Sign(p, privs...); !errors.Is(err, ErrInvalid) {
		t.Errorf("Sign(target unknown class) = %v, want ErrInvalid", err)
	}
	p = payload(t, 1)
	p.ExpiresAt = p.IssuedAt
	if _, err := Sign(p, privs...); !errors.Is(err, ErrInvalid) {
		t.Errorf("Sign(expires == issued) = %v, want ErrInvalid", err)
	}
}

func TestRotation(t *testing.T) {
	oldPubs, oldPrivs := newKeys(t, 3)
	newPubs, newPrivs := newKeys(t, 2)
	current := roots(t, 2, oldPubs...)
	next := NewRootSet(2, roots(t, 2, newPubs...))
	tests := []struct {
		name    string
		signers []ed25519.PrivateKey
		version uint64
		want    error
	}{
		{"threshold of both", []ed25519.PrivateKey{oldPrivs[0], oldPrivs[2], newPrivs[0], newPrivs[1]}, 2, nil},
		{"old keys only", []ed25519.PrivateKey{oldPrivs[0], oldPrivs[1], oldPrivs[2]}, 2, envelope.ErrThreshold},
		{"new keys only", []ed25519.PrivateKey{newPrivs[0], newPrivs[1]}, 2, envelope.ErrThreshold},
		{"one old key short", []ed25519.PrivateKey{oldPrivs[0], newPrivs[0], newPrivs[1]}, 2, envelope.ErrThreshold},
		{"stranger signs too", []ed25519.PrivateKey{oldPrivs[0], oldPrivs[1], newPrivs[0], newPrivs[1], newKeysPriv(t)}, 2, envelope.ErrUnknownSigner},
		{"version not above", []ed25519.PrivateKey{oldPrivs[0], oldPrivs[1], newPrivs[0], newPrivs[1]}, 1, ErrRollback},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set := next
			set.Version = tt.version
			raw, err := SignRoots(set, tt.signers...)
			if err != nil {
				t.Fatal(err)
			}
			got, _, err := VerifyRotation(raw, current, 1)
			if !errors.Is(err, tt.want) {
				t.Fatalf("VerifyRotation = %v, want %v", err, tt.want)
			}
			if err == nil && (got.Len() != 2 || got.Threshold != 2) {
				t.Errorf("rotated roots: %d keys, threshold %d; want 2, 2", got.Len(), got.Threshold)
			}
		})
	}
}

func newKeysPriv(t *testing.T) ed25519.PrivateKey {
	_, privs := newKeys(t, 1)
	return privs[0]
}
