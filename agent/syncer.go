package agent

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/spool"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

// The sync client's pacing. A poll is held by the server for syncWait when
// idle; failures back off exponentially with jitter up to backoffMax, so
// an outage of any length costs one attempt per minute and no memory.
const (
	syncWait     = 4 * time.Minute
	syncSlack    = 30 * time.Second
	backoffFirst = time.Second
	backoffMax   = time.Minute
	reportBatch  = 200
)

// controlClient is the control channel's transport: the held long-poll
// and the report upload (a *controlclient.Client; tests use fakes).
type controlClient interface {
	Sync(ctx context.Context, req controlapi.SyncRequest, connected func()) (controlapi.SyncResponse, error)
	Report(ctx context.Context, req controlapi.ReportRequest) (controlapi.ReportResponse, error)
}

// syncResult is an answer from control, handed to the loop.
type syncResult struct {
	resp controlapi.SyncResponse
	// done tells the syncer the loop has acted on resp, and whether it
	// refused something in it.
	done chan bool
}

// syncer is the control channel's component: one goroutine (run) that
// holds the long-poll with the latest snapshot, posts the outbox, and
// hands every answer to the loop, which alone decides what to do with it.
// It owns the outbox, the snapshot and the channel's status; the loop
// reaches it only through its methods, each safe from any goroutine.
type syncer struct {
	client  controlClient
	outbox  *spool.Spool
	log     *slog.Logger
	answers chan<- syncResult
	// snapshot is what the next poll sends.
	snapshot atomic.Pointer[controlapi.SyncRequest]
	// status is the last outcome, for `bulkhead status`.
	status atomic.Pointer[adminapi.ControlStatus]
	// kick makes run start over: the snapshot changed or events wait.
	kick chan struct{}
	// sleep, when set (by tests), replaces the pause after a refused
	// offer.
	sleep func(ctx context.Context, d time.Duration) bool
	// stopped is closed when run returns (nil until start).
	stopped chan struct{}
}

func newSyncer(c controlClient, outbox *spool.Spool, st adminapi.ControlStatus, answers chan<- syncResult, log *slog.Logger) *syncer {
	s := &syncer{client: c, outbox: outbox, log: log, answers: answers, kick: make(chan struct{}, 1)}
	s.snapshot.Store(&controlapi.SyncRequest{})
	s.status.Store(&st)
	return s
}

// queue adds an event to the outbox and wakes run to post it.
func (s *syncer) queue(t time.Time, kind, detail string) error {
	err := s.outbox.Add(t, kind, detail)
	s.wake()
	return err
}

// offer makes next what the following poll sends, cutting a held poll
// short when it differs from what that poll sent.
func (s *syncer) offer(next *controlapi.SyncRequest) {
	if prev := s.snapshot.Swap(next); !sameRequest(prev, next) {
		s.wake()
	}
}

// state is the channel's status.
func (s *syncer) state() *adminapi.ControlStatus { return s.status.Load() }

func (s *syncer) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// keepRefused persists the digests of the offers the device refused: after
// a restart the server is not given a second round of offers to audit.
func (s *syncer) keepRefused(digests []string) error { return s.outbox.SetRefused(digests) }

// start runs the syncer until ctx ends. The loop calls it once, when it
// starts or when the device enrols.
func (s *syncer) start(ctx context.Context) {
	s.stopped = make(chan struct{})
	go func() {
		defer close(s.stopped)
		s.run(ctx)
	}()
}

// close waits for run to return (its ctx ended) and closes the outbox.
func (s *syncer) close() error {
	if s.stopped != nil {
		<-s.stopped
	}
	return s.outbox.Close()
}

func sameRequest(a, b *controlapi.SyncRequest) bool {
	return a.PolicyVersion == b.PolicyVersion && a.RootsVersion == b.RootsVersion && slices.Equal(a.Refused, b.Refused) && a.State.Mode == b.State.Mode &&
		a.State.Why == b.State.Why && a.State.PolicyVersion == b.State.PolicyVersion && maps.Equal(a.State.Revoked, b.State.Revoked) &&
		maps.Equal(a.State.Orders, b.State.Orders) && slices.Equal(a.State.RefusedOrders, b.State.RefusedOrders) &&
		a.WireGuardKey == b.WireGuardKey && (a.Gateway == nil) == (b.Gateway == nil) && (a.Gateway == nil || *a.Gateway == *b.Gateway)
}

// run long-polls and posts reports until ctx ends.
//
// A kick means the snapshot changed or events wait in the outbox. Each
// round takes the pending kick before it reads the outbox and the
// snapshot, so a kick that arrives later (an event added while the
// outbox was being posted) is still there to cut the next poll short:
// nothing waits in the outbox for a poll to end.
func (s *syncer) run(ctx context.Context) {
	backoff, reportBackoff, refusedBackoff := backoffFirst, backoffFirst, backoffFirst
	failing := false // reports are not being delivered (said once)
	for ctx.Err() == nil {
		select {
		case <-s.kick:
		default:
		}
		// Reports that cannot be posted wait for a retry, but never hold
		// up the poll: orders must still arrive while the server refuses
		// reports. The retry kicks the poll short.
		var retry *time.Timer
		if err := s.flushReports(ctx); err != nil {
			if !failing {
				s.log.Warn("reports not delivered; they stay in the outbox and are retried", "err", err)
			}
			failing = true
			retry = time.AfterFunc(jitter(reportBackoff), s.wake)
			reportBackoff = min(reportBackoff*2, backoffMax)
		} else {
			if failing {
				s.log.Info("reports delivered again")
			}
			failing, reportBackoff = false, backoffFirst
		}
		resp, kicked, err := s.poll(ctx)
		if retry != nil {
			retry.Stop()
		}
		if kicked {
			continue
		}
		if ctx.Err() != nil {
			return
		}
		st := *s.status.Load()
		if err != nil {
			st.Connected, st.Error = false, err.Error()
			s.status.Store(&st)
			t := time.NewTimer(jitter(backoff))
			backoff = min(backoff*2, backoffMax)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-s.kick:
				t.Stop()
			case <-t.C:
			}
			continue
		}
		backoff = backoffFirst
		st.Connected, st.Error, st.LastSync = true, "", time.Now()
		s.status.Store(&st)
		done := make(chan bool)
		var refused bool
		select {
		case s.answers <- syncResult{resp: resp, done: done}:
			refused = <-done
		case <-ctx.Done():
			return
		}
		// An answer the device refused part of is followed by a pause
		// that grows while answers keep being refused: a server offering
		// one forged bundle after another cannot make the device refuse,
		// and audit, thousands a second (4,140 in 10 s, before).
		if !refused {
			refusedBackoff = backoffFirst
			continue
		}
		if !s.pause(ctx, jitter(refusedBackoff)) {
			return
		}
		refusedBackoff = min(refusedBackoff*2, backoffMax)
	}
}

// pause waits d, or until ctx ends (false). Kicks do not cut it short:
// what it paces is the server's offers.
func (s *syncer) pause(ctx context.Context, d time.Duration) bool {
	if s.sleep != nil {
		return s.sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// jitter is a wait of about d: full jitter between d/2 and 3d/2, so a
// fleet coming back after an outage does not arrive at the server in one
// wave.
func jitter(d time.Duration) time.Duration {
	return time.Duration(rand.Int64N(int64(d))) + d/2
}

// poll holds one long-poll with the latest snapshot. A kick cuts it short
// (kicked): the answer, if any, is dropped, and the next round asks again
// with what changed.
func (s *syncer) poll(ctx context.Context) (resp controlapi.SyncResponse, kicked bool, err error) {
	req := *s.snapshot.Load()
	pctx, cancel := context.WithTimeout(ctx, syncWait+syncSlack)
	defer cancel()
	cut := make(chan struct{})
	go func() {
		select {
		case <-s.kick:
			close(cut)
			cancel()
		case <-pctx.Done():
		}
	}()
	resp, err = s.client.Sync(pctx, req, func() {
		st := *s.status.Load()
		st.Connected, st.Error = true, ""
		s.status.Store(&st)
	})
	cancel()
	select {
	case <-cut:
		if err == nil {
			// The whole answer arrived before the kick cut the poll
			// short: it is acted on, never dropped (it may carry an
			// order); the next poll sends the new state.
			return resp, false, nil
		}
		return resp, true, nil
	default:
		return resp, false, err
	}
}

// flushReports posts what the outbox holds, in order, until it is empty.
// An error (the server unreachable or refusing) leaves the rest in the
// outbox for a retry.
func (s *syncer) flushReports(ctx context.Context) error {
	for ctx.Err() == nil {
		req, err := s.outbox.Pending(reportBatch)
		if err != nil {
			return fmt.Errorf("outbox: %w", err)
		}
		if len(req.Events) == 0 && req.Dropped == 0 {
			return nil
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := s.client.Report(rctx, req)
		cancel()
		if err != nil {
			return fmt.Errorf("report: %w", err)
		}
		if err := s.outbox.Ack(resp.Acked, req.Dropped); err != nil {
			return fmt.Errorf("outbox: %w", err)
		}
		if len(req.Events) < reportBatch {
			return nil
		}
	}
	return ctx.Err()
}
