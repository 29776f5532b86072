// Package bench owns Bulkhead's performance figures: the workloads they are
// measured on, the targets they are held to, and the RESULTS.md table that
// `make bench` regenerates. Benchmarks run here, never as timed assertions
// inside unit tests.
package bench

import (
	"cmp"
	"crypto/ed25519"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// B is the *testing.B a case runs with. testing.Benchmark, which
// bulkhead-bench uses, keeps a failed benchmark's log to itself; B also
// writes why it failed to standard error, so `make bench` can say.
type B struct{ *testing.B }

// Fatal says why on standard error and fails the case.
func (b B) Fatal(args ...any) { b.say(fmt.Sprint(args...)); b.B.Fatal(args...) }

// Fatalf is Fatal with a format.
func (b B) Fatalf(format string, args ...any) {
	b.say(fmt.Sprintf(format, args...))
	b.B.Fatalf(format, args...)
}

// Errorf says what went wrong on standard error and fails the case.
func (b B) Errorf(format string, args ...any) {
	b.say(fmt.Sprintf(format, args...))
	b.B.Errorf(format, args...)
}

// Skip says why on standard error; a skipped case reports no figure.
func (b B) Skip(args ...any) { b.say("skipped: " + fmt.Sprint(args...)); b.B.Skip(args...) }

func (b B) say(msg string) { fmt.Fprintf(os.Stderr, "bulkhead-bench: %s: %s\n", b.Name(), msg) }

// Benchmark runs a case's body as testing.Benchmark does.
func Benchmark(c Case) testing.BenchmarkResult {
	return testing.Benchmark(func(tb *testing.B) { c.Run(B{tb}) })
}

// Rounds is how many times `make bench` measures a case timed per
// operation; it reports the round with the median time. One round's mean
// moves by a fifth from one run to the next on this kind of VM (a
// collection, a neighbour), which a target of the same size cannot tell
// from a regression.
const Rounds = 5

// Median runs the case Rounds times and returns the round whose time per
// operation is the median; a round that fails to run (N is 0) is
// returned at once.
func Median(c Case) testing.BenchmarkResult {
	var rs []testing.BenchmarkResult
	for range Rounds {
		r := Benchmark(c)
		if r.N == 0 {
			return r
		}
		rs = append(rs, r)
	}
	slices.SortFunc(rs, func(a, b testing.BenchmarkResult) int { return cmp.Compare(a.NsPerOp(), b.NsPerOp()) })
	return rs[len(rs)/2]
}

// Case is one measured figure.
type Case struct {
	Name string
	// Privileged cases need root, ip and nft; without them they are
	// reported as not run.
	Privileged bool
	Target     time.Duration // per operation; zero means reported only
	// NoSlowerThan names another case this one must not be slower than
	// (measured in the same run).
	NoSlowerThan string
	// Unit, when set, makes the figure the metric Run reports under that
	// name (b.ReportMetric) instead of the time per operation.
	Unit string
	// Also names further metrics Run reports, shown next to the figure.
	Also []string
	// Reference says what Run measured next to the figure, reported as
	// "ref-"+Unit; MinRatio is how large the figure must be relative to it
	// (or the "ratio" metric, when Run measures the ratio in pairs).
	Reference string
	MinRatio  float64
	// Max is the bound the figure must stay under (in Unit).
	Max float64
	// Ref is what the figure compares with when that is not measured in
	// the same run (another product, a figure users report).
	Ref  string
	Run  func(b B)
	Note string
}

// Cases are the benchmarks `make bench` runs, in table order.
func Cases() []Case {
	return []Case{
		{
			Name: "verify bundle, 10,000 destinations",
			Run:  func(b B) { benchVerify(b, 10000) },
			Note: "size cap, DSSE + Ed25519, strict decode, validation",
		},
		{
			Name: "evaluate, 10,000 destinations",
			Run:  func(b B) { benchEvaluate(b, 10000) },
		},
		{
			Name:   "verify + evaluate, 10,000 destinations",
			Target: 20 * time.Millisecond,
			Run:    func(b B) { benchVerifyEvaluate(b, 10000) },
			Note:   "what a new bundle costs before it is applied",
		},
		{
			Name: "verify + evaluate, 100 destinations",
			Run:  func(b B) { benchVerifyEvaluate(b, 100) },
		},
		{
			Name: "posture sample",
			Run:  benchPostureSample,
			Note: "all the facts one sample gathers (host, load, memory, disk, every process, sockets with their owners, interfaces); the agent takes one per interval (default 30s)",
		},
	}
}

// CanRunPrivileged reports whether the kernel cases can run here.
func CanRunPrivileged() bool {
	if os.Geteuid() != 0 {
		return false
	}
	for _, tool := range []string{"ip", "nft", "wg", "wireguard-go", "iperf3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return false
		}
	}
	return true
}

// All is every case: the pure ones, then those that need the kernel.
func All() []Case {
	return slices.Concat(Cases(), crossCases(), kernelCases(), tunnelCases(), controlCases(), gatewayCases(), floodCases(), postureCases())
}

// LargePolicy builds a valid policy with n destinations spread over
// segments of 1,000 destinations each (fewer for small n), every one open
// to class "scanner", half of them through a schedule.
func LargePolicy(n int) policy.Document { return spreadPolicy(n, 1000) }

// spreadPolicy is LargePolicy with perSegment destinations per segment.
func spreadPolicy(n, perSegment int) policy.Document {
	doc := policy.Document{
		Schema:   policy.Schema,
		Control:  []policy.Endpoint{{Address: netip.MustParseAddr("10.99.0.1"), Port: 8443}},
		Validity: policy.Validity{MaxOffline: policy.Duration(72 * time.Hour)},
		Schedules: map[string]policy.Schedule{
			"day": {Zone: "Europe/Berlin", Days: []policy.Weekday{1, 2, 3, 4, 5}, Start: 6 * 60, End: 22 * 60},
		},
		Classes: map[string]policy.Class{"scanner": {}},
	}
	class := doc.Classes["scanner"]
	for s := 0; s*perSegment < n; s++ {
		seg := policy.Segment{
			Name:      fmt.Sprintf("seg-%03d", s),
			DataClass: "operational",
			Gateway:   policy.Gateway{PublicKey: policy.Key{byte(s), 1}, Endpoint: fmt.Sprintf("10.10.%d.%d:51820", s/250, s%250+1)},
		}
		for i := 0; i < perSegment && s*perSegment+i < n; i++ {
			seg.Destinations = append(seg.Destinations, policy.Destination{
				CIDR:     netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(100 + s), byte(i / 250), byte(i%250 + 1)}), 32),
				Protocol: policy.TCP,
				Ports:    []policy.PortRange{{First: 443, Last: 443}, {First: 8000, Last: 8099}},
			})
		}
		rule := policy.Rule{Segment: seg.Name}
		if s%2 == 1 {
			rule.Schedule = "day"
			rule.Ports = []policy.PortRange{{First: 443, Last: 443}}
		}
		class.Rules = append(class.Rules, rule)
		doc.Segments = append(doc.Segments, seg)
	}
	doc.Classes["scanner"] = class
	return doc
}

// signedLarge returns a signed bundle of LargePolicy(n) and its roots.
func signedLarge(b B, n int) ([]byte, opskey.Roots) {
	b.Helper()
	priv := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	roots, err := opskey.NewRoots(1, priv.Public().(ed25519.PublicKey))
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now().UTC()
	raw, err := bundle.Sign(bundle.Payload{
		Version: 1, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: LargePolicy(n),
	}, priv)
	if err != nil {
		b.Fatal(err)
	}
	return raw, roots
}

var scanner = bundle.Device{ID: "dev-1", Class: "scanner"}

func benchVerify(b B, n int) {
	raw, roots := signedLarge(b, n)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := bundle.Verify(raw, roots); err != nil {
			b.Fatal(err)
		}
	}
}

func benchEvaluate(b B, n int) {
	raw, roots := signedLarge(b, n)
	bu, err := bundle.Verify(raw, roots)
	if err != nil {
		b.Fatal(err)
	}
	in := localpolicy.Input{Bundle: &bu.Payload, Device: scanner, Now: bu.IssuedAt}
	b.ReportAllocs()
	for b.Loop() {
		if d := localpolicy.Evaluate(in); len(d.Segments) == 0 {
			b.Fatal("nothing open")
		}
	}
}

func benchVerifyEvaluate(b B, n int) {
	raw, roots := signedLarge(b, n)
	b.ReportAllocs()
	for b.Loop() {
		bu, err := bundle.Verify(raw, roots)
		if err != nil {
			b.Fatal(err)
		}
		if err := bu.Admit(bu.IssuedAt, 0, scanner); err != nil {
			b.Fatal(err)
		}
		in := localpolicy.Input{Bundle: &bu.Payload, Device: scanner, Now: bu.IssuedAt}
		if d := localpolicy.Evaluate(in); len(d.Segments) == 0 {
			b.Fatal("nothing open")
		}
	}
}
