package agent

import (
	"context"
	"net/netip"

	"github.com/bulkhead-edge/bulkhead/agent/flowlog"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// The agent's side effects go through these small interfaces, owned here
// and shaped by what the agent needs. Production uses the kernel's
// (*nft.Enforcer, *tunnel.Tunnel, *flowlog.Reader, the posture package);
// the decision tests use in-memory ones (agent/fakes_test.go), so every
// decision the agent makes is tested without root.

// Enforcer is the kernel table the agent enforces with.
type Enforcer interface {
	// Present reports whether the table is in the kernel.
	Present() (bool, error)
	// Apply makes the table rs, and reports whether anything changed.
	Apply(rs nft.Ruleset) (changed bool, err error)
	// Reapply rewrites the table as rs after an outside change.
	Reapply(rs nft.Ruleset) error
	// Verify is the cheap drift check, Check the whole comparison; both
	// return an error wrapping nft.ErrDrift when the table is not rs.
	Verify(rs nft.Ruleset) error
	Check(rs nft.Ruleset) error
	Close() error
}

// Tunnel is the WireGuard device segment traffic uses.
type Tunnel interface {
	Name() string
	ListenPort() uint16
	PublicKey() policy.Key
	// State reads the peers and their counters back.
	State() ([]tunnel.PeerState, error)
	// Apply makes the peers and their routes want; it returns the state
	// read back and whether anything changed.
	Apply(want []tunnel.Peer) (state []tunnel.PeerState, changed bool, err error)
	RotateKey() (policy.Key, error)
	// AddAddress puts an address on the interface (one control assigned
	// after the tunnel came up).
	AddAddress(p netip.Prefix) error
	Close() error
}

// FlowLog is the table's log: the flows a monitor passes and the
// connections the table refuses.
type FlowLog interface {
	// Read calls fn for every flow until the log is closed or fails.
	Read(fn func(controlapi.Flow)) error
	// Closed reports whether reading stopped (bind again).
	Closed() bool
	// Lost counts the entries the kernel dropped.
	Lost() uint64
	Close() error
}

// Posture gathers the device's facts and watches what the checks watch.
type Posture interface {
	Gather(ctx context.Context, agentVersion string, w posture.Wants) (*posture.Facts, error)
	// Watch fires on changed when something f saw that w watches changes;
	// stop releases what it holds.
	Watch(w posture.Wants, f *posture.Facts) (changed <-chan string, stop func())
}

// hostPosture is the device's own posture.
type hostPosture struct{}

func (hostPosture) Gather(ctx context.Context, v string, w posture.Wants) (*posture.Facts, error) {
	return posture.Gather(ctx, v, w)
}

func (hostPosture) Watch(w posture.Wants, f *posture.Facts) (<-chan string, func()) {
	return posture.Watch(w, f)
}

// openTunnel is tunnel.Open as a Tunnel.
func openTunnel(c tunnel.Config) (Tunnel, error) {
	t, err := tunnel.Open(c)
	if err != nil {
		return nil, err
	}
	return t, nil
}

// kernelFlowLog binds the table's log group in the enforcer's network
// namespace (the host's unless a test gave one).
func kernelFlowLog(e Enforcer) func() (FlowLog, error) {
	return func() (FlowLog, error) {
		ns := 0
		if n, ok := e.(interface{ NetNS() int }); ok {
			ns = n.NetNS()
		}
		r, err := flowlog.Open(ns, nft.LogGroup)
		if err != nil {
			return nil, err
		}
		return r, nil
	}
}
