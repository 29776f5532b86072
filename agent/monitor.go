package agent

import (
	"context"
	"log/slog"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/agent/flowlog"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

// flowReportEvery is how often the flows seen in monitor mode, and the
// connections refused, since the last report are reported, when there
// are any.
const flowReportEvery = 5 * time.Second

// flowMonitor is the table's log as a component: a reader goroutine bound
// to the log group while the loop runs, and what it read: the flows
// monitor mode passed, and the connections the table refused. The loop
// calls its methods; the reader reaches the loop only through flows.
type flowMonitor struct {
	open func() (FlowLog, error)
	log  *slog.Logger
	// running is the loop's context, set by start: the group is bound
	// only while the loop runs (at boot, it waits for it).
	running context.Context
	reader  FlowLog
	err     string // why the group could not be bound
	flows   chan controlapi.Flow
	seen    flowlog.Log // monitored segments' flows
	refused flowlog.Log // refused connections, by direction
	// monitoring is whether a monitor was in force at the last sync.
	monitoring bool
}

func newFlowMonitor(open func() (FlowLog, error), log *slog.Logger) flowMonitor {
	return flowMonitor{open: open, log: log, flows: make(chan controlapi.Flow, 64)}
}

// start lets the monitor bind the group from now until ctx ends.
func (m *flowMonitor) start(ctx context.Context) { m.running = ctx }

// bind binds the group once the loop runs, and again after its reading
// failed: the table always logs refused connections, and monitored
// segments' flows while a monitor is in force.
func (m *flowMonitor) bind() {
	if m.reader != nil && m.reader.Closed() { // its reading failed: bind afresh
		m.reader = nil
	}
	if m.running == nil || m.reader != nil {
		return
	}
	r, err := m.open()
	if err != nil {
		if err.Error() != m.err { // retried with every tunnel check; say it once
			m.log.Error("cannot read the table's log: refused connections go unreported, monitored flows still pass; both are counted in the table", "err", err)
		}
		m.err = err.Error()
		return
	}
	m.reader, m.err = r, ""
	ctx, flows, log := m.running, m.flows, m.log
	go func() {
		err := r.Read(func(f controlapi.Flow) {
			select {
			case flows <- f:
			case <-ctx.Done():
			}
		})
		if err != nil {
			log.Error("reading the table's log stopped; binding again at the next tunnel check", "err", err)
			r.Close()
		}
	}()
}

// add files a flow the table logged: a refused connection has a
// direction, a monitored one a segment.
func (m *flowMonitor) add(f controlapi.Flow, now time.Time) {
	if f.Direction != "" {
		m.refused.Add(f, now)
		return
	}
	m.seen.Add(f, now)
}

// take returns the audit events (kind and JSON detail) for what was seen
// since the last take, if anything.
func (m *flowMonitor) take() (kinds, details []string) {
	for _, r := range []struct {
		kind string
		log  *flowlog.Log
	}{{controlapi.EventFlows, &m.seen}, {controlapi.EventRefused, &m.refused}} {
		taken := r.log.Take()
		if len(taken) == 0 {
			continue
		}
		detail, err := json.Marshal(taken)
		if err != nil {
			m.log.Error("flows report", "err", err)
			continue
		}
		kinds, details = append(kinds, r.kind), append(details, string(detail))
	}
	return kinds, details
}

func (m *flowMonitor) close() {
	if m.reader != nil {
		m.reader.Close()
	}
}

// syncFlowLog follows the Desired state: a monitor that ended has what it
// saw last reported; the group is bound (again) if it is not.
func (a *Agent) syncFlowLog() {
	if a.desired.Monitor == nil && a.mon.monitoring {
		a.reportFlows()
	}
	a.mon.monitoring = a.desired.Monitor != nil
	a.mon.bind()
}

// reportFlows reports the monitored flows and the refused connections
// seen since the last report, if any.
func (a *Agent) reportFlows() {
	kinds, details := a.mon.take()
	for i, kind := range kinds {
		a.audit(kind, details[i])
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
	flows := a.mon.seen.All()
	if d == nil && len(flows) == 0 {
		return nil
	}
	s := &adminapi.MonitorStatus{Error: a.mon.err, Flows: flows, Overflow: a.mon.seen.Overflow, Segments: []string{}}
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
