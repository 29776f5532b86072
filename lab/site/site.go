// Package site is the logistics site of `make demo` (`bulkhead-lab
// demo`): a control server, five Bulkhead segment gateways, three devices
// running the real agent and a truck's safety controller, each in a
// network namespace, joined by a flat network the way warehouses are
// wired; and
// the scenarios of the article run against it (scenarios.go), each
// judged by what the site's policy says should happen.
package site

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Segment is one segment of the site: an echo service on a host behind
// its gateway, a Bulkhead gateway (the agent in its gateway role).
type Segment struct {
	Name    string
	Partner string
	Host    netip.AddrPort
	GW      *Agent
	// Endpoint is where devices reach the gateway, and Key its
	// WireGuard public key (the policy names both).
	Endpoint netip.AddrPort
	Key      string
	// Local is whether the gateway is on the site's own network; the
	// others are reached over the corporate uplink.
	Local bool
}

// Site is the whole site, built by Build.
type Site struct {
	t        lab.T
	progress io.Writer
	dir      string

	// Ctl is the control replica devices enrol with; Replicas the two
	// others, sharing DB with it.
	Ctl         *lab.Control
	Replicas    []*lab.Control
	DB          *lab.Postgres
	ControlBin  string
	OpsKey      string // the ops signing key (ops.key); its ops.pub is pinned by every agent
	AttackerKey string // a key no device trusts
	Router      *lab.NS
	WAN         *lab.NS
	uplink      string    // the router's interface to the corporate uplink
	ctlNS       *lab.NS   // the first replica's machine
	replicaNS   []*lab.NS // the others'
	dbNS        *lab.NS   // the database's

	Segments []*Segment
	Dock     *Agent
	Scanner  *Agent
	Tele     *Agent
	Truck    *lab.Telematics
	// DockSSH is a service on the dock gateway itself: what lateral
	// movement from a compromised scanner aims at.
	DockSSH netip.AddrPort

	SensorName string // the process the dock gateway's EDR check requires
	sensor     *exec.Cmd
	runSensor  func() *exec.Cmd
	gps        *lab.GPS

	// Version is the newest policy version pushed; Bundles the files.
	Version uint64
	Bundles map[uint64]string
}

// The site's addresses. Devices and local gateways hang off the site
// router (10.10.0.0/16); control and the corporate gateways are behind
// the corporate uplink.
var (
	controlAddr = netip.MustParseAddrPort("10.99.0.2:8443")
	replicaAddr = []netip.AddrPort{netip.MustParseAddrPort("10.99.0.6:8443"), netip.MustParseAddrPort("10.99.0.10:8443")}
	dbAddr      = netip.MustParseAddrPort("10.99.0.14:5432")
	tunnelPool  = netip.MustParsePrefix("100.64.0.0/24")
	truckNet    = netip.MustParsePrefix("192.168.50.0/29")
	yard        = lab.Point{Lat: 41.5250, Lon: -88.0817}           // the depot: a 500 m geofence
	parked      = lab.Point{Lat: yard.Lat + 0.0002, Lon: yard.Lon} // the truck's bay, 22 m from the centre
)

// segmentPlan is the site's segments: name, partner, host, local.
var segmentPlan = []Segment{
	{Name: "wms", Host: netip.MustParseAddrPort("10.20.1.10:443"), Local: true},
	{Name: "finance", Host: netip.MustParseAddrPort("10.30.0.10:443")},
	{Name: "carrier-edi", Partner: "northline-freight", Host: netip.MustParseAddrPort("10.60.0.10:443")},
	{Name: "broker-portal", Partner: "spotload-brokers", Host: netip.MustParseAddrPort("10.70.0.10:443")},
	{Name: "diagnostics", Host: netip.MustParseAddrPort("10.50.0.10:22"), Local: true},
}

// brokerFeed is the broker's bulk feed (iperf3), on its host.
const brokerFeed = 5201

// commandLifetime is how long each delivery of an order the site's
// control server signs stays valid.
const commandLifetime = 5 * time.Second

// classSegments is which segments each class's rules open.
var classSegments = map[string][]string{
	"dock-gateway": {"wms", "finance", "carrier-edi", "broker-portal", "diagnostics"},
	"scanner":      {"wms", "diagnostics"},
	"telematics":   {"carrier-edi", "diagnostics"},
}

// Build makes the site and brings every device to policy version 1,
// printing what it does to progress.
func Build(t lab.T, progress io.Writer) *Site {
	lab.RequirePrivileged(t, "nft", "wg", "wireguard-go", "iperf3", "gpsd")
	s := &Site{t: t, progress: progress, dir: t.TempDir(), Bundles: map[uint64]string{}}
	s.step("network: site router, corporate uplink, 3 devices, 5 segment gateways, a truck")
	s.network()
	s.detail("namespaces: %s", strings.Join(s.Namespaces(), " "))
	s.step("before Bulkhead: the network is flat")
	flat := []struct {
		what string
		ap   netip.AddrPort
	}{{"finance", s.Segment("finance").Host}, {"the dock gateway's ssh", s.DockSSH}}
	for _, f := range flat {
		if !lab.Reaches(t, s.Scanner.NS, "tcp", f.ap) {
			t.Fatalf("without agents the scanner does not reach %s (%s); the demo would prove nothing", f.what, f.ap)
		}
		s.detail("the scanner reaches %s at %s", f.what, f.ap)
	}

	s.step("control plane: PostgreSQL and three control replicas with the ops trust root; ops and attacker keys")
	opsDir, attacker := filepath.Join(s.dir, "ops"), filepath.Join(s.dir, "attacker")
	s.ControlBin = lab.Binary(t, "cmd/bulkhead-control")
	for _, dir := range []string{opsDir, attacker} {
		if out, err := exec.Command(s.ControlBin, "keygen", "--out", dir).CombinedOutput(); err != nil {
			t.Fatalf("keygen: %v: %s", err, out)
		}
	}
	s.OpsKey, s.AttackerKey = filepath.Join(opsDir, "ops.key"), filepath.Join(attacker, "ops.key")
	// Each delivery of an order the server signs lasts 5 s here (15 min
	// by default), so scenario 4 can show, in seconds, a truck back from
	// longer than that out of coverage getting its quarantine.
	s.DB = lab.StartPostgres(t, s.dbNS, dbAddr)
	s.detail("PostgreSQL at %s", dbAddr)
	opts := lab.ControlOptions{OpsPub: []string{filepath.Join(opsDir, "ops.pub")}, Database: s.DB.URL,
		Args: []string{"--command-lifetime", commandLifetime.String(), "--tunnel-pool", tunnelPool.String()}}
	s.Ctl = lab.StartControlWith(t, s.ctlNS, controlAddr, opts)
	s.detail("control at %s, CA %s; each delivery it signs lasts %v; tunnel addresses from %s", s.Ctl.URL, s.Ctl.Fingerprint, commandLifetime, tunnelPool)
	// The other replicas share the first's CA and command key, and carry
	// the name devices enrolled with in their certificates.
	opts.SecretsFrom, opts.Names = s.Ctl.Data, []string{controlAddr.Addr().String()}
	for i, ns := range s.replicaNS {
		s.Replicas = append(s.Replicas, lab.StartControlWith(t, ns, replicaAddr[i], opts))
		s.detail("replica at %s, the same store and CA", s.Replicas[i].URL)
	}

	s.step("segment gateways: the agent in its gateway role, one per segment (they boot in lockdown)")
	for _, seg := range s.Segments {
		seg.GW.Start(t)
		seg.Key = seg.GW.Status(t).Tunnel.PublicKey
	}
	s.step("policy v1 signed by the ops key, pushed through control (tokens are made only for classes and segments it defines)")
	s.Push(nil)
	for _, seg := range s.Segments {
		seg.GW.Enroll(t, s.Ctl, strings.Fields(s.Ctl.MustCLI(t, "token", "create", "--role", "gateway", "--segment", seg.Name, "--ttl", "10m"))[0])
		s.detail("%-22s %s, fronts %s, tunnel key %s", seg.GW.Name, seg.GW.ID, seg.Name, seg.Key)
	}
	s.step("devices: enrol with one-time tokens; control assigns each its tunnel address, and every gateway learns it")
	for _, a := range s.Agents() {
		a.Start(t)
		a.Enroll(t, s.Ctl, strings.Fields(s.Ctl.MustCLI(t, "token", "create", "--class", a.Class, "--ttl", "10m"))[0])
		s.detail("%-14s %s, class %s, tunnel key %s", a.Name, a.ID, a.Class, a.Status(t).Tunnel.PublicKey)
	}
	s.WaitVersion(s.Version, 30*time.Second)
	for _, a := range s.Agents() { // the truck's first fix may take a second
		if !lab.Within(20*time.Second, func() bool { return a.Status(t).Mode == "normal" }) {
			st := a.Status(t)
			t.Fatalf("the %s stays in mode %s: %s", a.Name, st.Mode, strings.Join(st.Why, "; "))
		}
	}
	// Tunnels come up on the first packet; wait for each device's first.
	for _, a := range s.Agents() {
		first := s.Segment(classSegments[a.Class][0]).Host
		if !lab.ReachesWithin(t, a.NS, "tcp", first, 15*time.Second) {
			st, _ := a.CLI("status")
			t.Fatalf("the %s never reached %s through its tunnel:\n%s\n%s", a.Name, first, st, a.LogTail(20))
		}
	}
	return s
}

// network builds the namespaces, links, routes and services.
func (s *Site) network() {
	t := s.t
	s.Router, s.WAN = lab.NewNS(t, "site"), lab.NewNS(t, "wan")
	for _, ns := range []*lab.NS{s.Router, s.WAN} {
		ns.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	s.uplink, _ = lab.Link(t, s.Router, "10.200.0.1/30", s.WAN, "10.200.0.2/30")
	s.setUplink(true)

	// hang links a new namespace to the router (local) or the uplink
	// on the n-th /30 of base, with a default route back.
	hang := func(prefix string, local bool, base string, n int) (*lab.NS, netip.Addr, string) {
		ns := lab.NewNS(t, prefix)
		up := s.WAN
		if local {
			up = s.Router
		}
		p := netip.MustParsePrefix(base)
		b := p.Addr().As4()
		b[3] = byte(4 * n)
		gw, me := netip.AddrFrom4(b).Next(), netip.AddrFrom4(b).Next().Next()
		link, _ := lab.Link(t, up, gw.String()+"/30", ns, me.String()+"/30")
		ns.MustRun(t, "ip", "route", "add", "default", "via", gw.String())
		return ns, me, link
	}
	devs := []AgentConfig{
		{Name: "dock gateway", Class: "dock-gateway"},
		{Name: "scanner", Class: "scanner"},
		{Name: "telematics box", Class: "telematics"},
	}
	s.ctlNS, _, _ = hang("ctl", false, "10.99.0.0/24", 0)
	for i := range replicaAddr {
		ns, _, _ := hang(fmt.Sprint("ctl", i+1), false, "10.99.0.0/24", i+1)
		s.replicaNS = append(s.replicaNS, ns)
	}
	s.dbNS, _, _ = hang("db", false, "10.99.0.0/24", len(replicaAddr)+1)
	control := policy.Endpoint{Address: controlAddr.Addr(), Port: controlAddr.Port()}
	opsPub := filepath.Join(s.dir, "ops", "ops.pub")
	var agents []*Agent
	for i, c := range devs {
		ns, addr, link := hang([]string{"dock", "scan", "tele"}[i], true, "10.10.1.0/24", i)
		if i == 2 {
			s.Truck = lab.StartTelematics(t, ns, truckNet)
			c.Floor = []localpolicy.FloorRule{s.Truck.Floor()}
			c.GPSD = "127.0.0.1:2947"
		}
		if i == 0 {
			s.DockSSH = netip.AddrPortFrom(addr, 22)
			lab.Echo(t, ns, s.DockSSH)
			s.SensorName, s.runSensor = lab.Sensor(t, ns)
			s.sensor = s.runSensor()
		}
		a := newAgent(t, ns, c, opsPub, control)
		a.LAN, a.link = addr, link
		agents = append(agents, a)
	}
	s.Dock, s.Scanner, s.Tele = agents[0], agents[1], agents[2]
	s.gps = lab.StartGPS(t, s.Tele.NS, 2947, parked, 200*time.Millisecond)

	for i, plan := range segmentPlan {
		seg := plan
		ns, addr, _ := hang("gw"+fmt.Sprint(i), seg.Local, map[bool]string{true: "10.10.2.0/24", false: "10.201.0.0/24"}[seg.Local], i)
		seg.Endpoint = netip.AddrPortFrom(addr, 51820)
		seg.GW = newAgent(t, ns, AgentConfig{Name: seg.Name + " gateway", Class: gatewayClass, Segments: []string{seg.Name}, ListenPort: seg.Endpoint.Port()}, opsPub, control)
		ns.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(seg.Host.Addr(), 32).String(), "dev", "lo")
		lab.Echo(t, ns, seg.Host)
		// The flat network: the host is routed to without any tunnel,
		// as warehouses are wired before segmentation.
		up := map[bool]*lab.NS{true: s.Router, false: s.WAN}[seg.Local]
		up.MustRun(t, "ip", "route", "add", seg.Host.Addr().String()+"/32", "via", addr.String())
		if seg.Name == "broker-portal" {
			lab.Iperf3Server(t, ns, netip.AddrPortFrom(seg.Host.Addr(), brokerFeed))
		}
		s.Segments = append(s.Segments, &seg)
	}
}

// setUplink connects or cuts the corporate uplink. A link going down
// takes its routes with it; up, they are put back.
func (s *Site) setUplink(up bool) {
	if !up {
		s.Router.MustRun(s.t, "ip", "link", "set", s.uplink, "down")
		return
	}
	s.Router.MustRun(s.t, "ip", "link", "set", s.uplink, "up")
	s.Router.MustRun(s.t, "ip", "route", "replace", "default", "via", "10.200.0.2")
	s.WAN.MustRun(s.t, "ip", "route", "replace", "10.10.0.0/16", "via", "10.200.0.1")
}

// setDeviceLink connects or cuts a device's link to the site: a truck
// leaving coverage.
func (s *Site) setDeviceLink(a *Agent, up bool) {
	s.Router.MustRun(s.t, "ip", "link", "set", a.link, map[bool]string{true: "up", false: "down"}[up])
}

// Namespaces are the names of every namespace of the site.
func (s *Site) Namespaces() []string {
	names := []string{s.Router.Name, s.WAN.Name, s.ctlNS.Name, s.dbNS.Name, s.Truck.NS.Name}
	for _, ns := range s.replicaNS {
		names = append(names, ns.Name)
	}
	for _, a := range s.Agents() {
		names = append(names, a.NS.Name)
	}
	for _, seg := range s.Segments {
		names = append(names, seg.GW.NS.Name)
	}
	return names
}

// Controls are the control replicas, the one devices enrol with first.
func (s *Site) Controls() []*lab.Control { return append([]*lab.Control{s.Ctl}, s.Replicas...) }

// Agents are the three devices.
func (s *Site) Agents() []*Agent { return []*Agent{s.Dock, s.Scanner, s.Tele} }

// Gateways are the segment gateways, in segment order.
func (s *Site) Gateways() []*Agent {
	var out []*Agent
	for _, seg := range s.Segments {
		out = append(out, seg.GW)
	}
	return out
}

// gatewayClass is the class the site's gateways enrol as; the policy
// declares it (with no rules) so that bundles may target them.
const gatewayClass = "segment-gateway"

// Segment is the segment called name.
func (s *Site) Segment(name string) *Segment {
	for _, seg := range s.Segments {
		if seg.Name == name {
			return seg
		}
	}
	s.t.Fatalf("site: no segment %q", name)
	return nil
}

// step and detail print progress.
func (s *Site) step(format string, args ...any) {
	fmt.Fprintf(s.progress, "  > "+format+"\n", args...)
}

func (s *Site) detail(format string, args ...any) {
	fmt.Fprintf(s.progress, "      "+format+"\n", args...)
}

// WaitVersion waits until every agent, devices and gateways, runs
// policy version v.
func (s *Site) WaitVersion(v uint64, d time.Duration) {
	for _, a := range append(s.Agents(), s.Gateways()...) {
		if !lab.Within(d, func() bool { return a.Status(s.t).PolicyVersion == v }) {
			st := a.Status(s.t)
			s.t.Fatalf("the %s runs policy v%d in mode %s, not v%d (%s)", a.Name, st.PolicyVersion, st.Mode, v, strings.Join(st.Why, "; "))
		}
	}
}

// Push signs the site's policy (with shift as the scanners' shift, if
// not nil) as the next version with the ops key, through the real CLI,
// and pushes it through control.
func (s *Site) Push(shift *[2]string) string {
	s.Version++
	doc := filepath.Join(s.dir, fmt.Sprintf("policy-v%d.json", s.Version))
	if err := os.WriteFile(doc, []byte(s.policyJSON(shift)), 0o600); err != nil {
		s.t.Fatal(err)
	}
	out := s.Sign(s.Version, doc, s.OpsKey)
	s.Ctl.MustCLI(s.t, "policy", "push", out)
	return out
}

// Sign signs the policy document at doc as version v with key, for
// every class of the site, and returns the bundle's path.
func (s *Site) Sign(v uint64, doc, key string) string {
	out := filepath.Join(s.dir, fmt.Sprintf("v%d-%s.dsse", v, filepath.Base(filepath.Dir(key))))
	args := []string{"policy", "sign", "--key", key, "--in", doc, "--version", fmt.Sprint(v), "--valid-for", "720h", "--out", out}
	for _, c := range []string{"dock-gateway", "scanner", "telematics", gatewayClass} {
		args = append(args, "--target", c)
	}
	s.Ctl.MustCLI(s.t, args...)
	if key == s.OpsKey {
		s.Bundles[v] = out
	}
	return out
}

// PolicyFile is the policy document of version v.
func (s *Site) PolicyFile(v uint64) string {
	return filepath.Join(s.dir, fmt.Sprintf("policy-v%d.json", v))
}
