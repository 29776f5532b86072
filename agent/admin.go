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

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

type request struct {
	adminapi.Request
	reply chan answer
}

// answer is the loop's answer to a request. A status in it carries the
// tunnel's peers as last read by the loop; live, when set, reads them
// afresh (UAPI I/O), after the loop has moved on.
type answer struct {
	adminapi.Response
	live func(*adminapi.TunnelStatus)
}

// answer completes resp on the loop.
func (a *Agent) answer(resp adminapi.Response) answer {
	if resp.Status == nil || a.link.tun == nil {
		return answer{Response: resp}
	}
	tun, segs, wall := a.link.tun, a.peerSegments(), a.wall
	return answer{Response: resp, live: func(ts *adminapi.TunnelStatus) {
		if st, err := tun.State(); err == nil {
			ts.Peers = peerStatus(st, segs, wall())
		}
	}}
}

func (a *Agent) handle(r request) adminapi.Response {
	switch r.Op {
	case adminapi.OpStatus:
		return adminapi.Response{Status: a.status()}
	case adminapi.OpExplain:
		addr, port, proto, err := ParseTarget(r.To)
		if err != nil {
			return adminapi.Response{Error: err.Error()}
		}
		var doc *policy.Document
		if a.bundle != nil {
			doc = &a.bundle.Policy
		}
		v := localpolicy.Explain(a.desired, doc, addr, port, proto)
		return adminapi.Response{Verdict: &v, Status: a.status()}
	case adminapi.OpRuleset:
		return adminapi.Response{Ruleset: a.table.ruleset.Text()}
	case adminapi.OpRotateKey:
		return a.rotateKey()
	case adminapi.OpApply:
		if _, err := a.install(r.Bundle); err != nil {
			switch kind, _ := envelope.TypeOf(r.Bundle); kind {
			case bundle.RootsPayloadType:
				return adminapi.Response{Error: err.Error() + "; the trust roots in force are unchanged"}
			case command.PayloadType:
				return adminapi.Response{Error: "command refused, the device's state is unchanged: " + err.Error()}
			}
			return adminapi.Response{Error: "bundle rejected, previous policy still enforced: " + err.Error()}
		}
		return adminapi.Response{Status: a.status()}
	}
	return adminapi.Response{Error: fmt.Sprintf("unknown request %q", r.Op)}
}

func (a *Agent) status() *adminapi.Status {
	s := &adminapi.Status{
		DeviceID: a.cfg.Device.ID, DeviceClass: a.cfg.Device.Class,
		Mode: a.desired.Mode.String(), Why: a.desired.Why, PolicyVersion: a.desired.PolicyVersion, RootsVersion: a.rootsVersion(),
		TrustedTime: a.clock.Now().UTC(), LastApply: a.table.lastApply, ApplyError: a.table.applyErr,
		DriftRepairs: a.table.repairs, NextChange: a.desired.NextChange, Decisions: a.desired.Decisions, Checks: a.currentChecks(),
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
	s.Control = a.controlStatus()
	if a.ch.rec != nil {
		s.DeviceID = a.ch.rec.DeviceID
	}
	s.Gateway = a.gatewayStatus()
	return s
}

func (a *Agent) tunnelStatus() adminapi.TunnelStatus {
	return a.link.status(a.cfg.Tunnel.Interface, a.peerSegments(), a.wall())
}

// peerSegments maps each wanted peer to the segments it carries.
func (a *Agent) peerSegments() map[policy.Key][]string {
	segs := make(map[policy.Key][]string, len(a.peers()))
	for _, p := range a.peers() {
		segs[p.PublicKey] = p.Segments
	}
	return segs
}

// rotateKey replaces the device's WireGuard key; the old one stops working
// at once and gateways must learn the new public key.
func (a *Agent) rotateKey() adminapi.Response {
	if a.link.tun == nil {
		return adminapi.Response{Error: "the tunnel is not up, so there is no key to rotate: " + a.link.err}
	}
	old := a.link.tun.PublicKey()
	pub, err := a.link.tun.RotateKey()
	if err != nil {
		return adminapi.Response{Error: "key rotation failed: " + err.Error()}
	}
	a.log.Info("wireguard key rotated", "old_public_key", old.String(), "public_key", pub.String())
	a.publish() // control learns the new key, and gateways from it
	if a.store != nil {
		a.audit("wireguard-key-rotated", fmt.Sprintf("public key %s replaces %s", pub, old))
	}
	return adminapi.Response{PublicKey: pub.String(), Status: a.status()}
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

func serveAdmin(ctx context.Context, ln net.Listener, do func(context.Context, adminapi.Request) adminapi.Response, log *slog.Logger) {
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
			var resp adminapi.Response
			var req adminapi.Request
			if err != nil && !errors.Is(err, io.EOF) {
				resp.Error = "read request: " + err.Error()
			} else if req, err = adminapi.DecodeRequest(line); err != nil {
				resp.Error = "malformed request: " + err.Error()
			} else {
				resp = do(ctx, req)
			}
			if err := json.NewEncoder(c).Encode(resp); err != nil {
				log.Debug("admin reply", "err", err)
			}
		}()
	}
}
