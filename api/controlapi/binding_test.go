package controlapi

import (
	"crypto/x509"
	"net"
	"net/url"
	"strings"
	"testing"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// A certificate binds one key and at most one address, or nothing: a
// gateway must never have to choose between two.
func TestBindingOf(t *testing.T) {
	key := TunnelBinding{Key: policy.Key{1, 2, 3}}
	uri := func(s string) *url.URL {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	for _, tc := range []struct {
		name string
		cert x509.Certificate
		want string // error; "" for a binding of key, 100.80.0.9 and scanner
	}{
		{name: "key, address and class", cert: x509.Certificate{URIs: []*url.URL{uri(DeviceURIPrefix + "d"), uri(ClassURI("scanner")), uri(key.URI())}, IPAddresses: []net.IP{net.ParseIP("100.80.0.9")}}},
		{name: "two classes", cert: x509.Certificate{URIs: []*url.URL{uri(ClassURI("scanner")), uri(ClassURI("gateway")), uri(key.URI())}}, want: "more than one class"},
		{name: "two keys", cert: x509.Certificate{URIs: []*url.URL{uri(key.URI()), uri(TunnelBinding{Key: policy.Key{4}}.URI())}}, want: "more than one WireGuard key"},
		{name: "two addresses", cert: x509.Certificate{URIs: []*url.URL{uri(key.URI())}, IPAddresses: []net.IP{net.ParseIP("100.80.0.9"), net.ParseIP("100.80.0.10")}}, want: "more than one tunnel address"},
		{name: "a short key", cert: x509.Certificate{URIs: []*url.URL{uri(WireGuardURIPrefix + "AQID")}}, want: "not 32 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, ok, err := BindingOf(&tc.cert)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) || ok {
					t.Fatalf("BindingOf = %v, %v, %v; want an error saying %q", b, ok, err, tc.want)
				}
				return
			}
			if err != nil || !ok || b.Key != key.Key || b.Address.String() != "100.80.0.9" || b.Class != "scanner" {
				t.Fatalf("BindingOf = %v, %v, %v", b, ok, err)
			}
		})
	}
}
