package server

import (
	"bytes"
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
)

// Replicas. Any number of servers may share one store (pgstore): each
// keeps in memory what every poll reads (the orders in force, the stored
// bundles and trust-root rotations) and follows the store's change feed
// to keep it in step with what the others commit. A change is only a
// hint: the replica reads the store, once per change, and wakes only the
// polls the change concerns. After the feed was lost (a database restart
// or failover), it reads everything again and wakes every poll, since
// changes made meanwhile were not heard.
//
// What a poll itself reads and writes stays off the store's critical
// path too: the records of the devices calling are kept (known.go) and
// forgotten at each change to their enrolment, and the states devices
// report are written in batches (states.go). A revocation is heard like
// an order: within the fan-out, the revoked device's poll ends on every
// replica and its next one is refused.

// seenFlush is how often a replica sharing its store records when its
// devices were last seen, so every replica's desk shows them.
const seenFlush = 30 * time.Second

// catalog is this replica's copy of the stored bundles and rotations:
// small, read by every poll, changed only by pushes.
type catalog struct {
	mu        sync.Mutex
	bundles   []storedBundle // by version
	rotations []storedRoots  // by version
}

type storedBundle struct {
	version uint64
	raw     []byte
	digest  string
	target  bundle.Target
	// unverified is a bundle no root set the server trusted verifies:
	// never offered (loadTrust).
	unverified bool
}

type storedRoots struct {
	version uint64
	raw     []byte
	digest  string
}

func (c *catalog) get() ([]storedBundle, []storedRoots) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bundles, c.rotations
}

func (c *catalog) set(b []storedBundle, r []storedRoots) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.bundles, c.rotations = b, r
}

// bundle is the stored bundle of version.
func (c *catalog) bundle(version uint64) (storedBundle, bool) {
	bs, _ := c.get()
	i, ok := slices.BinarySearchFunc(bs, version, func(b storedBundle, v uint64) int { return cmp.Compare(b.version, v) })
	if !ok {
		return storedBundle{}, false
	}
	return bs[i], true
}

// newest is the highest-version bundle above have that match accepts,
// or nil.
func (c *catalog) newest(have uint64, match func(storedBundle) bool) []byte {
	bs, _ := c.get()
	for i := len(bs) - 1; i >= 0 && bs[i].version > have; i-- {
		if match(bs[i]) {
			return bs[i].raw
		}
	}
	return nil
}

// rootsAbove is the rotations above have, but those refused.
func (c *catalog) rootsAbove(have uint64, refused []string) [][]byte {
	_, rs := c.get()
	var out [][]byte
	for _, r := range rs {
		if r.version > have && !slices.Contains(refused, r.digest) {
			out = append(out, r.raw)
		}
	}
	return out
}

// reload reads the stored rotations and bundles again: the trust root
// follows every rotation, and each bundle is judged against it. A bundle
// already held is not parsed again.
func (s *Server) reload() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	var rotations []storedRoots
	var raws [][]byte
	_, err := s.db.RootsAbove(0, func(raw []byte) bool {
		p, err := bundle.PeekRotation(raw)
		if err != nil {
			s.log.Error("a stored trust-root rotation does not decode; it is not offered", "err", err)
			return true
		}
		rotations = append(rotations, storedRoots{version: p.Version, raw: raw, digest: controlapi.BundleDigest(raw)})
		raws = append(raws, raw)
		return true
	})
	if err != nil {
		return err
	}
	for _, err := range s.trust.reset(s.cfg.Ops, raws) {
		s.log.Error("a stored trust-root rotation does not verify; later ones are not trusted either", "err", err)
	}
	old, _ := s.catalog.get()
	var bundles []storedBundle
	err = s.db.Bundles(func(v uint64, raw []byte) {
		if i, ok := slices.BinarySearchFunc(old, v, func(b storedBundle, v uint64) int { return cmp.Compare(b.version, v) }); ok && bytes.Equal(old[i].raw, raw) {
			b := old[i]
			b.unverified = s.cfg.Ops.Len() > 0 && !s.trust.verifiesUnderAny(raw)
			bundles = append(bundles, b)
			return
		}
		b := storedBundle{version: v, raw: raw, digest: controlapi.BundleDigest(raw)}
		if p, err := bundle.Peek(raw); err == nil {
			b.target = p.Target
		}
		if s.cfg.Ops.Len() > 0 && !s.trust.verifiesUnderAny(raw) {
			s.log.Warn("a stored bundle verifies under none of the ops keys this server trusts; it is not offered to devices (policy withdraw removes it)", "version", v)
			b.unverified = true
		}
		bundles = append(bundles, b)
	})
	if err != nil {
		return err
	}
	s.catalog.set(bundles, rotations)
	return nil
}

// catchUpOrders reads the orders committed since the last one this
// replica holds, adds them to the book and wakes the polls each targets.
func (s *Server) catchUpOrders() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	orders, err := s.db.OrdersAfter(s.book.last())
	if err != nil {
		return err
	}
	for _, o := range orders {
		s.book.add(o)
		s.waits.order(o.Command.Target)
	}
	return nil
}

// follow keeps this replica in step with the store until ctx ends.
func (s *Server) follow(ctx context.Context) {
	if err := s.db.Listen(ctx, s.changed, s.caughtUp); err != nil {
		s.log.Error("change feed ended", "err", err)
	}
}

// changed is one change another replica (or this one) committed.
func (s *Server) changed(c store.Change) {
	switch c.Kind {
	case store.ChangeOrder:
		if err := s.catchUpOrders(); err != nil {
			s.log.Error("read new orders", "seq", c.Seq, "err", err)
		}
	case store.ChangeBundle, store.ChangeRoots:
		if err := s.reload(); err != nil {
			s.log.Error("read bundles and rotations", "err", err)
			return
		}
		if c.Kind == store.ChangeRoots {
			s.waits.everyone()
		} else if b, ok := s.catalog.bundle(c.Seq); ok {
			s.waits.bundle(b.target)
		}
	case store.ChangeRoster:
		s.rosterChanged(c.Device)
	}
}

// reloadOrders reads every order again and makes them the book: after
// the feed was lost, the database may have lost commits too (a failover
// to a standby that had not received them), and an order numbered like
// one it lost would otherwise be taken as held.
func (s *Server) reloadOrders() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	orders, err := s.db.OrdersAfter(0)
	if err != nil {
		return err
	}
	for _, o := range s.book.replace(orders) {
		s.waits.order(o.Command.Target)
	}
	return nil
}

// caughtUp reads everything that may have changed unheard, and wakes
// every poll to look again.
func (s *Server) caughtUp() {
	err := s.reload()
	if err == nil {
		err = s.reloadOrders()
	}
	if err != nil {
		s.log.Error("catch up with the store", "err", err)
	}
	s.known.clear()
	s.waits.everyone()
}

// rosterChanged is a device's enrolment changed (enrolled, rebound or
// revoked, here or on another replica): its record is read again, the
// gateways learn the change, and the device's own poll looks again.
func (s *Server) rosterChanged(id string) {
	s.known.forget(id)
	s.waits.roster(id)
}

// flushSeen records the last-seen times gathered since the previous
// flush, every period (never, when 0) and once when ctx ends.
func (s *Server) flushSeen(ctx context.Context, period time.Duration) {
	var tick <-chan time.Time
	if period > 0 {
		t := time.NewTicker(period)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
		case <-tick:
		}
		s.mu.Lock()
		touched := s.touched
		s.touched = map[string]time.Time{}
		s.mu.Unlock()
		if err := s.db.Touch(touched); err != nil {
			s.log.Warn("record when devices were last seen", "err", err)
		}
		if ctx.Err() != nil {
			return
		}
	}
}
