package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Request is one admin-socket call: a JSON object per line.
type Request struct {
	Op     string `json:"op"`               // status, explain, apply, ruleset, rotate-key, enroll
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

type request struct {
	Request
	reply chan Response
}

func (a *Agent) handle(r request) Response {
	switch r.Op {
	case "status":
		return Response{Status: a.status()}
	case "explain":
		addr, port, proto, err := ParseTarget(r.To)
		if err != nil {
			return Response{Error: err.Error()}
		}
		var doc *policy.Document
		if a.bundle != nil {
			doc = &a.bundle.Policy
		}
		v := localpolicy.Explain(a.desired, doc, addr, port, proto)
		return Response{Verdict: &v, Status: a.status()}
	case "ruleset":
		return Response{Ruleset: a.ruleset.Text()}
	case "rotate-key":
		return a.rotateKey()
	case "enroll":
		return a.enroll(r.Request)
	case "apply":
		if _, err := a.install(r.Bundle); err != nil {
			if _, rot := bundle.PeekRotation(r.Bundle); rot == nil {
				return Response{Error: err.Error() + "; the trust roots in force are unchanged"}
			}
			return Response{Error: "bundle rejected, previous policy still enforced: " + err.Error()}
		}
		return Response{Status: a.status()}
	}
	return Response{Error: fmt.Sprintf("unknown request %q", r.Op)}
}

func (a *Agent) status() *Status {
	s := &Status{
		DeviceID: a.cfg.Device.ID, DeviceClass: a.cfg.Device.Class,
		Mode: a.desired.Mode.String(), Why: a.desired.Why, PolicyVersion: a.desired.PolicyVersion, RootsVersion: a.rootsVersion,
		TrustedTime: a.clock.Now().UTC(), LastApply: a.lastApply, ApplyError: a.applyErr,
		DriftRepairs: a.repairs, NextChange: a.desired.NextChange, Decisions: a.desired.Decisions, Checks: a.currentChecks(),
		Open: []string{},
	}
	if a.bundle != nil {
		s.PolicyExpires = a.bundle.ExpiresAt
	}
	for _, seg := range a.desired.Segments {
		s.Open = append(s.Open, seg.Segment)
	}
	s.Tunnel = a.tunnelStatus()
	s.Monitor, s.Refused = a.monitorStatus(), a.refusedStatus()
	s.Control = a.ch.status.Load()
	if a.ch.rec != nil {
		s.DeviceID = a.ch.rec.DeviceID
	}
	return s
}

func (a *Agent) tunnelStatus() TunnelStatus {
	ts := TunnelStatus{Interface: a.cfg.Tunnel.Interface, Error: a.tunErr, Peers: []PeerStatus{}}
	if a.tun == nil {
		return ts
	}
	ts.PublicKey = a.tun.PublicKey().String()
	if st, err := a.tun.State(); err == nil {
		a.traffic = st
	}
	segs := map[policy.Key][]string{}
	for _, p := range a.desired.Peers {
		segs[p.PublicKey] = p.Segments
	}
	now := a.wall()
	for _, p := range a.traffic {
		ps := PeerStatus{PublicKey: p.PublicKey.String(), Segments: segs[p.PublicKey], Endpoint: p.Endpoint.String(),
			LastHandshake: p.LastHandshake, HandshakeAge: -1, RxBytes: p.RxBytes, TxBytes: p.TxBytes}
		if !p.LastHandshake.IsZero() {
			ps.HandshakeAge = int64(now.Sub(p.LastHandshake) / time.Second)
		}
		ts.Peers = append(ts.Peers, ps)
	}
	return ts
}

// rotateKey replaces the device's WireGuard key; the old one stops working
// at once and gateways must learn the new public key.
func (a *Agent) rotateKey() Response {
	if a.tun == nil {
		return Response{Error: "the tunnel is not up, so there is no key to rotate: " + a.tunErr}
	}
	old := a.tun.PublicKey()
	pub, err := a.tun.RotateKey()
	if err != nil {
		return Response{Error: "key rotation failed: " + err.Error()}
	}
	a.log.Info("wireguard key rotated", "old_public_key", old.String(), "public_key", pub.String())
	if a.store != nil {
		a.audit("wireguard-key-rotated", fmt.Sprintf("public key %s replaces %s", pub, old))
	}
	return Response{PublicKey: pub.String(), Status: a.status()}
}

// ParseTarget reads ADDR:PORT[/tcp|udp] (tcp by default).
func ParseTarget(s string) (netip.Addr, uint16, policy.Protocol, error) {
	hostport, proto, _ := strings.Cut(s, "/")
	p := policy.TCP
	if proto != "" {
		if err := p.UnmarshalText([]byte(proto)); err != nil {
			return netip.Addr{}, 0, "", err
		}
	}
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return netip.Addr{}, 0, "", fmt.Errorf("%q is not ADDR:PORT[/tcp|udp], for example 10.20.1.10:443/tcp or [fd00::1]:53/udp", s)
	}
	return ap.Addr(), ap.Port(), p, nil
}

// listenAdmin opens the admin socket, reachable by root only: the directory
// is 0700 and the socket 0600.
func listenAdmin(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	os.Remove(path) // a stale socket from a crashed agent
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return ln, nil
}

func serveAdmin(ctx context.Context, ln net.Listener, reqs chan<- request, log *slog.Logger) {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			line, err := bufio.NewReaderSize(io.LimitReader(c, envelope.MaxEnvelope*2), 64<<10).ReadBytes('\n')
			var resp Response
			var req Request
			if err != nil && !errors.Is(err, io.EOF) {
				resp.Error = "read request: " + err.Error()
			} else if err := json.Unmarshal(line, &req); err != nil {
				resp.Error = "malformed request: " + err.Error()
			} else {
				r := request{Request: req, reply: make(chan Response, 1)}
				select {
				case reqs <- r:
					resp = <-r.reply
				case <-ctx.Done():
					resp.Error = "agent is stopping"
				}
			}
			if err := json.NewEncoder(c).Encode(resp); err != nil {
				log.Debug("admin reply", "err", err)
			}
		}()
	}
}

// Call sends one request to the agent's admin socket.
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
