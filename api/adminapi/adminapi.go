// Package adminapi is the agent's local API: the requests the root-only
// admin socket takes (one JSON object per line, decoded strictly), what it
// answers, and a typed client. The CLI, the installer, the lab and the
// tests call the agent through it without linking the daemon.
package adminapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
)

// Op is what a request asks.
type Op string

// The requests.
const (
	OpStatus    Op = "status"     // the agent's state
	OpExplain   Op = "explain"    // why a destination is open or shut (Request.To)
	OpApply     Op = "apply"      // install a bundle, rotation or command (Request.Bundle)
	OpRuleset   Op = "ruleset"    // the table in force, in nft syntax
	OpRotateKey Op = "rotate-key" // a new WireGuard key
	OpEnroll    Op = "enroll"     // enrol with control (Request.URL, Token, Fingerprint)
)

// Request is one admin-socket call: a JSON object per line.
type Request struct {
	Op     Op     `json:"op"`
	To     string `json:"to,omitempty"`     // explain: ADDR:PORT[/tcp|udp]
	Bundle []byte `json:"bundle,omitempty"` // apply: the envelope bytes (a bundle or a trust-root rotation)
	// enroll: the control server, a one-time token, the pinned CA.
	URL         string `json:"url,omitempty"`
	Token       string `json:"token,omitempty"`
	Fingerprint string `json:"fingerprint,omitempty"`
}

// Response answers a Request.
type Response struct {
	Error   string               `json:"error,omitempty"`
	Status  *Status              `json:"status,omitempty"`
	Verdict *localpolicy.Verdict `json:"verdict,omitempty"`
	// Ruleset is the table the agent applied, in nft(8) syntax.
	Ruleset string `json:"ruleset,omitempty"`
	// PublicKey is the device's new WireGuard key after rotate-key.
	PublicKey string `json:"public_key,omitempty"`
}

// Status is what `bulkhead status` shows.
type Status struct {
	DeviceID      string    `json:"device_id,omitempty"`
	DeviceClass   string    `json:"device_class,omitempty"`
	Mode          string    `json:"mode"`
	Why           []string  `json:"why,omitempty"`
	PolicyVersion uint64    `json:"policy_version"`
	PolicyExpires time.Time `json:"policy_expires,omitzero"`
	// RootsVersion is the version of the ops trust-root set in force (1:
	// the keys pinned at install).
	RootsVersion uint64                 `json:"roots_version"`
	TrustedTime  time.Time              `json:"trusted_time"`
	LastApply    time.Time              `json:"last_apply,omitzero"`
	ApplyError   string                 `json:"apply_error,omitempty"`
	DriftRepairs int                    `json:"drift_repairs"`
	NextChange   time.Time              `json:"next_change,omitzero"`
	Open         []string               `json:"open_segments"`
	Decisions    []localpolicy.Decision `json:"decisions,omitempty"`
	// Checks are the policy's posture checks after the latest sample.
	Checks []localpolicy.Check `json:"checks,omitempty"`
	Tunnel TunnelStatus        `json:"tunnel"`
	// Control is the control channel; absent until the device enrols.
	Control *ControlStatus `json:"control,omitempty"`
	// Monitor is the monitor in force, or the flows the last one saw.
	Monitor *MonitorStatus `json:"monitor,omitempty"`
	// Refused is what the table refused since the agent started.
	Refused *RefusedStatus `json:"refused,omitempty"`
	// Gateway is the segment-gateway role; absent on a device.
	Gateway *GatewayStatus `json:"gateway,omitempty"`
}

// GatewayStatus is what a segment gateway holds and admits.
type GatewayStatus struct {
	Segments []string `json:"segments"`
	// Roster counts the enrolled devices it knows (verified), Admitted
	// those it admits now, in Groups groups.
	Roster   int `json:"roster"`
	Admitted int `json:"admitted"`
	Groups   int `json:"groups"`
	// Orders counts the orders it took; OrderCursor and RosterCursor are
	// how far it has taken control's.
	Orders       int    `json:"orders"`
	OrderCursor  uint64 `json:"order_cursor"`
	RosterCursor uint64 `json:"roster_cursor"`
	// Refused names the roster devices not admitted, and why (at most
	// 100, by id).
	Refused []GatewayRefusal `json:"refused,omitempty"`
}

// GatewayRefusal is a roster device a gateway does not admit, and why.
type GatewayRefusal struct {
	Device string `json:"device"`
	Reason string `json:"reason"`
}

// TunnelStatus is the WireGuard device and its peers. The private key is
// never part of it.
type TunnelStatus struct {
	Interface string       `json:"interface"`
	PublicKey string       `json:"public_key,omitempty"`
	Error     string       `json:"error,omitempty"`
	Peers     []PeerStatus `json:"peers"`
}

// PeerStatus is one gateway the device holds a tunnel to.
type PeerStatus struct {
	PublicKey     string    `json:"public_key"`
	Segments      []string  `json:"segments"`
	Endpoint      string    `json:"endpoint"`
	LastHandshake time.Time `json:"last_handshake,omitzero"`
	// HandshakeAge is seconds since the last handshake; -1 if none yet.
	HandshakeAge int64  `json:"handshake_age_seconds"`
	RxBytes      uint64 `json:"rx_bytes"`
	TxBytes      uint64 `json:"tx_bytes"`
}

// ControlStatus is the control channel in `bulkhead status`.
type ControlStatus struct {
	URL       string    `json:"url"`
	DeviceID  string    `json:"device_id"`
	Connected bool      `json:"connected"`
	LastSync  time.Time `json:"last_sync,omitzero"`
	Error     string    `json:"error,omitempty"`
}

// RefusedStatus is what the table refused since the agent started: the
// first packets of refused connections, at a bounded rate, aggregated.
type RefusedStatus struct {
	// Error says why refused connections cannot be read (they are still
	// refused, and counted by the table's default drop).
	Error    string                    `json:"error,omitempty"`
	Flows    []controlapi.ObservedFlow `json:"flows"`
	Overflow uint64                    `json:"overflow,omitempty"`
}

// MonitorStatus is the monitor in force and what it has seen.
type MonitorStatus struct {
	Until    time.Time `json:"until"`
	Segments []string  `json:"segments"`
	// Error says why logged flows cannot be read (the monitor rules
	// still pass and count them in the table).
	Error string                    `json:"error,omitempty"`
	Flows []controlapi.ObservedFlow `json:"flows"`
	// Overflow counts connections of flows beyond flowlog.MaxFlows, Lost
	// the times the kernel dropped log messages in a burst.
	Overflow uint64 `json:"overflow,omitempty"`
	Lost     uint64 `json:"lost,omitempty"`
}

// Call sends one request to the agent's admin socket and returns its
// answer; an answer carrying an error is returned as is, with its Error.
func Call(socket string, req Request) (*Response, error) {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the agent at %s (is `bulkhead run` running, and are you root?): %w", socket, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return nil, err
	}
	var resp Response
	if err := json.NewDecoder(c).Decode(&resp); err != nil {
		return nil, fmt.Errorf("agent reply: %w", err)
	}
	return &resp, nil
}

// Client calls one agent's admin socket; each method fails with the
// agent's own error message when it refuses.
type Client struct{ Socket string }

// Do sends req and returns the answer, or the agent's refusal as an
// error.
func (c Client) Do(req Request) (*Response, error) {
	resp, err := Call(c.Socket, req)
	if err != nil {
		return nil, err
	}
	if resp.Error != "" {
		return resp, errors.New(resp.Error)
	}
	return resp, nil
}

// Status is the agent's state.
func (c Client) Status() (*Status, error) {
	resp, err := c.Do(Request{Op: OpStatus})
	if err != nil {
		return nil, err
	}
	return resp.Status, nil
}

// Explain says why ADDR:PORT[/proto] is open or shut.
func (c Client) Explain(to string) (*Response, error) { return c.Do(Request{Op: OpExplain, To: to}) }

// Apply installs a signed bundle, trust-root rotation or command, and
// returns the state after it.
func (c Client) Apply(raw []byte) (*Status, error) {
	resp, err := c.Do(Request{Op: OpApply, Bundle: raw})
	if err != nil {
		return nil, err
	}
	return resp.Status, nil
}

// Ruleset is the table the agent applied, in nft syntax.
func (c Client) Ruleset() (string, error) {
	resp, err := c.Do(Request{Op: OpRuleset})
	if err != nil {
		return "", err
	}
	return resp.Ruleset, nil
}

// RotateKey replaces the device's WireGuard key and returns the new
// public key.
func (c Client) RotateKey() (string, *Status, error) {
	resp, err := c.Do(Request{Op: OpRotateKey})
	if err != nil {
		return "", nil, err
	}
	return resp.PublicKey, resp.Status, nil
}

// Enroll enrols the device with the control server at url.
func (c Client) Enroll(url, token, fingerprint string) (*Status, error) {
	resp, err := c.Do(Request{Op: OpEnroll, URL: url, Token: token, Fingerprint: fingerprint})
	if err != nil {
		return nil, err
	}
	return resp.Status, nil
}

// DecodeRequest reads one request strictly: unknown fields, trailing data
// and an unknown op are errors.
func DecodeRequest(line []byte) (Request, error) {
	var req Request
	if err := strictjson.Unmarshal(line, &req); err != nil {
		return req, err
	}
	switch req.Op {
	case OpStatus, OpExplain, OpApply, OpRuleset, OpRotateKey, OpEnroll:
		return req, nil
	}
	return req, fmt.Errorf("unknown request %q", req.Op)
}
