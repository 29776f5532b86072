package command

import (
	"crypto/ed25519"
	"errors"
	"maps"
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
		got, _, err := Decide(tc.v, tc.st, tc.now, dev)
		if !errors.Is(err, tc.err) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.err)
		}
		if tc.err != nil && !sameSticky(got, tc.st) {
			t.Errorf("%s: refused, yet the state changed: %+v", tc.name, got)
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
	// Effect never shares the partner map with its input.
	next, _, _ := Effect(revoked, cmd(ReinstatePartner), true)
	if len(revoked.RevokedPartners) != 1 || next.RevokedPartners != nil {
		t.Errorf("Effect mutated its input or left an empty map: %v %v", revoked, next)
	}
}

func sameSticky(a, b localpolicy.Sticky) bool {
	return a.Mode == b.Mode && a.Reason == b.Reason && maps.Equal(a.RevokedPartners, b.RevokedPartners) && maps.Equal(a.Held, b.Held)
}

// An order delivered again changes nothing; a lift lifts only what was
// imposed before it was issued, even past its own expiry; a captured old
// release is useless against a later quarantine.
func TestLiftsOnlyWhatCameBefore(t *testing.T) {
	dev := bundle.Device{ID: "dev-1", Class: "truck"}
	at := func(kind Kind, id string, issued time.Time, byOps bool) *Verified {
		c := cmd(kind)
		c.ID, c.IssuedAt, c.ExpiresAt = id, issued, issued.Add(10*time.Minute)
		return &Verified{Command: c, ByOps: byOps}
	}
	var st localpolicy.Sticky
	obey := func(v *Verified, now time.Time, wantChanged bool, wantErr error) {
		t.Helper()
		next, changed, err := Decide(v, st, now, dev)
		if !errors.Is(err, wantErr) || changed != wantChanged {
			t.Fatalf("%s %s at %s: changed %v, err %v; want %v, %v", v.Kind, v.ID, now.Format(time.TimeOnly), changed, err, wantChanged, wantErr)
		}
		st = next
	}
	q1 := at(Quarantine, "order-q1", t0, false)
	obey(q1, t0, true, nil)
	obey(q1, t0.Add(time.Minute), false, nil) // delivered again
	r1 := at(Release, "order-r1", t0.Add(time.Hour), true)
	// Away while r1 was valid, back a week later: it still lifts q1.
	obey(r1, t0.Add(7*24*time.Hour), true, nil)
	if st.Mode != localpolicy.Normal || st.Held != nil {
		t.Fatalf("after the release: %+v", st)
	}
	obey(r1, t0.Add(7*24*time.Hour), false, nil) // nothing left to lift
	// A new incident: q2 re-signed by control a day later, imposed at T+2h.
	q2 := at(Quarantine, "order-q2", t0.Add(26*time.Hour), false)
	q2.OrderedAt = t0.Add(2 * time.Hour)
	obey(q2, t0.Add(26*time.Hour), true, nil)
	// The captured r1, valid or not, does not lift it.
	obey(r1, t0.Add(time.Hour), false, ErrImposedLater)
	obey(r1, t0.Add(30*time.Hour), false, ErrImposedLater)
	// An ops diagnostic issued before q2 does not loosen it either; a
	// control-key diagnostic never does; q1 delivered again is older.
	obey(at(Diagnostic, "order-d1", t0.Add(90*time.Minute), true), t0.Add(90*time.Minute), false, ErrImposedLater)
	obey(at(Diagnostic, "order-d2", t0.Add(27*time.Hour), false), t0.Add(27*time.Hour), false, ErrRatchet)
	q1again := at(Quarantine, "order-q1", t0.Add(27*time.Hour), false)
	q1again.OrderedAt = t0
	obey(q1again, t0.Add(27*time.Hour), false, nil)
	if st.Held[localpolicy.SlotMode].Order != "order-q2" {
		t.Fatalf("q2 no longer holds the mode: %+v", st)
	}
	// A control-signed order past its expiry is refused; a release
	// issued after q2 lifts it.
	obey(at(Quarantine, "order-q3", t0.Add(28*time.Hour), false), t0.Add(29*time.Hour), false, ErrExpired)
	obey(at(Release, "order-r2", t0.Add(3*time.Hour), true), t0.Add(30*time.Hour), true, nil)
	// Partners: the same rule, slot by slot.
	rp := at(RevokePartner, "order-p1", t0.Add(40*time.Hour), false)
	obey(rp, t0.Add(40*time.Hour), true, nil)
	obey(at(ReinstatePartner, "order-p0", t0.Add(39*time.Hour), true), t0.Add(41*time.Hour), false, ErrImposedLater)
	obey(at(ReinstatePartner, "order-p2", t0.Add(41*time.Hour), true), t0.Add(50*time.Hour), true, nil)
	if st.RevokedPartners != nil || st.Held != nil {
		t.Fatalf("after the reinstatement: %+v", st)
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
