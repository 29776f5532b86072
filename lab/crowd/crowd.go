// Package crowd is a fleet without the devices: many enrolled members
// that do nothing but hold a long-poll open against the control server,
// the load a real fleet puts on it. Members enrol with one-time tokens and
// sync through agent/controlclient, the same client and TLS the agent
// uses; what they receive is reported, not obeyed (the crowd checks no
// signatures and enforces nothing; it keeps the sticky state the orders
// set and reports which orders it holds, as an agent does, so control
// does not deliver them again). `bulkhead-lab crowd` runs it, and the
// fan-out benchmark reads its events.
package crowd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/agent/controlclient"
	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// Event is one line of the crowd's output.
type Event struct {
	Kind   string `json:"event"` // see the Ev* constants
	Member int    `json:"member,omitzero"`
	// For EvCommand: the command's id and kind, and when it arrived
	// (Unix nanoseconds, taken as the answer was decoded).
	ID      string `json:"id,omitzero"`
	Command string `json:"command,omitzero"`
	At      int64  `json:"at,omitzero"`
	Count   int    `json:"count,omitzero"` // for EvEnrolled
	Error   string `json:"error,omitzero"`
}

// Event kinds.
const (
	EvEnrolled = "enrolled" // every member enrolled; Count of them
	EvHeld     = "held"     // the member's poll is open and waiting
	EvCommand  = "command"  // a command arrived for the member
	EvError    = "error"    // the member's sync failed; it retries in about a second
)

// Options say where the crowd enrols.
type Options struct {
	URL, Fingerprint, Class string
	// Dir holds one directory of enrolment files per member.
	Dir string
	// Wait is what each poll asks the server to hold it for.
	Wait time.Duration
	// Also are other control replicas' endpoints, tried in turn when the
	// one enrolled with does not answer, as an agent tries its policy's.
	Also []netip.AddrPort
}

// Enroll enrols one member per token, a few at a time, and returns their
// clients in token order. Any refusal stops it: a crowd with holes in it
// would measure something else.
func Enroll(ctx context.Context, o Options, tokens []string) ([]*controlclient.Client, error) {
	endpoint, err := controlclient.Endpoint(ctx, o.URL)
	if err != nil {
		return nil, err
	}
	clients := make([]*controlclient.Client, len(tokens))
	errs := make([]error, len(tokens))
	work := make(chan int)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range work {
				clients[i], errs[i] = enrollOne(ctx, o, endpoint, i, tokens[i])
			}
		})
	}
	for i := range tokens {
		work <- i
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return clients, nil
}

func enrollOne(ctx context.Context, o Options, endpoint netip.AddrPort, i int, token string) (*controlclient.Client, error) {
	dir := filepath.Join(o.Dir, fmt.Sprintf("member-%04d", i))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := tunnel.GenerateKey()
	if err != nil {
		return nil, err
	}
	rec, err := controlclient.Enroll(ctx, dir, o.URL, token, o.Fingerprint, controlclient.Who{Class: o.Class}, key.Public().String(), endpoint)
	if err != nil {
		return nil, fmt.Errorf("member %d: %w", i, err)
	}
	c, err := controlclient.New(dir, rec)
	if err == nil {
		c.SetEndpoints(o.Also)
	}
	return c, err
}

// Poll holds one long-poll open per client until ctx ends, writing an
// event to out whenever a poll is held and whenever commands arrive. A
// member re-polls at once after an answer, as the agent does.
//
// Events are written in batches, every eventFlush: a fan-out to 10,000
// members is 20,000 events within a second, and a write for each would
// take CPU from the server being measured. An event's time is taken when
// it happens, not when it is written.
func Poll(ctx context.Context, o Options, clients []*controlclient.Client, out io.Writer) {
	var mu sync.Mutex
	buf := bufio.NewWriter(out)
	emit := func(e Event) {
		line, _ := json.Marshal(e)
		mu.Lock()
		buf.Write(append(line, '\n'))
		mu.Unlock()
	}
	flush := func() {
		mu.Lock()
		buf.Flush()
		mu.Unlock()
	}
	emit(Event{Kind: EvEnrolled, Count: len(clients)})
	starting := make(chan struct{}, startBurst)
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() { member(ctx, o, i, c, emit, starting) })
	}
	tick := time.NewTicker(eventFlush)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-tick.C:
		case <-ctx.Done():
			wg.Wait()
			done = true
		}
		flush()
	}
}

// eventFlush is how often the crowd writes the events gathered.
const eventFlush = 5 * time.Millisecond

// startBurst is how many members open their first connection at once. A
// fleet does not boot in one instant, and a crowd of 14,000 dialling
// together overflows a replica's listen backlog (4,096 here): the SYNs
// beyond it are dropped, every dial times out and fails over, and the
// storm spreads to every replica.
const startBurst = 64

// member polls for client c until ctx ends. Its first poll waits for a
// place among starting, which it gives back once that poll is held or
// has failed.
func member(ctx context.Context, o Options, i int, c *controlclient.Client, emit func(Event), starting chan struct{}) {
	select {
	case starting <- struct{}{}:
	case <-ctx.Done():
		return
	}
	started := false
	start := func() {
		if !started {
			started = true
			<-starting
		}
	}
	defer start()
	var req controlapi.SyncRequest
	var st localpolicy.Sticky
	req.WaitSeconds = int(o.Wait / time.Second)
	for ctx.Err() == nil {
		pctx, cancel := context.WithTimeout(ctx, o.Wait+30*time.Second)
		resp, err := c.Sync(pctx, req, func() { start(); emit(Event{Kind: EvHeld, Member: i}) })
		at := time.Now().UnixNano()
		cancel()
		start()
		if err != nil {
			if ctx.Err() == nil {
				emit(Event{Kind: EvError, Member: i, Error: err.Error()})
				// About a second, jittered as the agent's first retry is:
				// members cut off together do not come back in one wave.
				select {
				case <-ctx.Done():
				case <-time.After(time.Second/2 + rand.N(time.Second)):
				}
			}
			continue
		}
		for _, raw := range resp.Commands {
			cmd, err := command.Peek(raw)
			if err != nil {
				emit(Event{Kind: EvError, Member: i, Error: err.Error()})
				continue
			}
			emit(Event{Kind: EvCommand, Member: i, ID: cmd.ID, Command: string(cmd.Kind), At: at})
			if next, changed, err := command.Effect(st, cmd, cmd.Kind.Loosens()); err == nil && changed {
				st = next
			}
		}
		req.State.Mode, req.State.Revoked, req.State.Orders = st.Mode, st.RevokedPartners, st.Orders()
		if resp.Bundle != nil {
			// Only its version matters: without it, a bundle for the
			// crowd's class would answer every poll at once.
			if p, err := bundle.Peek(resp.Bundle); err == nil {
				req.PolicyVersion = max(req.PolicyVersion, p.Version)
			}
		}
	}
}
