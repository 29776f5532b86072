package server

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Bounds on what a caller without a client certificate can make the
// server hold or do. Devices and operators present certificates, so none
// of these limit them; they are what keeps an unauthenticated flood from
// taking the kill-switch down with the server.
const (
	// unauthPerIP and unauthTotal bound the TLS connections without a
	// client certificate held open at once, per address and in all.
	unauthPerIP = 16
	unauthTotal = 512
	// failuresPerMinute and failureBurst bound the failed unauthenticated
	// requests (refused enrolments) one address may make; beyond them it
	// is answered 429 before any work.
	failuresPerMinute = 10
	failureBurst      = 20
	// sourcesTracked bounds the addresses the failure limiter remembers.
	sourcesTracked = 10000
	// refusalWindow is how often refused enrolments are audited, as one
	// summary row, not one row each.
	refusalWindow = time.Minute
)

// errTooManyUnauthenticated refuses a TLS handshake without a client
// certificate over the per-address or total bound.
var errTooManyUnauthenticated = errors.New("too many connections without a client certificate")

// gate counts the open connections without a client certificate, by
// address.
type gate struct {
	mu    sync.Mutex
	byIP  map[netip.Addr]int
	conns map[string]netip.Addr // remote ip:port of each counted connection
	total int
}

func newGate() *gate {
	return &gate{byIP: map[netip.Addr]int{}, conns: map[string]netip.Addr{}}
}

// admit counts a connection from remote that presented no certificate, or
// refuses it over the bounds.
func (g *gate) admit(remote net.Addr) error {
	ap, err := netip.ParseAddrPort(remote.String())
	if err != nil {
		return fmt.Errorf("%w: address %s", errTooManyUnauthenticated, remote)
	}
	ip := ap.Addr().Unmap()
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, counted := g.conns[remote.String()]; counted {
		return nil
	}
	if g.byIP[ip] >= unauthPerIP || g.total >= unauthTotal {
		return errTooManyUnauthenticated
	}
	g.byIP[ip]++
	g.total++
	g.conns[remote.String()] = ip
	return nil
}

// release forgets a closed connection, if it was counted.
func (g *gate) release(remote string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	ip, ok := g.conns[remote]
	if !ok {
		return
	}
	delete(g.conns, remote)
	g.total--
	if g.byIP[ip]--; g.byIP[ip] <= 0 {
		delete(g.byIP, ip)
	}
}

// refusals rate-limits failed unauthenticated requests per address and
// aggregates them for the audit log.
type refusals struct {
	mu      sync.Mutex
	limits  map[netip.Addr]*source
	reasons map[string]int     // refusals by reason in this window
	sources map[netip.Addr]int // refusals by address in this window
	since   time.Time          // the window's start
	now     func() time.Time
}

type source struct {
	limiter *rate.Limiter
	seen    time.Time
}

func newRefusals(now func() time.Time) *refusals {
	return &refusals{limits: map[netip.Addr]*source{}, reasons: map[string]int{}, sources: map[netip.Addr]int{}, since: now(), now: now}
}

// allow reports whether ip may make another unauthenticated request:
// false once its failures exhausted its budget.
func (r *refusals) allow(ip netip.Addr) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.limits[ip]
	return !ok || s.limiter.TokensAt(r.now()) >= 1
}

// record counts a failure from ip, for its budget and for the summary.
func (r *refusals) record(ip netip.Addr, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	s, ok := r.limits[ip]
	if !ok {
		if len(r.limits) >= sourcesTracked {
			r.forgetOldestLocked()
		}
		s = &source{limiter: rate.NewLimiter(rate.Every(time.Minute/failuresPerMinute), failureBurst)}
		r.limits[ip] = s
	}
	s.seen = now
	s.limiter.AllowN(now, 1)
	r.reasons[reason]++
	r.sources[ip]++
}

// forgetOldestLocked drops the address not seen for longest.
func (r *refusals) forgetOldestLocked() {
	var oldest netip.Addr
	var at time.Time
	for ip, s := range r.limits {
		if !oldest.IsValid() || s.seen.Before(at) {
			oldest, at = ip, s.seen
		}
	}
	delete(r.limits, oldest)
}

// summary ends the window: the audit detail of what was refused in it
// ("" when nothing was), by reason and by the busiest addresses, in a
// fixed order.
func (r *refusals) summary() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer func() {
		r.reasons, r.sources, r.since = map[string]int{}, map[netip.Addr]int{}, r.now()
	}()
	total := 0
	var reasons []string
	for _, reason := range slices.Sorted(maps.Keys(r.reasons)) {
		total += r.reasons[reason]
		reasons = append(reasons, fmt.Sprintf("%s: %d", reason, r.reasons[reason]))
	}
	if total == 0 {
		return ""
	}
	ips := slices.SortedFunc(maps.Keys(r.sources), func(a, b netip.Addr) int {
		return cmp.Or(cmp.Compare(r.sources[b], r.sources[a]), a.Compare(b))
	})
	var top []string
	for _, ip := range ips[:min(len(ips), 5)] {
		top = append(top, fmt.Sprintf("%s (%d)", ip, r.sources[ip]))
	}
	return fmt.Sprintf("%d refused since %s from %d addresses (%s); the most from %s",
		total, r.since.UTC().Format(time.RFC3339), len(ips), strings.Join(reasons, ", "), strings.Join(top, ", "))
}

// remoteIP is the address a request came from.
func remoteIP(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
