package site

import (
	"encoding/json"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/lab"
)

// reach is one TCP echo round trip from the device to ap (2 s at most).
func (s *Site) reach(a *Agent, ap netip.AddrPort) bool {
	return lab.Reaches(s.t, a.NS, "tcp", ap)
}

// flow is a live TCP connection carrying a byte every 10 ms, echoed: an
// established flow whose death can be timed to the last echo.
type flow struct {
	conn net.Conn
	last atomic.Int64 // unix nanoseconds of the latest echo
	stop chan struct{}
	once sync.Once
}

// openFlow opens a flow from the device to ap and waits for its first
// echo.
func (s *Site) openFlow(a *Agent, ap netip.AddrPort) *flow {
	f := &flow{conn: lab.Conn(s.t, a.NS, ap), stop: make(chan struct{})}
	go func() {
		buf := make([]byte, 64)
		for {
			if _, err := f.conn.Read(buf); err != nil {
				return
			}
			f.last.Store(time.Now().UnixNano())
		}
	}()
	go func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-tick.C:
				f.conn.SetWriteDeadline(time.Now().Add(time.Second))
				f.conn.Write([]byte{'.'})
			}
		}
	}()
	s.t.Cleanup(f.close)
	if !lab.Within(5*time.Second, func() bool { return f.last.Load() != 0 }) {
		s.t.Fatalf("no echo on a new connection from the %s to %s", a.Name, ap)
	}
	return f
}

func (f *flow) close() { f.once.Do(func() { close(f.stop); f.conn.Close() }) }

// lastEcho is when the latest echo arrived.
func (f *flow) lastEcho() time.Time { return time.Unix(0, f.last.Load()) }

// alive reports whether an echo arrived in the last 300 ms.
func (f *flow) alive() bool { return time.Since(f.lastEcho()) < 300*time.Millisecond }

// diesAfter waits up to d for the flow to fall silent and returns how
// long after start its last echo came.
func (f *flow) diesAfter(start time.Time, d time.Duration) (time.Duration, bool) {
	_, ok := lab.Until(start, d, func() bool { return time.Since(f.lastEcho()) > 500*time.Millisecond })
	return f.lastEcho().Sub(start), ok && f.lastEcho().After(start.Add(-300*time.Millisecond))
}

// device is what control knows of the device, its reports included.
func (s *Site) device(a *Agent) (controlapi.Device, bool) {
	var d controlapi.Device
	out, err := s.Ctl.CLI("device", "show", a.ID)
	if err != nil {
		return d, false
	}
	return d, json.Unmarshal([]byte(out), &d) == nil
}

// reported is the device's first report at control of kind whose detail
// contains every text, if any.
func (s *Site) reported(a *Agent, kind string, texts ...string) (controlapi.Event, bool) {
	d, ok := s.device(a)
	if !ok {
		return controlapi.Event{}, false
	}
next:
	for _, e := range d.Reports {
		if e.Kind != kind {
			continue
		}
		for _, text := range texts {
			if !strings.Contains(e.Detail, text) {
				continue next
			}
		}
		return e, true
	}
	return controlapi.Event{}, false
}

// refusedReported reports whether the device reported f among the
// connections its table refused.
func (s *Site) refusedReported(a *Agent, f controlapi.Flow) bool {
	d, ok := s.device(a)
	if !ok {
		return false
	}
	for _, e := range d.Reports {
		if e.Kind != controlapi.EventRefused {
			continue
		}
		var flows []controlapi.ObservedFlow
		if json.Unmarshal([]byte(e.Detail), &flows) != nil {
			continue
		}
		for _, o := range flows {
			if o.Flow == f {
				return true
			}
		}
	}
	return false
}
