package nft

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// batch is the netlink transaction queue makes for rs over an empty
// namespace, message by message: header type and flags, then the payload
// (sequence numbers and port ids are the socket's, not ours).
func batch(t *testing.T, rs Ruleset) [][]byte {
	t.Helper()
	var msgs [][]byte
	c, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		for _, m := range req {
			b, err := m.MarshalBinary()
			if err != nil {
				return nil, err
			}
			msgs = append(msgs, append(fmt.Appendf(nil, "%d/%d:", m.Header.Type, m.Header.Flags), b[16:]...))
		}
		return req, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	if err := queue(c, rs, nil, contents{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	return msgs
}

// shuffled is d with everything that arrives as a list in another order:
// segments, their destinations and ports, monitored segments, peers, the
// floor and the control endpoints.
func shuffled(d localpolicy.Desired, r *rand.Rand) localpolicy.Desired {
	mix := func(a []localpolicy.Access) []localpolicy.Access {
		a = slices.Clone(a)
		r.Shuffle(len(a), func(i, j int) { a[i], a[j] = a[j], a[i] })
		for i := range a {
			dst := slices.Clone(a[i].Destinations)
			r.Shuffle(len(dst), func(i, j int) { dst[i], dst[j] = dst[j], dst[i] })
			for k := range dst {
				ports := slices.Clone(dst[k].Ports)
				r.Shuffle(len(ports), func(i, j int) { ports[i], ports[j] = ports[j], ports[i] })
				dst[k].Ports = ports
			}
			a[i].Destinations = dst
		}
		return a
	}
	d.Segments = mix(d.Segments)
	if d.Monitor != nil {
		m := *d.Monitor
		m.Segments = mix(m.Segments)
		d.Monitor = &m
	}
	d.Peers = slices.Clone(d.Peers)
	r.Shuffle(len(d.Peers), func(i, j int) { d.Peers[i], d.Peers[j] = d.Peers[j], d.Peers[i] })
	d.Floor = slices.Clone(d.Floor)
	r.Shuffle(len(d.Floor), func(i, j int) { d.Floor[i], d.Floor[j] = d.Floor[j], d.Floor[i] })
	d.Control = slices.Clone(d.Control)
	r.Shuffle(len(d.Control), func(i, j int) { d.Control[i], d.Control[j] = d.Control[j], d.Control[i] })
	return d
}

// withOverlaps adds to d what makes ordering matter most: a second
// floor rule and control endpoint, and segments whose destinations
// overlap each other's and the example's, some rate-limited.
func withOverlaps(d localpolicy.Desired) localpolicy.Desired {
	d.Floor = append(slices.Clone(d.Floor), localpolicy.FloorRule{Name: "plc", Destination: policy.Destination{
		CIDR: netip.MustParsePrefix("192.168.50.4/30"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 502, Last: 502}}}})
	d.Control = append(slices.Clone(d.Control), policy.Endpoint{Address: netip.MustParseAddr("10.99.0.9"), Port: 443})
	tcp := func(cidr string, ports ...uint16) policy.Destination {
		dst := policy.Destination{CIDR: netip.MustParsePrefix(cidr), Protocol: policy.TCP}
		for _, p := range ports {
			dst.Ports = append(dst.Ports, policy.PortRange{First: p, Last: p + 9})
		}
		return dst
	}
	d.Segments = append(slices.Clone(d.Segments),
		localpolicy.Access{Segment: "yard-wide", Destinations: []policy.Destination{tcp("10.20.0.0/16", 440, 8000), {CIDR: netip.MustParsePrefix("10.20.1.7/32"), Protocol: policy.Any}}},
		localpolicy.Access{Segment: "yard-cams", RateLimit: &policy.RateLimit{BytesPerSecond: 1000}, Destinations: []policy.Destination{tcp("10.20.1.0/25", 443, 8005), tcp("10.20.0.0/20", 9000)}},
		// Boxes that start alike and end differently: which is cut
		// must not depend on which came first.
		localpolicy.Access{Segment: "yard-audit", RateLimit: &policy.RateLimit{BytesPerSecond: 2000}, Destinations: []policy.Destination{tcp("10.20.1.0/24", 440),
			{CIDR: netip.MustParsePrefix("10.20.1.0/24"), Protocol: policy.TCP, Ports: []policy.PortRange{{First: 440, Last: 470}}}}},
	)
	return d
}

// The same Desired state gives the same ruleset, text and netlink batch,
// byte for byte, whatever order its lists arrive in.
func TestBuildIgnoresInputOrder(t *testing.T) {
	for _, class := range []string{"dock-gateway", "scanner", "telematics", "monitored-scanner", "overlapping", "sharded"} {
		t.Run(class, func(t *testing.T) {
			var d localpolicy.Desired
			if class == "overlapping" {
				d = withOverlaps(desired(t, "dock-gateway", localpolicy.Sticky{}))
			} else {
				d = desired(t, class, localpolicy.Sticky{})
			}
			opt := Options{DHCP: true, Tunnel: "bh0", ListenPort: 51820}
			want := Build(d, opt)
			wantText, wantBatch := want.Text(), batch(t, want)
			if len(wantBatch) < 10 {
				t.Fatalf("a batch of %d messages; the test proves nothing", len(wantBatch))
			}
			for seed := range uint64(20) {
				got := Build(shuffled(d, rand.New(rand.NewPCG(seed, 1))), opt)
				if text := got.Text(); text != wantText {
					t.Fatalf("seed %d: the text differs:\n%s\nwant\n%s", seed, text, wantText)
				}
				gotBatch := batch(t, got)
				if len(gotBatch) != len(wantBatch) {
					t.Fatalf("seed %d: %d messages, want %d", seed, len(gotBatch), len(wantBatch))
				}
				for i := range gotBatch {
					if !bytes.Equal(gotBatch[i], wantBatch[i]) {
						t.Fatalf("seed %d: message %d differs:\n%x\nwant\n%x", seed, i, gotBatch[i], wantBatch[i])
					}
				}
			}
		})
	}
}

// Overlapping segments become disjoint map elements that give every
// point the verdict of the strictest segment covering it, and cover
// exactly what the segments cover.
func TestOverlappingSegmentsKeepTheStricterVerdict(t *testing.T) {
	d := withOverlaps(desired(t, "dock-gateway", localpolicy.Sticky{}))
	rs := Build(d, Options{Tunnel: "bh0"})
	// The verdict each point should get: rate-limited segments first, by
	// name, then the unlimited ones (accept).
	order := slices.Clone(d.Segments)
	slices.SortStableFunc(order, func(a, b localpolicy.Access) int {
		if (a.RateLimit != nil) != (b.RateLimit != nil) {
			if a.RateLimit != nil {
				return -1
			}
			return 1
		}
		if a.RateLimit != nil {
			return strings.Compare(a.Segment, b.Segment)
		}
		return 0
	})
	var pts []point
	for _, a := range d.Segments {
		pts = append(pts, probePoints(destinations(a))...)
	}
	checked := 0
	for _, p := range pts {
		want, wantOK := "", false
		for _, a := range order {
			if covered(destinations(a), p) {
				want, wantOK = "", true
				if a.RateLimit != nil {
					want = "seg_" + a.Segment
				}
				break
			}
		}
		got, ok := verdictAt(rs, p)
		if ok != wantOK || got != want {
			t.Fatalf("%+v: verdict %q (covered %v), want %q (covered %v)", p, got, ok, want, wantOK)
		}
		if ok && got != "" {
			checked++
		}
	}
	if checked == 0 {
		t.Fatal("no probe point landed on a rate-limited segment; the test proves nothing")
	}
	for _, s := range rs.Sets {
		for i, a := range s.Elements {
			for _, b := range s.Elements[i+1:] {
				if overlaps(a, b) {
					t.Errorf("set %s: %+v overlaps %+v", s.Name, a, b)
				}
			}
		}
	}
}
