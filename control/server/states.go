package server

import (
	"log/slog"
	"sync"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

// stateFlush is the most often reported states are written: a fan-out's
// re-polls, thousands within a second, become a few writes instead of
// one each.
const stateFlush = 100 * time.Millisecond

// stateLog gathers the states devices report and writes them to the
// store in batches, from a goroutine of its own. Until a state is
// committed, latest still has it, so this replica's desk reads what its
// devices said; other replicas see it within stateFlush and the write.
// A state lost with the process is not lost to the fleet: the device
// reports it again at every sync, and the store keeps only what differs.
type stateLog struct {
	write func(map[string]controlapi.DeviceState, time.Time) error
	now   func() time.Time
	log   *slog.Logger

	mu       sync.Mutex
	pending  map[string]controlapi.DeviceState // reported, not yet being written
	inflight map[string]controlapi.DeviceState // being written now
	kick     chan struct{}
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
}

func newStateLog(write func(map[string]controlapi.DeviceState, time.Time) error, now func() time.Time, log *slog.Logger) *stateLog {
	l := &stateLog{write: write, now: now, log: log, pending: map[string]controlapi.DeviceState{},
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go l.run()
	return l
}

// put records what device id reported.
func (l *stateLog) put(id string, st controlapi.DeviceState) {
	l.mu.Lock()
	l.pending[id] = st
	l.mu.Unlock()
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// latest is what device id reported that may not be committed yet.
func (l *stateLog) latest(id string) (controlapi.DeviceState, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st, ok := l.pending[id]; ok {
		return st, true
	}
	st, ok := l.inflight[id]
	return st, ok
}

// close writes what is pending and stops; again, it does nothing.
func (l *stateLog) close() {
	l.stopOnce.Do(func() { close(l.stop) })
	<-l.done
}

func (l *stateLog) run() {
	defer close(l.done)
	var last time.Time
	gap := stateFlush
	for {
		select {
		case <-l.kick:
		case <-l.stop:
			if err := l.flush(); err != nil {
				l.log.Warn("record the states devices reported; they report them again at their next sync", "err", err)
			}
			return
		}
		// Whatever arrives until gap after the last write joins this one.
		if wait := gap - time.Since(last); wait > 0 {
			select {
			case <-time.After(wait):
			case <-l.stop:
			}
		}
		last = time.Now()
		switch err := l.flush(); {
		case err == nil:
			if gap > stateFlush {
				l.log.Info("recording the states devices report again")
			}
			gap = stateFlush
		case gap == stateFlush:
			l.log.Warn("record the states devices reported; retrying", "err", err)
			gap = time.Second
		default:
			gap = min(2*gap, 30*time.Second)
		}
	}
}

// flush writes what is pending. What fails is kept for the next write,
// unless the device said something newer meanwhile.
func (l *stateLog) flush() error {
	l.mu.Lock()
	batch := l.pending
	if len(batch) == 0 {
		l.mu.Unlock()
		return nil
	}
	l.pending, l.inflight = map[string]controlapi.DeviceState{}, batch
	l.mu.Unlock()
	err := l.write(batch, l.now())
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight = nil
	if err != nil {
		for id, st := range batch {
			if _, newer := l.pending[id]; !newer {
				l.pending[id] = st
			}
		}
		select {
		case l.kick <- struct{}{}:
		default:
		}
	}
	return err
}
