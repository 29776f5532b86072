package controlclient

import (
	"crypto/ed25519"
	"crypto/rand"
	"net/netip"
	"strings"
	"testing"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// A gateway admits a roster entry only on a certificate control's CA
// signed for that device, binding one key, one address and one class.
func TestMemberBelievesOnlyTheCertificate(t *testing.T) {
	ca, _, err := pki.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := pki.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	addr := netip.MustParseAddr("100.80.0.9")
	binding := controlapi.TunnelBinding{Key: policy.Key{7}}.URI()
	issue := func(c *pki.CA, uris []string, ips ...netip.Addr) []byte {
		der, err := c.ClientCert(pub, "dev-1", uris, ips...)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	good := issue(ca, []string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI("scanner"), binding}, addr)
	m, err := Member(ca.Cert, "dev-1", good)
	if err != nil || m.Class != "scanner" || m.Key != (policy.Key{7}) || m.Address != addr || m.ID != "dev-1" {
		t.Fatalf("Member = %+v, %v", m, err)
	}
	for _, tc := range []struct {
		name, id string
		der      []byte
		want     string
	}{
		{"another CA", "dev-1", issue(other, []string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI("scanner"), binding}, addr), "not signed by control's CA"},
		{"another device's certificate", "dev-2", good, "for another device"},
		{"no key", "dev-1", issue(ca, []string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI("scanner")}, addr), "binds no WireGuard key"},
		{"no address", "dev-1", issue(ca, []string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI("scanner"), binding}), "binds no tunnel address"},
		{"no class", "dev-1", issue(ca, []string{controlapi.DeviceURIPrefix + "dev-1", binding}, addr), "binds no class"},
		{"two classes", "dev-1", issue(ca, []string{controlapi.DeviceURIPrefix + "dev-1", controlapi.ClassURI("scanner"), controlapi.ClassURI("dock-gateway"), binding}, addr), "more than one class"},
		{"garbage", "dev-1", []byte("not a certificate"), "certificate"},
	} {
		if _, err := Member(ca.Cert, tc.id, tc.der); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
}
