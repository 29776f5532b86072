package bench

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

// ReplicaCrowd is how many the fan-out over three replicas on PostgreSQL
// reaches: ReplicaCrowdCI in make bench, 100,000 in make bench-scale.
var ReplicaCrowd = ReplicaCrowdCI

// ReplicaCrowdCI is the replicated fan-out's size in make bench.
const ReplicaCrowdCI = 10000

// fanOutPlan is one fan-out benchmark's setting.
type fanOutPlan struct {
	size, trials, replicas int
	// kill adds a trial that starts by killing the replica the agents
	// and a third of the crowd hold their polls on.
	kill bool
}

// benchFanOut measures how long a partner revocation takes to reach a
// fleet on one server with its bbolt file.
func benchFanOut(b B) {
	p := fanOutPlan{size: crowdSize, trials: 5, replicas: 1}
	if Quick {
		p.size, p.trials = 20, 1
	}
	fanOut(b, p)
}

// benchFanOutReplicas is the same over three replicas sharing one
// PostgreSQL, with a replica killed at the start of one more trial.
func benchFanOutReplicas(b B) {
	p := fanOutPlan{size: ReplicaCrowd, trials: 5, replicas: replicasFor(ReplicaCrowd), kill: true}
	if Quick {
		p.size, p.trials = 30, 1
	}
	if p.replicas > 3 {
		b.say(fmt.Sprintf("%d polls over %d replicas: each held poll is a descriptor in its replica and its crowd process, and the descriptor limit here is %d", p.size, p.replicas, noFile()))
	}
	fanOut(b, p)
}

// replicasFor is how many replicas hold size polls: three, or more where
// a third of them would take a replica (and its crowd process) past
// four fifths of its descriptor limit. A process cannot raise its hard
// limit without CAP_SYS_RESOURCE, which a container may withhold.
func replicasFor(size int) int {
	per := max(1, noFile()*4/5)
	return max(3, (size+per-1)/per)
}

// noFile is the descriptor limit the replicas and crowds inherit.
func noFile() int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur > 1<<30 {
		return 1 << 30
	}
	return int(lim.Cur)
}

// patience is how long a step that involves every poll may take: a
// minute, or 6 ms a poll in a large crowd (10 minutes for 100,000).
func patience(size int) time.Duration {
	return max(time.Minute, time.Duration(size)*6*time.Millisecond)
}

// fanOut measures the fan-out of p: p.size long-polls held by `bulkhead-lab
// crowd` (one crowd per replica, each trying the others when its own does
// not answer), and two real agents enrolled with the first replica, each
// sending a 1 ms UDP flow to the partner's segment through a Debian
// wireguard-go gateway. Each trial is one revoke-partner from the ops CLI
// (on the last replica); a device's figure is when its answer arrived
// (crowd) or when the last packet of its flow reached the segment host
// (agents). An ops-signed reinstate-partner goes between trials, and
// every poll is held again before the next.
func fanOut(b B, p fanOutPlan) {
	lab.RequirePrivileged(b, "nft", "wg", "wireguard-go")
	ctlNS, crowdNS, gwNS := lab.NewNS(b, "ctl"), lab.NewNS(b, "crowd"), lab.NewNS(b, "gw")
	devs := []*lab.NS{lab.NewNS(b, "dev"), lab.NewNS(b, "dev")}
	gw := lab.StartGateway(b, gwNS, lab.DebianWireGuard, netip.MustParseAddr("192.0.2.1"), 51820, "100.64.0.1/24")
	gwNS.MustRun(b, "ip", "addr", "add", iperfHost.String()+"/32", "dev", "lo")
	// Every device has its own link into the control namespace and (the
	// agents) into the gateway's; the replicas listen on addresses of
	// their own there, the database on another.
	replicaAddr := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 98, 0, byte(i + 1)}), 8443)
	}
	for i := range p.replicas {
		ctlNS.MustRun(b, "ip", "addr", "add", replicaAddr(i).Addr().String()+"/32", "dev", "lo")
	}
	for i, ns := range append([]*lab.NS{crowdNS}, devs...) {
		lab.Link(b, ns, fmt.Sprintf("10.99.%d.2/30", i), ctlNS, fmt.Sprintf("10.99.%d.1/30", i))
		ns.MustRun(b, "ip", "route", "add", "10.98.0.0/24", "via", fmt.Sprintf("10.99.%d.1", i))
	}
	ops := newOpsKeys(b, b.TempDir())
	opts := lab.ControlOptions{OpsPub: []string{ops.pubFile}}
	if p.replicas > 1 {
		dbAddr := netip.MustParseAddrPort("10.98.0.100:5432")
		ctlNS.MustRun(b, "ip", "addr", "add", dbAddr.Addr().String()+"/32", "dev", "lo")
		opts.Database = lab.StartPostgres(b, ctlNS, dbAddr).URL
	}
	var ctls []*lab.Control
	var control []policy.Endpoint
	for i := range p.replicas {
		// Each replica's certificate names every replica: a device
		// enrolled with one and failing over to another checks the
		// name it enrolled with.
		opts.Names = nil
		for j := range p.replicas {
			if j != i {
				opts.Names = append(opts.Names, replicaAddr(j).Addr().String())
			}
		}
		if i > 0 {
			// The CA and command key are the first's.
			opts.SecretsFrom = ctls[0].Data
		}
		ctls = append(ctls, lab.StartControlWith(b, ctlNS, replicaAddr(i), opts))
		control = append(control, policy.Endpoint{Address: replicaAddr(i).Addr(), Port: replicaAddr(i).Port()})
	}
	first, last := ctls[0], ctls[len(ctls)-1]
	var agents []*agentProc
	var pushed string
	for i, ns := range devs {
		uplink, gwAddr := fmt.Sprintf("192.0.2.%d", 4*i+2), fmt.Sprintf("192.0.2.%d", 4*i+1)
		lab.Link(b, ns, uplink+"/30", gwNS, gwAddr+"/30")
		tunAddr := fmt.Sprintf("100.64.0.%d", i+2)
		a := runAgent(b, ns, "scanner", tunAddr+"/32", 51820, ops)
		a.enroll(b, first)
		gw.AllowPeer(b, a.PublicKey, netip.MustParseAddrPort(uplink+":51820"), tunAddr+"/32")
		file := a.apply(b, 1, policy.Document{
			Schema:   policy.Schema,
			Control:  control,
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
	first.MustCLI(b, "policy", "push", pushed)
	flows := startFlows(b, gwNS, devs)
	before := rssOf(b, ctls)
	var crowds crowds
	for i, c := range ctls {
		n := p.size / p.replicas
		if i == 0 {
			n += p.size % p.replicas
		}
		var also []netip.AddrPort
		for j := range p.replicas {
			if j != i {
				also = append(also, replicaAddr(j))
			}
		}
		crowds = append(crowds, startCrowdAt(b, crowdNS, first, c, n, "crowd", also))
	}
	held := rssOf(b, ctls)
	cut := func(a *agentProc) bool {
		for _, d := range a.status(b).Decisions {
			if d.Segment == "carrier" {
				return !d.Allowed
			}
		}
		return true
	}
	var ms, killMs []float64
	var cpu float64
	orders := 0
	profile := startProfile(b)
	b.ResetTimer()
	for range b.N {
		for trial := range p.trials + map[bool]int{true: 1}[p.kill] {
			killing := p.kill && trial == p.trials
			if killing {
				profile()
			}
			lab.WaitFor(b, "every poll is held and every flow runs", patience(p.size), func() bool {
				return crowds.held() == p.size && flows.running(20*time.Millisecond)
			})
			ticks := cpuTicks(b, ctlNS)
			start := time.Now()
			if killing {
				first.Stop()
			}
			id := order(b, last, "revoke-partner", "acme", "--reason", "bench")
			if !lab.Within(patience(p.size), func() bool { return len(crowds.arrivals(id)) == p.size }) {
				var got []string
				for _, c := range crowds {
					got = append(got, fmt.Sprintf("%d of %d held, %d arrived", c.held(), len(c.isHeld), len(c.arrivals(id))))
				}
				b.Fatalf("trial %d: after %s the crowds have: %s", trial, patience(p.size), strings.Join(got, "; "))
			}
			lab.WaitFor(b, "the agents' flows stop", 60*time.Second, func() bool {
				return flows.silent(100*time.Millisecond) && cut(agents[0]) && cut(agents[1])
			})
			if !killing {
				cpu += float64(cpuTicks(b, ctlNS)-ticks) * 1000 / clockTicks
				orders++
			}
			var these []float64
			for _, at := range crowds.arrivals(id) {
				these = append(these, float64(at.Sub(start))/float64(time.Millisecond))
			}
			for _, at := range flows.last() {
				these = append(these, max(0, float64(at.Sub(start))/float64(time.Millisecond)))
			}
			if p.size > ReplicaCrowdCI {
				// A long run says how each trial went as it goes.
				b.say(fmt.Sprintf("trial %d%s: p50 %.0f ms, p99 %.0f ms, max %.0f ms", trial, map[bool]string{true: " (a replica killed)"}[killing],
					percentile(these, 0.5), percentile(these, 0.99), percentile(these, 1)))
			}
			if killing {
				killMs = append(killMs, these...)
			} else {
				ms = append(ms, these...)
				// Every poll hears the reinstatement before the next trial.
				// Not with --wait: it reads the whole order, every device's
				// state, four times a second, which at 100,000 devices
				// takes longer than the CLI waits for an answer.
				back := order(b, last, "reinstate-partner", "acme", "--reason", "bench", "--key", ops.privFile)
				lab.WaitFor(b, "the reinstatement reaching every poll", patience(p.size), func() bool { return len(crowds.arrivals(back)) == p.size })
			}
		}
	}
	b.StopTimer()
	profile()
	if want := p.trials * (p.size + len(agents)); len(ms) != want {
		b.Fatalf("%d figures, want %d", len(ms), want)
	}
	b.ReportMetric(percentile(ms, 0.99), "ms-p99")
	b.ReportMetric(percentile(ms, 0.50), "ms-p50")
	b.ReportMetric(percentile(ms, 1), "ms-max")
	if p.kill {
		b.ReportMetric(percentile(killMs, 0.99), "kill-ms-p99")
		b.ReportMetric(percentile(killMs, 1), "kill-ms-max")
	}
	b.ReportMetric((held-before)*1024/float64(p.size+len(agents)), "KiB/poll")
	b.ReportMetric(cpu/float64(max(orders, 1)), "cpu-ms/order")
}

// order gives an order with the ops CLI and returns its id.
func order(b B, ctl *lab.Control, argv ...string) string {
	out := ctl.MustCLI(b, argv...)
	f := strings.Fields(out)
	if len(f) < 2 || f[0] != argv[0] {
		b.Fatalf("%s said %q", argv[0], out)
	}
	return f[1]
}

// rssOf is the resident memory of the control servers, in MiB.
func rssOf(b testing.TB, ctls []*lab.Control) float64 {
	var n float64
	for _, c := range ctls {
		n += vmRSS(b, c.Pid())
	}
	return n
}

// clockTicks is the kernel's USER_HZ, in which /proc reports CPU time.
const clockTicks = 100

// cpuTicks is the CPU time (user and system, in clock ticks) every
// process in ns has used: the replicas and their database.
func cpuTicks(b testing.TB, ns *lab.NS) int64 {
	out, err := exec.Command("ip", "netns", "pids", ns.Name).Output()
	if err != nil {
		b.Fatal(err)
	}
	var n int64
	for _, pid := range strings.Fields(string(out)) {
		raw, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			continue // gone meanwhile
		}
		// The fields after the command's closing parenthesis: utime is
		// the 12th of them, stime the 13th.
		f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+1:]))
		if len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			s, _ := strconv.ParseInt(f[12], 10, 64)
			n += u + s
		}
	}
	return n
}

// crowds are several crowd processes read as one.
type crowds []*crowdProc

func (cs crowds) held() (n int) {
	for _, c := range cs {
		n += c.held()
	}
	return n
}

func (cs crowds) arrivals(id string) (out []time.Time) {
	for _, c := range cs {
		out = append(out, c.arrivals(id)...)
	}
	return out
}

// crowdProc is `bulkhead-lab crowd` running in a namespace, and what its
// events said so far.
type crowdProc struct {
	mu     sync.Mutex
	isHeld []bool
	got    map[string][]time.Time // command id -> arrival at each member
	errors map[string]int         // the members' errors, by text (the first 20 texts)
}

// startCrowdOf enrols size devices of class with ctl from ns and waits
// until each holds a poll.
func startCrowdOf(b testing.TB, ns *lab.NS, ctl *lab.Control, size int, class string) *crowdProc {
	return startCrowdAt(b, ns, ctl, ctl, size, class, nil)
}

// startCrowdAt is startCrowdOf with the tokens made by issuer and the
// devices enrolled with ctl, trying the replicas also in turn when it
// does not answer.
func startCrowdAt(b testing.TB, ns *lab.NS, issuer, ctl *lab.Control, size int, class string, also []netip.AddrPort) *crowdProc {
	b.Helper()
	// The tokens come first, one per line; the summary follows (stderr).
	// token create makes at most 10,000 at once.
	var made []string
	for len(made) < size {
		n := min(size-len(made), 10000)
		lines := strings.Split(issuer.MustCLI(b, "token", "create", "--allow-unknown-class", "--class", class, "--count", fmt.Sprint(n)), "\n")
		if len(lines) < n {
			b.Fatalf("token create printed %d lines for %d tokens", len(lines), n)
		}
		made = append(made, lines[:n]...)
	}
	tokens := strings.Join(made, "\n")
	argv := []string{lab.Binary(b, "cmd/bulkhead-lab"), "crowd", "--control", ctl.URL, "--trust-ca", ctl.Fingerprint,
		"--class", class, "--dir", b.TempDir()}
	for _, a := range also {
		argv = append(argv, "--also", a.String())
	}
	cmd := ns.Command(argv...)
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
	c := &crowdProc{isHeld: make([]bool, size), got: map[string][]time.Time{}, errors: map[string]int{}}
	go func() {
		c.read(out)
		cmd.Wait()
		close(exited)
	}()
	wait := max(3*time.Minute, 3*patience(size))
	for deadline := time.Now().Add(wait); c.held() < size; time.Sleep(50 * time.Millisecond) {
		select {
		case <-exited:
			log, _ := os.ReadFile(logf.Name())
			b.Fatalf("bulkhead-lab crowd exited: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d crowd polls held after %s; the members' errors: %s", c.held(), size, wait, c.errorsSeen())
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
			if _, ok := c.errors[e.Error]; ok || len(c.errors) < 20 {
				c.errors[e.Error]++
			}
		}
		c.mu.Unlock()
	}
}

// errorsSeen lists the members' errors, most frequent first.
func (c *crowdProc) errorsSeen() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.errors) == 0 {
		return "none"
	}
	texts := slices.Collect(maps.Keys(c.errors))
	slices.SortFunc(texts, func(a, b string) int { return cmp.Or(c.errors[b]-c.errors[a], strings.Compare(a, b)) })
	var out []string
	for _, t := range texts {
		out = append(out, fmt.Sprintf("%d× %s", c.errors[t], t))
	}
	return strings.Join(out, "; ")
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

// startProfile records where the whole machine's CPU time goes while the
// ordinary trials run, with perf (Debian's linux-perf), when
// BULKHEAD_BENCH_PERF names the file to write; run with
// BULKHEAD_LAB_SYMBOLS=1 so that perf can name Bulkhead's functions, and
// read it with `perf report -i FILE`. The function it returns stops the
// recording; calling it again does nothing.
func startProfile(b B) (stop func()) {
	file := os.Getenv("BULKHEAD_BENCH_PERF")
	if file == "" {
		return func() {}
	}
	cmd := exec.Command("perf", "record", "-a", "-g", "-F", "199", "-o", file)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatalf("BULKHEAD_BENCH_PERF: %v", err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cmd.Process.Signal(os.Interrupt)
			cmd.Wait()
		})
	}
	b.Cleanup(stop)
	return stop
}
