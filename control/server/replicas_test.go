package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/jackc/pgx/v5"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/internal/pgrun"
	"github.com/bulkhead-edge/bulkhead/internal/pgrun/pgtest"
)

// replicas are n servers sharing one PostgreSQL database, each following
// the change feed as Serve does, with the same CA, command key and ops
// key copied to each.
func replicas(t *testing.T, n int) ([]*api, *pgrun.Cluster) {
	t.Helper()
	pg := pgtest.Start(t, pgrun.Options{})
	url := pgtest.DB(t, pg)
	first := newAPI(t, time.Hour, func(c *Config) { c.Database = url })
	out := []*api{first}
	for range n - 1 {
		dir := t.TempDir()
		copySecrets(t, first.s.cfg.DataDir, dir)
		cfg := first.s.cfg
		cfg.DataDir = dir
		s, _, err := Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		out = append(out, &api{harness: &harness{s: s, h: s.Handler()}, ops: first.ops, opsKey: first.opsKey})
	}
	for _, a := range out {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { a.s.follow(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	return out, pg
}

// copySecrets copies what replicas share: the CA and the command key.
func copySecrets(t *testing.T, from, to string) {
	t.Helper()
	for _, name := range []string{pki.CertFile, pki.KeyFile, CommandKeyFile} {
		raw, err := os.ReadFile(filepath.Join(from, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, name), raw, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// held is a device's long-poll held by a replica.
type held struct {
	w    flushes
	done chan struct{}
}

func hold(t *testing.T, a *api, dev *x509.Certificate) *held {
	t.Helper()
	return holdWith(t, a, dev, controlapi.DeviceState{})
}

// holdWith is hold for a device reporting st.
func holdWith(t *testing.T, a *api, dev *x509.Certificate, st controlapi.DeviceState) *held {
	t.Helper()
	body, _ := json.Marshal(controlapi.SyncRequest{WaitSeconds: 3600, State: st})
	r := httptest.NewRequest("POST", controlapi.PathSync, bytes.NewReader(body))
	r.TLS = &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{dev}}}
	h := &held{w: flushes{httptest.NewRecorder(), make(chan struct{}, 1)}, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		defer func() {
			// A poll the server ends (its device revoked) is aborted.
			if v := recover(); v != nil && v != http.ErrAbortHandler {
				panic(v)
			}
		}()
		a.h.ServeHTTP(h.w, r)
	}()
	select {
	case <-h.w.flushed: // held
	case <-h.done: // answered at once
	}
	return h
}

// answer is the held poll's answer. The keep-alive is an hour, so only a
// wake-up answers; the bound only turns a hang into a failure.
func (h *held) answer(t *testing.T) controlapi.SyncResponse {
	t.Helper()
	select {
	case <-h.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("the held poll was never woken")
	}
	var resp controlapi.SyncResponse
	decodeOK(t, h.w.ResponseRecorder, &resp)
	return resp
}

// lookedAgain has every poll on s look again, twice, and says whether
// the device's poll is still held (false: it ended). Each catch-up wakes
// every poll; a poll waits again before it looks, so the second wait
// (seen as a new wake-all channel) proves the first look is done.
func lookedAgain(t *testing.T, s *Server, h *held) bool {
	t.Helper()
	for range 2 {
		s.caughtUp()
		for end := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
			if woken(h) {
				return false
			}
			s.waits.mu.Lock()
			waiting := s.waits.all != nil
			s.waits.mu.Unlock()
			if waiting {
				break
			}
			if time.Now().After(end) {
				t.Fatal("the poll neither waited again nor ended")
			}
		}
	}
	return true
}

func woken(h *held) bool {
	select {
	case <-h.done:
		return true
	default:
		return false
	}
}

// An order given on one replica wakes the polls held on every other,
// and only those it targets.
func TestAnOrderReachesPollsHeldByOtherReplicas(t *testing.T) {
	rs, _ := replicas(t, 3)
	dev := rs[0].enrol(t, "scanner")
	other := rs[0].enrol(t, "telematics")
	onB := hold(t, rs[1], dev)
	otherOnB := hold(t, rs[1], other)
	onC := hold(t, rs[2], dev) // the same device, after a failover
	var order controlapi.CommandResponse
	decodeOK(t, rs[2].call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{deviceID(dev)}, Reason: "INC-7"}, rs[2].ops), &order)
	for _, h := range []*held{onB, onC} {
		if resp := h.answer(t); len(resp.Commands) != 1 {
			t.Errorf("a poll held by a replica carried %d commands, want the order", len(resp.Commands))
		}
	}
	// The bundle push after it wakes the telematics poll; had the order
	// woken it, it would have answered empty before.
	decodeOK(t, rs[0].call("POST", controlapi.PathAdminBundles, rs[0].bundle(t, 1, "telematics"), rs[0].ops), nil)
	if resp := otherOnB.answer(t); resp.Bundle == nil || len(resp.Commands) != 0 {
		t.Errorf("the telematics poll answered %d commands and bundle %v: woken by the order, not the bundle", len(resp.Commands), resp.Bundle != nil)
	}
	// Every replica's book and desk agree.
	for i, a := range rs {
		var got controlapi.Order
		decodeOK(t, a.call("GET", controlapi.PathAdminOrders+"/"+order.ID, nil, a.ops), &got)
		if got.ID != order.ID {
			t.Errorf("replica %d shows order %q", i, got.ID)
		}
	}
}

// A device revoked on one replica is refused by every other, though each
// knew it a moment before: the poll each held for it ends, and its next
// sync is refused.
func TestARevocationReachesEveryReplica(t *testing.T) {
	rs, _ := replicas(t, 3)
	dev := rs[0].enrol(t, "scanner")
	var polls []*held
	for _, a := range rs {
		polls = append(polls, hold(t, a, dev))
	}
	decodeOK(t, rs[2].call("POST", controlapi.PathAdminDevices+"/"+deviceID(dev)+"/revoke", controlapi.RevokeRequest{Reason: "stolen truck"}, rs[2].ops), nil)
	for i, h := range polls {
		select {
		case <-h.done:
		case <-time.After(time.Minute):
			t.Fatalf("the poll held on replica %d outlived the device's revocation", i)
		}
	}
	for i, a := range rs {
		if w := a.call("POST", controlapi.PathSync, controlapi.SyncRequest{}, dev); w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "revoked") {
			t.Errorf("replica %d answered a revoked device's sync: %d %s", i, w.Code, w.Body)
		}
	}
}

// An order given while the replica holding a device's poll is gone
// reaches the device on the replica it fails over to.
func TestAnOrderGivenWhileAReplicaIsDownReachesItsDevices(t *testing.T) {
	rs, _ := replicas(t, 3)
	dev := rs[0].enrol(t, "scanner")
	rs[1].s.Close() // the replica it was connected to
	decodeOK(t, rs[2].call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{deviceID(dev)}, Reason: "INC-8"}, rs[2].ops), nil)
	// Its poll on the replica it fails over to carries the order, at once
	// or as soon as that replica hears of it.
	if resp := hold(t, rs[0], dev).answer(t); len(resp.Commands) != 1 {
		t.Errorf("after failover the device was sent %d commands, want the order", len(resp.Commands))
	}
}

// A database restart cuts the change feed; each replica reconnects by
// itself, catches up, and its held polls are woken by orders again.
func TestReplicasFollowAcrossADatabaseRestart(t *testing.T) {
	rs, pg := replicas(t, 2)
	dev := rs[0].enrol(t, "scanner")
	onA := hold(t, rs[0], dev)
	ctx := context.Background()
	if err := pg.Stop(ctx, false); err != nil {
		t.Fatal(err)
	}
	w := rs[1].call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{deviceID(dev)}, Reason: "INC-9"}, rs[1].ops)
	if w.Code < 500 {
		t.Errorf("with the database down an order was answered %d %s; it cannot be committed", w.Code, w.Body)
	}
	// A catch-up while the store is down (the feed's, racing the outage)
	// makes the poll look, and fail to read: it stays held.
	if !lookedAgain(t, rs[0].s, onA) {
		t.Fatal("the held poll ended while the database was down")
	}
	if err := pg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// Reconnected, the feed wakes every poll to look again; this one
	// finds nothing (the order was refused) and stays held.
	decodeOK(t, rs[1].call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{deviceID(dev)}, Reason: "INC-9"}, rs[1].ops), nil)
	resp := onA.answer(t)
	if len(resp.Commands) != 1 {
		t.Errorf("after the restart the held poll carried %d commands, want the order", len(resp.Commands))
	}
}

// A replica cannot join a fleet with another CA or command key: it would
// issue certificates no device trusts, or sign orders none accepts.
func TestAReplicaWithOtherSecretsIsRefused(t *testing.T) {
	rs, _ := replicas(t, 1)
	cfg := rs[0].s.cfg
	cfg.DataDir = t.TempDir()
	if _, _, err := Open(cfg); err == nil || !strings.Contains(err.Error(), "holds no CA") {
		t.Errorf("a replica with an empty data directory: %v, want a refusal", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.DataDir, pki.CertFile)); err == nil {
		t.Error("the refused replica created a CA")
	}
	// Its own CA, made elsewhere.
	other := t.TempDir()
	if _, _, err := pki.LoadOrCreate(other); err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = other
	if _, _, err := Open(cfg); err == nil || !strings.Contains(err.Error(), "not the one the store's fleet uses") {
		t.Errorf("a replica with another CA: %v, want a refusal", err)
	}
	// The right CA and another command key.
	mixed := t.TempDir()
	copySecrets(t, rs[0].s.cfg.DataDir, mixed)
	os.Remove(filepath.Join(mixed, CommandKeyFile))
	cfg.DataDir = mixed
	if _, _, err := Open(cfg); err == nil || !strings.Contains(err.Error(), "command key") {
		t.Errorf("a replica with another command key: %v, want a refusal", err)
	}
}

// A database that fails over to a standby may lose its last commits, and
// then number the next order like one it lost. A replica that heard of
// the lost order must not take the new one as held: after the feed is
// back it reads the whole book again.
func TestAnOrderNumberedLikeALostOneIsNotSkipped(t *testing.T) {
	rs, _ := replicas(t, 2)
	dev := rs[0].enrol(t, "scanner")
	var lost controlapi.CommandResponse
	decodeOK(t, rs[0].call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "quarantine", Devices: []string{deviceID(dev)}, Reason: "INC-10"}, rs[0].ops), &lost)
	seq := rs[0].s.book.find(lost.ID).Seq
	for rs[1].s.book.find(lost.ID) == nil {
		time.Sleep(10 * time.Millisecond) // the other replica hears of it
	}
	ctx := context.Background()
	db, err := pgx.Connect(ctx, rs[0].s.cfg.Database)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(ctx)
	// The failover: the order and its number are gone, and the feed's
	// connections with the old primary.
	if _, err := db.Exec(ctx, "DELETE FROM orders WHERE seq = $1", int64(seq)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(ctx, "UPDATE counters SET value = $1 WHERE name = 'orders'", int64(seq-1)); err != nil {
		t.Fatal(err)
	}
	listeners := func() (n int) {
		if err := db.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'listen%'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if _, err := db.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE 'listen%'"); err != nil {
		t.Fatal(err)
	}
	for listeners() != len(rs) {
		time.Sleep(10 * time.Millisecond) // both replicas follow the feed again
	}
	// The device holds the lost order, as it was delivered before.
	onB := holdWith(t, rs[1], dev, controlapi.DeviceState{Orders: map[string]string{"mode": lost.ID}})
	var next controlapi.CommandResponse
	decodeOK(t, rs[0].call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Kind: "diagnostic", Devices: []string{deviceID(dev)}, Reason: "INC-11"}, rs[0].ops), &next)
	if o := rs[0].s.book.find(next.ID); o == nil || o.Seq != seq {
		t.Fatalf("the new order is %+v in the replica that gave it, not numbered %d", o, seq)
	}
	if resp := onB.answer(t); len(resp.Commands) != 1 {
		t.Errorf("the poll carried %d commands, want the new order", len(resp.Commands))
	}
}
