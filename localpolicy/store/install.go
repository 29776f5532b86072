package store

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// Install is the one way a new bundle enters the cache: read with a hard
// cap, verified against the trust roots in force, admitted (newer than anything accepted, for
// this device, valid at now), then stored. Every outcome is audited; a
// rejected bundle changes nothing else, so the previous policy stays in
// force.
func (s *Store) Install(r io.Reader, now time.Time, dev bundle.Device) (*bundle.Bundle, error) {
	b, err := s.install(r, now, dev)
	if err != nil {
		if aerr := s.Audit(now, "bundle-rejected", err.Error()); aerr != nil {
			return nil, errors.Join(err, fmt.Errorf("audit: %w", aerr))
		}
		return nil, err
	}
	return b, nil
}

func (s *Store) install(r io.Reader, now time.Time, dev bundle.Device) (*bundle.Bundle, error) {
	raw, err := envelope.ReadAll(r)
	if err != nil {
		return nil, err
	}
	roots, _, err := s.CurrentRoots()
	if err != nil {
		return nil, err
	}
	b, err := bundle.Verify(raw, roots)
	if err != nil {
		return nil, err
	}
	highest, err := s.Highest()
	if err != nil {
		return nil, err
	}
	if err := b.Admit(now, highest, dev); err != nil {
		return nil, err
	}
	if err := s.Accept(b, now); err != nil {
		return nil, err
	}
	return b, nil
}

// CurrentRoots returns the trust roots in force and their version. The
// store keeps them decoded between changes: the agent asks on every
// decision it reports.
func (s *Store) CurrentRoots() (opskey.Roots, uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current != nil {
		return s.current.roots, s.current.version, nil
	}
	set, ok, err := s.Roots()
	if err != nil {
		return opskey.Roots{}, 0, err
	}
	if !ok {
		return opskey.Roots{}, 0, fmt.Errorf("%w: no trust roots pinned (the installer pins them)", ErrCorrupt)
	}
	roots, err := set.Roots()
	if err != nil {
		return opskey.Roots{}, 0, fmt.Errorf("%w: trust roots: %w", ErrCorrupt, err)
	}
	s.current = &currentRoots{roots: roots, version: set.Version}
	return roots, set.Version, nil
}

// PinRoots stores the keys pinned at install (pinned reads them) as the
// first trust-root set, version 1, unless a set is stored: from then on
// only a rotation changes them.
func (s *Store) PinRoots(pinned func() (opskey.Roots, error)) error {
	if _, ok, err := s.Roots(); err != nil || ok {
		return err
	}
	roots, err := pinned()
	if err != nil {
		return fmt.Errorf("pin trust roots: %w", err)
	}
	_, err = s.SetRoots(bundle.NewRootSet(1, roots))
	return err
}

// Rotate replaces the trust roots with a rotation signed by a threshold of
// the current roots and a threshold of the new ones. The outcome is audited.
func (s *Store) Rotate(raw []byte, now time.Time) (opskey.Roots, error) {
	roots, err := s.rotate(raw)
	if err != nil {
		if aerr := s.Audit(now, "roots-rejected", err.Error()); aerr != nil {
			return opskey.Roots{}, errors.Join(err, fmt.Errorf("audit: %w", aerr))
		}
		return opskey.Roots{}, err
	}
	return roots, s.Audit(now, "roots-rotated", fmt.Sprintf("%d keys, threshold %d", roots.Len(), roots.Threshold))
}

func (s *Store) rotate(raw []byte) (opskey.Roots, error) {
	current, version, err := s.CurrentRoots()
	if err != nil {
		return opskey.Roots{}, err
	}
	next, set, err := bundle.VerifyRotation(raw, current, version)
	if err != nil {
		return opskey.Roots{}, err
	}
	if _, err := s.SetRoots(set); err != nil {
		return opskey.Roots{}, err
	}
	return next, nil
}
