package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Do runs fn on an OS thread switched into the namespace. Sockets fn
// creates stay in the namespace after Do returns.
func (ns *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: after switching namespaces back and
		// forth it is discarded when the goroutine exits, so no other
		// goroutine can inherit a thread in the wrong namespace.
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer self.Close()
		if err := unix.Setns(ns.FD(), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns.Name, err)
			return
		}
		err = fn()
		if rerr := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); rerr != nil && err == nil {
			err = rerr
		}
		errc <- err
	}()
	return <-errc
}

// Link joins two namespaces with a veth pair and gives each end an address
// (a prefix such as 10.10.0.2/24 or fd00:10::2/64).
func Link(t testing.TB, a *NS, aAddr string, b *NS, bAddr string) {
	t.Helper()
	ifA, ifB := "veth-"+a.Name[len(a.Name)-6:], "veth-"+b.Name[len(b.Name)-6:]
	a.MustRun(t, "ip", "link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", b.Name)
	for _, side := range []struct {
		ns        *NS
		ifname    string
		addresses string
	}{{a, ifA, aAddr}, {b, ifB, bAddr}} {
		for _, addr := range splitComma(side.addresses) {
			args := []string{"ip", "addr", "add", addr, "dev", side.ifname}
			if netip.MustParsePrefix(addr).Addr().Is6() {
				args = append(args, "nodad")
			}
			side.ns.MustRun(t, args...)
		}
		side.ns.MustRun(t, "ip", "link", "set", side.ifname, "up")
	}
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if i > start {
				out = append(out, s[start:i])
			}
			start = i + 1
		}
	}
	return out
}

// Echo starts TCP and UDP echo servers on addr:port inside ns for the rest
// of the test.
func Echo(t testing.TB, ns *NS, ap netip.AddrPort) {
	t.Helper()
	var tl net.Listener
	var uc net.PacketConn
	err := ns.Do(func() error {
		var err error
		if tl, err = net.Listen("tcp", ap.String()); err != nil {
			return err
		}
		uc, err = net.ListenPacket("udp", ap.String())
		return err
	})
	if err != nil {
		t.Fatalf("echo on %s in %s: %v", ap, ns.Name, err)
	}
	t.Cleanup(func() { tl.Close(); uc.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := uc.ReadFrom(buf)
			if err != nil {
				return
			}
			uc.WriteTo(buf[:n], from)
		}
	}()
}

// Reachable reports whether an echo round trip to ap over proto ("tcp" or
// "udp") succeeds from inside ns within timeout. Any failure counts as
// unreachable (a drop in OUTPUT fails connect with EPERM, elsewhere it
// times out), so tests first prove the probe reachable without a firewall.
func Reachable(ns *NS, proto string, ap netip.AddrPort, timeout time.Duration) (bool, error) {
	var ok bool
	err := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c, err := (&net.Dialer{}).DialContext(ctx, proto, ap.String())
		if err != nil {
			return nil
		}
		defer c.Close()
		ok = roundTrip(c, timeout)
		return nil
	})
	return ok, err
}

// Conn opens a TCP connection from ns to ap and keeps it for the test.
func Conn(t testing.TB, ns *NS, ap netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() error {
		var err error
		c, err = net.DialTimeout("tcp", ap.String(), time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("connect %s from %s: %v", ap, ns.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// RoundTrip reports whether one echo exchange on c completes in time.
func RoundTrip(c net.Conn, timeout time.Duration) bool { return roundTrip(c, timeout) }

func roundTrip(c net.Conn, timeout time.Duration) bool {
	msg := []byte("bulkhead probe")
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(msg); err != nil {
		return false
	}
	buf := make([]byte, len(msg))
	_, err := io.ReadFull(c, buf)
	return err == nil && string(buf) == string(msg)
}
