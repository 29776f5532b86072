package agent

import (
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/agent/controlapi"
	"github.com/bulkhead-edge/bulkhead/agent/flowlog"
	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
)

// flowReportEvery is how often the flows seen in monitor mode since the
// last report are reported, when there are any.
const flowReportEvery = 5 * time.Second

// monitorState is what the event loop holds for monitor mode.
type monitorState struct {
	log    flowlog.Log
	reader *flowlog.Reader // bound while a monitor is in force
	err    string          // why the group could not be bound
	flows  chan controlapi.Flow
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

// syncFlowLog binds the NFLOG group before a monitor's rules are applied
// (so no logged packet goes unread) and unbinds it once no monitor is in
// force, reporting what was seen last. Outside Run (at boot) it waits
// for Run.
func (a *Agent) syncFlowLog() {
	want := a.desired.Monitor != nil && a.ch.runCtx != nil
	m := &a.mon
	if m.reader != nil && m.reader.Closed() { // its reading failed: bind afresh
		m.reader = nil
	}
	switch {
	case want && m.reader == nil:
		r, err := flowlog.Open(a.enforcer.NetNS(), nft.LogGroup)
		if err != nil {
			if err.Error() != m.err { // retried with every tunnel check; say it once
				a.log.Error("monitor mode: cannot read logged flows; they still pass, and are counted in the table", "err", err)
			}
			m.err = err.Error()
			return
		}
		m.reader, m.err = r, ""
		ctx, flows := a.ch.runCtx, m.flows
		go func() {
			err := r.Read(func(f controlapi.Flow) {
				select {
				case flows <- f:
				case <-ctx.Done():
				}
			})
			if err != nil {
				a.log.Error("monitor mode: reading logged flows stopped; binding again at the next tunnel check", "err", err)
				r.Close()
			}
		}()
	case !want && m.reader != nil:
		m.reader.Close()
		m.reader = nil
		a.reportFlows()
	case !want:
		m.err = ""
	}
}

// reportFlows reports the flows seen since the last report, if any.
func (a *Agent) reportFlows() {
	taken := a.mon.log.Take()
	if len(taken) == 0 {
		return
	}
	detail, err := json.Marshal(taken)
	if err != nil {
		a.log.Error("flows report", "err", err)
		return
	}
	a.audit(controlapi.EventFlows, string(detail))
}

func (a *Agent) monitorStatus() *MonitorStatus {
	d := a.desired.Monitor
	flows := a.mon.log.All()
	if d == nil && len(flows) == 0 {
		return nil
	}
	s := &MonitorStatus{Error: a.mon.err, Flows: flows, Overflow: a.mon.log.Overflow, Segments: []string{}}
	if d != nil {
		s.Until = d.Until
		for _, seg := range d.Segments {
			s.Segments = append(s.Segments, seg.Segment)
		}
	}
	if a.mon.reader != nil {
		s.Lost = a.mon.reader.Lost()
	}
	return s
}
