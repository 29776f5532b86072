package agent

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"slices"
	"sync/atomic"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/internal/version"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture"
)

// minResample spaces the samples a watched change triggers: a fact that
// changes all the time (a pinned file something keeps writing) must not
// keep the device sampling back to back. One sample costs about 20 ms of
// CPU here, so this caps that case at under a tenth of a core; a change
// after a quiet spell (timed samples do not count) is judged at once.
const minResample = 250 * time.Millisecond

// sampler is the posture component: one goroutine (run) that gathers
// facts every interval, whenever asked (a new policy may name new checks)
// and whenever a watched fact changes, and hands each sample to the loop.
// The loop judges samples; the sampler only gathers.
type sampler struct {
	posture  Posture
	log      *slog.Logger
	interval time.Duration
	// wants is what the current policy's checks need gathered; each
	// policy stores a new one, which also tells a sample gathered for an
	// older policy from a current one.
	wants   atomic.Pointer[posture.Wants]
	kick    chan struct{}
	samples chan sample
}

// sample is one gathering of facts, and what it was gathered for.
type sample struct {
	facts *posture.Facts
	wants *posture.Wants
}

func newSampler(p Posture, interval time.Duration, log *slog.Logger) *sampler {
	s := &sampler{posture: p, log: log, interval: interval, kick: make(chan struct{}, 1), samples: make(chan sample)}
	s.wants.Store(&posture.Wants{})
	return s
}

// ask asks for a sample now, gathering what w names.
func (s *sampler) ask(w posture.Wants) {
	s.wants.Store(&w)
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// current tells a sample gathered for the latest ask from an older one.
func (s *sampler) current(smp sample) bool { return smp.wants == s.wants.Load() }

// run samples until ctx ends.
func (s *sampler) run(ctx context.Context) {
	tick := time.NewTicker(s.interval)
	defer tick.Stop()
	var lastChange time.Time // when the latest change-triggered sample began
	for {
		select {
		case <-s.kick: // this sample answers it
		default:
		}
		wants := s.wants.Load()
		f, err := s.posture.Gather(ctx, version.Version, *wants)
		// A sample is a megabyte of short-lived garbage every interval;
		// hand its pages back rather than carry them.
		debug.FreeOSMemory()
		if err != nil {
			s.log.Warn("posture sample", "err", err)
		} else {
			select {
			case s.samples <- sample{f, wants}:
			case <-ctx.Done():
				return
			}
		}
		// What the checks watch (a required process, a pinned file) is
		// sampled again the moment it changes, not at the next tick.
		changed, stop := s.posture.Watch(*wants, f)
		select {
		case <-ctx.Done():
		case <-tick.C:
		case <-s.kick:
		case why := <-changed:
			s.log.Info("posture: sampling now", "because", why)
			select {
			case <-ctx.Done():
			case <-time.After(minResample - time.Since(lastChange)):
			}
			lastChange = time.Now()
		}
		stop()
		if ctx.Err() != nil {
			return
		}
	}
}

// postureChecks are the current policy's checks for this device's class.
// Only the event loop calls it.
func (a *Agent) postureChecks() []policy.Check {
	if a.bundle == nil {
		return nil
	}
	return a.bundle.Payload.Policy.Classes[a.device().Class].Checks
}

// kickSample asks for a sample now, for the current policy's checks (a
// new policy may name new files, processes or disks).
func (a *Agent) kickSample() { a.sample.ask(posture.Want(a.postureChecks())) }

// observe judges a sample: check results change the evaluator's input,
// and every check that changes state is audited with what was seen and
// what was expected. The inventory is reported when it changes.
func (a *Agent) observe(s sample) {
	if !a.sample.current(s) {
		// Gathered for an older policy: it may lack what the current
		// checks read, and would fail them for it. The sample asked
		// for the current policy follows.
		return
	}
	f := s.facts
	a.readTunnel(f)
	a.readSelf(f)
	all, changed := a.tracker.Observe(a.postureChecks(), f)
	a.checks = all
	for _, c := range changed {
		if c.Failing {
			a.audit("check-failed", fmt.Sprintf("%s (profile %s): observed %s, expected %s", c.ID, c.Profile, c.Observed, c.Expected))
		} else {
			a.audit("check-recovered", fmt.Sprintf("%s: observed %s", c.ID, c.Observed))
		}
	}
	if inv := inventory(f); inv != a.lastInventory {
		a.lastInventory = inv
		a.audit("inventory", inv)
	}
	if len(changed) > 0 {
		a.reconcile("posture check " + changed[0].ID)
	}
}

// readTunnel adds the tunnel's counters, by open segment, to a sample.
// Counters are per gateway peer; every segment behind a gateway sees its
// peer's.
func (a *Agent) readTunnel(f *posture.Facts) {
	if a.link.tun == nil {
		return // no tunnel: no segment is open, nothing can move
	}
	st, err := a.link.read()
	if err != nil {
		f.Unread = append(f.Unread, "tunnel")
		return
	}
	f.Tunnel = map[string]uint64{}
	segs := a.peerSegments()
	for _, p := range st {
		for _, seg := range segs[p.PublicKey] {
			f.Tunnel[seg] = p.RxBytes + p.TxBytes
		}
	}
}

// readSelf adds what only the agent knows to a sample: its wall clock
// against control's time, and the outside changes to its table since the
// previous sample (which this sample then answers for).
func (a *Agent) readSelf(f *posture.Facts) {
	if a.ctlAt.IsZero() {
		f.Unread = append(f.Unread, "clock")
	} else {
		now := a.wall()
		// Control's time now: its answer's, plus the monotonic time
		// since it arrived (a clock set back meanwhile moves neither).
		f.ClockSkew = now.Round(0).Sub(a.ctlTime.Add(now.Sub(a.ctlAt)))
	}
	if a.table.readErr != "" {
		f.Unread = append(f.Unread, "table")
	}
	a.loc.read(f, a.wall())
	f.Tampered = a.table.takeTampered()
}

// currentChecks are the check results the evaluator sees: those of the
// current policy (a check a new policy dropped no longer counts, even
// before the next sample).
func (a *Agent) currentChecks() []localpolicy.Check {
	var out []localpolicy.Check
	for _, c := range a.checks {
		if slices.ContainsFunc(a.postureChecks(), func(p policy.Check) bool { return p.ID == c.ID }) {
			out = append(out, c)
		}
	}
	return out
}

// inventory is what the device is and exposes, as one JSON line: it
// changes with an upgrade, a new listener or an address, not with load.
func inventory(f *posture.Facts) string {
	type sock struct {
		Protocol string `json:"protocol"`
		Local    string `json:"local"`
		Process  string `json:"process,omitzero"`
	}
	inv := struct {
		Hostname  string              `json:"hostname"`
		OS        string              `json:"os"`
		Kernel    string              `json:"kernel"`
		Arch      string              `json:"arch"`
		Agent     string              `json:"agent"`
		Listeners []sock              `json:"listeners"`
		Addrs     map[string][]string `json:"addrs"`
		// Peers connected to a listener here, by address; Destinations
		// this device connected to, by address and port.
		Peers        []string `json:"peers,omitzero"`
		Destinations []string `json:"destinations,omitzero"`
	}{Hostname: f.Hostname, OS: f.OS + " " + f.OSVersion, Kernel: f.Kernel, Arch: f.Arch, Agent: f.AgentVersion, Addrs: map[string][]string{}}
	names := map[int32]string{}
	for _, p := range f.Processes {
		names[p.PID] = p.Name
	}
	for _, l := range f.Listeners {
		inv.Listeners = append(inv.Listeners, sock{l.Protocol, l.Local.String(), names[l.PID]})
	}
	slices.SortFunc(inv.Listeners, func(x, y sock) int {
		return cmp.Compare(x.Protocol+" "+x.Local, y.Protocol+" "+y.Local)
	})
	inv.Listeners = slices.Compact(inv.Listeners)
	inv.Peers, inv.Destinations = observed(f)
	for _, i := range f.Interfaces {
		for _, p := range i.Addrs {
			inv.Addrs[i.Name] = append(inv.Addrs[i.Name], p.String())
		}
	}
	out, _ := json.Marshal(inv, json.Deterministic(true))
	return string(out)
}

// maxObserved bounds each list of observed peers and destinations in an
// inventory, so a busy gateway's report stays small.
const maxObserved = 64

// observed sorts the established connections into peers (the remote
// address of a connection to one of the device's listening ports) and
// destinations (the remote address and port of one the device opened).
func observed(f *posture.Facts) (peers, dsts []string) {
	listening := map[string]bool{}
	for _, l := range f.Listeners {
		listening[fmt.Sprint(l.Protocol, l.Local.Port())] = true
	}
	for _, c := range f.Established {
		if !c.Remote.IsValid() || c.Remote.Addr().IsLoopback() {
			continue
		}
		if listening[fmt.Sprint(c.Protocol, c.Local.Port())] {
			peers = append(peers, c.Remote.Addr().String())
		} else {
			dsts = append(dsts, c.Protocol+" "+c.Remote.String())
		}
	}
	bound := func(s []string) []string {
		slices.Sort(s)
		s = slices.Compact(s)
		return s[:min(len(s), maxObserved)]
	}
	return bound(peers), bound(dsts)
}
