package agent

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
)

// enrolTimeout bounds an enrolment: resolving the server and the exchange.
const enrolTimeout = 20 * time.Second

// enrolStep is an enrolment's message to the loop: the endpoint to open
// (opened is closed once the table lets it through), or the outcome
// (reply set).
type enrolStep struct {
	url    string
	ep     netip.AddrPort
	opened chan struct{}
	rec    *controlclient.Record
	err    error
	reply  chan answer
}

// beginEnrol starts an enrolment. The network exchange runs off the loop,
// which goes on repairing drift and answering status meanwhile; the loop
// opens the table to the server when asked (enrolStep.opened) and takes
// the outcome (enrolled), which answers r.
func (a *Agent) beginEnrol(ctx context.Context, r request) {
	var refuse string
	switch {
	case a.ch.rec != nil:
		refuse = fmt.Sprintf("already enrolled as %s with %s; to enrol again, stop the agent and remove %s",
			a.ch.rec.DeviceID, a.ch.rec.URL, filepath.Join(a.cfg.StateDir, controlclient.RecordFile))
	case a.ch.enrolling != "":
		refuse = fmt.Sprintf("an enrolment with %s is in progress", a.ch.enrolling)
	case a.cfg.Device.Class == "":
		refuse = "the configuration names no device class to enrol as"
	}
	if refuse != "" {
		r.reply <- answer{Response: adminapi.Response{Error: refuse}}
		return
	}
	a.ch.enrolling = r.URL
	wg := a.link.publicKey()
	stateDir, who, steps, enrol := a.cfg.StateDir, controlclient.Who{Class: a.cfg.Device.Class}, a.enrolments, a.enrol
	if g := a.cfg.Gateway; g != nil {
		who.Segments = slices.Clone(g.Segments)
	}
	go func() {
		ectx, cancel := context.WithTimeout(ctx, enrolTimeout)
		defer cancel()
		out := enrolStep{url: r.URL, reply: r.reply}
		out.ep, out.err = controlclient.Endpoint(ectx, r.URL)
		if out.err == nil {
			open := enrolStep{url: r.URL, ep: out.ep, opened: make(chan struct{})}
			select {
			case steps <- open:
				<-open.opened
			case <-ctx.Done():
				return
			}
			out.rec, out.err = enrol(ectx, stateDir, r.URL, r.Token, r.Fingerprint, who, wg, out.ep)
		}
		select {
		case steps <- out:
		case <-ctx.Done():
		}
	}()
}

// enrolStepped acts on an enrolment's message, on the loop.
func (a *Agent) enrolStepped(ctx context.Context, s enrolStep) {
	if s.opened != nil {
		a.ch.pending = s.ep
		a.reconcile("enrolment with " + s.url)
		close(s.opened)
		return
	}
	s.reply <- a.answer(a.enrolled(ctx, s))
}

// enrolled takes an enrolment's outcome: a device enrolled starts
// syncing; a failed enrolment closes what was opened for it.
func (a *Agent) enrolled(ctx context.Context, s enrolStep) adminapi.Response {
	a.ch.enrolling, a.ch.pending = "", netip.AddrPort{}
	err := s.err
	if err == nil {
		err = a.useEnrolment(s.rec)
	}
	if err != nil {
		a.reconcile("enrolment failed")
		a.audit("enrolment-failed", fmt.Sprintf("%s: %v", s.url, err))
		return adminapi.Response{Error: "enrolment failed: " + err.Error()}
	}
	a.takeAddress()
	a.reconcile("enrolled")
	a.audit("enrolled", fmt.Sprintf("device %s with %s (CA %s)", s.rec.DeviceID, s.rec.URL, s.rec.Fingerprint))
	a.ch.sync.start(ctx)
	return adminapi.Response{Status: a.status()}
}

// takeAddress puts the tunnel address control assigned on the running
// tunnel when the configuration names none; a configuration that names
// another is kept, with a warning: gateways admit the device only from
// the address its certificate binds.
func (a *Agent) takeAddress() {
	p, ok := a.assignedAddress()
	switch {
	case !ok:
	case len(a.cfg.Tunnel.Addresses) == 0:
		a.link.address(p)
	case !slices.Contains(a.cfg.Tunnel.Addresses, p):
		a.log.Warn("the configuration's tunnel addresses differ from the one control assigned; Bulkhead gateways admit this device only from the assigned one",
			"configured", a.cfg.Tunnel.Addresses, "assigned", p)
	}
}
