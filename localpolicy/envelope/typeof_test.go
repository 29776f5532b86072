package envelope_test

import (
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"

	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
)

// TypeOf routes an envelope by what it declares, and names what is wrong
// with one it cannot read.
func TestTypeOf(t *testing.T) {
	key := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	for _, typ := range []string{"application/vnd.bulkhead.command+json", "application/vnd.bulkhead.roots+json"} {
		raw, err := envelope.Sign(typ, []byte(`{}`), key)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := envelope.TypeOf(raw); err != nil || got != typ {
			t.Errorf("TypeOf = %q, %v; want %q", got, err, typ)
		}
	}
	if _, err := envelope.TypeOf([]byte(`{"payloadType":"x","payload":"","signatures":[],"extra":1}`)); !errors.Is(err, envelope.ErrMalformed) {
		t.Errorf("an unknown field: %v", err)
	}
	if _, err := envelope.TypeOf([]byte(strings.Repeat(" ", envelope.MaxEnvelope+1))); !errors.Is(err, envelope.ErrTooLarge) {
		t.Errorf("an oversized envelope: %v", err)
	}
}
