package controlclient

import (
	"context"
	"net"
	"net/netip"
	"testing"
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
