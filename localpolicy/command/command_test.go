package command

import (
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

var t0 = time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)

func key(seed byte) ed25519.PrivateKey {
	return ed25519.NewKeyFromSeed(append(make([]byte, ed25519.SeedSize-1), seed))
}

func cmd(kind Kind) Command {
	c := Command{ID: "cmd-00000001", Kind: kind, Target: Target{Devices: []string{"dev-1"}}, Reason: "ticket 42",
		IssuedAt: t0, ExpiresAt: t0.Add(10 * time.Minute)}
	if kind.partner() {
		c.Partner = "acme-freight"
	}
	return c
}

func TestVerifyRatchet(t *testing.T) {
	ops1, ops2, ctl := key(1), key(2), key(3)
	roots, _ := opskey.NewRoots(2, ops1.Public().(ed25519.PublicKey), ops2.Public().(ed25519.PublicKey))
	ctlPub := ctl.Public().(ed25519.PublicKey)
	for _, tc := range []struct {
		kind  Kind
		keys  []ed25519.PrivateKey
		byOps bool
		err   error
	}{
		{Quarantine, []ed25519.PrivateKey{ops1, ops2}, true, nil},
		{Quarantine, []ed25519.PrivateKey{ctl}, false, nil},
		{Diagnostic, []ed25519.PrivateKey{ctl}, false, nil},
		{RevokePartner, []ed25519.PrivateKey{ctl}, false, nil},
		{Release, []ed25519.PrivateKey{ops1, ops2}, true, nil},
		{Release, []ed25519.PrivateKey{ctl}, false, ErrRatchet},
		{ReinstatePartner, []ed25519.PrivateKey{ctl}, false, ErrRatchet},
		// One ops key of two is not the ops keys; the control key does not
		// make up the difference.
		{Release, []ed25519.PrivateKey{ops1}, false, envelope.ErrThreshold},
		{Quarantine, []ed25519.PrivateKey{ops1, ctl}, false, envelope.ErrUnknownSigner},
		{Quarantine, []ed25519.PrivateKey{key(9)}, false, envelope.ErrUnknownSigner},
	} {
		raw, err := Sign(cmd(tc.kind), tc.keys...)
		if err != nil {
			t.Fatal(err)
		}
		v, err := Verify(raw, roots, ctlPub)
		if !errors.Is(err, tc.err) {
			t.Errorf("%s signed by %d key(s): err = %v, want %v", tc.kind, len(tc.keys), err, tc.err)
			continue
		}
		if err == nil && v.ByOps != tc.byOps {
			t.Errorf("%s: ByOps = %v, want %v", tc.kind, v.ByOps, tc.byOps)
		}
	}
	// With no control key known, a control-signed command is unknown.
	raw, _ := Sign(cmd(Quarantine), ctl)
	if _, err := Verify(raw, roots, nil); !errors.Is(err, envelope.ErrUnknownSigner) {
		t.Errorf("control-signed with no control key: %v", err)
	}
}

func TestDecide(t *testing.T) {
	dev := bundle.Device{ID: "dev-1", Class: "truck"}
	quarantined := localpolicy.Sticky{Mode: localpolicy.Quarantine, Reason: "x"}
	revoked := localpolicy.Sticky{RevokedPartners: map[string]string{"acme-freight": "breach"}}
	at := func(c Command, byOps bool) *Verified { return &Verified{Command: c, ByOps: byOps} }
	other := cmd(Quarantine)
	other.Target = Target{Classes: []string{"scanner"}}
	fleet := cmd(RevokePartner)
	fleet.Target = Target{All: true}
	for _, tc := range []struct {
		name string
		v    *Verified
		st   localpolicy.Sticky
		now  time.Time
		want localpolicy.Sticky
		err  error
	}{
		{"quarantine", at(cmd(Quarantine), false), localpolicy.Sticky{}, t0, localpolicy.Sticky{Mode: localpolicy.Quarantine, Reason: "ticket 42"}, nil},
		{"control diagnostic cannot lift quarantine", at(cmd(Diagnostic), false), quarantined, t0, quarantined, ErrRatchet},
		{"ops diagnostic can", at(cmd(Diagnostic), true), quarantined, t0, localpolicy.Sticky{Mode: localpolicy.Diagnostic, Reason: "ticket 42"}, nil},
		{"release", at(cmd(Release), true), quarantined, t0, localpolicy.Sticky{}, nil},
		{"revoke for every device", at(fleet, false), localpolicy.Sticky{}, t0, localpolicy.Sticky{RevokedPartners: map[string]string{"acme-freight": "ticket 42"}}, nil},
		{"reinstate", at(cmd(ReinstatePartner), true), revoked, t0, localpolicy.Sticky{}, nil},
		{"other class", at(other, true), localpolicy.Sticky{}, t0, localpolicy.Sticky{}, ErrWrongTarget},
		{"expired", at(cmd(Quarantine), true), localpolicy.Sticky{}, t0.Add(10 * time.Minute), localpolicy.Sticky{}, ErrExpired},
		{"from the future", at(cmd(Quarantine), true), localpolicy.Sticky{}, t0.Add(-time.Hour), localpolicy.Sticky{}, ErrNotYetValid},
	} {
		got, err := Decide(tc.v, tc.st, tc.now, dev)
		if !errors.Is(err, tc.err) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.err)
		}
		if got.Mode != tc.want.Mode || got.Reason != tc.want.Reason || len(got.RevokedPartners) != len(tc.want.RevokedPartners) {
			t.Errorf("%s: sticky = %+v, want %+v", tc.name, got, tc.want)
		}
		for p, r := range tc.want.RevokedPartners {
			if got.RevokedPartners[p] != r {
				t.Errorf("%s: partner %s = %q, want %q", tc.name, p, got.RevokedPartners[p], r)
			}
		}
	}
	// Apply never shares the partner map with its input.
	next := Apply(revoked, cmd(ReinstatePartner))
	if len(revoked.RevokedPartners) != 1 || next.RevokedPartners != nil {
		t.Errorf("Apply mutated its input or left an empty map: %v %v", revoked, next)
	}
}

func TestValidateNamesEveryProblem(t *testing.T) {
	c := Command{ID: "x", Kind: "reboot", Partner: "p", IssuedAt: t0, ExpiresAt: t0.Add(2 * time.Hour)}
	err := c.Validate()
	for _, want := range []string{`kind "reboot"`, `id "x"`, "no device", "reason", "exceeds the maximum"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v, want it to mention %q", err, want)
		}
	}
	if _, err := Sign(c, key(1)); !errors.Is(err, ErrInvalid) {
		t.Errorf("Sign of an invalid command = %v", err)
	}
	r := cmd(RevokePartner)
	r.Partner = ""
	if err := r.Validate(); err == nil || !strings.Contains(err.Error(), "needs a partner") {
		t.Errorf("revoke without partner: %v", err)
	}
}

func FuzzVerify(f *testing.F) {
	ops := key(1)
	roots, _ := opskey.NewRoots(1, ops.Public().(ed25519.PublicKey))
	raw, _ := Sign(cmd(Quarantine), ops)
	f.Add(raw)
	f.Add([]byte(`{"payloadType":"` + PayloadType + `","payload":"e30=","signatures":[]}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		v, err := Verify(raw, roots, key(3).Public().(ed25519.PublicKey))
		if err == nil && v.Validate() != nil {
			t.Fatal("Verify accepted an invalid command")
		}
	})
}
