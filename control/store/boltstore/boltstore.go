// Package boltstore keeps control's state in one bbolt file: the default
// for a single site, the demo and `serve --data DIR`. bbolt locks the
// file, so one process serves it; that process is its only writer and it
// has no change feed to follow.
package boltstore

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"maps"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/go-json-experiment/json"
	bolt "go.etcd.io/bbolt"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

var (
	bucketTokens    = []byte(store.BucketTokens)
	bucketDevices   = []byte(store.BucketDevices)
	bucketBundles   = []byte(store.BucketBundles)
	bucketOrders    = []byte(store.BucketOrders)
	bucketReports   = []byte(store.BucketReports)
	bucketAudit     = []byte(store.BucketAudit)
	bucketFlows     = []byte(store.BucketFlows)
	bucketRoots     = []byte(store.BucketRoots)
	bucketAddresses = []byte(store.BucketAddresses)
	bucketClaims    = []byte(store.BucketClaims)
)

// buckets are every bucket, in the order Export gives them.
var buckets = [][]byte{bucketTokens, bucketDevices, bucketBundles, bucketOrders, bucketReports, bucketAudit, bucketFlows, bucketRoots, bucketAddresses, bucketClaims}

// Store is a bbolt-backed store.Store.
type Store struct{ bolt *bolt.DB }

var _ store.Store = (*Store)(nil)

// Open opens (or creates) the file at path.
func Open(path string) (*Store, error) {
	b, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w (is another bulkhead-control serve using it?)", path, err)
	}
	err = b.Update(func(tx *bolt.Tx) error {
		for _, name := range buckets {
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
	return &Store{b}, nil
}

// OpenReadOnly opens the file at path for reading only: what migrate
// reads, with the server stopped.
func OpenReadOnly(path string) (*Store, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, err
	}
	b, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w (stop the bulkhead-control serve using it first)", path, err)
	}
	return &Store{b}, nil
}

// Export calls fn with every record, bucket by bucket, each bucket's
// counter first, in one consistent read.
func (d *Store) Export(fn func(store.Record) error) error {
	return d.bolt.View(func(tx *bolt.Tx) error {
		for _, name := range buckets {
			b := tx.Bucket(name)
			if b == nil {
				continue
			}
			if err := fn(store.Record{Bucket: string(name), Seq: b.Sequence()}); err != nil {
				return err
			}
			err := b.ForEach(func(k, v []byte) error {
				return fn(store.Record{Bucket: string(name), Key: bytes.Clone(k), Value: bytes.Clone(v)})
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// Close releases the file.
func (d *Store) Close() error { return d.bolt.Close() }

func (d *Store) Claim(name, value string) (string, error) {
	var have string
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketClaims)
		if v := b.Get([]byte(name)); v != nil || value == "" {
			have = string(v)
			return nil
		}
		have = value
		return b.Put([]byte(name), []byte(value))
	})
	return have, err
}

// Listen waits for ctx: no other process writes the file.
func (d *Store) Listen(ctx context.Context, _ func(store.Change), caughtUp func()) error {
	caughtUp()
	<-ctx.Done()
	return nil
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

// audit appends one entry in tx.
func audit(tx *bolt.Tx, now time.Time, actor, action, detail string) error {
	b := tx.Bucket(bucketAudit)
	seq, _ := b.NextSequence()
	if seq > store.AuditKept {
		if err := b.Delete(u64(seq - store.AuditKept)); err != nil {
			return err
		}
	}
	return put(b, u64(seq), store.AuditEntry(seq, now, actor, action, detail))
}

func (d *Store) NewToken(class, role string, segments []string, ttl time.Duration, now time.Time, actor string) (controlapi.TokenResponse, error) {
	resp, t := store.NewTokenValue(class, role, segments, ttl, now)
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		if err := put(tx.Bucket(bucketTokens), store.HashToken(resp.Token), t); err != nil {
			return err
		}
		return audit(tx, now, actor, "token-created", store.TokenDetail(t))
	})
	return resp, err
}

func (d *Store) CheckToken(tok, class string, segments []string, now time.Time) error {
	return d.bolt.View(func(tx *bolt.Tx) error {
		t, ok, err := get[store.Token](tx.Bucket(bucketTokens), store.HashToken(tok))
		if err != nil {
			return err
		}
		return store.TokenUsable(t, ok, class, segments, now)
	})
}

func (d *Store) Enroll(tok, class string, segments []string, pool netip.Prefix, now time.Time, issue store.IssueFunc) (controlapi.Device, error) {
	var dev controlapi.Device
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		tb := tx.Bucket(bucketTokens)
		t, ok, err := get[store.Token](tb, store.HashToken(tok))
		if err != nil {
			return err
		}
		if err := store.TokenUsable(t, ok, class, segments, now); err != nil {
			return err
		}
		id := store.RandomID("dev-", 6)
		var addr netip.Addr
		if pool.IsValid() {
			if addr, err = store.NextFree(pool, highest(tx, pool), taken(tx, pool)); err != nil {
				return err
			}
			if err := tx.Bucket(bucketAddresses).Put(addrKey(addr), []byte(id)); err != nil {
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
		if err := put(tb, store.HashToken(tok), t); err != nil {
			return err
		}
		if err := put(tx.Bucket(bucketDevices), []byte(dev.ID), dev); err != nil {
			return err
		}
		return audit(tx, now, "device "+dev.ID, "enrolled", store.EnrolDetail(t, dev))
	})
	return dev, err
}

// taken yields the assigned addresses from pool's first host upwards.
func taken(tx *bolt.Tx, pool netip.Prefix) iter.Seq[netip.Addr] {
	return func(yield func(netip.Addr) bool) {
		c := tx.Bucket(bucketAddresses).Cursor()
		for k, _ := c.Seek(addrKey(pool.Addr().Next())); k != nil; k, _ = c.Next() {
			a := netip.AddrFrom16([16]byte(k))
			if pool.Addr().Is4() {
				a = a.Unmap()
			}
			if !pool.Contains(a) || !yield(a) {
				return
			}
		}
	}
}

// highest is the highest address of pool taken (invalid: none is).
func highest(tx *bolt.Tx, pool netip.Prefix) netip.Addr {
	c := tx.Bucket(bucketAddresses).Cursor()
	last := addrKey(store.LastOf(pool))
	k, _ := c.Seek(last)
	switch {
	case k == nil:
		k, _ = c.Last()
	case !bytes.Equal(k, last):
		k, _ = c.Prev()
	}
	if k == nil {
		return netip.Addr{}
	}
	a := netip.AddrFrom16([16]byte(k))
	if pool.Addr().Is4() {
		a = a.Unmap()
	}
	if !pool.Contains(a) {
		return netip.Addr{}
	}
	return a
}

func addrKey(a netip.Addr) []byte {
	k := a.As16()
	return k[:]
}

func (d *Store) Device(id string) (controlapi.Device, error) {
	var dev controlapi.Device
	err := d.bolt.View(func(tx *bolt.Tx) error {
		v, ok, err := get[controlapi.Device](tx.Bucket(bucketDevices), []byte(id))
		if err == nil && !ok {
			err = fmt.Errorf("%w: %s", store.ErrNoDevice, id)
		}
		dev = v
		return err
	})
	return dev, err
}

func (d *Store) Devices() ([]controlapi.Device, error) {
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

func (d *Store) DeviceClasses() (map[string]string, error) {
	out := map[string]string{}
	err := d.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var dev struct {
				Class string `json:"class"`
			}
			if err := json.Unmarshal(v, &dev); err != nil {
				return fmt.Errorf("stored device %s: %w", k, err)
			}
			out[string(k)] = dev.Class
			return nil
		})
	})
	return out, err
}

func (d *Store) Roster(after uint64, limit int) (out []controlapi.Device, cursor uint64, more bool, err error) {
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
	out, cursor, more = store.RosterPage(out, after, limit)
	return out, cursor, more, err
}

func (d *Store) Revoke(id, why, actor string, now time.Time) (controlapi.Device, error) {
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
		return audit(tx, now, actor, "device-revoked", store.RevokeDetail(dev, why))
	})
	return dev, err
}

func (d *Store) SetStates(states map[string]controlapi.DeviceState, now time.Time) error {
	// Most syncs repeat what is stored: those are found by a read, and
	// only the rest take a write (and its sync to disk).
	var changed []string
	err := d.bolt.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		for _, id := range slices.Sorted(maps.Keys(states)) {
			dev, ok, err := get[controlapi.Device](b, []byte(id))
			if err != nil {
				return err
			}
			if ok && !store.SameState(dev.State, states[id]) {
				changed = append(changed, id)
			}
		}
		return nil
	})
	if err != nil || len(changed) == 0 {
		return err
	}
	return d.bolt.Update(func(tx *bolt.Tx) error {
		for _, id := range changed {
			err := updateDeviceIn(tx, id, func(dev *controlapi.Device) {
				dev.State = states[id]
				if now.After(dev.LastSeen) {
					dev.LastSeen = now.UTC()
				}
			})
			if err != nil && !errors.Is(err, store.ErrNoDevice) {
				return err
			}
		}
		return nil
	})
}

func (d *Store) Touch(seen map[string]time.Time) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		for _, id := range slices.Sorted(maps.Keys(seen)) {
			err := updateDeviceIn(tx, id, func(dev *controlapi.Device) {
				if t := seen[id]; t.After(dev.LastSeen) {
					dev.LastSeen = t.UTC()
				}
			})
			if err != nil && !errors.Is(err, store.ErrNoDevice) {
				return err
			}
		}
		return nil
	})
}

// updateDeviceIn changes device id's record inside tx.
func updateDeviceIn(tx *bolt.Tx, id string, fn func(*controlapi.Device)) error {
	b := tx.Bucket(bucketDevices)
	dev, ok, err := get[controlapi.Device](b, []byte(id))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: %s", store.ErrNoDevice, id)
	}
	fn(&dev)
	return put(b, []byte(id), dev)
}

func (d *Store) Rebind(id, wgKey string, der []byte, now time.Time) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		old := ""
		rev, err := tx.Bucket(bucketDevices).NextSequence()
		if err != nil {
			return err
		}
		err = updateDeviceIn(tx, id, func(dev *controlapi.Device) {
			old = dev.WireGuardKey
			dev.WireGuardKey, dev.Certificate, dev.Rev = wgKey, der, rev
		})
		if err != nil || old == wgKey {
			return err
		}
		return audit(tx, now, "device "+id, "wireguard-key-changed", store.KeyChangeDetail(old, wgKey))
	})
}

func (d *Store) PushBundle(version uint64, raw []byte, now time.Time, actor, target string) error {
	return d.pushVersioned(bucketBundles, "bundle", version, raw, now, actor, "policy-pushed", fmt.Sprintf("version %d for %s", version, target))
}

func (d *Store) PushRoots(version uint64, raw []byte, now time.Time, actor string) error {
	return d.pushVersioned(bucketRoots, "trust-root rotation", version, raw, now, actor, "roots-pushed", fmt.Sprintf("version %d", version))
}

func (d *Store) pushVersioned(bucket []byte, what string, version uint64, raw []byte, now time.Time, actor, action, detail string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		if b.Get(u64(version)) != nil {
			return fmt.Errorf("%s version %d: %w", what, version, store.ErrPushed)
		}
		if err := b.Put(u64(version), raw); err != nil {
			return err
		}
		return audit(tx, now, actor, action, detail)
	})
}

func (d *Store) Bundles(fn func(version uint64, raw []byte)) error {
	return d.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketBundles).ForEach(func(k, v []byte) error {
			fn(binary.BigEndian.Uint64(k), bytes.Clone(v))
			return nil
		})
	})
}

func (d *Store) Bundle(version uint64) ([]byte, error) {
	var out []byte
	err := d.bolt.View(func(tx *bolt.Tx) error {
		out = bytes.Clone(tx.Bucket(bucketBundles).Get(u64(version)))
		return nil
	})
	return out, err
}

func (d *Store) WithdrawBundle(version uint64, now time.Time, actor, why string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBundles)
		if b.Get(u64(version)) == nil {
			return fmt.Errorf("%w: version %d", store.ErrNoBundle, version)
		}
		if err := b.Delete(u64(version)); err != nil {
			return err
		}
		return audit(tx, now, actor, "policy-withdrawn", fmt.Sprintf("version %d: %s", version, why))
	})
}

func (d *Store) RootsAbove(have uint64, skip func(raw []byte) bool) ([][]byte, error) {
	var out [][]byte
	err := d.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketRoots).Cursor()
		for k, v := c.Seek(u64(have + 1)); k != nil; k, v = c.Next() {
			if !skip(v) {
				out = append(out, bytes.Clone(v))
			}
		}
		return nil
	})
	return out, err
}

func (d *Store) NewestBundle(have uint64, match func(version uint64, raw []byte) bool) ([]byte, error) {
	var out []byte
	err := d.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketBundles).Cursor()
		for k, v := c.Last(); k != nil && binary.BigEndian.Uint64(k) > have; k, v = c.Prev() {
			if match(binary.BigEndian.Uint64(k), v) {
				out = bytes.Clone(v)
				return nil
			}
		}
		return nil
	})
	return out, err
}

func (d *Store) AddOrder(o *store.Order, now time.Time, detail string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketOrders)
		err := b.ForEach(func(k, v []byte) error {
			var have store.Order
			if err := json.Unmarshal(v, &have); err != nil {
				return fmt.Errorf("stored order %d: %w", binary.BigEndian.Uint64(k), err)
			}
			if have.Command.ID == o.Command.ID {
				return fmt.Errorf("%s: %w", o.Command.ID, store.ErrOrderGiven)
			}
			return nil
		})
		if err != nil {
			return err
		}
		seq, _ := b.NextSequence()
		stored := *o
		stored.Seq = seq
		if err := put(b, u64(seq), &stored); err != nil {
			return err
		}
		if err := audit(tx, now, o.By, string(o.Command.Kind), detail); err != nil {
			return err
		}
		o.Seq = seq
		return nil
	})
}

func (d *Store) OrdersAfter(seq uint64) ([]*store.Order, error) {
	var out []*store.Order
	err := d.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketOrders).Cursor()
		for k, v := c.Seek(u64(seq + 1)); k != nil; k, v = c.Next() {
			o := &store.Order{}
			if err := json.Unmarshal(v, o); err != nil {
				return fmt.Errorf("stored order %d: %w", binary.BigEndian.Uint64(k), err)
			}
			out = append(out, o)
		}
		return nil
	})
	return out, err
}

func reportKey(id string, seq uint64) []byte {
	return append(append([]byte(id), 0), u64(seq)...)
}

// deviceReports yields the keys of a device's reports, oldest first.
func deviceReports(c *bolt.Cursor, id string) iter.Seq2[[]byte, []byte] {
	prefix := append([]byte(id), 0)
	return func(yield func([]byte, []byte) bool) {
		for k, v := c.Seek(prefix); k != nil && len(k) == len(prefix)+8 && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			if !yield(k, v) {
				return
			}
		}
	}
}

func (d *Store) AddReports(id string, req controlapi.ReportRequest, accepted func(controlapi.Event) []controlapi.ObservedFlow) (uint64, error) {
	var acked uint64
	err := d.bolt.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketReports)
		for _, e := range req.Events {
			key := reportKey(id, e.Seq)
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
		// Keep the newest ReportsKept per device.
		var keys [][]byte
		for k := range deviceReports(b.Cursor(), id) {
			keys = append(keys, bytes.Clone(k))
		}
		for len(keys) > store.ReportsKept {
			if err := b.Delete(keys[0]); err != nil {
				return err
			}
			keys = keys[1:]
		}
		if req.Dropped == 0 {
			return nil
		}
		err := updateDeviceIn(tx, id, func(dev *controlapi.Device) { dev.ReportsDropped += req.Dropped })
		if errors.Is(err, store.ErrNoDevice) {
			return nil
		}
		return err
	})
	return acked, err
}

func (d *Store) Reports(id string, n int) ([]controlapi.Event, error) {
	var out []controlapi.Event
	err := d.bolt.View(func(tx *bolt.Tx) error {
		for _, v := range deviceReports(tx.Bucket(bucketReports).Cursor(), id) {
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

func (d *Store) AuditPage(after uint64, limit int) ([]controlapi.AuditEntry, uint64, error) {
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

func (d *Store) Audit(now time.Time, actor, action, detail string) error {
	return d.bolt.Update(func(tx *bolt.Tx) error { return audit(tx, now, actor, action, detail) })
}

// addFlows merges a device's flows-observed report into its class's
// observed flows.
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
			if n >= store.FlowsKept || dev.FlowsAdded >= store.FlowsPerDevice {
				continue
			}
			n++
			dev.FlowsAdded++
		}
		if err := put(b, key, store.MergeFlow(have, ok, f, id)); err != nil {
			return err
		}
	}
	return nil
}

func (d *Store) Flows(class string) ([]controlapi.ObservedFlow, error) {
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
