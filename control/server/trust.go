package server

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// errNoRoots refuses a push to a server that publishes no ops keys: it
// could not tell a bundle devices take from one they refuse.
var errNoRoots = errors.New("this server publishes no ops keys (start serve with --ops-pub), so it cannot check a push against them; devices would refuse what it cannot check")

// trust is the ops trust root the server judges pushes by: the keys it
// publishes (--ops-pub), moved on by every rotation it accepted, as a
// device's would be. It never stores what a device would refuse.
type trust struct {
	mu sync.Mutex
	// chain is every root set in force so far, oldest first: the
	// published one (version 1), then each accepted rotation's.
	chain []rootsAt
}

type rootsAt struct {
	version uint64
	roots   opskey.Roots
}

// newTrust starts from the published roots (empty: none) and applies the
// stored rotations in order; one that does not verify ends the chain
// there, and is reported.
func newTrust(published opskey.Roots, rotations [][]byte) (*trust, []error) {
	t := &trust{}
	if published.Len() == 0 {
		return t, nil
	}
	t.chain = []rootsAt{{1, published}}
	var errs []error
	for _, raw := range rotations {
		if err := t.rotate(raw); err != nil {
			errs = append(errs, err)
			break
		}
	}
	return t, errs
}

// reset starts again from the published roots and applies rotations in
// order, as newTrust does: a replica follows rotations others accepted.
func (t *trust) reset(published opskey.Roots, rotations [][]byte) []error {
	fresh, errs := newTrust(published, rotations)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.chain = fresh.chain
	return errs
}

// current is the root set in force and its version.
func (t *trust) current() (opskey.Roots, uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.chain) == 0 {
		return opskey.Roots{}, 0, errNoRoots
	}
	c := t.chain[len(t.chain)-1]
	return c.roots, c.version, nil
}

// rotate accepts a rotation signed by a threshold of the current roots and
// of the new ones, as devices do.
func (t *trust) rotate(raw []byte) error {
	next, err := t.checkRotation(raw)
	if err != nil {
		return err
	}
	t.accept(next)
	return nil
}

// checkRotation verifies a rotation against the current roots without
// accepting it.
func (t *trust) checkRotation(raw []byte) (rootsAt, error) {
	roots, version, err := t.current()
	if err != nil {
		return rootsAt{}, err
	}
	next, set, err := bundle.VerifyRotation(raw, roots, version)
	if err != nil {
		return rootsAt{}, fmt.Errorf("devices would refuse it: %w", err)
	}
	return rootsAt{set.Version, next}, nil
}

// accept moves the roots on to next, a checked rotation.
func (t *trust) accept(next rootsAt) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.chain = append(t.chain, next)
}

// checkBundle refuses a bundle a device would refuse for its signatures
// or its time: signed by keys the current roots do not trust, below their
// threshold, expired or not yet valid at now.
func (t *trust) checkBundle(raw []byte, now time.Time) (*bundle.Bundle, error) {
	roots, _, err := t.current()
	if err != nil {
		return nil, err
	}
	b, err := bundle.Verify(raw, roots)
	if err != nil {
		return nil, fmt.Errorf("devices would refuse it: %w", err)
	}
	if err := b.CheckTime(now); err != nil {
		return nil, fmt.Errorf("devices would refuse it: %w", err)
	}
	return b, nil
}

// checkCommand refuses a command a device would refuse for its signatures
// or its time: not signed by a threshold of the current ops roots, not
// yet valid, or expired at now.
func (t *trust) checkCommand(raw []byte, now time.Time) (*command.Verified, error) {
	roots, _, err := t.current()
	if err != nil {
		return nil, err
	}
	v, err := command.Verify(raw, roots, nil)
	if err != nil {
		return nil, fmt.Errorf("devices would refuse it: %w", err)
	}
	if now.Before(v.IssuedAt.Add(-bundle.ClockSkew)) {
		return nil, fmt.Errorf("devices would refuse it: %s is issued at %s, after this server's time %s", v.ID, v.IssuedAt.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if !now.Before(v.ExpiresAt) {
		return nil, fmt.Errorf("%s expired at %s; sign a fresh one", v.ID, v.ExpiresAt.UTC().Format(time.RFC3339))
	}
	return v, nil
}

// verifiesUnderAny reports whether raw verifies against any root set the
// chain has held: a bundle pushed before a rotation was signed by the
// roots of its day.
func (t *trust) verifiesUnderAny(raw []byte) bool {
	t.mu.Lock()
	chain := append([]rootsAt(nil), t.chain...)
	t.mu.Unlock()
	for _, c := range chain {
		if _, err := bundle.Verify(raw, c.roots); err == nil {
			return true
		}
	}
	return false
}
