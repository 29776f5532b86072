package server

import (
	"slices"
	"sync"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// monitors remembers each stored bundle's monitors by class: reports are
// judged against them, and a bundle of 10,000 destinations is parsed once,
// not per report.
type monitors struct {
	mu        sync.Mutex
	byVersion map[uint64]map[string]*policy.Monitor
}

// of is class's monitor in the bundle version raw (nil: none).
func (m *monitors) of(version uint64, raw []byte, class string) *policy.Monitor {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.byVersion == nil {
		m.byVersion = map[uint64]map[string]*policy.Monitor{}
	}
	classes, ok := m.byVersion[version]
	if !ok {
		classes = map[string]*policy.Monitor{}
		if p, err := bundle.Peek(raw); err == nil {
			for name, c := range p.Policy.Classes {
				classes[name] = c.Monitor
			}
		}
		m.byVersion[version] = classes
	}
	return classes[class]
}

// monitoredFlows keeps of the flows a device reported those its signed
// policy had it monitor: the bundle of the version it reports running
// (targeted at it), whose class's monitor names the segment (or every
// segment), names the device (or every device), and had not ended when
// the flow was last seen. A device not in monitor mode cannot put a flow
// into a class's discovery, so cannot make `policy suggest` draft a rule
// opening finance.
func (s *Server) monitoredFlows(dev controlapi.Device, detail string) []controlapi.ObservedFlow {
	var flows []controlapi.ObservedFlow
	if json.Unmarshal([]byte(detail), &flows) != nil {
		return nil
	}
	raw, err := s.db.Bundle(dev.State.PolicyVersion)
	if err != nil || raw == nil {
		return nil
	}
	if p, err := bundle.Peek(raw); err != nil || !p.Target.Matches(bundle.Device{ID: dev.ID, Class: dev.Class}) {
		return nil
	}
	m := s.monitors.of(dev.State.PolicyVersion, raw, dev.Class)
	if m == nil || (len(m.Devices) > 0 && !slices.Contains(m.Devices, dev.ID)) {
		return nil
	}
	return slices.DeleteFunc(flows, func(f controlapi.ObservedFlow) bool {
		monitored := len(m.Segments) == 0 || slices.Contains(m.Segments, f.Segment)
		return f.Segment == "" || !monitored || f.Last.After(m.Until.Add(time.Minute))
	})
}
