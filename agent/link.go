package agent

import (
	"log/slog"
	"net/netip"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// link is the WireGuard tunnel as the loop holds it: opened when it can
// be (and retried until it is; it never holds up enforcement), its peers
// made those of the Desired state, and their counters as last read. Owned
// by the loop.
type link struct {
	open func(tunnel.Config) (Tunnel, error)
	log  *slog.Logger
	tun  Tunnel // nil until the tunnel is up
	err  string // why the tunnel is not up, or its last failed apply
	// traffic is the peers' state as last read back.
	traffic []tunnel.PeerState
}

// up opens the tunnel, unless it is up; it reports whether it came up now.
func (l *link) up(cfg tunnel.Config) bool {
	if l.tun != nil {
		return false
	}
	cfg.Logger = l.log
	t, err := l.open(cfg)
	if err != nil {
		if err.Error() != l.err { // retried every full check; say it once
			l.log.Error("tunnel not up; segments stay closed until it is", "err", err)
		}
		l.err = err.Error()
		return false
	}
	l.tun, l.err = t, ""
	l.log.Info("tunnel up", "interface", t.Name(), "public_key", t.PublicKey().String())
	return true
}

// apply makes the tunnel's peers and routes want and reads back their
// counters.
func (l *link) apply(want []localpolicy.Peer) {
	if l.tun == nil {
		return
	}
	st, changed, err := l.tun.Apply(tunnel.Wanted(want))
	if st != nil {
		l.traffic = st
	}
	if err != nil {
		l.err = err.Error()
		l.log.Error("tunnel apply failed", "err", err)
		return
	}
	l.err = ""
	if changed {
		l.log.Info("tunnel peers", "peers", len(want))
	}
}

// address puts p on the tunnel, if it is up (else the next up does).
func (l *link) address(p netip.Prefix) {
	if l.tun == nil {
		return
	}
	if err := l.tun.AddAddress(p); err != nil {
		l.err = err.Error()
		l.log.Error("tunnel address", "address", p, "err", err)
		return
	}
	l.log.Info("tunnel address assigned by control", "address", p)
}

// read reads the peers' counters afresh.
func (l *link) read() ([]tunnel.PeerState, error) {
	st, err := l.tun.State()
	if err == nil {
		l.traffic = st
	}
	return st, err
}

// publicKey is the tunnel's key, "" while it is down.
func (l *link) publicKey() string {
	if l.tun == nil {
		return ""
	}
	return l.tun.PublicKey().String()
}

// status is the tunnel in `bulkhead status`, with the peers as last read;
// segs names what each peer carries.
func (l *link) status(iface string, segs map[policy.Key][]string, now time.Time) adminapi.TunnelStatus {
	ts := adminapi.TunnelStatus{Interface: iface, Error: l.err, Peers: []adminapi.PeerStatus{}}
	if l.tun != nil {
		ts.PublicKey = l.tun.PublicKey().String()
		ts.Peers = peerStatus(l.traffic, segs, now)
	}
	return ts
}

func (l *link) close() {
	if l.tun != nil {
		l.tun.Close()
	}
}

func peerStatus(traffic []tunnel.PeerState, segs map[policy.Key][]string, now time.Time) []adminapi.PeerStatus {
	out := []adminapi.PeerStatus{}
	for _, p := range traffic {
		ps := adminapi.PeerStatus{PublicKey: p.PublicKey.String(), Segments: segs[p.PublicKey], Endpoint: p.Endpoint.String(),
			LastHandshake: p.LastHandshake, HandshakeAge: -1, RxBytes: p.RxBytes, TxBytes: p.TxBytes}
		if !p.LastHandshake.IsZero() {
			ps.HandshakeAge = int64(now.Sub(p.LastHandshake) / time.Second)
		}
		out = append(out, ps)
	}
	return out
}
