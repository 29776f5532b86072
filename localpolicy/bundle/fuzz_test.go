package bundle

import (
	"bytes"
	"crypto/ed25519"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// FuzzVerify: the verifier never panics on any input, and anything it
// accepts carries exactly a payload the ops key signed.
func FuzzVerify(f *testing.F) {
	// A key of this run only: inputs the fuzzer kept from earlier runs
	// (its cache outlives the examples they were signed from) verify under
	// no key trusted here, so whatever verifies was signed below.
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		f.Fatal(err)
	}
	roots, err := opskey.NewRoots(1, priv.Public().(ed25519.PublicKey))
	if err != nil {
		f.Fatal(err)
	}
	signed := map[string]bool{}
	all := examples.All()
	for _, name := range slices.Sorted(maps.Keys(all)) { // seeds in a fixed order
		data := all[name]
		doc, err := policy.Parse(data)
		if err != nil {
			f.Fatal(err)
		}
		raw, err := Sign(Payload{Version: 1, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour),
			Target: Target{Classes: []string{"scanner"}}, Policy: *doc}, priv)
		if err != nil {
			f.Fatal(err)
		}
		body, err := envelope.PeekUnverified(raw, PayloadType)
		if err != nil {
			f.Fatal(err)
		}
		signed[string(body)] = true
		f.Add(raw)
	}
	if len(signed) == 0 {
		f.Fatal("no examples to seed from")
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		b, err := Verify(raw, roots)
		if err != nil {
			return
		}
		body, err := envelope.PeekUnverified(raw, PayloadType)
		if err != nil || !signed[string(body)] {
			t.Fatalf("accepted a payload nobody signed")
		}
		if !bytes.Equal(b.Raw, raw) {
			t.Fatal("Bundle.Raw differs from the verified input")
		}
	})
}
