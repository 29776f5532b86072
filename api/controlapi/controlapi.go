// Package controlapi is the wire contract of the control channel: the
// paths and JSON messages the agent's client and the reference control
// server (control/server) exchange, and how a control CA is pinned. It
// holds no behaviour beyond encoding, so both sides can share it without
// the agent linking any server code.
package controlapi

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Paths. Device paths need a device certificate, admin paths an ops one;
// only enrolment is open (it is authorized by its one-time token).
const (
	PathEnroll = "/v1/enroll"
	PathSync   = "/v1/sync"
	PathReport = "/v1/report"

	PathAdminDevices  = "/v1/admin/devices"  // GET; GET .../ID; POST .../ID/revoke RevokeRequest
	PathAdminTokens   = "/v1/admin/tokens"   // POST TokenRequest
	PathAdminBundles  = "/v1/admin/bundles"  // POST a signed bundle
	PathAdminCommands = "/v1/admin/commands" // POST CommandRequest
	PathAdminOrders   = "/v1/admin/orders"   // GET [?all=1]; GET .../ID
	PathAdminAudit    = "/v1/admin/audit"
	PathAdminFlows    = "/v1/admin/flows" // GET ?class=C
)

// URI SANs that say what a client certificate is for, and (WireGuardURIPrefix)
// the tunnel key it binds.
const (
	DeviceURIPrefix    = "bulkhead://device/"
	OpsURIPrefix       = "bulkhead://ops/"
	WireGuardURIPrefix = "bulkhead://wireguard/"
	ClassURIPrefix     = "bulkhead://class/"
)

// TunnelBinding is what a device's certificate binds to its identity for
// the gateways: its WireGuard public key (a URI SAN, WireGuardURIPrefix
// and the key in unpadded base64url), its tunnel address (an IP SAN) and
// its class (a URI SAN, ClassURIPrefix and the class), all recorded at
// enrolment. A gateway that trusts the control CA admits a peer only with
// the key and address its certificate names, to what its class opens.
type TunnelBinding struct {
	Key     policy.Key
	Address netip.Addr
	Class   string
}

// URI is the URI SAN binding the key.
func (b TunnelBinding) URI() string {
	return WireGuardURIPrefix + base64.RawURLEncoding.EncodeToString(b.Key[:])
}

// ClassURI is the URI SAN binding a device's class.
func ClassURI(class string) string { return ClassURIPrefix + class }

// BindingOf reads the tunnel binding of a device certificate: ok is false
// when it binds no key. A certificate naming two keys or two addresses
// binds nothing (an error).
func BindingOf(cert *x509.Certificate) (b TunnelBinding, ok bool, err error) {
	for _, u := range cert.URIs {
		if class, found := strings.CutPrefix(u.String(), ClassURIPrefix); found {
			if b.Class != "" {
				return TunnelBinding{}, false, errors.New("the certificate binds more than one class")
			}
			b.Class = class
			continue
		}
		rest, found := strings.CutPrefix(u.String(), WireGuardURIPrefix)
		if !found {
			continue
		}
		if ok {
			return TunnelBinding{}, false, errors.New("the certificate binds more than one WireGuard key")
		}
		raw, derr := base64.RawURLEncoding.DecodeString(rest)
		if derr != nil || len(raw) != len(b.Key) {
			return TunnelBinding{}, false, fmt.Errorf("the certificate's WireGuard key %q is not 32 bytes of base64url", rest)
		}
		copy(b.Key[:], raw)
		ok = true
	}
	switch len(cert.IPAddresses) {
	case 0:
	case 1:
		a, _ := netip.AddrFromSlice(cert.IPAddresses[0])
		b.Address = a.Unmap()
	default:
		return TunnelBinding{}, false, errors.New("the certificate binds more than one tunnel address")
	}
	return b, ok, nil
}

// MaxWait caps how long the server holds a sync open.
const MaxWait = 10 * time.Minute

// Fingerprint is how a CA certificate is pinned: "SHA256:" and the hex
// SHA-256 of its DER encoding.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return "SHA256:" + hex.EncodeToString(sum[:])
}

// ParseFingerprint normalizes a pinned fingerprint as typed by a person
// (case, colons) or names what is wrong with it.
func ParseFingerprint(s string) (string, error) {
	hexPart, ok := strings.CutPrefix(strings.TrimSpace(s), "SHA256:")
	if !ok {
		return "", fmt.Errorf("CA fingerprint %q must start with SHA256: (as `bulkhead-control serve` prints it)", s)
	}
	hexPart = strings.ToLower(strings.ReplaceAll(hexPart, ":", ""))
	if b, err := hex.DecodeString(hexPart); err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("CA fingerprint %q: want 64 hex digits after SHA256:", s)
	}
	return "SHA256:" + hexPart, nil
}

// Error is every non-2xx answer's body.
type Error struct {
	Error string `json:"error"`
}

// EnrollRequest is what a device sends with its token.
type EnrollRequest struct {
	Token string `json:"token"`
	// Class is the device class the device was configured as; empty
	// takes the class the token was made for.
	Class string `json:"class,omitzero"`
	// Hostname is informational, for the ops desk.
	Hostname string `json:"hostname,omitzero"`
	// CSR is a PKCS#10 request (DER) signed by the device's identity key;
	// the certificate issued is bound to that key.
	CSR []byte `json:"csr"`
	// WireGuardKey is the tunnel's public key (base64), for gateways.
	WireGuardKey string `json:"wireguard_key,omitzero"`
	// Segments, when set, says a segment gateway of these segments is
	// enrolling: the token must be a gateway token for exactly them. A
	// device sends none, and a gateway token does not enrol it.
	Segments []string `json:"segments,omitzero"`
}

// EnrollResponse is what an accepted enrolment returns.
type EnrollResponse struct {
	DeviceID string `json:"device_id"`
	// Certificate is the device's client certificate (DER).
	Certificate []byte `json:"certificate"`
	// CA is the control CA (DER) the fingerprint was checked against.
	CA []byte `json:"ca"`
	// CommandKey is the control server's Ed25519 command-signing key:
	// it may sign commands that tighten, never ones that loosen.
	CommandKey []byte `json:"command_key"`
	// Class is the class the device was enrolled as (the token's).
	Class string `json:"class"`
	// TunnelAddress is the device's tunnel address, assigned from the
	// server's pool and bound in Certificate (none: the server has no
	// pool, and the device's configuration names its address).
	TunnelAddress netip.Addr `json:"tunnel_address,omitzero"`
	// TunnelPool is the pool the address came from: a gateway puts its
	// address on its interface with the pool's length, so every device
	// is on its link.
	TunnelPool netip.Prefix `json:"tunnel_pool,omitzero"`
	// Role and Segments are the token's: a gateway's segments.
	Role     string   `json:"role,omitzero"`
	Segments []string `json:"segments,omitzero"`
	// OpsKeys are the ops public keys (raw Ed25519) and OpsThreshold how
	// many must sign, as the server was told to publish them. The
	// installer pins them in the device's configuration at install; the
	// agent itself trusts only its configuration and signed rotations.
	OpsKeys      [][]byte `json:"ops_keys,omitzero"`
	OpsThreshold int      `json:"ops_threshold,omitzero"`
}

// DeviceState is what the agent enforces, sent with every sync so the ops
// desk sees it as soon as it changes.
type DeviceState struct {
	Mode          localpolicy.Mode  `json:"mode"`
	Why           string            `json:"why,omitzero"`
	PolicyVersion uint64            `json:"policy_version"`
	Revoked       map[string]string `json:"revoked_partners,omitzero"`
	AgentVersion  string            `json:"agent_version,omitzero"`
	// Orders names, for each slot of the device's sticky state
	// (localpolicy.SlotMode, localpolicy.PartnerSlot), the order holding
	// it: control compares it with the orders in force for the device.
	Orders map[string]string `json:"orders,omitzero"`
	// RefusedOrders are the orders control delivered that the device
	// refused, newest last, at most MaxRefusedOrders: control shows them
	// and does not deliver them again while they stand.
	RefusedOrders []OrderRefusal `json:"refused_orders,omitzero"`
}

// OrderRefusal is an order a device refused, and why.
type OrderRefusal struct {
	Order  string `json:"order"`
	Reason string `json:"reason"`
}

// MaxRefusedOrders bounds DeviceState.RefusedOrders.
const MaxRefusedOrders = 16

// SyncRequest asks for anything newer than what the device has; the
// server answers at once if there is something, else after WaitSeconds.
type SyncRequest struct {
	PolicyVersion uint64      `json:"policy_version"`
	WaitSeconds   int         `json:"wait_seconds"`
	State         DeviceState `json:"state"`
	// RootsVersion is the version of the device's trust-root set: the
	// server sends the rotations above it.
	RootsVersion uint64 `json:"roots_version,omitzero"`
	// Refused are the digests (BundleDigest) of bundles (and rotations) the device
	// refused, newest last, at most MaxRefused: the server offers none of
	// them again, so a forged bundle in its store cannot hold the device
	// in a loop of refusals (each one audited, flooding its outbox).
	Refused []string `json:"refused,omitzero"`
	// WireGuardKey is the device's tunnel key now (base64). When the
	// certificate the device presents binds another (`bulkhead
	// rotate-key`), the server records the new key and answers at once
	// with a certificate binding it (SyncResponse.Certificate): gateways
	// learn the key from control, never from the device alone.
	WireGuardKey string `json:"wireguard_key,omitzero"`
	// Gateway is what a segment gateway holds of the roster and the
	// orders; the server answers a gateway's sync with what lies past it.
	// A device that is not a gateway gets nothing for it.
	Gateway *GatewayCursor `json:"gateway,omitzero"`
}

// The roles a token enrols.
const (
	RoleDevice  = "device"
	RoleGateway = "gateway"
)

// GatewayCursor is how far a gateway has taken the roster (Device.Rev)
// and the orders (their sequence numbers).
type GatewayCursor struct {
	Roster uint64 `json:"roster"`
	Orders uint64 `json:"orders"`
}

// GatewayUpdate is what a gateway lacks: devices whose certificate
// changed past its roster cursor, oldest change first, and the orders
// given past its order cursor, in the order they were given. More says
// the roster has more past RosterCursor: sync again at once.
type GatewayUpdate struct {
	Roster       []RosterEntry  `json:"roster,omitzero"`
	RosterCursor uint64         `json:"roster_cursor"`
	Orders       []GatewayOrder `json:"orders,omitzero"`
	OrderCursor  uint64         `json:"order_cursor"`
	More         bool           `json:"more,omitzero"`
}

// RosterEntry is an enrolled device as a gateway learns it: its id and
// its certificate, which binds its class, WireGuard key and tunnel
// address under control's CA. The gateway believes the certificate,
// never the server's word alone.
type RosterEntry struct {
	ID          string `json:"id"`
	Certificate []byte `json:"certificate,omitzero"`
	// Revoked takes the device out of the roster (no certificate).
	Revoked bool `json:"revoked,omitzero"`
}

// RevokeRequest revokes an enrolled device for good.
type RevokeRequest struct {
	Reason string `json:"reason"`
}

// GatewayOrder is an order as a gateway receives it: signed, as a device
// receives it, but for every device the order names.
type GatewayOrder struct {
	Seq uint64 `json:"seq"`
	Raw []byte `json:"raw"`
}

// MaxRefused is how many refused bundle digests a device remembers.
const MaxRefused = 8

// BundleDigest names a bundle by its bytes: sha256, hex.
func BundleDigest(raw []byte) string {
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:])
}

// SyncResponse carries a newer bundle for this device (if any) and the
// orders in force for it that it does not hold yet, as signed envelopes
// the agent verifies.
type SyncResponse struct {
	// Roots are trust-root rotations above the device's RootsVersion,
	// oldest first; the device applies them before Bundle.
	Roots      [][]byte  `json:"roots,omitzero"`
	Bundle     []byte    `json:"bundle,omitzero"`
	Commands   [][]byte  `json:"commands,omitzero"`
	ServerTime time.Time `json:"server_time"`
	// Certificate, when present, replaces the device's client
	// certificate (DER): same identity key and device, binding the
	// tunnel key the device sent and its tunnel address.
	Certificate []byte `json:"certificate,omitzero"`
	// Gateway is a gateway's update (nil: nothing new, or not a gateway).
	Gateway *GatewayUpdate `json:"gateway,omitzero"`
}

// Event is one report from the agent's outbox.
type Event struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Kind   string    `json:"kind"`
	Detail string    `json:"detail,omitzero"`
}

// ReportRequest posts events in order. Dropped counts events the outbox
// had to discard, oldest first, since the last accepted report.
type ReportRequest struct {
	Events  []Event `json:"events"`
	Dropped uint64  `json:"dropped,omitzero"`
}

// ReportResponse acknowledges every event up to Acked.
type ReportResponse struct {
	Acked uint64 `json:"acked"`
}

// TokenRequest makes an enrolment token.
type TokenRequest struct {
	Class      string `json:"class"`
	TTLSeconds int64  `json:"ttl_seconds"`
	// Role is RoleDevice (the default) or RoleGateway: a gateway token
	// names the segments the gateway fronts.
	Role     string   `json:"role,omitzero"`
	Segments []string `json:"segments,omitzero"`
	// AllowUnknownClass issues a token for a class no stored policy
	// defines (a policy for it is still to come).
	AllowUnknownClass bool `json:"allow_unknown_class,omitzero"`
}

// TokenResponse is the token, shown once.
type TokenResponse struct {
	Token     string    `json:"token"`
	Class     string    `json:"class"`
	Role      string    `json:"role,omitzero"`
	Segments  []string  `json:"segments,omitzero"`
	ExpiresAt time.Time `json:"expires_at"`
}

// CommandRequest gives an order. Signed, when set, is a command the ops
// keys signed; otherwise the server builds the command from the other
// fields and signs it with its own key, which it does only for orders
// that tighten. DryRun names the devices it would cover and records
// nothing.
type CommandRequest struct {
	Signed  []byte   `json:"signed,omitzero"`
	Kind    string   `json:"kind,omitzero"`
	Devices []string `json:"devices,omitzero"`
	Classes []string `json:"classes,omitzero"`
	All     bool     `json:"all,omitzero"`
	Partner string   `json:"partner,omitzero"`
	Reason  string   `json:"reason,omitzero"`
	DryRun  bool     `json:"dry_run,omitzero"`
}

// CommandResponse names the order and the enrolled devices it covers now.
type CommandResponse struct {
	ID      string   `json:"id"`
	Devices []string `json:"devices"`
	DryRun  bool     `json:"dry_run,omitzero"`
}

// Order is an order at control and where it stands on each device it
// covers.
type Order struct {
	ID        string    `json:"id"`
	Kind      string    `json:"kind"`
	Target    string    `json:"target"`
	Partner   string    `json:"partner,omitzero"`
	Reason    string    `json:"reason"`
	ImposedAt time.Time `json:"imposed_at"`
	By        string    `json:"by"`
	// SignedByOps is true when the ops keys signed it.
	SignedByOps bool `json:"signed_by_ops,omitzero"`
	// InForce is false once a later order superseded it on every device
	// it covers.
	InForce bool          `json:"in_force"`
	Devices []OrderDevice `json:"devices"`
}

// OrderDevice is where an order stands on one device.
type OrderDevice struct {
	Device   string    `json:"device"`
	State    string    `json:"state"`
	Detail   string    `json:"detail,omitzero"`
	LastSeen time.Time `json:"last_seen,omitzero"`
}

// The states of an order on a device. Applied means the device reported
// the order's effect in force, not merely that it was sent.
const (
	OrderApplied    = "applied"
	OrderPending    = "pending"
	OrderRefused    = "refused"
	OrderSuperseded = "superseded"
)

// Device is the ops desk's view of one device.
type Device struct {
	ID           string `json:"id"`
	Class        string `json:"class"`
	Hostname     string `json:"hostname,omitzero"`
	WireGuardKey string `json:"wireguard_key,omitzero"`
	// TunnelAddress is the address control assigned the device's tunnel
	// from its pool (none when the server has no pool).
	TunnelAddress netip.Addr `json:"tunnel_address,omitzero"`
	// Role is RoleGateway for a segment gateway ("" is a device), and
	// Segments the segments it fronts.
	Role     string   `json:"role,omitzero"`
	Segments []string `json:"segments,omitzero"`
	// Certificate is the device's current client certificate (DER):
	// what gateways check its key, address and class against.
	Certificate []byte `json:"certificate,omitzero"`
	// Rev orders the changes gateways must learn: it is set from one
	// server-wide counter whenever the certificate changes or the
	// device is revoked.
	Rev uint64 `json:"rev,omitzero"`
	// RevokedAt is when ops revoked the device (zero: not revoked), and
	// RevokedWhy why: it is out of every gateway's roster and control
	// answers it no more. Only a new enrolment brings it back.
	RevokedAt  time.Time   `json:"revoked_at,omitzero"`
	RevokedWhy string      `json:"revoked_why,omitzero"`
	EnrolledAt time.Time   `json:"enrolled_at"`
	LastSeen   time.Time   `json:"last_seen,omitzero"`
	State      DeviceState `json:"state"`
	// Reports are the latest events, newest last (device show only).
	Reports []Event `json:"reports,omitzero"`
	// ReportsDropped sums what the device's outbox discarded.
	ReportsDropped uint64 `json:"reports_dropped,omitzero"`
	// FlowsAdded counts the observed flows the device added to its
	// class's discovery (bounded per device).
	FlowsAdded int `json:"flows_added,omitzero"`
}

// EventFlows is the report kind whose detail is a JSON array of
// ObservedFlow: what a monitored device opened since its previous such
// report, with the connections counted in that time.
const EventFlows = "flows-observed"

// EventRefused is the report kind whose detail is a JSON array of
// ObservedFlow with a Direction: the connections the device's table
// refused since its previous such report (their first packets, at most
// 20 a second per direction), with the attempts counted in that time.
const EventRefused = "flows-refused"

// Flow is a connection a device opened in monitor mode that no rule of its
// class opened: to Address on Port (0 for protocols without ports) over
// Protocol (tcp, udp, icmp; any for others) in Segment.
type Flow struct {
	// Segment is the monitored segment a flow went to; empty for a
	// refused connection.
	Segment string `json:"segment,omitempty"`
	// Direction is set for a connection the table refused: "out" to
	// Address (and Port), or "in" from Address to the device's Port.
	Direction string          `json:"direction,omitempty"`
	Protocol  policy.Protocol `json:"protocol"`
	Address   netip.Addr      `json:"address"`
	Port      uint16          `json:"port,omitzero"`
}

// Target is where the flow went: address:port, or the address alone.
func (f Flow) Target() string {
	if f.Port == 0 {
		return f.Address.String()
	}
	return netip.AddrPortFrom(f.Address, f.Port).String()
}

// ObservedFlow is a flow, how many new connections made it, and when the
// first and the last were seen. Control's answer also names the devices.
type ObservedFlow struct {
	Flow    `json:",inline"`
	Count   uint64    `json:"count"`
	First   time.Time `json:"first"`
	Last    time.Time `json:"last"`
	Devices []string  `json:"devices,omitzero"`
}

// AuditEntry is one line of the server's audit log.
type AuditEntry struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"`
	Action string    `json:"action"`
	Detail string    `json:"detail"`
}

// AuditPage is one page of the audit log, oldest first; Next is the seq
// to ask after for the next page, 0 when there is none.
type AuditPage struct {
	Entries []AuditEntry `json:"entries"`
	Next    uint64       `json:"next,omitzero"`
}

// ReadResponse reads an answer of at most 64 MiB and decodes it into out,
// or returns the server's refusal as an error carrying its message.
func ReadResponse(resp *http.Response, out any) error {
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("control server: %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(data, out)
}
