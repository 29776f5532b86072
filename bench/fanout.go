package bench

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/crowd"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// crowdSize is how many long-polling devices the fan-out reaches besides
// the real agents.
const crowdSize = 1000

// benchFanOut measures how long a partner revocation takes to reach a
// fleet: crowdSize long-polls held by `bulkhead-lab crowd`, and two real
// agents each sending a 1 ms UDP flow to the partner's segment through a
// Debian wireguard-go gateway. Each trial is one revoke-partner from the
// ops CLI; a device's figure is when its answer arrived (crowd) or when
// the last packet of its flow reached the segment host (agents). An
// ops-signed reinstate-partner goes between trials, and every poll is
// held again before the next.
func benchFanOut(b B) {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go")
	size, trials := crowdSize, 5
	if Quick {
		size, trials = 20, 1
	}
	ctlNS, crowdNS, gwNS := lab.NewNS(b, "ctl"), lab.NewNS(b, "crowd"), lab.NewNS(b, "gw")
	devs := []*lab.NS{lab.NewNS(b, "dev"), lab.NewNS(b, "dev")}
	gw := lab.StartGateway(b, gwNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	gwNS.MustRun(b, "ip", "addr", "add", iperfHost.String()+"/32", "dev", "lo")
	// Every device has its own link into the control namespace and (the
	// agents) into the gateway's; the server listens on the first.
	for i, ns := range append([]*lab.NS{crowdNS}, devs...) {
		lab.Link(b, ns, fmt.Sprintf("10.99.%d.2/30", i), ctlNS, fmt.Sprintf("10.99.%d.1/30", i))
		if i > 0 {
			ns.MustRun(b, "ip", "route", "add", "10.99.0.1/32", "via", fmt.Sprintf("10.99.%d.1", i))
		}
	}
	ops := newOpsKeys(b, b.TempDir())
	ctl := lab.StartControl(b, ctlNS, netip.MustParseAddrPort("10.99.0.1:8443"), 0, ops.pubFile)
	var agents []*agentProc
	var pushed string
	for i, ns := range devs {
		uplink, gwAddr := fmt.Sprintf("192.0.2.%d", 4*i+2), fmt.Sprintf("192.0.2.%d", 4*i+1)
		lab.Link(b, ns, uplink+"/30", gwNS, gwAddr+"/30")
		tunAddr := fmt.Sprintf("100.64.0.%d", i+2)
		a := runAgent(b, ns, "scanner", tunAddr+"/32", 51820, ops)
		a.enroll(b, ctl)
		gw.AllowPeer(b, a.PublicKey, netip.MustParseAddrPort(uplink+":51820"), tunAddr+"/32")
		file := a.apply(b, 1, policy.Document{
			Schema:   policy.Schema,
			Control:  []policy.Endpoint{{Address: netip.MustParseAddr("10.99.0.1"), Port: 8443}},
			Validity: policy.Validity{MaxOffline: policy.Duration(72 * time.Hour)},
			Segments: []policy.Segment{{Name: "carrier", DataClass: "operational", Partner: "acme", Tier: 3,
				Destinations: []policy.Destination{{CIDR: netip.PrefixFrom(iperfHost, 32), Protocol: policy.UDP, Ports: []policy.PortRange{{First: flowPort, Last: flowPort}}}},
				Gateway:      policy.Gateway{PublicKey: key(b, gw.PublicKey), Endpoint: gwAddr + ":51820"}}},
			Classes: map[string]policy.Class{"scanner": {Rules: []policy.Rule{{Segment: "carrier"}}}},
		})
		pushed = file
		agents = append(agents, a)
	}
	// Control learns the partner's name from the policy it holds (pushed
	// once every agent runs its own copy of it).
	ctl.MustCLI(b, "policy", "push", pushed)
	flows := startFlows(b, gwNS, devs)
	cr := startCrowd(b, crowdNS, ctl, size)
	cut := func(a *agentProc) bool {
		for _, d := range a.status(b).Decisions {
			if d.Segment == "carrier" {
				return !d.Allowed
			}
		}
		return true
	}
	var ms []float64
	b.ResetTimer()
	for range b.N {
		for range trials {
			lab.WaitFor(b, "every poll is held and every flow runs", 60*time.Second, func() bool {
				return cr.held() == size && flows.running(20*time.Millisecond)
			})
			start := time.Now()
			out := ctl.MustCLI(b, "revoke-partner", "acme", "--reason", "bench")
			f := strings.Fields(out)
			if len(f) < 2 || f[0] != "revoke-partner" {
				b.Fatalf("revoke-partner said %q", out)
			}
			id := f[1]
			lab.WaitFor(b, "the crowd has the revocation", 60*time.Second, func() bool { return len(cr.arrivals(id)) == size })
			lab.WaitFor(b, "the agents' flows stop", 60*time.Second, func() bool {
				return flows.silent(100*time.Millisecond) && cut(agents[0]) && cut(agents[1])
			})
			for _, at := range cr.arrivals(id) {
				ms = append(ms, float64(at.Sub(start))/float64(time.Millisecond))
			}
			for _, at := range flows.last() {
				ms = append(ms, max(0, float64(at.Sub(start))/float64(time.Millisecond)))
			}
			ctl.MustCLI(b, "reinstate-partner", "acme", "--reason", "bench", "--key", ops.privFile, "--wait", "60s")
		}
	}
	b.StopTimer()
	if want := trials * (size + len(agents)); len(ms) != want {
		b.Fatalf("%d figures, want %d", len(ms), want)
	}
	b.ReportMetric(percentile(ms, 0.99), "ms-p99")
	b.ReportMetric(percentile(ms, 0.50), "ms-p50")
	b.ReportMetric(percentile(ms, 1), "ms-max")
}

// crowdProc is `bulkhead-lab crowd` running in a namespace, and what its
// events said so far.
type crowdProc struct {
	mu     sync.Mutex
	isHeld []bool
	got    map[string][]time.Time // command id -> arrival at each member
}

// startCrowd enrols size devices of class "crowd" with ctl from ns and
// waits until each holds a poll.
func startCrowd(b testing.TB, ns *lab.NS, ctl *lab.Control, size int) *crowdProc {
	return startCrowdOf(b, ns, ctl, size, "crowd")
}

// startCrowdOf is startCrowd with devices of class.
func startCrowdOf(b testing.TB, ns *lab.NS, ctl *lab.Control, size int, class string) *crowdProc {
	b.Helper()
	// The tokens come first, one per line; the summary follows (stderr).
	lines := strings.Split(ctl.MustCLI(b, "token", "create", "--allow-unknown-class", "--class", class, "--count", fmt.Sprint(size)), "\n")
	if len(lines) < size {
		b.Fatalf("token create printed %d lines for %d tokens", len(lines), size)
	}
	tokens := strings.Join(lines[:size], "\n")
	cmd := ns.Command(lab.Binary(b, "cmd/bulkhead-lab"), "crowd", "--control", ctl.URL, "--trust-ca", ctl.Fingerprint,
		"--class", class, "--dir", b.TempDir())
	cmd.Stdin = strings.NewReader(tokens)
	logf, err := os.Create(filepath.Join(b.TempDir(), "crowd.log"))
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan struct{})
	b.Cleanup(func() { cmd.Process.Kill(); <-exited })
	c := &crowdProc{isHeld: make([]bool, size), got: map[string][]time.Time{}}
	go func() {
		c.read(out)
		cmd.Wait()
		close(exited)
	}()
	for deadline := time.Now().Add(3 * time.Minute); c.held() < size; time.Sleep(50 * time.Millisecond) {
		select {
		case <-exited:
			log, _ := os.ReadFile(logf.Name())
			b.Fatalf("bulkhead-lab crowd exited: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d crowd polls held after 3 minutes", c.held(), size)
		}
	}
	return c
}

func (c *crowdProc) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var e crowd.Event
		if json.Unmarshal(sc.Bytes(), &e) != nil || e.Member < 0 || e.Member >= len(c.isHeld) {
			continue
		}
		c.mu.Lock()
		switch e.Kind {
		case crowd.EvHeld:
			c.isHeld[e.Member] = true
		case crowd.EvCommand:
			c.isHeld[e.Member] = false
			c.got[e.ID] = append(c.got[e.ID], time.Unix(0, e.At))
		case crowd.EvError:
			c.isHeld[e.Member] = false
		}
		c.mu.Unlock()
	}
}

// held is how many members have a poll open now.
func (c *crowdProc) held() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, h := range c.isHeld {
		if h {
			n++
		}
	}
	return n
}

// arrivals are when command id reached each member that has it.
func (c *crowdProc) arrivals(id string) []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Time(nil), c.got[id]...)
}

// udpFlows are 1 ms UDP streams, one from each device namespace to the
// segment host behind the gateway, and when each last arrived.
type udpFlows struct {
	mu      sync.Mutex
	arrived map[netip.Addr]time.Time // by the sender's tunnel address
	senders int
}

func startFlows(b testing.TB, gwNS *lab.NS, devs []*lab.NS) *udpFlows {
	b.Helper()
	f := &udpFlows{arrived: map[netip.Addr]time.Time{}, senders: len(devs)}
	dst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(iperfHost, flowPort))
	var rx *net.UDPConn
	if err := gwNS.Do(func() (err error) { rx, err = net.ListenUDP("udp", dst); return err }); err != nil {
		b.Fatal(err)
	}
	stop := make(chan struct{})
	var conns []*net.UDPConn
	b.Cleanup(func() {
		close(stop)
		rx.Close()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		buf := make([]byte, 64)
		for {
			_, from, err := rx.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			f.mu.Lock()
			f.arrived[from.Addr().Unmap()] = time.Now()
			f.mu.Unlock()
		}
	}()
	for _, ns := range devs {
		var tx *net.UDPConn
		if err := ns.Do(func() (err error) { tx, err = net.DialUDP("udp", nil, dst); return err }); err != nil {
			b.Fatal(err)
		}
		conns = append(conns, tx)
		go func() {
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					tx.Write([]byte("flow")) // refused while revoked
				}
			}
		}()
	}
	return f
}

// running reports whether a packet from every sender arrived within d.
func (f *udpFlows) running(d time.Duration) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, t := range f.arrived {
		if time.Since(t) < d {
			n++
		}
	}
	return n == f.senders
}

// silent reports whether nothing arrived from anyone for d.
func (f *udpFlows) silent(d time.Duration) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, t := range f.arrived {
		if time.Since(t) < d {
			return false
		}
	}
	return true
}

// last is when each sender's newest packet arrived.
func (f *udpFlows) last() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []time.Time
	for _, t := range f.arrived {
		out = append(out, t)
	}
	return out
}
