package agent

import (
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/agent/adminapi"
	"github.com/bulkhead-edge/bulkhead/agent/controlapi"
	"github.com/bulkhead-edge/bulkhead/agent/flowlog"
)

// flowReportEvery is how often the flows seen in monitor mode, and the
// connections refused, since the last report are reported, when there
// are any.
const flowReportEvery = 5 * time.Second

// monitorState is what the event loop holds of the table's log: the
// flows monitor mode passed, and the connections the table refused.
type monitorState struct {
	log     flowlog.Log // monitored segments' flows
	refused flowlog.Log // refused connections, by direction
	reader  FlowLog
	err     string // why the group could not be bound
	flows   chan controlapi.Flow
	// monitoring is whether a monitor was in force at the last sync.
	monitoring bool
}

// syncFlowLog binds the NFLOG group once the agent runs, and again after
// its reading failed: the table always logs refused connections, and
// monitored segments' flows while a monitor is in force. Outside Run (at
// boot) it waits for Run.
func (a *Agent) syncFlowLog() {
	m := &a.mon
	if a.desired.Monitor == nil && m.monitoring {
		a.reportFlows() // what the monitor saw last, at its end
	}
	m.monitoring = a.desired.Monitor != nil
	if m.reader != nil && m.reader.Closed() { // its reading failed: bind afresh
		m.reader = nil
	}
	if a.ch.runCtx == nil || m.reader != nil {
		return
	}
	r, err := a.openFlowLog()
	if err != nil {
		if err.Error() != m.err { // retried with every tunnel check; say it once
			a.log.Error("cannot read the table's log: refused connections go unreported, monitored flows still pass; both are counted in the table", "err", err)
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
			a.log.Error("reading the table's log stopped; binding again at the next tunnel check", "err", err)
			r.Close()
		}
	}()
}

// logged files a flow the table logged: a refused connection has a
// direction, a monitored one a segment.
func (a *Agent) logged(f controlapi.Flow) {
	if f.Direction != "" {
		a.mon.refused.Add(f, a.clock.Now())
		return
	}
	a.mon.log.Add(f, a.clock.Now())
}

// reportFlows reports the monitored flows and the refused connections
// seen since the last report, if any.
func (a *Agent) reportFlows() {
	for _, r := range []struct {
		kind string
		log  *flowlog.Log
	}{{controlapi.EventFlows, &a.mon.log}, {controlapi.EventRefused, &a.mon.refused}} {
		taken := r.log.Take()
		if len(taken) == 0 {
			continue
		}
		detail, err := json.Marshal(taken)
		if err != nil {
			a.log.Error("flows report", "err", err)
			continue
		}
		a.audit(r.kind, string(detail))
	}
}

func (a *Agent) refusedStatus() *adminapi.RefusedStatus {
	flows := a.mon.refused.All()
	if len(flows) == 0 && a.mon.err == "" {
		return nil
	}
	return &adminapi.RefusedStatus{Error: a.mon.err, Flows: flows, Overflow: a.mon.refused.Overflow}
}

func (a *Agent) monitorStatus() *adminapi.MonitorStatus {
	d := a.desired.Monitor
	flows := a.mon.log.All()
	if d == nil && len(flows) == 0 {
		return nil
	}
	s := &adminapi.MonitorStatus{Error: a.mon.err, Flows: flows, Overflow: a.mon.log.Overflow, Segments: []string{}}
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
