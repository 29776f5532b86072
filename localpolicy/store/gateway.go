package store

import (
	"bytes"
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// A segment gateway keeps, besides what every agent keeps, control's
// roster (each device's certificate, as control's CA signed it) and the
// orders it took (as signed), with how far it has taken each. It keeps
// them as received and verified; the agent verifies them again when it
// loads them, so a cache edited on disk admits nobody new.
var (
	bucketRoster        = []byte("gateway_roster") // device id -> certificate (DER)
	bucketGatewayOrders = []byte("gateway_orders") // seq -> signed order
	keyRosterCursor     = []byte("roster_cursor")
	keyOrderCursor      = []byte("order_cursor")
)

// GatewayState is a gateway's roster and orders.
type GatewayState struct {
	// Roster maps a device id to its certificate (DER).
	Roster map[string][]byte
	// Orders are the signed orders taken, in the order control gave them.
	Orders                    [][]byte
	RosterCursor, OrderCursor uint64
}

// GatewayOrder is an order a gateway took, by control's sequence number.
type GatewayOrder struct {
	Seq uint64
	Raw []byte
}

// Gateway reads the gateway's state (empty on a device, or a gateway
// that has not synced yet).
func (s *Store) Gateway() (GatewayState, error) {
	st := GatewayState{Roster: map[string][]byte{}}
	err := s.view(func(meta *bolt.Bucket, tx *bolt.Tx) error {
		var err error
		if st.RosterCursor, err = getU64(meta, keyRosterCursor); err != nil {
			return err
		}
		if st.OrderCursor, err = getU64(meta, keyOrderCursor); err != nil {
			return err
		}
		if b := tx.Bucket(bucketRoster); b != nil {
			if err := b.ForEach(func(k, v []byte) error { st.Roster[string(k)] = bytes.Clone(v); return nil }); err != nil {
				return err
			}
		}
		if b := tx.Bucket(bucketGatewayOrders); b != nil {
			return b.ForEach(func(k, v []byte) error {
				if len(k) != 8 {
					return fmt.Errorf("%w: gateway order key of %d bytes", ErrCorrupt, len(k))
				}
				st.Orders = append(st.Orders, bytes.Clone(v))
				return nil
			})
		}
		return nil
	})
	return st, err
}

// TakeGateway stores what one update from control brought, in one
// transaction: devices whose certificate is new or changed (the latest
// replaces the one held; nil: revoked, forgotten), the orders taken, and
// both cursors. Control
// sends an update only when it brings something, so an idle gateway
// writes nothing.
func (s *Store) TakeGateway(roster map[string][]byte, orders []GatewayOrder, rosterCursor, orderCursor uint64) error {
	return s.update(func(meta *bolt.Bucket, tx *bolt.Tx) error {
		if len(roster) > 0 {
			b, err := tx.CreateBucketIfNotExists(bucketRoster)
			if err != nil {
				return err
			}
			for id, der := range roster {
				put := func() error { return b.Put([]byte(id), der) }
				if der == nil { // revoked
					put = func() error { return b.Delete([]byte(id)) }
				}
				if err := put(); err != nil {
					return err
				}
			}
		}
		if len(orders) > 0 {
			b, err := tx.CreateBucketIfNotExists(bucketGatewayOrders)
			if err != nil {
				return err
			}
			for _, o := range orders {
				if err := b.Put(binary.BigEndian.AppendUint64(nil, o.Seq), o.Raw); err != nil {
					return err
				}
			}
		}
		for key, v := range map[string]uint64{string(keyRosterCursor): rosterCursor, string(keyOrderCursor): orderCursor} {
			if have, err := getU64(meta, []byte(key)); err != nil || have == v {
				if err != nil {
					return err
				}
				continue
			}
			if err := meta.Put([]byte(key), u64(v)); err != nil {
				return err
			}
		}
		return nil
	})
}
