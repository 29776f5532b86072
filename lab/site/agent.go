package site

import (
	"net/netip"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/lab"
	"github.com/bulkhead-edge/bulkhead/lab/agentproc"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Agent is one device of the site: the real `bulkhead run` (agentproc.Agent),
// configured as an installer would (its state directory, the pinned ops
// key, the safety floor) and enrolled with a token.
type Agent struct {
	*agentproc.Agent
	Name  string // what the demo calls it: "dock gateway"
	Class string
	// LAN is its address on the site's network.
	LAN netip.Addr
	// ID is the device id control gave it at enrolment.
	ID string
	// link is the router's end of the device's link to the site.
	link string
}

// AgentConfig is what differs between the site's devices.
type AgentConfig struct {
	Name, Class string
	Floor       []localpolicy.FloorRule
	GPSD        string // gpsd's host:port, for a moving device
	// Segments make the agent a segment gateway of them, and ListenPort
	// fixes its tunnel's UDP port (the policy names it).
	Segments   []string
	ListenPort uint16
}

// newAgent writes the agent's configuration; Start runs it.
func newAgent(t lab.T, ns *lab.NS, c AgentConfig, opsPub string, control policy.Endpoint) *Agent {
	cfg := config.Config{
		Device:      config.Device{Class: c.Class},
		Trust:       config.Trust{Keys: []string{opsPub}},
		Control:     []policy.Endpoint{control},
		SafetyFloor: c.Floor,
		Tunnel:      config.TunnelConfig{ListenPort: c.ListenPort},
		Posture:     config.PostureConfig{Interval: policy.Duration(time.Second)},
		Location:    config.LocationConfig{GPSD: c.GPSD},
	}
	if len(c.Segments) > 0 {
		cfg.Gateway = &config.GatewayConfig{Segments: c.Segments}
	}
	return &Agent{Agent: agentproc.New(t, ns, cfg), Name: c.Name, Class: c.Class}
}

// Status is `bulkhead status` as data.
func (a *Agent) Status(t lab.T) *adminapi.Status {
	st, err := a.Admin().Status()
	if err != nil {
		t.Fatalf("status of the %s: %v", a.Name, err)
	}
	return st
}

// Enroll runs `bulkhead enroll` with token.
func (a *Agent) Enroll(t lab.T, ctl *lab.Control, token string) {
	if out, err := a.Agent.Enroll(ctl.URL, token, ctl.Fingerprint); err != nil {
		t.Fatalf("enrolling the %s: %v: %s", a.Name, err, out)
	}
	a.ID = a.Status(t).DeviceID
}
