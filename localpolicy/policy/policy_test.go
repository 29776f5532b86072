package policy

import (
	"errors"
	"strings"
	"testing"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
)

func exampleText(t testing.TB) string { return string(examples.Site()) }

func TestExamplesAreValid(t *testing.T) {
	for f, data := range examples.All() {
		if _, err := Parse(data); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// Each case changes the valid example in one place and names the problem
// the operator must be told about.
// dockProfiles is where the dock gateways' class continues after its
// rules in the example, for cases that add to the class.
const dockProfiles = `"profiles": {
        "restricted": ["wms", "dock-scheduling"],`

func TestValidationRejects(t *testing.T) {
	tests := []struct {
		name      string
		old, new  string
		wantErr   error
		wantInMsg string
	}{
		{"rule names unknown segment",
			`{"segment": "finance"}`, `{"segment": "finanse"}`,
			ErrInvalid, `classes.dock-gateway.rules[4].segment: names unknown segment "finanse"`},
		{"overlapping segments of different partners",
			`{"cidr": "10.70.0.10/32"`, `{"cidr": "10.60.0.128/25"`,
			ErrInvalid, `10.60.0.0/24 (segment carrier-edi, partner northline-freight) overlaps 10.60.0.128/25 (segment broker-portal, partner spotload-brokers)`},
		{"internal segment overlapping a partner's",
			`{"cidr": "10.30.0.0/24"`, `{"cidr": "10.60.0.0/16"`,
			ErrInvalid, `(segment finance, internal) overlaps 10.60.0.0/24 (segment carrier-edi, partner northline-freight)`},
		{"profile opens more than normal mode",
			`"restricted": ["wms"],`, `"restricted": ["wms", "finance"],`,
			ErrInvalid, `classes.scanner.profiles.restricted[1]: opens segment "finance", which normal mode does not open for class scanner`},
		{"rule opens a port the segment does not declare",
			`{"segment": "carrier-edi", "ports": ["443"]}`, `{"segment": "carrier-edi", "ports": ["22"]}`,
			ErrInvalid, `classes.telematics.rules[1].ports[0]: opens 22, which segment carrier-edi does not declare`},
		{"unknown schedule",
			`"schedule": "day-shift"`, `"schedule": "weekend"`,
			ErrInvalid, `names unknown schedule "weekend"`},
		{"unknown zone",
			`"zone": "America/Chicago", "days": ["mon"`, `"zone": "America/Springfield", "days": ["mon"`,
			ErrInvalid, `schedules.day-shift.zone: "America/Springfield" is not a known IANA time zone`},
		{"empty window",
			`"start": "06:00", "end": "14:00"`, `"start": "06:00", "end": "06:00"`,
			ErrInvalid, `the window would be empty`},
		{"rule host outside the segment",
			`{"segment": "carrier-edi", "ports": ["443"]}`, `{"segment": "carrier-edi", "hosts": ["10.61.0.5/32"], "ports": ["443"]}`,
			ErrInvalid, `classes.telematics.rules[1].hosts[0]: 10.61.0.5/32 lies outside every destination of segment carrier-edi`},
		{"inbound without a protocol",
			dockProfiles, `"inbound": [{"segment": "diagnostics", "ports": ["22"]}], ` + dockProfiles,
			ErrInvalid, `classes.dock-gateway.inbound[0].protocol: an inbound rule names its protocol`},
		{"inbound tcp without ports",
			dockProfiles, `"inbound": [{"segment": "diagnostics", "protocol": "tcp"}], ` + dockProfiles,
			ErrInvalid, `classes.dock-gateway.inbound[0].ports: names none of the device's ports`},
		{"inbound source outside the segment",
			dockProfiles, `"inbound": [{"segment": "diagnostics", "hosts": ["10.51.0.0/28"], "protocol": "tcp", "ports": ["22"]}], ` + dockProfiles,
			ErrInvalid, `classes.dock-gateway.inbound[0].hosts[0]: 10.51.0.0/28 lies outside every destination of segment diagnostics`},
		{"inbound from an unknown segment",
			dockProfiles, `"inbound": [{"segment": "diagnostic", "protocol": "tcp", "ports": ["22"]}], ` + dockProfiles,
			ErrInvalid, `classes.dock-gateway.inbound[0].segment: names unknown segment "diagnostic"`},
		{"inbound icmp with ports",
			dockProfiles, `"inbound": [{"segment": "diagnostics", "protocol": "icmp", "ports": ["22"]}], ` + dockProfiles,
			ErrInvalid, `classes.dock-gateway.inbound[0].ports: icmp has no ports`},
		{"rule protocol any",
			`{"segment": "carrier-edi", "ports": ["443"]}`, `{"segment": "carrier-edi", "protocol": "any"}`,
			ErrInvalid, `classes.telematics.rules[1].protocol: "any" narrows nothing; omit protocol`},
		{"rule narrowed to nothing",
			`{"segment": "carrier-edi", "ports": ["443"]}`, `{"segment": "carrier-edi", "hosts": ["10.60.0.5/32"], "protocol": "udp"}`,
			ErrInvalid, `classes.telematics.rules[1]: opens nothing: segment carrier-edi declares no destination on these hosts, protocol and ports`},
		{"monitor without an end",
			`"telematics": {`, `"telematics": {"monitor": {"segments": ["wms"]},`,
			ErrInvalid, `classes.telematics.monitor.until: is missing; monitoring passes what rules would drop, so it must end`},
		{"monitor of an unknown segment",
			`"telematics": {`, `"telematics": {"monitor": {"until": "2026-12-01T00:00:00Z", "segments": ["wsm"]},`,
			ErrInvalid, `classes.telematics.monitor.segments[0]: names unknown segment "wsm"`},
		{"host bits set",
			`"10.20.1.0/24"`, `"10.20.1.7/24"`,
			ErrInvalid, `10.20.1.7/24 has host bits set; write 10.20.1.0/24`},
		{"check testing two things",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "kernel-supported", "kernel": {"min": "5.10"}, "os": ["debian"]}`,
			ErrInvalid, `classes.scanner.checks[0]: checks [kernel os] at once`},
		{"check testing nothing",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "kernel-supported"}`,
			ErrInvalid, `classes.scanner.checks[0]: says nothing to check`},
		{"check id reused",
			`{"id": "listeners",`, `{"id": "edr-running",`,
			ErrInvalid, `classes.scanner.checks[3].id: "edr-running" is used twice`},
		{"check profile unknown",
			`"profile": "quarantine"}`, `"profile": "lockdown"}`,
			ErrInvalid, `classes.scanner.checks[2].profile: "lockdown" is not one of [restricted diagnostic quarantine]`},
		{"process name is a path",
			`{"name": "edr-sensor"}`, `{"name": "/usr/bin/edr-sensor"}`,
			ErrInvalid, `classes.scanner.checks[1].process.name: "/usr/bin/edr-sensor" is not a command name`},
		{"kernel version not a version",
			`{"min": "5.10"}`, `{"min": "five"}`,
			ErrInvalid, `classes.scanner.checks[0].kernel.min: "five" is not a version`},
		{"listener on icmp",
			`{"protocol": "udp", "ports": ["68"]}`, `{"protocol": "icmp", "ports": ["68"]}`,
			ErrInvalid, `classes.scanner.checks[3].listeners[0].protocol: must be tcp or udp`},
		{"free disk relative",
			`"path": "/", "min_bytes"`, `"path": "var", "min_bytes"`,
			ErrInvalid, `classes.scanner.checks[5].free_disk.path: "var" is not an absolute path`},
		{"traffic check on an unknown segment",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "wms-volume", "traffic": {"segment": "wsm", "max_bytes": 1000, "window": "1m"}}`,
			ErrInvalid, `classes.scanner.checks[0].traffic.segment: names unknown segment "wsm"`},
		{"traffic window too short",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "wms-volume", "traffic": {"segment": "wms", "max_bytes": 1000, "window": "100ms"}}`,
			ErrInvalid, `classes.scanner.checks[0].traffic.window: 100ms is outside 1s-24h`},
		{"clock skew negative",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "clock", "max_clock_skew": "-30s"}`,
			ErrInvalid, `classes.scanner.checks[0].max_clock_skew: must be positive`},
		{"geofence with both shapes",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "yard", "geofence": {"circle": {"lat": 41.8, "lon": -87.6, "radius_m": 500}, "polygon": [[1, 1], [1, 2], [2, 2]]}}`,
			ErrInvalid, `classes.scanner.checks[0].geofence: needs exactly one of circle and polygon`},
		{"geofence centre off the globe",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "yard", "geofence": {"circle": {"lat": 141.8, "lon": -87.6, "radius_m": 500}}}`,
			ErrInvalid, `classes.scanner.checks[0].geofence.circle: (141.8, -87.6) is not a latitude`},
		{"geofence polygon of two points",
			`{"id": "kernel-supported", "kernel": {"min": "5.10"}}`, `{"id": "yard", "geofence": {"polygon": [[1, 1], [1, 2]]}}`,
			ErrInvalid, `classes.scanner.checks[0].geofence.polygon: has 2 vertices`},
		{"tier limit on internal segments",
			`"tier_limits": {"3":`, `"tier_limits": {"0":`,
			ErrInvalid, `tier_limits.0: tier 0 is not a partner tier (1-3)`},
		{"tier limit bucket too small",
			`"tier_limits": {"3": {"bytes_per_second": 250000, "burst_bytes": 250000}}`, `"tier_limits": {"3": {"bytes_per_second": 1000}}`,
			ErrInvalid, `tier_limits.3: bytes_per_second plus burst_bytes is 1000, below 65536`},
		{"tcp without ports",
			`{"cidr": "10.30.0.0/24", "protocol": "tcp", "ports": ["443"]}`, `{"cidr": "10.30.0.0/24", "protocol": "tcp"}`,
			ErrInvalid, `segments[2].destinations[0].ports: is empty`},
		{"partner segment at tier 0",
			`"tier": 1,`, `"tier": 0,`,
			ErrInvalid, `segments[5].tier: is 0 (internal) but the segment belongs to partner "northline-freight"`},
		{"duplicate segment name",
			`"name": "finance"`, `"name": "wms"`,
			ErrInvalid, `segments[2].name: "wms" is already the name of segments[0]`},
		{"one gateway two endpoints",
			`"U2YQklOv9bKmPFyg6JlSTSzDSfIgc5uwhXj3kxmRwW8=", "endpoint": "10.10.0.22:51820"`, `"5p2fPOTJKkll/Ed47AnOR2v5sJGQzt1u2YTxkfOVjzQ=", "endpoint": "10.10.0.22:51820"`,
			ErrInvalid, `segments[2].gateway.endpoint: gateway 5p2fPOTJKkll/Ed47AnOR2v5sJGQzt1u2YTxkfOVjzQ= is already reached at 10.10.0.21:51820`},
		{"gateway endpoint is a name",
			`"endpoint": "10.10.0.25:51820"`, `"endpoint": "gw.example:51820"`,
			ErrInvalid, `segments[6].gateway.endpoint: "gw.example:51820" is not an IP:port`},
		{"rate limit of nothing",
			`"bytes_per_second": 125000`, `"bytes_per_second": 0`,
			ErrInvalid, `segments[6].rate_limit.bytes_per_second: must be above 0`},
		{"bucket smaller than one offloaded packet",
			`"bytes_per_second": 125000, "burst_bytes": 250000`, `"bytes_per_second": 12500, "burst_bytes": 1500`,
			ErrInvalid, `segments[6].rate_limit: bytes_per_second plus burst_bytes is 14000, below 65536`},
		{"rate beyond the kernel's",
			`"bytes_per_second": 125000`, `"bytes_per_second": 20000000000`,
			ErrInvalid, `segments[6].rate_limit.bytes_per_second: 20000000000 is above 10000000000`},
		{"burst beyond the kernel's",
			`"burst_bytes": 250000`, `"burst_bytes": 5000000000`,
			ErrInvalid, `segments[6].rate_limit.burst_bytes: 5000000000 is above 4294967295`},
		{"bad key",
			`"public_key": "Y1KuI/W/tP3P4uYDdcptys4f0w6I/Ge59JNaDXbfjPE="`, `"public_key": "not-a-key"`,
			nil, `segments[6].gateway.public_key`},
		{"wrong schema",
			`"schema": "bulkhead.policy/v1"`, `"schema": "bulkhead.policy/v2"`,
			ErrInvalid, `schema: is "bulkhead.policy/v2"`},
		{"no max offline",
			`"max_offline": "72h"`, `"max_offline": "0s"`,
			ErrInvalid, `validity.max_offline`},
		{"unknown field names its path",
			`"data_class": "financial",`, `"data_class": "financial", "dataclass": "x",`,
			strictjson.ErrUnknownField, `"segments[2].dataclass"`},
		{"bad protocol",
			`"protocol": "icmp"`, `"protocol": "gre"`,
			nil, `segments[4].destinations[1].protocol: unknown protocol "gre"`},
		{"bad port range",
			`"8000-8099"`, `"8099-8000"`,
			nil, `end is below start`},
		{"bad day",
			`"days": ["mon", "tue"`, `"days": ["monday", "tue"`,
			nil, `unknown day "monday"`},
	}
	base := exampleText(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(base, tt.old) {
				t.Fatalf("example does not contain %q", tt.old)
			}
			_, err := Parse([]byte(strings.Replace(base, tt.old, tt.new, 1)))
			if err == nil {
				t.Fatal("Parse succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error %q is not %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantInMsg) {
				t.Errorf("error %q\ndoes not say %q", err, tt.wantInMsg)
			}
		})
	}
}

func TestInvalidErrorListsEverything(t *testing.T) {
	d := Document{}
	err := d.Validate()
	var inv *InvalidError
	if !errors.As(err, &inv) {
		t.Fatalf("Validate(empty) = %v, want *InvalidError", err)
	}
	if len(inv.Problems) < 4 {
		t.Errorf("problems = %q, want schema, control, validity, segments and classes", inv.Problems)
	}
	if !strings.Contains(err.Error(), "and") {
		t.Errorf("summary %q does not say more problems exist", err)
	}
}
