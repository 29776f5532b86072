// Package envelope owns signed envelopes: DSSE (via go-securesystemslib)
// with Ed25519 ops keys, the hard size caps on what is read, and the k-of-n
// threshold rules. It returns verified payload bytes and knows nothing of
// what they mean.
package envelope

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/go-json-experiment/json"
	"github.com/secure-systems-lab/go-securesystemslib/dsse"

	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// MaxPayload is the largest payload accepted, decoded.
const MaxPayload = 4 << 20

// MaxEnvelope bounds the encoded envelope: the base64 payload plus room for
// signatures. Input is never read past this.
const MaxEnvelope = (MaxPayload+2)/3*4 + 64<<10

// Errors a caller may test for with errors.Is; each has its own cause.
var (
	ErrTooLarge      = errors.New("too large")
	ErrMalformed     = errors.New("malformed envelope")
	ErrUnknownSigner = errors.New("unknown signer")
	ErrBadSignature  = errors.New("signature does not verify")
	ErrThreshold     = errors.New("not enough signatures")
)

// Signed is a verified envelope.
type Signed struct {
	Payload []byte
	// Signers are the ids of the keys whose signatures verified.
	Signers []string
}

// ReadAll reads at most MaxEnvelope bytes from r and fails with ErrTooLarge
// if there is more, so an endless or huge input costs a bounded amount of
// memory.
func ReadAll(r io.Reader) ([]byte, error) {
	raw, err := io.ReadAll(io.LimitReader(r, MaxEnvelope+1))
	if err != nil {
		return nil, err
	}
	if len(raw) > MaxEnvelope {
		return nil, fmt.Errorf("%w: input exceeds %d bytes (payload limit %d MiB)", ErrTooLarge, MaxEnvelope, MaxPayload>>20)
	}
	return raw, nil
}

// ReadFile reads the envelope at path with ReadAll's cap; errors name the
// file.
func ReadFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	raw, err := ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return raw, nil
}

// Open verifies raw as a DSSE envelope of payloadType. Every signature must
// come from a key in one of the sets and verify; each set's threshold must be
// met by distinct keys of that set. (Two sets are how a trust-root rotation
// is checked: the old roots and the new roots must both approve.)
func Open(raw []byte, payloadType string, sets ...opskey.Roots) (*Signed, error) {
	env, payload, err := parse(raw, payloadType)
	if err != nil {
		return nil, err
	}
	if len(env.Signatures) == 0 {
		return nil, fmt.Errorf("%w: the envelope carries no signature", ErrThreshold)
	}

	// Refuse anything a signer did not vouch for before spending any
	// signature checks: unknown or repeated key ids, undecodable signatures.
	sigs := make([][]byte, len(env.Signatures))
	keys := make([]ed25519.PublicKey, len(env.Signatures))
	seen := map[string]bool{}
	for i, s := range env.Signatures {
		if s.KeyID == "" {
			return nil, fmt.Errorf("%w: signature %d has no keyid", ErrMalformed, i)
		}
		if seen[s.KeyID] {
			return nil, fmt.Errorf("%w: key %s signed more than once", ErrMalformed, Short(s.KeyID))
		}
		seen[s.KeyID] = true
		sig, err := base64.StdEncoding.Strict().DecodeString(s.Sig)
		if err != nil {
			return nil, fmt.Errorf("%w: signature by key %s is not standard base64", ErrMalformed, Short(s.KeyID))
		}
		pub, ok := lookup(s.KeyID, sets)
		if !ok {
			return nil, fmt.Errorf("%w: key %s is not a trusted ops key", ErrUnknownSigner, Short(s.KeyID))
		}
		sigs[i], keys[i] = sig, pub
	}

	// Every signature is over DSSE's pre-authentication encoding of the
	// payload already decoded (strictly) above; decoding it a second
	// time, as dsse's verifier does, cost a tenth of a large bundle's
	// verification.
	pae := dsse.PAE(env.PayloadType, payload)
	valid := map[string]bool{}
	for i, s := range env.Signatures {
		if !ed25519.Verify(keys[i], pae, sigs[i]) {
			return nil, fmt.Errorf("%w: signature by key %s does not match the payload (altered after signing, or signed by another key)", ErrBadSignature, Short(s.KeyID))
		}
		valid[s.KeyID] = true
	}
	for _, set := range sets {
		n := 0
		for id := range valid {
			if _, ok := set.Key(id); ok {
				n++
			}
		}
		if n < set.Threshold {
			return nil, fmt.Errorf("%w: %d valid signature(s) from trusted keys, %d of %d required", ErrThreshold, n, set.Threshold, set.Len())
		}
	}
	signers := make([]string, 0, len(env.Signatures))
	for _, s := range env.Signatures {
		signers = append(signers, s.KeyID)
	}
	return &Signed{Payload: payload, Signers: signers}, nil
}

// TypeOf is the payload type raw declares, read without checking any
// signature or decoding the payload: it routes an envelope to the one
// verifier of its kind (a bundle, a trust-root rotation, a command), and
// is never grounds for trusting it.
func TypeOf(raw []byte) (string, error) {
	if len(raw) > MaxEnvelope {
		return "", fmt.Errorf("%w: envelope is %d bytes, limit %d", ErrTooLarge, len(raw), MaxEnvelope)
	}
	var env dsse.Envelope
	if err := strictjson.Unmarshal(raw, &env); err != nil {
		return "", fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return env.PayloadType, nil
}

// PeekUnverified returns the payload of a well-formed envelope without
// checking any signature. Its only use is learning which keys must have
// signed (a root rotation names them inside); never act on what it returns
// before Open has succeeded.
func PeekUnverified(raw []byte, payloadType string) ([]byte, error) {
	_, payload, err := parse(raw, payloadType)
	return payload, err
}

func parse(raw []byte, payloadType string) (*dsse.Envelope, []byte, error) {
	if len(raw) > MaxEnvelope {
		return nil, nil, fmt.Errorf("%w: envelope is %d bytes, limit %d", ErrTooLarge, len(raw), MaxEnvelope)
	}
	var env dsse.Envelope
	if err := strictjson.Unmarshal(raw, &env); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	if env.PayloadType != payloadType {
		return nil, nil, fmt.Errorf("%w: payload type is %q, want %q", ErrMalformed, env.PayloadType, payloadType)
	}
	if base64.StdEncoding.DecodedLen(len(env.Payload)) > MaxPayload+2 {
		return nil, nil, fmt.Errorf("%w: payload exceeds %d MiB", ErrTooLarge, MaxPayload>>20)
	}
	payload, err := base64.StdEncoding.Strict().DecodeString(env.Payload)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: payload is not standard base64", ErrMalformed)
	}
	if len(payload) > MaxPayload {
		return nil, nil, fmt.Errorf("%w: payload is %d bytes, limit %d MiB", ErrTooLarge, len(payload), MaxPayload>>20)
	}
	return &env, payload, nil
}

func lookup(id string, sets []opskey.Roots) (ed25519.PublicKey, bool) {
	for _, s := range sets {
		if k, ok := s.Key(id); ok {
			return k, true
		}
	}
	return nil, false
}

// Sign wraps payload in a DSSE envelope signed by every key.
func Sign(payloadType string, payload []byte, keys ...ed25519.PrivateKey) ([]byte, error) {
	if len(keys) == 0 {
		return nil, errors.New("sign: no signing key given")
	}
	if len(payload) > MaxPayload {
		return nil, fmt.Errorf("sign: %w: payload is %d bytes, limit %d MiB", ErrTooLarge, len(payload), MaxPayload>>20)
	}
	signers := make([]dsse.Signer, len(keys))
	for i, k := range keys {
		signers[i] = signer{k}
	}
	es, err := dsse.NewEnvelopeSigner(signers...)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	env, err := es.SignPayload(context.Background(), payloadType, payload)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	var buf bytes.Buffer
	if err := json.MarshalWrite(&buf, env); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

// Short abbreviates a key id for messages.
func Short(id string) string {
	if len(id) > 16 {
		return id[:16]
	}
	return id
}

type signer struct{ key ed25519.PrivateKey }

func (s signer) Sign(_ context.Context, data []byte) ([]byte, error) {
	return ed25519.Sign(s.key, data), nil
}

func (s signer) KeyID() (string, error) {
	return opskey.ID(s.key.Public().(ed25519.PublicKey)), nil
}
