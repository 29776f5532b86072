package flowlog

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// message is an NFLOG packet message: nfgenmsg, then the attributes.
func message(prefix string, payload []byte) []byte {
	msg := []byte{2, 0, 0x10, 0x92}
	attr := func(typ uint16, data []byte) {
		msg = binary.NativeEndian.AppendUint16(msg, uint16(4+len(data)))
		msg = binary.NativeEndian.AppendUint16(msg, typ)
		msg = append(msg, data...)
		for len(msg)%4 != 0 {
			msg = append(msg, 0)
		}
	}
	attr(1, []byte{8, 0, 3, 0}) // NFULA_PACKET_HDR, skipped
	if prefix != "" {
		attr(attrPrefix, append([]byte(prefix), 0))
	}
	if payload != nil {
		attr(attrPayload, payload)
	}
	return msg
}

func ipv4(proto byte, dst string, l4 ...byte) []byte {
	return ipv4From(proto, "192.0.2.99", dst, l4...)
}

func ipv4From(proto byte, src, dst string, l4 ...byte) []byte {
	p := make([]byte, 24, 24+len(l4))
	p[0], p[9] = 0x46, proto // IHL 6: one word of options
	copy(p[12:16], netip.MustParseAddr(src).AsSlice())
	copy(p[16:20], netip.MustParseAddr(dst).AsSlice())
	return append(p, l4...)
}

func TestParse(t *testing.T) {
	v6 := make([]byte, 40, 48)
	v6[0], v6[6] = 0x60, 17
	copy(v6[24:], netip.MustParseAddr("fd00:20:1::7").AsSlice())
	copy(v6[8:], netip.MustParseAddr("fd00:10::6").AsSlice())
	v6 = append(v6, 0x13, 0x88, 0x12, 0xb5, 0, 8, 0, 0)
	tests := []struct {
		name string
		msg  []byte
		want controlapi.Flow
		ok   bool
	}{
		{"tcp v4 with options", message("wms", ipv4(6, "10.20.1.7", 0xc3, 0x50, 0x01, 0xbb)), controlapi.Flow{Segment: "wms", Protocol: policy.TCP, Address: netip.MustParseAddr("10.20.1.7"), Port: 443}, true},
		{"udp v6", message("telemetry", v6), controlapi.Flow{Segment: "telemetry", Protocol: policy.UDP, Address: netip.MustParseAddr("fd00:20:1::7"), Port: 4789}, true},
		{"icmp has no port", message("diagnostics", ipv4(1, "10.50.0.3", 8, 0, 0, 0)), controlapi.Flow{Segment: "diagnostics", Protocol: policy.ICMP, Address: netip.MustParseAddr("10.50.0.3")}, true},
		{"gre is any", message("wms", ipv4(47, "10.20.1.7")), controlapi.Flow{Segment: "wms", Protocol: policy.Any, Address: netip.MustParseAddr("10.20.1.7")}, true},
		// Refused connections: outbound by where they went, inbound by
		// where they came from, both with the port they were aimed at.
		{"refused out", message("denied:out", ipv4From(6, "10.10.1.6", "10.30.0.10", 0xc3, 0x50, 0x01, 0xbb)), controlapi.Flow{Direction: "out", Protocol: policy.TCP, Address: netip.MustParseAddr("10.30.0.10"), Port: 443}, true},
		{"refused in", message("denied:in", ipv4From(6, "10.10.1.6", "10.10.1.2", 0xc3, 0x50, 0, 22)), controlapi.Flow{Direction: "in", Protocol: policy.TCP, Address: netip.MustParseAddr("10.10.1.6"), Port: 22}, true},
		{"refused in v6", message("denied:in", v6), controlapi.Flow{Direction: "in", Protocol: policy.UDP, Address: netip.MustParseAddr("fd00:10::6"), Port: 4789}, true},
		{"no prefix", message("", ipv4(6, "10.20.1.7", 0, 0, 1, 187)), controlapi.Flow{}, false},
		{"no payload", message("wms", nil), controlapi.Flow{}, false},
		{"ports cut off", message("wms", ipv4(6, "10.20.1.7", 0, 0)), controlapi.Flow{}, false},
		{"not ip", message("wms", make([]byte, 40)), controlapi.Flow{}, false},
		{"truncated", []byte{2, 0}, controlapi.Flow{}, false},
	}
	for _, tt := range tests {
		got, ok := Parse(tt.msg)
		if ok != tt.ok || (ok && got != tt.want) {
			t.Errorf("%s: Parse = %+v, %v; want %+v, %v", tt.name, got, ok, tt.want, tt.ok)
		}
	}
}

func TestLogAggregates(t *testing.T) {
	var l Log
	t0 := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	a := controlapi.Flow{Segment: "wms", Protocol: policy.TCP, Address: netip.MustParseAddr("10.20.1.7"), Port: 8080}
	b := controlapi.Flow{Segment: "finance", Protocol: policy.TCP, Address: netip.MustParseAddr("10.30.0.9"), Port: 443}
	l.Add(a, t0)
	l.Add(a, t0.Add(time.Second))
	l.Add(b, t0.Add(2*time.Second))
	taken := l.Take()
	if len(taken) != 2 || taken[0].Flow != b || taken[1].Flow != a || taken[1].Count != 2 ||
		!taken[1].First.Equal(t0) || !taken[1].Last.Equal(t0.Add(time.Second)) {
		t.Fatalf("first Take = %+v", taken)
	}
	if again := l.Take(); len(again) != 0 {
		t.Errorf("a second Take with nothing new = %+v", again)
	}
	l.Add(a, t0.Add(time.Minute))
	if taken := l.Take(); len(taken) != 1 || taken[0].Count != 1 || !taken[0].First.Equal(t0.Add(time.Minute)) {
		t.Errorf("Take after one more = %+v, want that one connection only", taken)
	}
	if all := l.All(); len(all) != 2 || all[1].Count != 3 || !all[1].First.Equal(t0) {
		t.Errorf("All = %+v, want both flows, wms with 3 connections since %v", all, t0)
	}
	for i := range MaxFlows {
		l.Add(controlapi.Flow{Segment: "scan", Protocol: policy.TCP, Address: netip.MustParseAddr("10.0.0.1"), Port: uint16(i + 1)}, t0)
	}
	if len(l.All()) != MaxFlows || l.Overflow != 2 {
		t.Errorf("after a scan: %d flows kept, overflow %d; want %d and 2", len(l.All()), l.Overflow, MaxFlows)
	}
	l.Add(a, t0) // a flow already held still counts
	if l.Overflow != 2 {
		t.Errorf("a known flow counted as overflow")
	}
}
