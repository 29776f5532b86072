package flowlog

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Packets logged by a rule nft(8) wrote (not our table code) come back as
// the flows they start, for v4 and v6, tcp and udp; a second socket cannot
// take the bound group.
func TestReadsWhatNftLogs(t *testing.T) {
	lab.RequirePrivileged(t, "nft")
	ns := lab.NewNS(t, "nflog")
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	ns.MustRun(t, "nft", "add table inet t; add chain inet t out { type filter hook output priority 0; }; "+
		`add rule inet t out oifname "lo" ct state new meta l4proto { tcp, udp } log prefix "wms" group 4242`)
	r, err := Open(ns.FD(), 4242)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := Open(ns.FD(), 4242); err == nil || !strings.Contains(err.Error(), "bound by another program") {
		t.Errorf("a second bind of the group: %v", err)
	}
	got := make(chan controlapi.Flow, 16)
	done := make(chan error, 1)
	go func() { done <- r.Read(func(f controlapi.Flow) { got <- f }) }()

	send := []struct {
		network, addr string
	}{{"udp", "127.0.0.1:5683"}, {"tcp", "127.0.0.1:8443"}, {"udp", "[::1]:4789"}}
	err = ns.Do(func() error {
		for _, s := range send {
			c, err := net.DialTimeout(s.network, s.addr, time.Second)
			if err != nil { // tcp: refused, but the SYN was logged
				continue
			}
			c.Write([]byte("x"))
			c.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []controlapi.Flow{
		{Segment: "wms", Protocol: policy.UDP, Address: netip.MustParseAddr("127.0.0.1"), Port: 5683},
		{Segment: "wms", Protocol: policy.TCP, Address: netip.MustParseAddr("127.0.0.1"), Port: 8443},
		{Segment: "wms", Protocol: policy.UDP, Address: netip.MustParseAddr("::1"), Port: 4789},
	}
	for _, w := range want {
		select {
		case f := <-got:
			if f != w {
				t.Errorf("read %+v, want %+v", f, w)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("nothing read for %+v", w)
		}
	}
	r.Close()
	if err := <-done; err != nil {
		t.Errorf("Read after Close: %v", err)
	}
}
