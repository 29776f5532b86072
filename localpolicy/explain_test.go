package localpolicy

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

func TestExplain(t *testing.T) {
	b := example(t)
	scanner := Evaluate(Input{Bundle: b, Device: bundle.Device{Class: "scanner"}, Now: dayShift, Floor: floor})
	quarantined := Evaluate(Input{Bundle: b, Device: bundle.Device{Class: "scanner"}, Now: dayShift, Floor: floor, Sticky: Sticky{Mode: Quarantine}})
	restricted := Evaluate(Input{Bundle: b, Device: bundle.Device{Class: "scanner"}, Now: dayShift, Floor: floor,
		Checks: []Check{{ID: "edr-running", Failing: true, Profile: Restricted, Observed: "edr not running", Expected: "edr running"}}})
	tests := []struct {
		name    string
		d       Desired
		to      string
		proto   policy.Protocol
		allowed bool
		by      string
		reason  string
	}{
		{"wms in shift", scanner, "10.20.1.10:443", policy.TCP, true, "segment wms", "within schedule day-shift"},
		{"wms on a port the rule does not open", scanner, "10.20.1.10:8050", policy.TCP, false, "segment wms", "open, but not for tcp port 8050"},
		{"finance for a scanner", scanner, "10.30.0.10:443", policy.TCP, false, "segment finance", "no rule of class scanner"},
		{"control", quarantined, "10.99.0.1:8443", policy.TCP, true, "control", ""},
		{"floor in quarantine", quarantined, "192.168.50.3:502", policy.TCP, true, "safety floor can-gateway", ""},
		{"wms in quarantine", quarantined, "10.20.1.10:443", policy.TCP, false, "segment wms", "mode quarantine"},
		{"a failing check names itself", restricted, "10.50.0.5:22", policy.TCP, false, "segment diagnostics", "mode restricted: the restricted profile of class scanner does not keep it open (restricted: check edr-running failed: observed edr not running, expected edr running)"},
		{"unknown address", scanner, "10.80.0.1:443", policy.TCP, false, "default deny", "in no segment"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ap := netip.MustParseAddrPort(tt.to)
			v := Explain(tt.d, &b.Policy, ap.Addr(), ap.Port(), tt.proto)
			if v.Allowed != tt.allowed || v.By != tt.by || !strings.Contains(v.Reason, tt.reason) {
				t.Errorf("Explain = %+v, want allowed=%v by %q reason containing %q", v, tt.allowed, tt.by, tt.reason)
			}
		})
	}
}
