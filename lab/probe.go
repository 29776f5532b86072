package lab

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
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

var links atomic.Int32

// Link joins two namespaces with a veth pair and gives each end an address
// (a prefix such as 10.10.0.2/24 or fd00:10::2/64, several separated by
// commas). It returns the interface names in a and in b: "to-" and the
// other side's namespace suffix, numbered so that two namespaces can be
// joined more than once.
func Link(t T, a *NS, aAddr string, b *NS, bAddr string) (ifA, ifB string) {
	t.Helper()
	n := links.Add(1)
	ifA, ifB = fmt.Sprintf("to-%s-%d", b.Name[len(b.Name)-6:], n), fmt.Sprintf("to-%s-%d", a.Name[len(a.Name)-6:], n)
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
	return ifA, ifB
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
func Echo(t T, ns *NS, ap netip.AddrPort) {
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
	return ReachableFrom(ns, proto, netip.AddrPort{}, ap, timeout)
}

// ReachableFrom is Reachable from a chosen local address and port (the
// zero AddrPort: any; an address with port 0: any port of it), as a host
// spoofing a service's source port would send.
func ReachableFrom(ns *NS, proto string, local, ap netip.AddrPort, timeout time.Duration) (bool, error) {
	var ok bool
	err := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		d := net.Dialer{}
		if local.IsValid() || local.Port() != 0 {
			ip := net.IP(nil)
			if local.Addr().IsValid() {
				ip = local.Addr().AsSlice()
			}
			if proto == "udp" {
				d.LocalAddr = &net.UDPAddr{IP: ip, Port: int(local.Port())}
			} else {
				d.LocalAddr = &net.TCPAddr{IP: ip, Port: int(local.Port())}
			}
		}
		c, err := d.DialContext(ctx, proto, ap.String())
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
func Conn(t T, ns *NS, ap netip.AddrPort) net.Conn {
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

// Stream sends numbered UDP datagrams from ns to the echo service at ap
// every interval until the returned stop is called; stop reports how many
// were sent and how many never came back. A reconfiguration that drops
// even one packet of a running flow shows up as lost > 0.
func Stream(t T, ns *NS, ap netip.AddrPort, interval time.Duration) (stop func() (sent, lost int)) {
	t.Helper()
	var c net.Conn
	if err := ns.Do(func() error {
		var err error
		c, err = net.Dial("udp", ap.String())
		return err
	}); err != nil {
		t.Fatalf("stream to %s: %v", ap, err)
	}
	var mu sync.Mutex
	got := map[uint64]bool{}
	quit, sentc, recvDone := make(chan struct{}), make(chan int, 1), make(chan struct{})
	go func() {
		defer close(recvDone)
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			if n == 8 {
				mu.Lock()
				got[binary.BigEndian.Uint64(buf)] = true
				mu.Unlock()
			}
		}
	}()
	go func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		var seq uint64
		for {
			select {
			case <-quit:
				sentc <- int(seq)
				return
			case <-tick.C:
				c.Write(binary.BigEndian.AppendUint64(nil, seq))
				seq++
			}
		}
	}()
	return func() (int, int) {
		close(quit)
		sent := <-sentc
		time.Sleep(300 * time.Millisecond) // echoes still in flight
		c.Close()
		<-recvDone
		mu.Lock()
		defer mu.Unlock()
		return sent, sent - len(got)
	}
}

// Reaches is Reachable for a test: a round trip with a 2 s timeout, the
// test failing only if the probe itself cannot run.
func Reaches(t T, ns *NS, proto string, ap netip.AddrPort) bool {
	t.Helper()
	ok, err := Reachable(ns, proto, ap, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// FirstContact bounds the first exchange through a WireGuard peer just
// configured: if the first handshake initiation is lost (a busy machine),
// it is retried only after the 5 s rekey timeout, so a single 2 s probe
// fails where the path is fine (one CI run of three, once).
const FirstContact = 15 * time.Second

// ReachesWithin retries Reaches until it succeeds or d has passed; for
// paths that come up on a protocol timer (a WireGuard handshake that
// failed is retried only after 5 s).
func ReachesWithin(t T, ns *NS, proto string, ap netip.AddrPort, d time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(d)
	for !Reaches(t, ns, proto, ap) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}
