package server

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"net/netip"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// parseWGKey reads a tunnel key a device sent ("" is none).
func parseWGKey(s string) (key policy.Key, ok bool, err error) {
	if s == "" {
		return key, false, nil
	}
	if !wgKeyForm.MatchString(s) || key.UnmarshalText([]byte(s)) != nil {
		return key, false, errors.New("wireguard_key: a base64 Curve25519 public key (44 characters)")
	}
	return key, true, nil
}

// deviceCert issues device id's certificate for its identity key pub,
// binding its class, its tunnel key (when it has one) and its tunnel
// address (when valid).
func (s *Server) deviceCert(pub crypto.PublicKey, id, class, wgKey string, addr netip.Addr) ([]byte, error) {
	uris := []string{controlapi.DeviceURIPrefix + id, controlapi.ClassURI(class)}
	key, ok, err := parseWGKey(wgKey)
	if err != nil {
		return nil, err
	}
	if ok {
		uris = append(uris, controlapi.TunnelBinding{Key: key}.URI())
	}
	var ips []netip.Addr
	if addr.IsValid() {
		ips = append(ips, addr)
	}
	return s.ca.ClientCert(pub, "device "+id, uris, ips...)
}

// rebind answers a device whose presented certificate does not bind the
// tunnel key it reports (it rotated its key, or enrolled before its
// tunnel was up), or not its address and class (issued before they were
// bound): the record takes the new key, audited, and the device
// gets a certificate binding it and its address. Nil when the binding
// holds.
func (s *Server) rebind(presented *x509.Certificate, dev controlapi.Device, wgKey string, now time.Time) ([]byte, error) {
	key, ok, err := parseWGKey(wgKey)
	if err != nil || !ok {
		return nil, err
	}
	if b, bound, err := controlapi.BindingOf(presented); err == nil && bound && b.Key == key && b.Address == dev.TunnelAddress && b.Class == dev.Class &&
		bytes.Equal(presented.Raw, dev.Certificate) {
		return nil, nil
	}
	der, err := s.deviceCert(presented.PublicKey, dev.ID, dev.Class, wgKey, dev.TunnelAddress)
	if err != nil {
		return nil, err
	}
	if err := s.db.Rebind(dev.ID, wgKey, der, now); err != nil {
		return nil, err
	}
	if wgKey != dev.WireGuardKey {
		s.log.Info("device tunnel key changed", "id", dev.ID, "public_key", wgKey)
	}
	s.rosterChanged(dev.ID) // gateways learn the new binding
	return der, nil
}
