package controlclient

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

// listener accepts on loopback and says which one a connection reached.
func listener(t *testing.T) (net.Listener, netip.AddrPort) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, netip.MustParseAddrPort(ln.Addr().String())
}

// closedPort is a loopback port nothing listens on: a replica gone.
func closedPort(t *testing.T) netip.AddrPort {
	ln, ep := listener(t)
	ln.Close()
	return ep
}

// A connection goes to the first control endpoint that answers, tried in
// turn, and stays with the one that answered until it stops answering.
func TestEndpointsAreTriedInTurn(t *testing.T) {
	enrolled := closedPort(t)
	b, epB := listener(t)
	c, epC := listener(t)
	var e endpoints
	e.set(enrolled, []netip.AddrPort{enrolled, epB, {}, netip.AddrPortFrom(epC.Addr(), 0), epC})
	if got := len(e.list); got != 3 {
		t.Fatalf("%d endpoints kept (%v), want the enrolled one, B and C once each", got, e.list)
	}
	reached := func() net.Listener {
		t.Helper()
		conn, err := e.dial(context.Background(), "tcp", "ignored:1")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if conn.RemoteAddr().String() == epB.String() {
			return b
		}
		return c
	}
	if reached() != b {
		t.Fatal("the enrolled endpoint is down: want B, the next in turn")
	}
	// A new list keeps the endpoint that answered first in turn.
	e.set(enrolled, []netip.AddrPort{epC, epB})
	if reached() != b {
		t.Error("after the list changed, the connection left B, which answers")
	}
	b.Close()
	if reached() != c {
		t.Error("B is down: want C")
	}
	c.Close()
	if _, err := e.dial(context.Background(), "tcp", "ignored:1"); err == nil {
		t.Error("every endpoint is down, yet a connection was made")
	}
}

// A control endpoint that accepts connections but fails the handshake is
// passed over like one that is down: here the endpoint enrolled with is
// a replica of the same CA whose certificate lacks the name the device
// uses. Taken as answering, it held the device for good, every sync
// failing on the name, while the next endpoint worked.
func TestAnEndpointFailingTheHandshakeIsPassedOver(t *testing.T) {
	c := newControl(t)
	dir := t.TempDir()
	rec, err := c.enrolIn(dir, c.fp)
	if err != nil {
		t.Fatal(err)
	}
	stranger := httptest.NewUnstartedServer(http.NotFoundHandler())
	cert, err := c.ca.ServerCert([]string{"192.0.2.9"})
	if err != nil {
		t.Fatal(err)
	}
	stranger.TLS = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	stranger.StartTLS()
	t.Cleanup(stranger.Close)
	good := rec.Endpoint
	rec.Endpoint = netip.MustParseAddrPort(stranger.Listener.Addr().String())
	client, err := New(dir, rec)
	if err != nil {
		t.Fatal(err)
	}
	client.SetEndpoints([]netip.AddrPort{good})
	for i := range 2 {
		resp, err := client.Sync(context.Background(), controlapi.SyncRequest{State: controlapi.DeviceState{Why: "echo"}}, nil)
		if err != nil || len(resp.Commands) != 1 {
			t.Fatalf("sync %d with the enrolled endpoint failing its handshake: %+v, %v; want the next endpoint's answer", i+1, resp, err)
		}
	}
}
