// Package store owns the device's offline policy cache: one bbolt file that
// holds the last accepted bundle as its original signed bytes, the highest
// version ever accepted, the trust roots, sticky state set by commands,
// remembered command ids, the latest trusted time, a hash-chained audit
// log, and on a segment gateway control's roster and the orders it took. Every setter writes only when the value changes: these devices live
// on flash that wears out, and an idle agent writes nothing.
package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"github.com/go-json-experiment/json"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/bulkhead-edge/bulkhead/internal/boltfile"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
)

// Errors a caller may test for with errors.Is.
var (
	ErrNoBundle = errors.New("no policy has been accepted yet")
	ErrCorrupt  = errors.New("policy cache is corrupt or was tampered with")
	ErrLocked   = errors.New("policy cache is in use by another process")
	ErrReplay   = errors.New("command id was already used")
)

const schemaVersion = 1

var (
	bucketMeta     = []byte("meta")
	bucketCommands = []byte("commands")
	bucketAudit    = []byte("audit")

	keySchema  = []byte("schema")
	keyBundle  = []byte("bundle")
	keyHighest = []byte("highest_version")
	keyTrusted = []byte("trusted_time")
	keyContact = []byte("last_contact")
	// keyRefusedUpTo is the version a recovered cache refuses up to.
	keyRefusedUpTo = []byte("refused_up_to")
	keySticky      = []byte("sticky")
	keyRoots       = []byte("roots")
	// keyBundleRoots is the root set the cached bundle was accepted
	// under: Load verifies it against that set, so a rotation does not
	// lock a device out of the policy it already runs.
	keyBundleRoots = []byte("bundle_roots")
	keyAuditSeq    = []byte("audit_seq")
	keyAuditTop    = []byte("audit_head")
)

// Store is the open cache, and the one owner of what it holds: the
// bundle, the trust roots, the sticky state, trusted time and the last
// contact. Its methods are safe for concurrent use.
type Store struct {
	db      *bolt.DB
	onAudit func(Event)
	mu      sync.Mutex
	current *currentRoots // decoded trust roots in force; nil: read them
}

type currentRoots struct {
	roots   opskey.Roots
	version uint64
}

// Open opens or creates the cache at path (mode 0600) and checks the file's
// consistency; a damaged file is ErrCorrupt, never an empty cache and never
// a crash (package boltfile). The freelist is written with every commit
// (one more page; commits are rare, and an idle agent makes none), so an
// open reads it instead of rebuilding it; a cache written by an older
// agent, without one, is rebuilt once and written with one from then on.
func Open(path string) (*Store, error) {
	db, err := boltfile.Open(path, &bolt.Options{Timeout: time.Second, FreelistType: bolt.FreelistMapType})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("%w: %s", ErrLocked, path)
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("open policy cache: %w", err)
	case err != nil:
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	s := &Store{db: db}
	if err := s.init(); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

func (s *Store) init() (err error) {
	defer guard(&err)
	var fresh bool
	err = s.db.View(func(tx *bolt.Tx) error {
		for e := range tx.Check() {
			return fmt.Errorf("%w: %v", ErrCorrupt, e)
		}
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			fresh = true
			return nil
		}
		if v := meta.Get(keySchema); len(v) != 8 || binary.BigEndian.Uint64(v) != schemaVersion {
			return fmt.Errorf("%w: unknown cache schema", ErrCorrupt)
		}
		if tx.Bucket(bucketCommands) == nil || tx.Bucket(bucketAudit) == nil {
			return fmt.Errorf("%w: buckets missing", ErrCorrupt)
		}
		return nil
	})
	if err != nil || !fresh {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucket(bucketMeta)
		if err != nil {
			return err
		}
		if _, err := tx.CreateBucket(bucketCommands); err != nil {
			return err
		}
		if _, err := tx.CreateBucket(bucketAudit); err != nil {
			return err
		}
		return meta.Put(keySchema, u64(schemaVersion))
	})
}

// guard turns a panic inside bbolt (it panics on some kinds of page damage)
// into ErrCorrupt, so a damaged cache leads to lockdown, not a crash loop.
func guard(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: %v", ErrCorrupt, r)
	}
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

func (s *Store) view(fn func(meta *bolt.Bucket, tx *bolt.Tx) error) (err error) {
	defer guard(&err)
	return s.db.View(func(tx *bolt.Tx) error { return fn(tx.Bucket(bucketMeta), tx) })
}

func (s *Store) update(fn func(meta *bolt.Bucket, tx *bolt.Tx) error) (err error) {
	defer guard(&err)
	return s.db.Update(func(tx *bolt.Tx) error { return fn(tx.Bucket(bucketMeta), tx) })
}

// Highest is the highest bundle version this device ever accepted, or
// was told to refuse up to (RefuseUpTo): no bundle at or below it is
// accepted again.
func (s *Store) Highest() (uint64, error) {
	var h uint64
	err := s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		var err error
		h, err = highest(meta)
		return err
	})
	return h, err
}

func highest(meta *bolt.Bucket) (uint64, error) {
	accepted, err := getU64(meta, keyHighest)
	if err != nil {
		return 0, err
	}
	refused, err := getU64(meta, keyRefusedUpTo)
	return max(accepted, refused), err
}

// RefuseUpTo makes the cache refuse bundles up to version v, as if it had
// accepted v: a recovered cache refuses what the device already ran past.
// A lower v changes nothing.
func (s *Store) RefuseUpTo(v uint64) error {
	return s.update(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		cur, err := getU64(meta, keyRefusedUpTo)
		if err != nil || v <= cur {
			return err
		}
		return meta.Put(keyRefusedUpTo, u64(v))
	})
}

// Accept caches b as the enforced bundle. The version check is repeated
// inside the write transaction, so two racing accepts cannot roll back.
func (s *Store) Accept(b *bundle.Bundle, now time.Time) error {
	return s.update(func(meta *bolt.Bucket, tx *bolt.Tx) error {
		highest, err := highest(meta)
		if err != nil {
			return err
		}
		if b.Version <= highest {
			return fmt.Errorf("%w: version %d is not above %d, the highest this device has accepted", bundle.ErrRollback, b.Version, highest)
		}
		if err := meta.Put(keyBundle, b.Raw); err != nil {
			return err
		}
		if roots := meta.Get(keyRoots); roots != nil {
			if err := meta.Put(keyBundleRoots, bytes.Clone(roots)); err != nil {
				return err
			}
		}
		if err := meta.Put(keyHighest, u64(b.Version)); err != nil {
			return err
		}
		// The issue time is signed by the ops keys: the device can trust
		// that it is at least that late.
		if err := raiseTrusted(meta, b.IssuedAt); err != nil {
			return err
		}
		return s.appendAudit(tx, now, "bundle-accepted", fmt.Sprintf("version %d for %s, expires %s", b.Version, b.Target, b.ExpiresAt.UTC().Format(time.RFC3339)))
	})
}

// Load reads the cached bundle back and verifies it again from its signed
// bytes: against the root set it was accepted under, when the store
// recorded one, else against the roots in force. A trust-root rotation therefore leaves
// the running policy valid until a bundle signed by the new keys replaces
// it, across restarts. ErrNoBundle means the device never accepted one;
// anything else means the cache cannot be trusted and the device belongs
// in lockdown.
func (s *Store) Load(dev bundle.Device) (*bundle.Bundle, error) {
	var raw, acceptedUnder []byte
	var highest uint64
	err := s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		raw = bytes.Clone(meta.Get(keyBundle))
		acceptedUnder = bytes.Clone(meta.Get(keyBundleRoots))
		var err error
		highest, err = getU64(meta, keyHighest)
		return err
	})
	if err != nil {
		return nil, err
	}
	if raw == nil {
		if highest > 0 {
			return nil, fmt.Errorf("%w: version %d was accepted but the cached bundle is missing", ErrCorrupt, highest)
		}
		return nil, ErrNoBundle
	}
	roots, err := s.acceptedUnder(acceptedUnder)
	if err != nil {
		return nil, err
	}
	b, err := bundle.Verify(raw, roots)
	if err != nil {
		return nil, fmt.Errorf("%w: cached bundle: %w", ErrCorrupt, err)
	}
	if err := b.CheckCached(highest, dev); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return b, nil
}

// acceptedUnder decodes the root set a bundle was accepted under; a cache
// that recorded none (written before rotations) means the roots in force.
func (s *Store) acceptedUnder(enc []byte) (opskey.Roots, error) {
	if enc == nil {
		roots, _, err := s.CurrentRoots()
		return roots, err
	}
	var set bundle.RootSet
	if err := json.Unmarshal(enc, &set); err != nil {
		return opskey.Roots{}, fmt.Errorf("%w: the cached bundle's trust roots: %v", ErrCorrupt, err)
	}
	roots, err := set.Roots()
	if err != nil {
		return opskey.Roots{}, fmt.Errorf("%w: the cached bundle's trust roots: %w", ErrCorrupt, err)
	}
	return roots, nil
}

// TrustedTime is the latest time the device has reason to trust.
func (s *Store) TrustedTime() (time.Time, error) {
	var t time.Time
	err := s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		n, err := getU64(meta, keyTrusted)
		if n > 0 {
			t = time.Unix(0, int64(n)).UTC()
		}
		return err
	})
	return t, err
}

// AdvanceTrustedTime raises the trusted time to t; an earlier t writes
// nothing.
func (s *Store) AdvanceTrustedTime(t time.Time) error {
	cur, err := s.TrustedTime()
	if err != nil || !t.After(cur) {
		return err
	}
	return s.update(func(meta *bolt.Bucket, _ *bolt.Tx) error { return raiseTrusted(meta, t) })
}

func raiseTrusted(meta *bolt.Bucket, t time.Time) error {
	cur, err := getU64(meta, keyTrusted)
	if err != nil {
		return err
	}
	if n := uint64(t.UnixNano()); t.UnixNano() > 0 && n > cur {
		return meta.Put(keyTrusted, u64(n))
	}
	return nil
}

// Contact is the last contact with control the device recorded (zero:
// none yet).
func (s *Store) Contact() (time.Time, error) {
	var t time.Time
	err := s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		n, err := getU64(meta, keyContact)
		if n > 0 {
			t = time.Unix(0, int64(n)).UTC()
		}
		return err
	})
	return t, err
}

// RecordContact raises the recorded last contact to t; an earlier t
// writes nothing. It moves no trusted time: contact only extends how long
// the device may stay offline.
func (s *Store) RecordContact(t time.Time) error {
	return s.update(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		cur, err := getU64(meta, keyContact)
		if err != nil {
			return err
		}
		if n := t.UnixNano(); n > 0 && uint64(n) > cur {
			return meta.Put(keyContact, u64(uint64(n)))
		}
		return nil
	})
}

// Sticky returns the state set by commands.
func (s *Store) Sticky() (localpolicy.Sticky, error) {
	var st localpolicy.Sticky
	err := s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		v := meta.Get(keySticky)
		if v == nil {
			return nil
		}
		if err := json.Unmarshal(v, &st); err != nil {
			return fmt.Errorf("%w: sticky state: %v", ErrCorrupt, err)
		}
		return nil
	})
	return st, err
}

// SetSticky stores st and reports whether it differed from what was stored.
func (s *Store) SetSticky(st localpolicy.Sticky) (changed bool, err error) {
	enc, err := json.Marshal(st, json.Deterministic(true))
	if err != nil {
		return false, err
	}
	return s.putIfChanged(keySticky, enc)
}

// Roots returns the stored trust-root set, if one was stored.
func (s *Store) Roots() (set bundle.RootSet, ok bool, err error) {
	err = s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		v := meta.Get(keyRoots)
		if v == nil {
			return nil
		}
		ok = true
		if err := json.Unmarshal(v, &set); err != nil {
			return fmt.Errorf("%w: trust roots: %v", ErrCorrupt, err)
		}
		return nil
	})
	return set, ok, err
}

// SetRoots stores the trust-root set (pinned at install, or rotated).
func (s *Store) SetRoots(set bundle.RootSet) (changed bool, err error) {
	enc, err := json.Marshal(set)
	if err != nil {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.current = nil
	return s.putIfChanged(keyRoots, enc)
}

func (s *Store) putIfChanged(key, val []byte) (changed bool, err error) {
	err = s.view(func(meta *bolt.Bucket, _ *bolt.Tx) error {
		changed = !bytes.Equal(meta.Get(key), val)
		return nil
	})
	if err != nil || !changed {
		return false, err
	}
	return true, s.update(func(meta *bolt.Bucket, _ *bolt.Tx) error { return meta.Put(key, val) })
}

// Obey records that the command id was obeyed and its resulting sticky
// state in one transaction, so a crash leaves both or neither. It fails
// with ErrReplay, changing nothing, if the id is already remembered.
func (s *Store) Obey(id string, expires, now time.Time, st localpolicy.Sticky) error {
	enc, err := json.Marshal(st, json.Deterministic(true))
	if err != nil {
		return err
	}
	return s.update(func(meta *bolt.Bucket, tx *bolt.Tx) error {
		if err := rememberCommand(tx, id, expires, now); err != nil {
			return err
		}
		return meta.Put(keySticky, enc)
	})
}

// rememberCommand records a command id until it expires, and fails with
// ErrReplay if the id is already remembered. Expired ids are forgotten in
// the same transaction, so the set stays as small as the commands in flight.
func rememberCommand(tx *bolt.Tx, id string, expires, now time.Time) error {
	b := tx.Bucket(bucketCommands)
	if v := b.Get([]byte(id)); v != nil {
		return fmt.Errorf("%w: %s", ErrReplay, id)
	}
	var expired [][]byte
	err := b.ForEach(func(k, v []byte) error {
		if len(v) == 8 && int64(binary.BigEndian.Uint64(v)) <= now.UnixNano() {
			expired = append(expired, bytes.Clone(k))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, k := range expired {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return b.Put([]byte(id), u64(uint64(expires.UnixNano())))
}

func getU64(b *bolt.Bucket, key []byte) (uint64, error) {
	v := b.Get(key)
	switch len(v) {
	case 0:
		return 0, nil
	case 8:
		return binary.BigEndian.Uint64(v), nil
	}
	return 0, fmt.Errorf("%w: %s has %d bytes", ErrCorrupt, key, len(v))
}

func u64(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }
