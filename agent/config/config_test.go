package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestConfigErrorsNameLineAndField(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.json")
	write(t, path, "{\n  \"device\": {\"class\": \"scanner\"},\n  \"trust\": {\"keys\": [\"x\"]},\n  \"safty_floor\": []\n}")
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), "line 4") || !strings.Contains(err.Error(), "safty_floor") {
		t.Errorf("Load = %v, want line 4 and the unknown field", err)
	}
	write(t, path, `{"device": {"class": "scanner"}, "trust": {"keys": ["x"]}, "safety_floor": [{"name": "plc", "cidr": "10.0.0.1/24", "protocol": "tcp", "ports": ["502"]}]}`)
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "safety_floor[0]") || !strings.Contains(err.Error(), "host bits") {
		t.Errorf("Load = %v, want safety_floor[0] host bits", err)
	}
	for _, tc := range []struct{ location, want string }{
		{`{"gpsd": "127.0.0.1:2947", "static": {"lat": 1, "lon": 2}}`, "location: give gpsd or static, not both"},
		{`{"gpsd": "localhost"}`, `location.gpsd: "localhost" is not host:port`},
		{`{"static": {"lat": 95, "lon": 2}}`, "location.static: (95, 2) is not a latitude"},
	} {
		write(t, path, `{"device": {"class": "scanner"}, "trust": {"keys": ["x"]}, "location": `+tc.location+`}`)
		if _, err := Load(path); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("location %s: Load = %v, want %q", tc.location, err, tc.want)
		}
	}
}

// A gateway names its segments and listens on a fixed port.
func TestGatewayConfiguration(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.json")
	for _, tc := range []struct{ extra, want string }{
		{`"gateway": {"segments": []}, "tunnel": {"listen_port": 51820}`, "gateway.segments: name the segments"},
		{`"gateway": {"segments": ["wms"]}`, "tunnel.listen_port: a gateway listens on a fixed port"},
		{`"gateway": {"segments": ["wms"]}, "tunnel": {"listen_port": 51820}`, ""},
	} {
		write(t, path, `{"device": {"class": "segment-gateway"}, "trust": {"keys": ["x"]}, `+tc.extra+`}`)
		c, err := Load(path)
		switch {
		case tc.want == "" && (err != nil || c.Gateway == nil || c.Gateway.Segments[0] != "wms"):
			t.Errorf("%s: Load = %+v, %v", tc.extra, c, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: Load = %v, want %q", tc.extra, err, tc.want)
		}
	}
}

// Resolve fills every default in a copy and leaves what was written alone:
// an installer writes back exactly what it read.
func TestResolveIsPure(t *testing.T) {
	written := Config{Device: Device{Class: "scanner"}, Trust: Trust{Keys: []string{"/etc/bulkhead/ops.pub"}}}
	before := written
	eff, err := written.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(written, before) {
		t.Fatalf("Resolve changed what was written: %+v", written)
	}
	if eff.StateDir != DefaultStateDir || eff.DropDir != filepath.Join(DefaultStateDir, "inbox") || eff.AdminSocket != DefaultSocket ||
		eff.DHCP == nil || !*eff.DHCP || time.Duration(eff.Posture.Interval) != DefaultPostureInterval || eff.Tunnel.Interface == "" {
		t.Fatalf("effective settings %+v: want every default filled", eff)
	}
	if _, err := (Config{Device: Device{Class: "scanner"}, Trust: written.Trust, Posture: PostureConfig{Interval: policy.Duration(time.Millisecond)}}).Resolve(); err == nil ||
		!strings.Contains(err.Error(), "posture.interval") {
		t.Fatalf("a 1ms posture interval: %v, want it refused by name", err)
	}
	if _, err := (Config{}).Resolve(); err == nil || !strings.Contains(err.Error(), "device:") || !strings.Contains(err.Error(), "trust.keys") {
		t.Fatalf("an empty configuration: %v, want every missing field named", err)
	}
}
