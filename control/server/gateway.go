package server

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

// GatewayClass is the class a gateway token gives when it names none: a
// gateway is no policy device, and its own table opens only control and
// its floor (and its segments' tunnel).
const GatewayClass = "segment-gateway"

// rosterBatch bounds the roster entries one answer carries: a new
// gateway of a large fleet takes the roster in a few round trips.
const rosterBatch = 1000

// gatewayUpdate is what a gateway holding have lacks, or nil: the
// devices whose certificate changed since, and every order given since,
// each signed for all the devices it names (lifts as ops signed them).
// The gateway verifies both itself; nothing here is taken on the
// server's word.
func (s *Server) gatewayUpdate(have controlapi.GatewayCursor, now time.Time) (*controlapi.GatewayUpdate, error) {
	u := &controlapi.GatewayUpdate{OrderCursor: have.Orders}
	devs, cursor, more, err := s.db.Roster(have.Roster, rosterBatch)
	if err != nil {
		return nil, err
	}
	u.RosterCursor, u.More = cursor, more
	for _, d := range devs {
		e := controlapi.RosterEntry{ID: d.ID, Certificate: d.Certificate}
		if !d.RevokedAt.IsZero() {
			e = controlapi.RosterEntry{ID: d.ID, Revoked: true}
		}
		u.Roster = append(u.Roster, e)
	}
	orders := slices.SortedFunc(slices.Values(s.book.all()), func(a, b *order) int { return cmp.Compare(a.Seq, b.Seq) })
	for _, o := range orders {
		if o.Seq <= have.Orders {
			continue
		}
		raw, err := s.deliveryFor(o, o.Command.Target, now)
		if err != nil {
			return nil, fmt.Errorf("sign order %s for gateways: %w", o.Command.ID, err)
		}
		u.Orders = append(u.Orders, controlapi.GatewayOrder{Seq: o.Seq, Raw: raw})
		u.OrderCursor = o.Seq
	}
	if len(u.Roster) == 0 && len(u.Orders) == 0 {
		return nil, nil
	}
	return u, nil
}

// revokeDevice takes a device out of every gateway's roster for good, and
// out of control's answers: its certificate opens nothing any more.
func (s *Server) revokeDevice(w http.ResponseWriter, r *http.Request, actor string) {
	var req controlapi.RevokeRequest
	if !decode(w, r, &req) {
		return
	}
	if strings.TrimSpace(req.Reason) == "" || len(req.Reason) > 500 {
		fail(w, http.StatusBadRequest, "a revocation needs a reason (at most 500 bytes)")
		return
	}
	id := r.PathValue("id")
	dev, err := s.db.Revoke(id, req.Reason, actor, s.now())
	switch {
	case errors.Is(err, store.ErrNoDevice):
		fail(w, http.StatusNotFound, err.Error())
		return
	case err != nil:
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	s.log.Info("device revoked", "id", id, "by", actor, "reason", req.Reason)
	s.rosterChanged(id) // gateways drop it now; its own poll ends
	reply(w, s.withSeen(dev))
}
