package agent

import (
	"cmp"
	"context"
	"fmt"
	"runtime/debug"
	"slices"
	"sync/atomic"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture"
)

// DefaultPostureInterval is how often the device samples itself when the
// configuration does not say.
const DefaultPostureInterval = 30 * time.Second

// sampler gathers posture facts off the event loop, every interval and
// whenever kicked (a new policy may name new checks), and hands each
// sample to the loop.
type sampler struct {
	wants   atomic.Pointer[posture.Wants]
	kick    chan struct{}
	samples chan *posture.Facts
}

// postureChecks are the current policy's checks for this device's class.
// Only the event loop calls it.
func (a *Agent) postureChecks() []policy.Check {
	if a.bundle == nil {
		return nil
	}
	return a.bundle.Payload.Policy.Classes[a.device().Class].Checks
}

// startSampler runs the sampler until ctx ends.
func (a *Agent) startSampler(ctx context.Context) {
	s := &a.sample
	s.wants.Store(new(posture.Want(a.postureChecks())))
	go func() {
		tick := time.NewTicker(time.Duration(a.cfg.Posture.Interval))
		defer tick.Stop()
		for {
			f, err := posture.Gather(ctx, Version, *s.wants.Load())
			// A sample is a megabyte of short-lived garbage every
			// interval; hand its pages back rather than carry them.
			debug.FreeOSMemory()
			if err != nil {
				a.log.Warn("posture sample", "err", err)
			} else {
				select {
				case s.samples <- f:
				case <-ctx.Done():
					return
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			case <-s.kick:
			}
		}
	}()
}

// kickSample asks for a sample now (after a policy change).
func (a *Agent) kickSample() {
	a.sample.wants.Store(new(posture.Want(a.postureChecks())))
	select {
	case a.sample.kick <- struct{}{}:
	default:
	}
}

// observe judges a sample: check results change the evaluator's input,
// and every check that changes state is audited with what was seen and
// what was expected. The inventory is reported when it changes.
func (a *Agent) observe(f *posture.Facts) {
	a.readTunnel(f)
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
	if a.tun == nil {
		return // no tunnel: no segment is open, nothing can move
	}
	st, err := a.tun.State()
	if err != nil {
		f.Unread = append(f.Unread, "tunnel")
		return
	}
	a.traffic = st
	f.Tunnel = map[string]uint64{}
	for _, p := range st {
		for _, want := range a.desired.Peers {
			if want.PublicKey == p.PublicKey {
				for _, seg := range want.Segments {
					f.Tunnel[seg] = p.RxBytes + p.TxBytes
				}
			}
		}
	}
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
	for _, i := range f.Interfaces {
		for _, p := range i.Addrs {
			inv.Addrs[i.Name] = append(inv.Addrs[i.Name], p.String())
		}
	}
	out, _ := json.Marshal(inv, json.Deterministic(true))
	return string(out)
}
