package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// edges is the order in which the agent touched its in-memory edges: the
// table's applies and repairs and the tunnel's opening.
type edges struct {
	mu  sync.Mutex
	log []string
}

func (e *edges) add(s string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.log = append(e.log, s)
}

func (e *edges) list() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.log)
}

// memTable is an Enforcer in memory: the table is the last ruleset
// applied, and a test may change it from outside (tamper) or make the
// next applies fail.
type memTable struct {
	edges *edges
	mu    sync.Mutex
	rs    *nft.Ruleset // nil: no table in the "kernel"
	drift string       // an outside change not yet undone
	fail  error        // every Apply fails with it
	// applied is every ruleset applied, oldest first.
	applied []string
}

func (m *memTable) Present() (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.rs != nil, nil
}

func (m *memTable) Apply(rs nft.Ruleset) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return false, m.fail
	}
	if m.rs != nil && m.drift == "" && m.rs.Text() == rs.Text() {
		return false, nil
	}
	m.rs, m.drift = &rs, ""
	m.applied = append(m.applied, rs.Text())
	m.edges.add("table applied")
	return true, nil
}

func (m *memTable) Reapply(rs nft.Ruleset) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rs, m.drift = &rs, ""
	m.edges.add("table repaired")
	return nil
}

func (m *memTable) Verify(rs nft.Ruleset) error { return m.Check(rs) }

func (m *memTable) Check(rs nft.Ruleset) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.drift != "":
		return fmt.Errorf("%w: %s", nft.ErrDrift, m.drift)
	case m.rs == nil:
		return fmt.Errorf("%w: table %s is gone", nft.ErrDrift, nft.Table)
	case m.rs.Text() != rs.Text():
		return fmt.Errorf("%w: the table is not what was applied", nft.ErrDrift)
	}
	return nil
}

func (m *memTable) Close() error { return nil }

// tamper is someone with root editing the table.
func (m *memTable) tamper(what string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.drift = what
}

// text is the table in force, "" when there is none.
func (m *memTable) text() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rs == nil {
		return ""
	}
	return m.rs.Text()
}

// memTunnel is a Tunnel in memory: its peers are the last ones applied.
type memTunnel struct {
	mu    sync.Mutex
	key   policy.Key
	peers []tunnel.Peer
	// addrs are the interface's addresses: those it was opened with, then
	// those added.
	addrs []netip.Prefix
}

func (m *memTunnel) open(e *edges) func(tunnel.Config) (Tunnel, error) {
	return func(c tunnel.Config) (Tunnel, error) {
		e.add("tunnel up")
		m.mu.Lock()
		defer m.mu.Unlock()
		m.addrs = slices.Clone(c.Addresses)
		return m, nil
	}
}

func (m *memTunnel) Name() string          { return "bh-mem" }
func (m *memTunnel) ListenPort() uint16    { return 51820 }
func (m *memTunnel) PublicKey() policy.Key { m.mu.Lock(); defer m.mu.Unlock(); return m.key }
func (m *memTunnel) Close() error          { return nil }

func (m *memTunnel) AddAddress(p netip.Prefix) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.addrs = append(m.addrs, p)
	return nil
}

func (m *memTunnel) State() ([]tunnel.PeerState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var st []tunnel.PeerState
	for _, p := range m.peers {
		st = append(st, tunnel.PeerState{Peer: p})
	}
	return st, nil
}

func (m *memTunnel) Apply(want []tunnel.Peer) ([]tunnel.PeerState, bool, error) {
	m.mu.Lock()
	changed := tunnel.Diff(m.peers, want) != ""
	m.peers = slices.Clone(want)
	m.mu.Unlock()
	st, err := m.State()
	return st, changed, err
}

func (m *memTunnel) RotateKey() (policy.Key, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.key[0]++
	return m.key, nil
}

// gateways are the public keys of the tunnel's peers.
func (m *memTunnel) gateways() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var keys []string
	for _, p := range m.peers {
		keys = append(keys, p.PublicKey.String())
	}
	slices.Sort(keys)
	return keys
}

// memPosture is a device whose running processes the test sets; a change
// fires the watch, as a watched process exiting does.
type memPosture struct {
	mu        sync.Mutex
	processes []string
	changed   chan string
}

func newMemPosture(processes ...string) *memPosture {
	return &memPosture{processes: processes, changed: make(chan string, 1)}
}

func (m *memPosture) Gather(context.Context, string, posture.Wants) (*posture.Facts, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := &posture.Facts{Hostname: "scanner-17", OS: "debian", Kernel: "6.12.0", Arch: "arm64"}
	for i, name := range m.processes {
		f.Processes = append(f.Processes, posture.Process{PID: int32(i + 1), Name: name})
	}
	return f, nil
}

func (m *memPosture) Watch(posture.Wants, *posture.Facts) (<-chan string, func()) {
	return m.changed, func() {}
}

// run makes the processes the ones running, and fires the watch.
func (m *memPosture) run(processes ...string) {
	m.mu.Lock()
	m.processes = processes
	m.mu.Unlock()
	select {
	case m.changed <- "processes changed":
	default:
	}
}

// memFlowLog is a table log that logs nothing until closed.
type memFlowLog struct {
	once   sync.Once
	closed chan struct{}
}

func openMemFlowLog() (FlowLog, error) { return &memFlowLog{closed: make(chan struct{})}, nil }

func (m *memFlowLog) Read(func(controlapi.Flow)) error {
	<-m.closed
	return nil
}

func (m *memFlowLog) Closed() bool {
	select {
	case <-m.closed:
		return true
	default:
		return false
	}
}

func (m *memFlowLog) Lost() uint64 { return 0 }

func (m *memFlowLog) Close() error {
	m.once.Do(func() { close(m.closed) })
	return nil
}
