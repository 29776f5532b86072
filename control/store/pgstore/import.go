package pgstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"

	"github.com/go-json-experiment/json"
	"github.com/jackc/pgx/v5"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

// importBatch is how many rows one COPY carries.
const importBatch = 5000

// Import fills an empty database with every record export gives (a
// bbolt store's Export), in one transaction: all of it or nothing. A
// database that holds anything is refused, so nothing is overwritten.
func (s *Store) Import(ctx context.Context, export func(func(store.Record) error) error) (n int, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var used bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM devices) OR EXISTS (SELECT 1 FROM tokens) OR EXISTS (SELECT 1 FROM orders)
			OR EXISTS (SELECT 1 FROM bundles) OR EXISTS (SELECT 1 FROM audit) OR EXISTS (SELECT 1 FROM claims)`).Scan(&used); err != nil {
			return err
		}
		if used {
			return fmt.Errorf("the database already holds a control store; migrate only into an empty one")
		}
		im := importer{ctx: ctx, tx: tx}
		if err := export(im.add); err != nil {
			return err
		}
		n = im.n
		return im.flush()
	})
	return n, err
}

type importer struct {
	ctx   context.Context
	tx    pgx.Tx
	table string
	cols  []string
	rows  [][]any
	n     int
}

func seqKey(k []byte) (int64, error) {
	if len(k) != 8 {
		return 0, fmt.Errorf("key %x is not a number", k)
	}
	return int64(binary.BigEndian.Uint64(k)), nil
}

// add takes one record.
func (im *importer) add(r store.Record) error {
	if r.Key == nil {
		counter := map[string]string{store.BucketDevices: "rev", store.BucketOrders: "orders", store.BucketAudit: "audit"}[r.Bucket]
		if counter == "" {
			return nil
		}
		_, err := im.tx.Exec(im.ctx, "UPDATE counters SET value = greatest(value, $2) WHERE name = $1", counter, int64(r.Seq))
		return err
	}
	row, table, cols, err := rowOf(r)
	if err != nil {
		return fmt.Errorf("%s %q: %w", r.Bucket, r.Key, err)
	}
	if table != im.table {
		if err := im.flush(); err != nil {
			return err
		}
		im.table, im.cols = table, cols
	}
	im.rows = append(im.rows, row)
	im.n++
	if len(im.rows) >= importBatch {
		return im.flush()
	}
	return nil
}

func (im *importer) flush() error {
	if len(im.rows) == 0 {
		return nil
	}
	_, err := im.tx.CopyFrom(im.ctx, pgx.Identifier{im.table}, im.cols, pgx.CopyFromRows(im.rows))
	im.rows = im.rows[:0]
	if err != nil {
		return fmt.Errorf("copy into %s: %w", im.table, err)
	}
	return nil
}

// rowOf is the row a record becomes, and its table and columns.
func rowOf(r store.Record) (row []any, table string, cols []string, err error) {
	k, v := r.Key, r.Value
	switch r.Bucket {
	case store.BucketTokens:
		return []any{k, v}, "tokens", []string{"hash", "data"}, nil
	case store.BucketDevices:
		dev, err := decode[controlapi.Device](v, "device")
		if err != nil {
			return nil, "", nil, err
		}
		inRoster := dev.Role != controlapi.RoleGateway && (len(dev.Certificate) > 0 || !dev.RevokedAt.IsZero())
		return []any{string(k), int64(dev.Rev), inRoster, dev.Class, v}, "devices", []string{"id", "rev", "in_roster", "class", "data"}, nil
	case store.BucketBundles, store.BucketRoots:
		n, err := seqKey(k)
		return []any{n, v}, r.Bucket, []string{"version", "raw"}, err
	case store.BucketOrders:
		n, err := seqKey(k)
		if err != nil {
			return nil, "", nil, err
		}
		var o store.Order
		if err := json.Unmarshal(v, &o); err != nil {
			return nil, "", nil, err
		}
		return []any{n, o.Command.ID, v}, "orders", []string{"seq", "id", "data"}, nil
	case store.BucketReports:
		i := len(k) - 9
		if i < 0 || k[i] != 0 {
			return nil, "", nil, fmt.Errorf("not a report key")
		}
		n, err := seqKey(k[i+1:])
		return []any{string(k[:i]), n, v}, "reports", []string{"device", "seq", "data"}, err
	case store.BucketAudit:
		n, err := seqKey(k)
		return []any{n, v}, "audit", []string{"seq", "data"}, err
	case store.BucketFlows:
		class, flow, ok := bytes.Cut(k, []byte{0})
		if !ok {
			return nil, "", nil, fmt.Errorf("not a flow key")
		}
		return []any{string(class), flow, v}, "flows", []string{"class", "flow", "data"}, nil
	case store.BucketAddresses:
		if len(k) != 16 {
			return nil, "", nil, fmt.Errorf("not an address")
		}
		return []any{k, string(v)}, "addresses", []string{"addr", "device"}, nil
	case store.BucketClaims:
		return []any{string(k), string(v)}, "claims", []string{"name", "value"}, nil
	}
	return nil, "", nil, fmt.Errorf("unknown bucket")
}
