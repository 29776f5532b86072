// Package command owns the orders security operations send a device:
// quarantine, diagnostic, release, revoke-partner and reinstate-partner.
// A command is a DSSE envelope with an id, a target, an issue time and a
// short expiry. Verify checks who signed it; Decide says whether this
// device, in its current state, obeys it and what its sticky state becomes.
// The ratchet lives here: the control server's own key may only tighten;
// loosening needs the ops keys. So does the since rule: a lifting order
// lifts only what was imposed before it was issued, which is what lets a
// device back from a long absence apply a release past its expiry while a
// captured old release stays useless against a later quarantine. Effect is
// the same judgement without time or target, for control to fold the
// orders in force into what each device should hold. Remembering ids
// against replay is the store's job. Pure: no I/O.
package command

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/envelope"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// PayloadType marks a DSSE envelope as a Bulkhead command.
const PayloadType = "application/vnd.bulkhead.command+json"

// MaxLifetime bounds expires_at - issued_at. A command is an order for
// now; lasting state belongs in a policy bundle.
const MaxLifetime = time.Hour

// Kind is what a command orders.
type Kind string

// The kinds.
const (
	Quarantine       Kind = "quarantine"
	Diagnostic       Kind = "diagnostic"
	Release          Kind = "release"
	RevokePartner    Kind = "revoke-partner"
	ReinstatePartner Kind = "reinstate-partner"
)

// Kinds lists every kind.
var Kinds = []Kind{Quarantine, Diagnostic, Release, RevokePartner, ReinstatePartner}

// Loosens reports whether the kind can only open access, and so needs the
// ops keys.
func (k Kind) Loosens() bool { return k == Release || k == ReinstatePartner }

func (k Kind) partner() bool { return k == RevokePartner || k == ReinstatePartner }

// Errors a caller may test for with errors.Is.
var (
	ErrInvalid     = errors.New("invalid command")
	ErrRatchet     = errors.New("the control server's key may only tighten")
	ErrWrongTarget = errors.New("command is for other devices")
	ErrExpired     = errors.New("command expired")
	ErrNotYetValid = errors.New("command not yet valid")
	// ErrImposedLater: a lifting order issued before what it would lift
	// was imposed (a captured release replayed against a new incident).
	ErrImposedLater = errors.New("what it would lift was imposed after it was issued")
)

// Target names the devices a command is for: every device, or those of
// the classes or with the ids.
type Target struct {
	All     bool     `json:"all,omitzero"`
	Classes []string `json:"classes,omitzero"`
	Devices []string `json:"devices,omitzero"`
}

// Matches reports whether dev is targeted.
func (t Target) Matches(dev bundle.Device) bool {
	return t.All || bundle.Target{Classes: t.Classes, Devices: t.Devices}.Matches(dev)
}

// Covers reports whether every device o names is named by t too.
func (t Target) Covers(o Target) bool {
	if t.All {
		return true
	}
	if o.All {
		return false
	}
	for _, c := range o.Classes {
		if !slices.Contains(t.Classes, c) {
			return false
		}
	}
	for _, d := range o.Devices {
		if !slices.Contains(t.Devices, d) {
			return false
		}
	}
	return true
}

func (t Target) String() string {
	if t.All {
		return "every device"
	}
	return bundle.Target{Classes: t.Classes, Devices: t.Devices}.String()
}

// Command is what gets signed.
type Command struct {
	ID        string    `json:"id"`
	Kind      Kind      `json:"kind"`
	Target    Target    `json:"target"`
	Partner   string    `json:"partner,omitzero"`
	Reason    string    `json:"reason"`
	IssuedAt  time.Time `json:"issued_at"`
	ExpiresAt time.Time `json:"expires_at"`
	// OrderedAt, when set, is when ops imposed the order this command
	// delivers again: control re-signs an order in force, with a fresh
	// short expiry, for each device that does not hold it yet. A later
	// lift is judged against it. Zero means IssuedAt.
	OrderedAt time.Time `json:"ordered_at,omitzero"`
}

// Since is when the order was imposed.
func (c *Command) Since() time.Time {
	if c.OrderedAt.IsZero() {
		return c.IssuedAt
	}
	return c.OrderedAt
}

// Slot is the part of a device's sticky state the command sets: its mode,
// or one partner's revocation.
func (c *Command) Slot() string {
	if c.Kind.partner() {
		return localpolicy.PartnerSlot(c.Partner)
	}
	return localpolicy.SlotMode
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{7,63}$`)

// Validate checks the command on its own, before any signature matters.
func (c *Command) Validate() error {
	var errs []string
	if !slices.Contains(Kinds, c.Kind) {
		errs = append(errs, fmt.Sprintf("kind %q is not one of %v", c.Kind, Kinds))
	}
	if !idPattern.MatchString(c.ID) {
		errs = append(errs, fmt.Sprintf("id %q must be 8-64 letters, digits, '.', '_' or '-'", c.ID))
	}
	if !c.Target.All && len(c.Target.Classes) == 0 && len(c.Target.Devices) == 0 {
		errs = append(errs, "the target names no device, no class, and not all devices")
	}
	if c.Kind.partner() != (c.Partner != "") {
		if c.Partner == "" {
			errs = append(errs, fmt.Sprintf("%s needs a partner", c.Kind))
		} else {
			errs = append(errs, fmt.Sprintf("%s takes no partner", c.Kind))
		}
	}
	if strings.TrimSpace(c.Reason) == "" || len(c.Reason) > 500 {
		errs = append(errs, "reason must be given, at most 500 bytes")
	}
	switch life := c.ExpiresAt.Sub(c.IssuedAt); {
	case c.IssuedAt.IsZero() || life <= 0:
		errs = append(errs, "expires_at must be after issued_at")
	case life > MaxLifetime:
		errs = append(errs, fmt.Sprintf("lifetime %v exceeds the maximum %v", life, MaxLifetime))
	}
	if c.OrderedAt.After(c.IssuedAt) {
		errs = append(errs, "ordered_at must not be after issued_at")
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %s", ErrInvalid, strings.Join(errs, "; "))
	}
	return nil
}

// Verified is a command whose signatures checked out.
type Verified struct {
	Command
	// ByOps is true when the ops keys signed it (met their threshold);
	// false when the control server's key did.
	ByOps bool
}

// Signer names who signed, for audit lines.
func (v *Verified) Signer() string {
	if v.ByOps {
		return "ops keys"
	}
	return "control server key"
}

// Verify checks raw against the ops roots, or else the control server's
// key (nil: none known). A loosening command signed only by the control
// key is refused here, whatever the device's state.
func Verify(raw []byte, ops opskey.Roots, control ed25519.PublicKey) (*Verified, error) {
	signed, err := envelope.Open(raw, PayloadType, ops)
	byOps := err == nil
	if err != nil && control != nil && (errors.Is(err, envelope.ErrUnknownSigner) || errors.Is(err, envelope.ErrThreshold)) {
		roots, rerr := opskey.NewRoots(1, control)
		if rerr != nil {
			return nil, rerr
		}
		if s, cerr := envelope.Open(raw, PayloadType, roots); cerr == nil {
			signed, err = s, nil
		}
	}
	if err != nil {
		return nil, err
	}
	var c Command
	if err := strictjson.Unmarshal(signed.Payload, &c); err != nil {
		return nil, fmt.Errorf("%w: payload: %v", ErrInvalid, err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if !byOps && c.Kind.Loosens() {
		return nil, fmt.Errorf("%w: %s %s is signed by the control server only; it needs the ops keys", ErrRatchet, c.Kind, c.ID)
	}
	return &Verified{Command: c, ByOps: byOps}, nil
}

// Decide says what st becomes when dev obeys v at now, whether that
// changes anything, or why it must not be obeyed. A command must be
// within its validity, except an ops-signed lift: a device away when it
// was issued applies it on return, and the since rule keeps it from
// lifting anything imposed after it.
func Decide(v *Verified, st localpolicy.Sticky, now time.Time, dev bundle.Device) (next localpolicy.Sticky, changed bool, err error) {
	if !v.Target.Matches(dev) {
		return st, false, fmt.Errorf("%w: %s targets %s", ErrWrongTarget, v.ID, v.Target)
	}
	if err := Current(v, now); err != nil {
		return st, false, err
	}
	return Effect(st, v.Command, v.ByOps)
}

// Current says why v may not be taken at now, or nil: it must be within
// its validity, except an ops-signed lift (see Decide). A segment gateway
// takes an order for all the devices it names with this check, and
// keeps it.
func Current(v *Verified, now time.Time) error {
	if now.Before(v.IssuedAt.Add(-bundle.ClockSkew)) {
		return fmt.Errorf("%w: %s was issued at %s, after this device's time %s", ErrNotYetValid, v.ID, stamp(v.IssuedAt), stamp(now))
	}
	if !now.Before(v.ExpiresAt) && !(v.ByOps && v.Kind.Loosens()) {
		return fmt.Errorf("%w: %s expired at %s (device time %s)", ErrExpired, v.ID, stamp(v.ExpiresAt), stamp(now))
	}
	return nil
}

var strictness = map[localpolicy.Mode]int{localpolicy.Normal: 0, localpolicy.Diagnostic: 1, localpolicy.Quarantine: 2}

// Effect is what obeying c does to st, judged on everything but time and
// target: byOps says whether the ops keys signed c. changed is false when
// st already holds what c orders (a delivery made again). The control
// key's orders may only tighten; an order lifting or loosening a slot
// must be issued after that slot's order was imposed.
func Effect(st localpolicy.Sticky, c Command, byOps bool) (next localpolicy.Sticky, changed bool, err error) {
	slot := c.Slot()
	held, isHeld := st.Held[slot]
	next = st
	next.RevokedPartners = maps.Clone(st.RevokedPartners)
	next.Held = maps.Clone(st.Held)
	lifted := func(what string) error {
		if isHeld && held.Since.After(c.Since()) {
			return fmt.Errorf("%w: %s %s was issued at %s, before %s (%s) was imposed at %s",
				ErrImposedLater, c.Kind, c.ID, stamp(c.Since()), what, held.Order, stamp(held.Since))
		}
		return nil
	}
	switch c.Kind {
	case Quarantine, Diagnostic:
		mode := localpolicy.Quarantine
		if c.Kind == Diagnostic {
			mode = localpolicy.Diagnostic
		}
		switch {
		case strictness[mode] < strictness[st.Mode] && !byOps:
			return st, false, fmt.Errorf("%w: %s would move this device from %s to %s", ErrRatchet, c.ID, st.Mode, mode)
		case strictness[mode] < strictness[st.Mode]:
			if err := lifted(st.Mode.String()); err != nil {
				return st, false, err
			}
		case mode == st.Mode && isHeld && !held.Since.Before(c.Since()):
			return st, false, nil // this order, or a later one of the same kind, holds it
		}
		next.Mode, next.Reason = mode, c.Reason
		since := c.Since()
		if isHeld && held.Since.After(since) && strictness[mode] >= strictness[st.Mode] {
			since = held.Since
		}
		next.Held = put(next.Held, slot, localpolicy.Held{Order: c.ID, Since: since.UTC()})
	case RevokePartner:
		if _, revoked := st.RevokedPartners[c.Partner]; revoked && isHeld && !held.Since.Before(c.Since()) {
			return st, false, nil
		}
		if next.RevokedPartners == nil {
			next.RevokedPartners = map[string]string{}
		}
		next.RevokedPartners[c.Partner] = c.Reason
		next.Held = put(next.Held, slot, localpolicy.Held{Order: c.ID, Since: c.Since().UTC()})
	case Release, ReinstatePartner:
		if !byOps {
			return st, false, fmt.Errorf("%w: %s %s needs the ops keys", ErrRatchet, c.Kind, c.ID)
		}
		_, revoked := st.RevokedPartners[c.Partner]
		if (c.Kind == Release && st.Mode == localpolicy.Normal) || (c.Kind == ReinstatePartner && !revoked) {
			return st, false, nil // nothing to lift
		}
		what := st.Mode.String()
		if c.Kind == ReinstatePartner {
			what = "the revocation of " + c.Partner
		}
		if err := lifted(what); err != nil {
			return st, false, err
		}
		if c.Kind == Release {
			next.Mode, next.Reason = localpolicy.Normal, ""
		} else {
			delete(next.RevokedPartners, c.Partner)
		}
		delete(next.Held, slot)
	}
	if len(next.RevokedPartners) == 0 {
		next.RevokedPartners = nil
	}
	if len(next.Held) == 0 {
		next.Held = nil
	}
	return next, true, nil
}

func put(m map[string]localpolicy.Held, slot string, h localpolicy.Held) map[string]localpolicy.Held {
	if m == nil {
		m = map[string]localpolicy.Held{}
	}
	m[slot] = h
	return m
}

// Sign validates c and signs it with every key. The ops CLI signs with
// ops keys; the control server signs tightening commands with its own.
func Sign(c Command, keys ...ed25519.PrivateKey) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	body, err := json.Marshal(c, json.Deterministic(true))
	if err != nil {
		return nil, fmt.Errorf("encode command: %w", err)
	}
	return envelope.Sign(PayloadType, body, keys...)
}

// Peek reads the command inside raw without checking any signature: for
// the control server, which routes commands and never obeys them.
func Peek(raw []byte) (Command, error) {
	var c Command
	payload, err := envelope.PeekUnverified(raw, PayloadType)
	if err == nil {
		err = strictjson.Unmarshal(payload, &c)
	}
	if err == nil {
		err = c.Validate()
	}
	return c, err
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }
