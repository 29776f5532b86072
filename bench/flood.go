package bench

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/lab"
)

// floodCases measure what callers without a certificate can cost the
// control server.
func floodCases() []Case {
	return []Case{{Name: "control server memory under 1,000 stalled unauthenticated connections", Privileged: true,
		Unit: "MiB", Also: []string{"ms-op"}, Max: 64,
		Run:  benchStalled,
		Note: "1,000 TLS connections without a client certificate from 100 addresses (10 each, under the per-address bound of 16), each sending part of a request's headers and then nothing (the server admits 512 without a certificate at once, and refuses the rest at the handshake); VmRSS above the idle server, read once all are open; ms-op is an operator's `bulkhead-control devices` meanwhile (the server still answers)"}}
}

func benchStalled(b B) {
	lab.RequirePrivileged(b)
	ctlNS, cliNS := lab.NewNS(b, "ctl"), lab.NewNS(b, "flood")
	sources := make([]netip.Addr, 100)
	addrs := "10.98.0.2/16"
	for i := range sources {
		sources[i] = netip.AddrFrom4([4]byte{10, 98, 1, byte(i + 1)})
		addrs += "," + sources[i].String() + "/16"
	}
	lab.Link(b, cliNS, addrs, ctlNS, "10.98.0.1/16")
	addr := netip.MustParseAddrPort("10.98.0.1:8443")
	ctl := lab.StartControl(b, ctlNS, addr, 0)
	caPEM, err := os.ReadFile(filepath.Join(ctl.Data, pki.CertFile))
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	ctl.MustCLI(b, "devices")
	idle := vmRSS(b, ctl.Pid())
	conns := 1000
	if Quick {
		conns = 20
	}
	b.ResetTimer()
	var grew, opMS float64
	for range b.N {
		var held []net.Conn
		for i := range conns {
			src := sources[i%len(sources)]
			var raw net.Conn
			err := cliNS.Do(func() (err error) {
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 5 * time.Second}
				raw, err = d.Dial("tcp", addr.String())
				return err
			})
			if err != nil {
				b.Fatalf("connection %d: %v", i, err)
			}
			c := tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: addr.Addr().String()})
			if err := c.Handshake(); err != nil {
				b.Fatalf("connection %d: %v", i, err)
			}
			fmt.Fprintf(c, "POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n")
			held = append(held, c)
		}
		grew = vmRSS(b, ctl.Pid()) - idle
		start := time.Now()
		if out, err := ctl.CLI("devices"); err != nil {
			b.Fatalf("an operator is not served under the flood: %v %s", err, out)
		}
		opMS = float64(time.Since(start).Microseconds()) / 1000
		for _, c := range held {
			c.Close()
		}
	}
	b.StopTimer()
	b.ReportMetric(grew, "MiB")
	b.ReportMetric(opMS, "ms-op")
}
