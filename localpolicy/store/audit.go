package store

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/go-json-experiment/json"
	bolt "go.etcd.io/bbolt"
)

// MaxAudit is how many audit events are kept; older ones are dropped, and
// the chain continues from the oldest kept event's predecessor hash.
const MaxAudit = 4096

// Event is one audit record. Hash covers the previous event's hash and this
// event's fields, so editing or removing an event in the middle breaks the
// chain. (Cutting events off the end is caught only against a head hash
// kept elsewhere: the agent reports it to control.)
type Event struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Kind   string    `json:"kind"`
	Detail string    `json:"detail"`
	Prev   string    `json:"prev"`
	Hash   string    `json:"hash"`
}

func (e *Event) digest() string {
	h := sha256.New()
	h.Write([]byte(e.Prev))
	h.Write(binary.BigEndian.AppendUint64(nil, e.Seq))
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(e.Time.UnixNano())))
	fmt.Fprintf(h, "%d:%s%d:%s", len(e.Kind), e.Kind, len(e.Detail), e.Detail)
	return hex.EncodeToString(h.Sum(nil))
}

// Audit appends an event, for example a rejected bundle and why.
func (s *Store) Audit(now time.Time, kind, detail string) error {
	return s.update(func(_ *bolt.Bucket, tx *bolt.Tx) error { return s.appendAudit(tx, now, kind, detail) })
}

// OnAudit makes fn see every event once its transaction has committed,
// whichever method wrote it (the agent forwards them to control). Set it
// before the store is shared.
func (s *Store) OnAudit(fn func(Event)) { s.onAudit = fn }

func (s *Store) appendAudit(tx *bolt.Tx, now time.Time, kind, detail string) error {
	meta, log := tx.Bucket(bucketMeta), tx.Bucket(bucketAudit)
	seq, err := getU64(meta, keyAuditSeq)
	if err != nil {
		return err
	}
	e := Event{Seq: seq + 1, Time: now.UTC(), Kind: kind, Detail: detail, Prev: string(meta.Get(keyAuditTop))}
	e.Hash = e.digest()
	enc, err := json.Marshal(e)
	if err != nil {
		return err
	}
	if err := log.Put(u64(e.Seq), enc); err != nil {
		return err
	}
	if e.Seq > MaxAudit {
		if err := log.Delete(u64(e.Seq - MaxAudit)); err != nil {
			return err
		}
	}
	if err := meta.Put(keyAuditSeq, u64(e.Seq)); err != nil {
		return err
	}
	if s.onAudit != nil {
		tx.OnCommit(func() { s.onAudit(e) })
	}
	return meta.Put(keyAuditTop, []byte(e.Hash))
}

// AuditLog returns the kept events, oldest first, after checking the chain;
// a broken link is ErrCorrupt naming the event.
func (s *Store) AuditLog() ([]Event, error) {
	var events []Event
	err := s.view(func(meta *bolt.Bucket, tx *bolt.Tx) error {
		var prev *Event
		err := tx.Bucket(bucketAudit).ForEach(func(k, v []byte) error {
			var e Event
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("%w: audit event %x: %v", ErrCorrupt, k, err)
			}
			if e.Hash != e.digest() || (prev != nil && (e.Prev != prev.Hash || e.Seq != prev.Seq+1)) {
				return fmt.Errorf("%w: audit chain broken at event %d", ErrCorrupt, e.Seq)
			}
			events = append(events, e)
			prev = &events[len(events)-1]
			return nil
		})
		if err != nil {
			return err
		}
		if prev != nil && string(meta.Get(keyAuditTop)) != prev.Hash {
			return fmt.Errorf("%w: audit head does not match the last event", ErrCorrupt)
		}
		return nil
	})
	return events, err
}
