package controlclient

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"slices"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/admit"
)

// Member reads a roster entry as a gateway must: the certificate is
// signed by ca (control's CA, pinned at enrolment), names the device id
// the entry claims, and binds one WireGuard key, one tunnel address and
// one class; those, and nothing the server says beside them, are what
// the gateway admits. Validity dates are not judged: a device whose
// certificate lapsed while the gateway was cut off is still the device
// control enrolled, and the policy and orders decide what it reaches.
func Member(ca *x509.Certificate, id string, der []byte) (admit.Member, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return admit.Member{}, fmt.Errorf("roster entry %s: certificate: %w", id, err)
	}
	if err := cert.CheckSignatureFrom(ca); err != nil {
		return admit.Member{}, fmt.Errorf("roster entry %s: the certificate is not signed by control's CA: %w", id, err)
	}
	if !slices.ContainsFunc(cert.URIs, func(u *url.URL) bool { return u.String() == controlapi.DeviceURIPrefix+id }) {
		return admit.Member{}, fmt.Errorf("roster entry %s: the certificate is for another device", id)
	}
	b, bound, err := controlapi.BindingOf(cert)
	switch {
	case err != nil:
		return admit.Member{}, fmt.Errorf("roster entry %s: %w", id, err)
	case !bound:
		return admit.Member{}, fmt.Errorf("roster entry %s: the certificate binds no WireGuard key", id)
	case !b.Address.IsValid():
		return admit.Member{}, fmt.Errorf("roster entry %s: the certificate binds no tunnel address", id)
	case b.Class == "":
		return admit.Member{}, errors.New("roster entry " + id + ": the certificate binds no class")
	}
	return admit.Member{ID: id, Class: b.Class, Key: b.Key, Address: b.Address}, nil
}
