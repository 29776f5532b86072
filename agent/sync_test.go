package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/spool"
	"github.com/bulkhead-edge/bulkhead/api/adminapi"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

// fakeControl is a control server that holds every poll until the poll is
// cut short, and answers each report only when the test says how.
type fakeControl struct {
	reports chan controlapi.ReportRequest // every report posted
	answer  chan error                    // how the report in flight ends: nil acknowledges it
	polls   chan struct{}                 // a poll was held
}

func newFakeControl() *fakeControl {
	return &fakeControl{reports: make(chan controlapi.ReportRequest), answer: make(chan error), polls: make(chan struct{}, 100)}
}

func (f *fakeControl) Sync(ctx context.Context, _ controlapi.SyncRequest, connected func()) (controlapi.SyncResponse, error) {
	connected()
	f.polls <- struct{}{}
	<-ctx.Done()
	return controlapi.SyncResponse{}, ctx.Err()
}

func (f *fakeControl) Report(ctx context.Context, req controlapi.ReportRequest) (controlapi.ReportResponse, error) {
	select {
	case f.reports <- req:
	case <-ctx.Done():
		return controlapi.ReportResponse{}, ctx.Err()
	}
	select {
	case err := <-f.answer:
		if err != nil {
			return controlapi.ReportResponse{}, err
		}
		return controlapi.ReportResponse{Acked: req.Events[len(req.Events)-1].Seq}, nil
	case <-ctx.Done():
		return controlapi.ReportResponse{}, ctx.Err()
	}
}

// syncing runs a syncer against f with a fresh outbox; answers go to the
// returned channel.
func syncing(t *testing.T, f controlClient, opts ...func(*syncer)) (*syncer, chan syncResult) {
	t.Helper()
	sp, err := spool.Open(filepath.Join(t.TempDir(), "channel.db"), spool.DefaultLimit)
	if err != nil {
		t.Fatal(err)
	}
	answers := make(chan syncResult)
	s := newSyncer(f, sp, adminapi.ControlStatus{}, answers, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, o := range opts {
		o(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.start(ctx)
	t.Cleanup(func() { cancel(); s.close() })
	return s, answers
}

// nextReport waits for the syncer's next report. The tests run in
// synctest bubbles, so the bound is the bubble's time, far below the
// poll's own length (syncWait): a report left for the poll to end fails
// here, at once, and never because the machine is slow.
func nextReport(t *testing.T, f *fakeControl, what string) controlapi.ReportRequest {
	t.Helper()
	select {
	case r := <-f.reports:
		return r
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: not posted while the poll is held", what)
		return controlapi.ReportRequest{}
	}
}

func kindsOf(r controlapi.ReportRequest) []string {
	var out []string
	for _, e := range r.Events {
		out = append(out, e.Kind)
	}
	return out
}

// An event added while an earlier one is being posted goes out right
// after it, not when the held poll next ends (up to four minutes later).
// Before the fix its wake-up was swallowed by the round that posted the
// first: demo scenario 7's rolled-back bundle, rejected on the same tick
// as a refused-flows report, was never reported in time.
func TestEventDuringAReportIsNotLeftForThePoll(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeControl()
		s, _ := syncing(t, f)
		s.queue(time.Now(), "first", "")
		if got := kindsOf(nextReport(t, f, "the first event")); len(got) != 1 || got[0] != "first" {
			t.Fatalf("first report %v", got)
		}
		s.queue(time.Now(), "second", "") // while the first is in flight
		f.answer <- nil
		if got := kindsOf(nextReport(t, f, "the event added during the first report")); len(got) != 1 || got[0] != "second" {
			t.Fatalf("second report %v, want [second]", got)
		}
		f.answer <- nil
	})
}

// A report the server does not take stays in the outbox and is posted
// again after a backoff; meanwhile the poll is held, so orders still
// arrive.
func TestRefusedReportIsRetriedWhilePolling(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeControl()
		s, _ := syncing(t, f)
		s.queue(time.Now(), "refused-once", "")
		nextReport(t, f, "the event")
		f.answer <- errors.New("503 service unavailable")
		select {
		case <-f.polls:
		case <-time.After(30 * time.Second):
			t.Fatal("no poll after a failed report: orders would not arrive")
		}
		if got := kindsOf(nextReport(t, f, "the retry")); len(got) != 1 || got[0] != "refused-once" {
			t.Fatalf("retried report %v", got)
		}
		f.answer <- nil
	})
}

// offering is a control server that answers every poll at once with an
// offer (a bundle the device will refuse).
type offering struct{ fakeControl }

func (o *offering) Sync(ctx context.Context, _ controlapi.SyncRequest, connected func()) (controlapi.SyncResponse, error) {
	connected()
	return controlapi.SyncResponse{Bundle: []byte("forged")}, ctx.Err()
}

// A server that offers one refused bundle after another gets ever slower
// answers from the device: after each refused offer the syncer pauses,
// twice as long each time up to a minute, so the device cannot be made to
// refuse, and audit, thousands a second (4,140 in 10 s, before).
func TestRefusedOffersArePaced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &offering{*newFakeControl()}
		pauses := make(chan time.Duration)
		_, answers := syncing(t, f, func(s *syncer) {
			s.sleep = func(ctx context.Context, d time.Duration) bool {
				select {
				case pauses <- d:
					return true
				case <-ctx.Done():
					return false
				}
			}
		})
		want := backoffFirst
		for i := range 9 {
			res := <-answers
			res.done <- true // refused
			d := <-pauses
			if d < want/2 || d > want*3/2 {
				t.Fatalf("pause %d after a refused offer: %s, want about %s", i, d, want)
			}
			want = min(2*want, backoffMax)
		}
	})
}
