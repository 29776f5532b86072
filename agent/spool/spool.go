// Package spool owns the control channel's state on the device's disk:
// the report outbox and the digests of the bundles the device refused. The outbox is bounded: when it is full the oldest events
// go first and are counted, and the count is reported once the server
// takes events again. Within the bound nothing
// is lost across restarts or outages; events leave only when the server
// acknowledged them (at-least-once; the server de-duplicates by sequence).
package spool

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/go-json-experiment/json"
	bolt "go.etcd.io/bbolt"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/internal/boltfile"
)

// DefaultLimit is how many events the outbox holds: days of a busy
// device's events in well under a megabyte of flash.
const DefaultLimit = 5000

var (
	bucketEvents = []byte("events")
	bucketMeta   = []byte("meta")
	keyDropped   = []byte("dropped")
	keyCount     = []byte("count")
	keyRefused   = []byte("refused")
)

// Spool is the open file.
type Spool struct {
	db    *bolt.DB
	limit int
}

// Open opens or creates the spool at path holding at most limit events. A
// damaged file is an error wrapping boltfile.ErrDamaged, never a crash.
func Open(path string, limit int) (*Spool, error) {
	db, err := boltfile.Open(path, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketEvents, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Spool{db: db, limit: limit}, nil
}

// Close closes the file.
func (s *Spool) Close() error { return s.db.Close() }

// Add appends an event, dropping (and counting) the oldest when full.
func (s *Spool) Add(t time.Time, kind, detail string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEvents)
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		raw, err := json.Marshal(controlapi.Event{Seq: seq, Time: t.UTC(), Kind: kind, Detail: detail})
		if err != nil {
			return err
		}
		if err := b.Put(u64(seq), raw); err != nil {
			return err
		}
		meta := tx.Bucket(bucketMeta)
		count := get(meta, keyCount) + 1
		var n uint64
		c := b.Cursor()
		for k, _ := c.First(); k != nil && count > uint64(s.limit); k, _ = c.First() {
			if err := c.Delete(); err != nil {
				return err
			}
			count--
			n++
		}
		if err := meta.Put(keyCount, u64(count)); err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		return meta.Put(keyDropped, u64(get(meta, keyDropped)+n))
	})
}

// Pending returns up to n of the oldest events and the drop count.
func (s *Spool) Pending(n int) (controlapi.ReportRequest, error) {
	var req controlapi.ReportRequest
	err := s.db.View(func(tx *bolt.Tx) error {
		req.Dropped = get(tx.Bucket(bucketMeta), keyDropped)
		c := tx.Bucket(bucketEvents).Cursor()
		for k, v := c.First(); k != nil && len(req.Events) < n; k, v = c.Next() {
			var e controlapi.Event
			if err := json.Unmarshal(v, &e); err != nil {
				return err
			}
			req.Events = append(req.Events, e)
		}
		return nil
	})
	return req, err
}

// Ack removes every event up to seq and the drop count the server has now
// been told about.
func (s *Spool) Ack(seq, dropped uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		count := get(meta, keyCount)
		c := tx.Bucket(bucketEvents).Cursor()
		for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) <= seq; k, _ = c.First() {
			if err := c.Delete(); err != nil {
				return err
			}
			count--
		}
		if err := meta.Put(keyCount, u64(count)); err != nil {
			return err
		}
		return meta.Put(keyDropped, u64(get(meta, keyDropped)-min(dropped, get(meta, keyDropped))))
	})
}

// Refused is the digests of the bundles the device refused, newest last.
func (s *Spool) Refused() ([]string, error) {
	var out []string
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(keyRefused)
		if v == nil {
			return nil
		}
		return json.Unmarshal(v, &out)
	})
	return out, err
}

// SetRefused records the refused digests; unchanged ones write nothing.
func (s *Spool) SetRefused(digests []string) error {
	raw, err := json.Marshal(digests)
	if err != nil {
		return err
	}
	same := false
	if err := s.db.View(func(tx *bolt.Tx) error {
		same = string(tx.Bucket(bucketMeta).Get(keyRefused)) == string(raw)
		return nil
	}); err != nil || same {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyRefused, raw) })
}

func get(b *bolt.Bucket, key []byte) uint64 {
	if v := b.Get(key); len(v) == 8 {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func u64(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }
