package server

import (
	"bytes"
	"cmp"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/go-json-experiment/json"
	bolt "go.etcd.io/bbolt"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

var (
	bucketTokens  = []byte("tokens")  // sha256(token) -> token
	bucketDevices = []byte("devices") // id -> device
	bucketBundles = []byte("bundles") // version -> signed bundle
	bucketOrders  = []byte("orders")  // seq -> order
	bucketReports = []byte("reports") // id 0x00 seq -> event
	bucketAudit   = []byte("audit")   // seq -> audit entry
	bucketFlows   = []byte("flows")   // class 0x00 flow -> observed flow
	bucketRoots   = []byte("roots")   // version -> signed trust-root rotation
)

// flowsKept bounds the observed flows kept, all classes together: what
// devices in monitor mode can fill with a scan.
const flowsKept = 10000

// reportsKept is how many events per device the server keeps.
const reportsKept = 1000

// Errors the handlers map to status codes.
var (
	errTokenUnknown = errors.New("enrolment token unknown")
	errTokenUsed    = errors.New("enrolment token already used")
	errTokenExpired = errors.New("enrolment token expired")
	errTokenClass   = errors.New("enrolment token is for another class")
	errTokenRole    = errors.New("enrolment token is for another role")
	errNoDevice     = errors.New("no such device")
	errNoBundle     = errors.New("no such policy bundle")
)

type token struct {
	Class     string    `json:"class"`
	Role      string    `json:"role,omitzero"`
	Segments  []string  `json:"segments,omitzero"`
	ExpiresAt time.Time `json:"expires_at"`
	UsedBy    string    `json:"used_by,omitzero"`
}

type db struct{ bolt *bolt.DB }

func openDB(path string) (*db, error) {
	b, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w (is another bulkhead-control serve using it?)", path, err)
	}
	err = b.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketTokens, bucketDevices, bucketBundles, bucketOrders, bucketReports, bucketAudit, bucketFlows, bucketRoots, bucketAddresses} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Close()
		return nil, err
	}
	return &db{b}, nil
}

func get[T any](b *bolt.Bucket, key []byte) (T, bool, error) {
	var v T
	raw := b.Get(key)
	if raw == nil {
		return v, false, nil
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		return v, false, fmt.Errorf("stored %s: %w", key, err)
	}
	return v, true, nil
}

func put(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, raw)
}

func u64(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }

func hashToken(t string) []byte { s := sha256.Sum256([]byte(t)); return s[:] }

func randomID(prefix string, n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// auditKept bounds the audit log: each entry past it pushes out the
// oldest, so no caller, authenticated or not, can grow the file without
// bound. Sequence numbers keep counting, so a gap at the start shows what
// was pushed out.
const auditKept = 100_000

// maxAuditDetail bounds one entry's detail.
const maxAuditDetail = 4 << 10

// audit appends one entry in tx.
func audit(tx *bolt.Tx, now time.Time, actor, action, detail string) error {
	b := tx.Bucket(bucketAudit)
	seq, _ := b.NextSequence()
	if len(detail) > maxAuditDetail {
		detail = detail[:maxAuditDetail] + "… (cut)"
	}
	if seq > auditKept {
		if err := b.Delete(u64(seq - auditKept)); err != nil {
			return err
		}
	}
	return put(b, u64(seq), controlapi.AuditEntry{Seq: seq, Time: now.UTC(), Actor: actor, Action: action, Detail: detail})
}

// newToken stores a one-time token and returns it; only its hash is kept.
func (d *db) newToken(class, role string, segments []string, ttl time.Duration, now time.Time, actor string) (controlapi.TokenResponse, error) {
	t := randomID("bht_", 20)
	resp := controlapi.TokenResponse{Token: t, Class: class, Role: role, Segments: segments, ExpiresAt: now.Add(ttl).UTC()}
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		if err := put(tx.Bucket(bucketTokens), hashToken(t), token{Class: class, Role: role, Segments: segments, ExpiresAt: resp.ExpiresAt}); err != nil {
			return err
		}
		detail := fmt.Sprintf("class %s, expires %s", class, resp.ExpiresAt.Format(time.RFC3339))
		if role == controlapi.RoleGateway {
			detail = fmt.Sprintf("gateway of %s, %s", strings.Join(segments, ", "), detail)
		}
		return audit(tx, now, actor, "token-created", detail)
	})
	return resp, err
}

// checkToken reports, reading only, whether tok would enrol a device of
// class now (a gateway of segments, when given): the check that comes
// before any other work.
func (d *db) checkToken(tok, class string, segments []string, now time.Time) error {
	return d.bolt.View(func(tx *bolt.Tx) error {
		t, ok, err := get[token](tx.Bucket(bucketTokens), hashToken(tok))
		if err != nil {
			return err
		}
		return tokenUsable(t, ok, class, segments, now)
	})
}

// tokenUsable is why a token cannot enrol a device of class (a gateway of
// segments) now, or nil.
func tokenUsable(t token, ok bool, class string, segments []string, now time.Time) error {
	if ok && t.UsedBy == "" {
		switch gw := t.Role == controlapi.RoleGateway; {
		case gw && len(segments) == 0:
			return fmt.Errorf("%w: it enrols a gateway of %s; this is a device (a gateway is configured with gateway.segments)", errTokenRole, strings.Join(t.Segments, ", "))
		case !gw && len(segments) > 0:
			return fmt.Errorf("%w: it enrols a device of class %s; this is a gateway of %s", errTokenRole, t.Class, strings.Join(segments, ", "))
		case gw && !slices.Equal(slices.Sorted(slices.Values(segments)), t.Segments):
			return fmt.Errorf("%w: it enrols a gateway of %s; this gateway fronts %s", errTokenRole, strings.Join(t.Segments, ", "), strings.Join(segments, ", "))
		}
	}
	switch {
	case !ok:
		return errTokenUnknown
	case t.UsedBy != "":
		return fmt.Errorf("%w (by device %s)", errTokenUsed, t.UsedBy)
	case !now.Before(t.ExpiresAt):
		return fmt.Errorf("%w at %s", errTokenExpired, t.ExpiresAt.Format(time.RFC3339))
	case class != "" && t.Class != class:
		return fmt.Errorf("%w: it is for class %q, this device is class %q", errTokenClass, t.Class, class)
	}
	return nil
}

// enroll spends the token, assigns the device a tunnel address from pool
// (when valid) and records the device, all or nothing: a refused or
// failed enrolment leaves the token and the pool as they were.
func (d *db) enroll(tok, class string, segments []string, pool netip.Prefix, now time.Time, issue func(id string, t token, addr netip.Addr) (controlapi.Device, error)) (controlapi.Device, error) {
	var dev controlapi.Device
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		tb := tx.Bucket(bucketTokens)
		t, ok, err := get[token](tb, hashToken(tok))
		if err != nil {
			return err
		}
		if err := tokenUsable(t, ok, class, segments, now); err != nil {
			return err
		}
		class = t.Class
		id := randomID("dev-", 6)
		var addr netip.Addr
		if pool.IsValid() {
			if addr, err = assignAddress(tx, pool, id); err != nil {
				return err
			}
		}
		if dev, err = issue(id, t, addr); err != nil {
			return err
		}
		dev.Role, dev.Segments = t.Role, t.Segments
		if dev.Rev, err = tx.Bucket(bucketDevices).NextSequence(); err != nil {
			return err
		}
		t.UsedBy = dev.ID
		if err := put(tb, hashToken(tok), t); err != nil {
			return err
		}
		if err := put(tx.Bucket(bucketDevices), []byte(dev.ID), dev); err != nil {
			return err
		}
		detail := fmt.Sprintf("class %s, hostname %q", class, dev.Hostname)
		if t.Role == controlapi.RoleGateway {
			detail = fmt.Sprintf("gateway of %s, %s", strings.Join(t.Segments, ", "), detail)
		}
		if addr.IsValid() {
			detail += ", tunnel address " + addr.String()
		}
		return audit(tx, now, "device "+dev.ID, "enrolled", detail)
	})
	return dev, err
}

func (d *db) device(id string) (controlapi.Device, error) {
	var dev controlapi.Device
	err := d.bolt.View(func(tx *bolt.Tx) error {
		v, ok, err := get[controlapi.Device](tx.Bucket(bucketDevices), []byte(id))
		if err == nil && !ok {
			err = fmt.Errorf("%w: %s", errNoDevice, id)
		}
		dev = v
		return err
	})
	return dev, err
}

func (d *db) devices() ([]controlapi.Device, error) {
	var out []controlapi.Device
	err := d.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var dev controlapi.Device
			if err := json.Unmarshal(v, &dev); err != nil {
				return fmt.Errorf("stored device %s: %w", k, err)
			}
			out = append(out, dev)
			return nil
		})
	})
	return out, err
}

// roster is, in change order, up to limit devices (gateways left out)
// whose certificate changed after rev, and the rev of the last one
// (after, when none); more says others follow it.
func (d *db) roster(after uint64, limit int) (out []controlapi.Device, cursor uint64, more bool, err error) {
	err = d.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var dev controlapi.Device
			if err := json.Unmarshal(v, &dev); err != nil {
				return fmt.Errorf("stored device %s: %w", k, err)
			}
			if dev.Rev > after && dev.Role != controlapi.RoleGateway && (len(dev.Certificate) > 0 || !dev.RevokedAt.IsZero()) {
				out = append(out, dev)
			}
			return nil
		})
	})
	slices.SortFunc(out, func(a, b controlapi.Device) int { return cmp.Compare(a.Rev, b.Rev) })
	if len(out) > limit {
		out, more = out[:limit], true
	}
	cursor = after
	if len(out) > 0 {
		cursor = out[len(out)-1].Rev
	}
	return out, cursor, more, err
}

// revoke marks a device revoked, for the gateways (a new rev) and for
// the audit; revoking one already revoked changes nothing.
func (d *db) revoke(id, why, actor string, now time.Time) (controlapi.Device, error) {
	var dev controlapi.Device
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		rev, err := tx.Bucket(bucketDevices).NextSequence()
		if err != nil {
			return err
		}
		already := false
		err = updateDeviceIn(tx, id, func(d *controlapi.Device) {
			if already = !d.RevokedAt.IsZero(); !already {
				d.RevokedAt, d.RevokedWhy, d.Rev = now.UTC(), why, rev
			}
			dev = *d
		})
		if err != nil || already {
			return err
		}
		return audit(tx, now, actor, "device-revoked", fmt.Sprintf("%s (class %s): %s", id, dev.Class, why))
	})
	return dev, err
}

// updateDevice applies fn to a stored device.
func (d *db) updateDevice(id string, fn func(*controlapi.Device)) error {
	return d.bolt.Update(func(tx *bolt.Tx) error { return updateDeviceIn(tx, id, fn) })
}

// updateDeviceIn changes device id's record inside tx.
func updateDeviceIn(tx *bolt.Tx, id string, fn func(*controlapi.Device)) error {
	b := tx.Bucket(bucketDevices)
	dev, ok, err := get[controlapi.Device](b, []byte(id))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: %s", errNoDevice, id)
	}
	fn(&dev)
	return put(b, []byte(id), dev)
}

// pushBundle stores a signed bundle under its version; the same version
// twice is refused, as a device would refuse it.
func (d *db) pushBundle(version uint64, raw []byte, now time.Time, actor, target string) error {
	return d.pushVersioned(bucketBundles, "bundle", version, raw, now, actor, "policy-pushed", fmt.Sprintf("version %d for %s", version, target))
}

// pushRoots stores a signed trust-root rotation under its version; the
// same version twice is refused.
func (d *db) pushRoots(version uint64, raw []byte, now time.Time, actor string) error {
	return d.pushVersioned(bucketRoots, "trust-root rotation", version, raw, now, actor, "roots-pushed", fmt.Sprintf("version %d", version))
}

func (d *db) pushVersioned(bucket []byte, what string, version uint64, raw []byte, now time.Time, actor, action, detail string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		if b.Get(u64(version)) != nil {
			return fmt.Errorf("%s version %d was already pushed; sign a higher version", what, version)
		}
		if err := b.Put(u64(version), raw); err != nil {
			return err
		}
		return audit(tx, now, actor, action, detail)
	})
}

// rotations returns every stored trust-root rotation, oldest first.
func (d *db) rotations() ([][]byte, error) {
	return d.rootsAbove(0, func([]byte) bool { return false })
}

// bundles calls fn with every stored bundle's version and bytes, oldest
// first.
func (d *db) bundles(fn func(version uint64, raw []byte)) error {
	return d.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketBundles).ForEach(func(k, v []byte) error {
			fn(binary.BigEndian.Uint64(k), bytes.Clone(v))
			return nil
		})
	})
}

// bundle is the stored bundle of version (nil: none).
func (d *db) bundle(version uint64) ([]byte, error) {
	var out []byte
	err := d.bolt.View(func(tx *bolt.Tx) error {
		out = bytes.Clone(tx.Bucket(bucketBundles).Get(u64(version)))
		return nil
	})
	return out, err
}

// withdrawBundle removes a stored bundle, so no device that lacks it is
// offered it, and audits why; errNoBundle if there is none.
func (d *db) withdrawBundle(version uint64, now time.Time, actor, why string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBundles)
		if b.Get(u64(version)) == nil {
			return fmt.Errorf("%w: version %d", errNoBundle, version)
		}
		if err := b.Delete(u64(version)); err != nil {
			return err
		}
		return audit(tx, now, actor, "policy-withdrawn", fmt.Sprintf("version %d: %s", version, why))
	})
}

// rootsAbove returns the rotations above have, oldest first, leaving out
// those skip rejects: each is signed by the set before it, so a device
// applies them in order.
func (d *db) rootsAbove(have uint64, skip func(raw []byte) bool) ([][]byte, error) {
	var out [][]byte
	err := d.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketRoots).Cursor()
		for k, v := c.Seek(u64(have + 1)); k != nil; k, v = c.Next() {
			if !skip(v) {
				out = append(out, append([]byte(nil), v...))
			}
		}
		return nil
	})
	return out, err
}

// newestBundle returns the highest-version bundle above have that match
// accepts, or nil.
func (d *db) newestBundle(have uint64, match func(version uint64, raw []byte) bool) ([]byte, error) {
	var out []byte
	err := d.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketBundles).Cursor()
		for k, v := c.Last(); k != nil && binary.BigEndian.Uint64(k) > have; k, v = c.Prev() {
			if match(binary.BigEndian.Uint64(k), v) {
				out = append([]byte(nil), v...)
				return nil
			}
		}
		return nil
	})
	return out, err
}

// addOrder stores an order, numbering it, and audits it.
func (d *db) addOrder(o *order, now time.Time, detail string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketOrders)
		o.Seq, _ = b.NextSequence()
		if err := put(b, u64(o.Seq), o); err != nil {
			return err
		}
		return audit(tx, now, o.By, string(o.Command.Kind), detail)
	})
}

// orders returns every stored order, in the order they arrived.
func (d *db) orders() ([]*order, error) {
	var out []*order
	err := d.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketOrders).ForEach(func(k, v []byte) error {
			o := &order{}
			if err := json.Unmarshal(v, o); err != nil {
				return fmt.Errorf("stored order %d: %w", binary.BigEndian.Uint64(k), err)
			}
			out = append(out, o)
			return nil
		})
	})
	return out, err
}

// addReports stores events not seen before and returns the highest seq
// stored for the device (the acknowledgement). The observed flows of a
// flows-observed event are those accepted says may join the class's
// discovery.
func (d *db) addReports(id string, req controlapi.ReportRequest, accepted func(controlapi.Event) []controlapi.ObservedFlow) (uint64, error) {
	var acked uint64
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketReports)
		prefix := append([]byte(id), 0)
		for _, e := range req.Events {
			key := append(append([]byte(nil), prefix...), u64(e.Seq)...)
			if b.Get(key) == nil {
				if err := put(b, key, e); err != nil {
					return err
				}
				if e.Kind == controlapi.EventFlows {
					if err := addFlows(tx, id, accepted(e)); err != nil {
						return err
					}
				}
			}
			acked = max(acked, e.Seq)
		}
		// Keep the newest reportsKept per device.
		var keys [][]byte
		c := b.Cursor()
		for k, _ := c.Seek(prefix); k != nil && len(k) == len(prefix)+8 && string(k[:len(prefix)]) == string(prefix); k, _ = c.Next() {
			keys = append(keys, append([]byte(nil), k...))
		}
		for len(keys) > reportsKept {
			if err := b.Delete(keys[0]); err != nil {
				return err
			}
			keys = keys[1:]
		}
		if req.Dropped == 0 {
			return nil
		}
		db := tx.Bucket(bucketDevices)
		dev, ok, err := get[controlapi.Device](db, []byte(id))
		if err != nil || !ok {
			return err
		}
		dev.ReportsDropped += req.Dropped
		return put(db, []byte(id), dev)
	})
	return acked, err
}

func (d *db) reports(id string, n int) ([]controlapi.Event, error) {
	var out []controlapi.Event
	err := d.bolt.View(func(tx *bolt.Tx) error {
		prefix := append([]byte(id), 0)
		c := tx.Bucket(bucketReports).Cursor()
		for k, v := c.Seek(prefix); k != nil && len(k) == len(prefix)+8 && string(k[:len(prefix)]) == string(prefix); k, v = c.Next() {
			var e controlapi.Event
			if err := json.Unmarshal(v, &e); err != nil {
				return err
			}
			out = append(out, e)
		}
		return nil
	})
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return out, err
}

// auditPage returns up to limit audit entries after seq after, oldest
// first, and the seq to ask after for the next page (0: none left).
func (d *db) auditPage(after uint64, limit int) ([]controlapi.AuditEntry, uint64, error) {
	var out []controlapi.AuditEntry
	var next uint64
	err := d.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		for k, v := c.Seek(u64(after + 1)); k != nil; k, v = c.Next() {
			if len(out) == limit {
				next = out[len(out)-1].Seq
				return nil
			}
			var e controlapi.AuditEntry
			if err := json.Unmarshal(v, &e); err != nil {
				return err
			}
			out = append(out, e)
		}
		return nil
	})
	return out, next, err
}

func (d *db) recordAudit(now time.Time, actor, action, detail string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error { return audit(tx, now, actor, action, detail) })
}

// addFlows merges a device's flows-observed report into its class's
// observed flows: counts add up, first and last widen, devices are
// listed once. A report that does not decode is kept as an event but
// adds nothing.
func addFlows(tx *bolt.Tx, id string, flows []controlapi.ObservedFlow) (err error) {
	if len(flows) == 0 {
		return nil
	}
	devices := tx.Bucket(bucketDevices)
	dev, ok, err := get[controlapi.Device](devices, []byte(id))
	if err != nil || !ok {
		return err
	}
	defer func() {
		if err == nil {
			err = put(devices, []byte(id), dev)
		}
	}()
	b := tx.Bucket(bucketFlows)
	prefix := append([]byte(dev.Class), 0)
	n := b.Stats().KeyN // an estimate is enough for a bound
	for _, f := range flows {
		key, err := json.Marshal(f.Flow, json.Deterministic(true))
		if err != nil {
			return err
		}
		key = append(slices.Clone(prefix), key...)
		have, ok, err := get[controlapi.ObservedFlow](b, key)
		if err != nil {
			return err
		}
		if !ok {
			if n >= flowsKept || dev.FlowsAdded >= flowsPerDevice {
				continue
			}
			n++
			dev.FlowsAdded++
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
		if err := put(b, key, have); err != nil {
			return err
		}
	}
	return nil
}

// flows lists the observed flows of a class.
func (d *db) flows(class string) ([]controlapi.ObservedFlow, error) {
	out := []controlapi.ObservedFlow{}
	err := d.bolt.View(func(tx *bolt.Tx) error {
		prefix := append([]byte(class), 0)
		c := tx.Bucket(bucketFlows).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			var f controlapi.ObservedFlow
			if err := json.Unmarshal(v, &f); err != nil {
				return fmt.Errorf("stored flow %s: %w", k, err)
			}
			out = append(out, f)
		}
		return nil
	})
	return out, err
}
