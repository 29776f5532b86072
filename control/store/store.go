// Package store owns control's state contract: what a control server
// keeps (devices, enrolment tokens, signed bundles and trust-root
// rotations, orders, reports, observed flows, the audit log), the rules
// every backend applies the same way (token checks, address assignment,
// bounds), and the change feed that tells one replica what another
// committed. Two backends implement it: boltstore (one embedded file, one
// process) and pgstore (PostgreSQL, any number of replicas); storetest is
// the conformance suite both pass.
package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/command"
)

// Bounds every backend keeps, so no caller can grow the store without
// limit.
const (
	// FlowsKept bounds the observed flows kept, all classes together: what
	// devices in monitor mode can fill with a scan.
	FlowsKept = 10000
	// FlowsPerDevice bounds the observed flows one device can add: a
	// device reporting junk fills its own share, not the class's.
	FlowsPerDevice = 1000
	// ReportsKept is how many events per device are kept.
	ReportsKept = 1000
	// AuditKept bounds the audit log: each entry past it pushes out the
	// oldest. Sequence numbers keep counting, so a gap at the start shows
	// what was pushed out.
	AuditKept = 100_000
	// MaxAuditDetail bounds one entry's detail.
	MaxAuditDetail = 4 << 10
)

// Errors callers map to answers.
var (
	ErrTokenUnknown = errors.New("enrolment token unknown")
	ErrTokenUsed    = errors.New("enrolment token already used")
	ErrTokenExpired = errors.New("enrolment token expired")
	ErrTokenClass   = errors.New("enrolment token is for another class")
	ErrTokenRole    = errors.New("enrolment token is for another role")
	ErrNoDevice     = errors.New("no such device")
	ErrNoBundle     = errors.New("no such policy bundle")
	ErrPushed       = errors.New("already pushed; sign a higher version")
	ErrOrderGiven   = errors.New("order already given; an order is given once (sign a new one to give it again)")
)

// Token is a one-time enrolment token as kept: only its hash names it.
type Token struct {
	Class     string    `json:"class"`
	Role      string    `json:"role,omitzero"`
	Segments  []string  `json:"segments,omitzero"`
	ExpiresAt time.Time `json:"expires_at"`
	UsedBy    string    `json:"used_by,omitzero"`
}

// Order is an order as kept: the command it was given as, who gave it,
// and the ops-signed envelope when ops signed it. Seq numbers orders in
// the order they were committed.
type Order struct {
	Seq     uint64          `json:"seq"`
	Command command.Command `json:"command"`
	ByOps   bool            `json:"by_ops,omitzero"`
	Raw     []byte          `json:"raw,omitzero"`
	By      string          `json:"by"`
}

// IssueFunc makes the record of a device being enrolled as id with token
// t and tunnel address addr (invalid: none), inside the enrolment: an
// error undoes it.
type IssueFunc func(id string, t Token, addr netip.Addr) (controlapi.Device, error)

// Store is control's state. Every write that ops or a device can cause
// is audited in the same transaction, and every method is safe for
// concurrent use. Callbacks run inside a read and must not call back.
type Store interface {
	// NewToken stores a one-time token and returns it.
	NewToken(class, role string, segments []string, ttl time.Duration, now time.Time, actor string) (controlapi.TokenResponse, error)
	// CheckToken says, reading only, whether tok would enrol a device of
	// class (a gateway of segments) now.
	CheckToken(tok, class string, segments []string, now time.Time) error
	// Enroll spends the token, assigns the device an address from pool
	// (when valid) and records the device, all or nothing.
	Enroll(tok, class string, segments []string, pool netip.Prefix, now time.Time, issue IssueFunc) (controlapi.Device, error)

	Device(id string) (controlapi.Device, error)
	Devices() ([]controlapi.Device, error)
	// DeviceClasses is every enrolled device's class (revoked ones too),
	// by id: what an order names and targets, without whole records.
	DeviceClasses() (map[string]string, error)
	// SetStates records the state each device last reported, as of now,
	// in one write: a device whose stored state is the same is left as it
	// is, and one not enrolled here is skipped.
	SetStates(states map[string]controlapi.DeviceState, now time.Time) error
	// Touch records when devices were last seen; a time not after the
	// stored one changes nothing.
	Touch(seen map[string]time.Time) error
	// Rebind records a device's new certificate and tunnel key under a
	// new rev; a changed key is audited.
	Rebind(id, wgKey string, der []byte, now time.Time) error
	// Revoke marks a device revoked under a new rev; revoking one already
	// revoked changes nothing.
	Revoke(id, why, actor string, now time.Time) (controlapi.Device, error)
	// Roster is, in rev order, up to limit devices (gateways left out)
	// with a certificate or revoked, whose rev is above after; cursor is
	// the last one's rev (after, when none), more says others follow.
	Roster(after uint64, limit int) (devs []controlapi.Device, cursor uint64, more bool, err error)

	// PushBundle stores a signed bundle under its version; a version
	// already pushed is ErrPushed.
	PushBundle(version uint64, raw []byte, now time.Time, actor, target string) error
	// WithdrawBundle removes a stored bundle; ErrNoBundle if none.
	WithdrawBundle(version uint64, now time.Time, actor, why string) error
	Bundle(version uint64) ([]byte, error)
	// Bundles calls fn with every stored bundle, oldest version first.
	Bundles(fn func(version uint64, raw []byte)) error
	// NewestBundle is the highest-version bundle above have that match
	// accepts, or nil.
	NewestBundle(have uint64, match func(version uint64, raw []byte) bool) ([]byte, error)

	// PushRoots stores a signed trust-root rotation under its version; a
	// version already pushed is ErrPushed.
	PushRoots(version uint64, raw []byte, now time.Time, actor string) error
	// RootsAbove is the rotations above have, oldest first, leaving out
	// those skip rejects.
	RootsAbove(have uint64, skip func(raw []byte) bool) ([][]byte, error)

	// AddOrder numbers o, stores it and audits it with detail; o is
	// committed when it returns nil. An order whose command ID was given
	// before is ErrOrderGiven.
	AddOrder(o *Order, now time.Time, detail string) error
	// OrdersAfter is every order numbered above seq, in number order.
	OrdersAfter(seq uint64) ([]*Order, error)

	// AddReports stores events not seen before and returns the highest
	// seq of them (the acknowledgement); the observed flows of a flows
	// event are those accepted returns.
	AddReports(id string, req controlapi.ReportRequest, accepted func(controlapi.Event) []controlapi.ObservedFlow) (uint64, error)
	// Reports is the device's newest n events, oldest first.
	Reports(id string, n int) ([]controlapi.Event, error)
	// Flows lists the observed flows of a class.
	Flows(class string) ([]controlapi.ObservedFlow, error)

	// Audit appends one entry.
	Audit(now time.Time, actor, action, detail string) error
	// AuditPage is up to limit entries after seq after, oldest first,
	// and the seq to ask after for the next page (0: none left).
	AuditPage(after uint64, limit int) ([]controlapi.AuditEntry, uint64, error)

	// Claim records value under name unless a value is recorded there
	// already, and returns what is recorded (value "" only reads): how
	// replicas agree on what must be the same for all of them.
	Claim(name, value string) (string, error)

	// Listen calls changed with each change another process committed,
	// and caughtUp whenever changes may have been missed (at the start,
	// and after a lost connection is back), until ctx ends. A backend
	// only one process can open has no other writer, and only waits.
	Listen(ctx context.Context, changed func(Change), caughtUp func()) error

	Close() error
}

// Change is what one replica tells the others it committed: a hint to
// read the store, never the data itself.
type Change struct {
	Kind ChangeKind
	// Seq is the order's number (ChangeOrder) or the bundle's version
	// (ChangeBundle, ChangeRoots).
	Seq uint64
	// Device is the device whose enrolment changed (ChangeRoster).
	Device string
}

// ChangeKind says what changed.
type ChangeKind string

const (
	ChangeOrder  ChangeKind = "order"
	ChangeBundle ChangeKind = "bundle"
	ChangeRoots  ChangeKind = "roots"
	ChangeRoster ChangeKind = "roster"
)

// String is the change as a notification payload: "order 12".
func (c Change) String() string {
	if c.Kind == ChangeRoster {
		return string(c.Kind) + " " + c.Device
	}
	return fmt.Sprintf("%s %d", c.Kind, c.Seq)
}

// ParseChange reads a notification payload.
func ParseChange(s string) (Change, error) {
	kind, arg, ok := strings.Cut(s, " ")
	c := Change{Kind: ChangeKind(kind)}
	switch {
	case !ok || arg == "":
		return c, fmt.Errorf("change %q: no argument", s)
	case c.Kind == ChangeRoster:
		c.Device = arg
		return c, nil
	case c.Kind == ChangeOrder, c.Kind == ChangeBundle, c.Kind == ChangeRoots:
		_, err := fmt.Sscan(arg, &c.Seq)
		if err != nil {
			return c, fmt.Errorf("change %q: %w", s, err)
		}
		return c, nil
	}
	return c, fmt.Errorf("change %q: unknown kind", s)
}

// SameState reports whether two reported states say the same.
func SameState(a, b controlapi.DeviceState) bool {
	x, _ := json.Marshal(a, json.Deterministic(true))
	y, _ := json.Marshal(b, json.Deterministic(true))
	return string(x) == string(y)
}

// HashToken is what names a token in the store.
func HashToken(t string) []byte { s := sha256.Sum256([]byte(t)); return s[:] }

// RandomID is prefix and n random bytes in hex.
func RandomID(prefix string, n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// NewTokenValue makes a token and what is kept of it.
func NewTokenValue(class, role string, segments []string, ttl time.Duration, now time.Time) (controlapi.TokenResponse, Token) {
	resp := controlapi.TokenResponse{Token: RandomID("bht_", 20), Class: class, Role: role, Segments: segments, ExpiresAt: now.Add(ttl).UTC()}
	return resp, Token{Class: class, Role: role, Segments: segments, ExpiresAt: resp.ExpiresAt}
}

// TokenDetail is a new token's audit detail.
func TokenDetail(t Token) string {
	detail := fmt.Sprintf("class %s, expires %s", t.Class, t.ExpiresAt.Format(time.RFC3339))
	if t.Role == controlapi.RoleGateway {
		detail = fmt.Sprintf("gateway of %s, %s", strings.Join(t.Segments, ", "), detail)
	}
	return detail
}

// EnrolDetail is an enrolment's audit detail.
func EnrolDetail(t Token, dev controlapi.Device) string {
	detail := fmt.Sprintf("class %s, hostname %q", t.Class, dev.Hostname)
	if t.Role == controlapi.RoleGateway {
		detail = fmt.Sprintf("gateway of %s, %s", strings.Join(t.Segments, ", "), detail)
	}
	if dev.TunnelAddress.IsValid() {
		detail += ", tunnel address " + dev.TunnelAddress.String()
	}
	return detail
}

// TokenUsable is why a token (found says it exists) cannot enrol a device
// of class (a gateway of segments) now, or nil.
func TokenUsable(t Token, found bool, class string, segments []string, now time.Time) error {
	if found && t.UsedBy == "" {
		switch gw := t.Role == controlapi.RoleGateway; {
		case gw && len(segments) == 0:
			return fmt.Errorf("%w: it enrols a gateway of %s; this is a device (a gateway is configured with gateway.segments)", ErrTokenRole, strings.Join(t.Segments, ", "))
		case !gw && len(segments) > 0:
			return fmt.Errorf("%w: it enrols a device of class %s; this is a gateway of %s", ErrTokenRole, t.Class, strings.Join(segments, ", "))
		case gw && !slices.Equal(slices.Sorted(slices.Values(segments)), t.Segments):
			return fmt.Errorf("%w: it enrols a gateway of %s; this gateway fronts %s", ErrTokenRole, strings.Join(t.Segments, ", "), strings.Join(segments, ", "))
		}
	}
	switch {
	case !found:
		return ErrTokenUnknown
	case t.UsedBy != "":
		return fmt.Errorf("%w (by device %s)", ErrTokenUsed, t.UsedBy)
	case !now.Before(t.ExpiresAt):
		return fmt.Errorf("%w at %s", ErrTokenExpired, t.ExpiresAt.Format(time.RFC3339))
	case class != "" && t.Class != class:
		return fmt.Errorf("%w: it is for class %q, this device is class %q", ErrTokenClass, t.Class, class)
	}
	return nil
}

// NextFree is the address a device enrolling into pool gets: the one
// after highest, the highest taken (invalid: none is), so the pool fills
// in order at the cost of one index read whatever the fleet's size; since
// addresses are never given back, that is the lowest free too. Once the
// pool's end is reached, it is the lowest free below (FirstFree over
// taken), if any is left.
func NextFree(pool netip.Prefix, highest netip.Addr, taken func(yield func(netip.Addr) bool)) (netip.Addr, error) {
	if !highest.IsValid() {
		return FirstFree(pool, func(func(netip.Addr) bool) {})
	}
	if next := highest.Next(); next.IsValid() && pool.Contains(next) && (!next.Is4() || pool.Contains(next.Next())) {
		return next, nil
	}
	return FirstFree(pool, taken)
}

// LastOf is the last address of pool (for IPv4, its broadcast address).
func LastOf(pool netip.Prefix) netip.Addr {
	a := pool.Masked().Addr().AsSlice()
	for i := range a {
		if bit := i * 8; bit+8 > pool.Bits() { // a byte with host bits
			a[i] |= byte(0xff >> max(0, pool.Bits()-bit))
		}
	}
	last, _ := netip.AddrFromSlice(a)
	return last
}

// FirstFree is the lowest address of pool not taken, given taken's
// addresses from the pool's first host upwards in order (it stops at
// the first gap). The network address and, for IPv4, the broadcast
// address are never assigned.
func FirstFree(pool netip.Prefix, taken func(yield func(netip.Addr) bool)) (netip.Addr, error) {
	want := pool.Addr().Next()
	for a := range taken {
		if a != want {
			break
		}
		want = want.Next()
	}
	last := !pool.Contains(want.Next())
	if !want.IsValid() || !pool.Contains(want) || (want.Is4() && last) {
		return netip.Addr{}, fmt.Errorf("the tunnel address pool %s is exhausted; widen it (bulkhead-control serve --tunnel-pool)", pool)
	}
	return want, nil
}

// AuditEntry is an entry as kept, its detail bounded.
func AuditEntry(seq uint64, now time.Time, actor, action, detail string) controlapi.AuditEntry {
	if len(detail) > MaxAuditDetail {
		detail = detail[:MaxAuditDetail] + "… (cut)"
	}
	return controlapi.AuditEntry{Seq: seq, Time: now.UTC(), Actor: actor, Action: action, Detail: detail}
}

// RevokeDetail is a revocation's audit detail.
func RevokeDetail(dev controlapi.Device, why string) string {
	return fmt.Sprintf("%s (class %s): %s", dev.ID, dev.Class, why)
}

// KeyChangeDetail is a rebind's audit detail when the key changed.
func KeyChangeDetail(old, key string) string {
	if old == "" {
		old = "none"
	}
	return fmt.Sprintf("%s replaces %s", key, old)
}

// MergeFlow adds one reported flow into what is kept of it (have; found
// says it was kept before) for device id.
func MergeFlow(have controlapi.ObservedFlow, found bool, f controlapi.ObservedFlow, id string) controlapi.ObservedFlow {
	if !found {
		have = controlapi.ObservedFlow{Flow: f.Flow, First: f.First}
	}
	have.Count += f.Count
	if f.First.Before(have.First) {
		have.First = f.First
	}
	if f.Last.After(have.Last) {
		have.Last = f.Last
	}
	if !slices.Contains(have.Devices, id) {
		have.Devices = append(have.Devices, id)
		slices.Sort(have.Devices)
	}
	return have
}

// RosterPage cuts devices read in rev order after after to a page of
// limit: the page, the cursor to ask after next (after, when empty), and
// whether more follow.
func RosterPage(devs []controlapi.Device, after uint64, limit int) (page []controlapi.Device, cursor uint64, more bool) {
	if len(devs) > limit {
		devs, more = devs[:limit], true
	}
	cursor = after
	if len(devs) > 0 {
		cursor = devs[len(devs)-1].Rev
	}
	return devs, cursor, more
}

// Record is one stored item as a backend keeps it, for moving a whole
// store to another backend (bulkhead-control migrate): the bucket it is
// in, its key and its value, byte for byte as the bbolt backend keys and
// encodes it. A Record with only Bucket and Seq set carries the bucket's
// counter (the last number it gave).
type Record struct {
	Bucket     string
	Key, Value []byte
	Seq        uint64
}

// The buckets a store is made of, as Records name them.
const (
	BucketTokens    = "tokens"    // sha256(token) -> Token
	BucketDevices   = "devices"   // id -> controlapi.Device; Seq: the last rev
	BucketBundles   = "bundles"   // version (8 bytes, big endian) -> signed bundle
	BucketOrders    = "orders"    // seq (8 bytes) -> Order; Seq: the last seq
	BucketReports   = "reports"   // id 0x00 seq (8 bytes) -> controlapi.Event
	BucketAudit     = "audit"     // seq (8 bytes) -> controlapi.AuditEntry; Seq: the last seq
	BucketFlows     = "flows"     // class 0x00 flow (deterministic JSON) -> controlapi.ObservedFlow
	BucketRoots     = "roots"     // version (8 bytes) -> signed trust-root rotation
	BucketAddresses = "addresses" // address (16 bytes) -> device id
	BucketClaims    = "claims"    // name -> value
)
