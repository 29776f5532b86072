// Package pgstore keeps control's state in PostgreSQL, so any number of
// bulkhead-control replicas share it: fleets, and a control plane that
// outlives a machine. High availability is PostgreSQL's own (streaming
// replication, Patroni, a managed service); nothing here replicates.
//
// Records are the same JSON the bbolt backend keeps. Every write commits
// with a NOTIFY on channel "bulkhead" naming what changed (a hint, never
// the data: store.Change), which PostgreSQL delivers to the other
// replicas only once the transaction commits. Numbers that readers page
// by (order seq, device rev, audit seq) are taken from a counter row held
// until commit, so they commit in order and no cursor skips one.
package pgstore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"iter"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgxlisten"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/store"
)

// Channel is the NOTIFY channel changes are announced on.
const Channel = "bulkhead"

// opTimeout bounds one call: with the database away, a call fails
// rather than holds its caller.
const opTimeout = 15 * time.Second

// ReconnectDelay is how long the change listener waits between attempts
// to reach the database again.
const ReconnectDelay = time.Second

// Store is a PostgreSQL-backed store.Store.
type Store struct {
	pool *pgxpool.Pool
	cfg  *pgx.ConnConfig
	log  *slog.Logger
}

var _ store.Store = (*Store)(nil)

// Open connects to the database at url (postgres://…) and brings its
// schema up to date.
func Open(ctx context.Context, url string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	pcfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("database address: %w", err)
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("database: %w", err)
	}
	if err := migrate(ctx, pool); err != nil {
		pool.Close()
		return nil, err
	}
	return &Store{pool: pool, cfg: pcfg.ConnConfig, log: log}, nil
}

// Close closes the connections.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

//go:embed migrations/*.sql
var migrations embed.FS

// Schema is the schema version this build brings a database to.
func Schema() int {
	names, _ := fs.Glob(migrations, "migrations/*.sql")
	return len(names)
}

// migrate applies the migrations the database lacks, in order, each in
// its own transaction; replicas starting together take turns.
func migrate(ctx context.Context, pool *pgxpool.Pool) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("database: %w", err)
	}
	defer conn.Release()
	const lockKey = 0x62756c6b68656164 // "bulkhead"
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(lockKey)); err != nil {
		return fmt.Errorf("database: %w", err)
	}
	defer conn.Exec(context.Background(), "SELECT pg_advisory_unlock($1)", int64(lockKey))
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	var have int
	if err := conn.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM schema_migrations").Scan(&have); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	names, _ := fs.Glob(migrations, "migrations/*.sql")
	slices.Sort(names)
	if have > len(names) {
		return fmt.Errorf("the database's schema is version %d, newer than this bulkhead-control knows (%d): upgrade bulkhead-control", have, len(names))
	}
	for i, name := range names[have:] {
		v := have + i + 1
		if n, _ := strconv.Atoi(strings.SplitN(strings.TrimPrefix(name, "migrations/"), "_", 2)[0]); n != v {
			return fmt.Errorf("migration %s is out of sequence (want number %d)", name, v)
		}
		sql, _ := migrations.ReadFile(name)
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, string(sql)); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version) VALUES ($1)", v)
			return err
		})
		if err != nil {
			return fmt.Errorf("schema migration %s: %w", name, err)
		}
	}
	return nil
}

func op() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), opTimeout)
}

// write runs fn in a transaction.
func (s *Store) write(fn func(ctx context.Context, tx pgx.Tx) error) error {
	ctx, cancel := op()
	defer cancel()
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(ctx, tx) })
}

// next takes the next number of counter name, held until commit.
func next(ctx context.Context, tx pgx.Tx, name string) (uint64, error) {
	var v int64
	err := tx.QueryRow(ctx, "UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value", name).Scan(&v)
	return uint64(v), err
}

func notify(ctx context.Context, tx pgx.Tx, c store.Change) error {
	_, err := tx.Exec(ctx, "SELECT pg_notify($1, $2)", Channel, c.String())
	return err
}

func audit(ctx context.Context, tx pgx.Tx, now time.Time, actor, action, detail string) error {
	seq, err := next(ctx, tx, "audit")
	if err != nil {
		return err
	}
	raw, err := json.Marshal(store.AuditEntry(seq, now, actor, action, detail))
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "INSERT INTO audit (seq, data) VALUES ($1, $2)", int64(seq), raw); err != nil {
		return err
	}
	if seq > store.AuditKept {
		_, err = tx.Exec(ctx, "DELETE FROM audit WHERE seq <= $1", int64(seq-store.AuditKept))
	}
	return err
}

func decode[T any](raw []byte, what string) (T, error) {
	var v T
	if err := json.Unmarshal(raw, &v); err != nil {
		return v, fmt.Errorf("stored %s: %w", what, err)
	}
	return v, nil
}

// querier is a pool or a transaction.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// device reads a device; lock takes its row until commit.
func device(ctx context.Context, q querier, id string, lock bool) (controlapi.Device, error) {
	sql := "SELECT data, last_seen FROM devices WHERE id = $1"
	if lock {
		sql += " FOR UPDATE"
	}
	var raw []byte
	var seen *time.Time
	err := q.QueryRow(ctx, sql, id).Scan(&raw, &seen)
	if errors.Is(err, pgx.ErrNoRows) {
		return controlapi.Device{}, fmt.Errorf("%w: %s", store.ErrNoDevice, id)
	}
	if err != nil {
		return controlapi.Device{}, err
	}
	return withSeen(raw, seen)
}

func withSeen(raw []byte, seen *time.Time) (controlapi.Device, error) {
	dev, err := decode[controlapi.Device](raw, "device")
	if seen != nil && seen.After(dev.LastSeen) {
		dev.LastSeen = seen.UTC()
	}
	return dev, err
}

func putDevice(ctx context.Context, tx pgx.Tx, dev controlapi.Device) error {
	raw, err := json.Marshal(dev)
	if err != nil {
		return err
	}
	inRoster := dev.Role != controlapi.RoleGateway && (len(dev.Certificate) > 0 || !dev.RevokedAt.IsZero())
	_, err = tx.Exec(ctx, `INSERT INTO devices (id, rev, in_roster, class, data) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, in_roster = excluded.in_roster, class = excluded.class, data = excluded.data`,
		dev.ID, int64(dev.Rev), inRoster, dev.Class, raw)
	return err
}

// updateDevice changes device id's record inside tx.
func updateDevice(ctx context.Context, tx pgx.Tx, id string, fn func(*controlapi.Device)) error {
	dev, err := device(ctx, tx, id, true)
	if err != nil {
		return err
	}
	fn(&dev)
	return putDevice(ctx, tx, dev)
}

func (s *Store) NewToken(class, role string, segments []string, ttl time.Duration, now time.Time, actor string) (controlapi.TokenResponse, error) {
	resp, t := store.NewTokenValue(class, role, segments, ttl, now)
	err := s.write(func(ctx context.Context, tx pgx.Tx) error {
		raw, err := json.Marshal(t)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO tokens (hash, data) VALUES ($1, $2)", store.HashToken(resp.Token), raw); err != nil {
			return err
		}
		return audit(ctx, tx, now, actor, "token-created", store.TokenDetail(t))
	})
	return resp, err
}

func token(ctx context.Context, q querier, tok string, lock bool) (store.Token, bool, error) {
	sql := "SELECT data FROM tokens WHERE hash = $1"
	if lock {
		sql += " FOR UPDATE"
	}
	var raw []byte
	err := q.QueryRow(ctx, sql, store.HashToken(tok)).Scan(&raw)
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Token{}, false, nil
	}
	if err != nil {
		return store.Token{}, false, err
	}
	t, err := decode[store.Token](raw, "token")
	return t, err == nil, err
}

func (s *Store) CheckToken(tok, class string, segments []string, now time.Time) error {
	ctx, cancel := op()
	defer cancel()
	t, ok, err := token(ctx, s.pool, tok, false)
	if err != nil {
		return err
	}
	return store.TokenUsable(t, ok, class, segments, now)
}

func (s *Store) Enroll(tok, class string, segments []string, pool netip.Prefix, now time.Time, issue store.IssueFunc) (controlapi.Device, error) {
	var dev controlapi.Device
	err := s.write(func(ctx context.Context, tx pgx.Tx) error {
		t, ok, err := token(ctx, tx, tok, true)
		if err != nil {
			return err
		}
		if err := store.TokenUsable(t, ok, class, segments, now); err != nil {
			return err
		}
		// The rev is taken first: it also makes enrolments take turns at
		// the address pool.
		rev, err := next(ctx, tx, "rev")
		if err != nil {
			return err
		}
		id := store.RandomID("dev-", 6)
		var addr netip.Addr
		if pool.IsValid() {
			lo, hi := pool.Addr().As16(), store.LastOf(pool).As16()
			var top []byte
			highest := netip.Addr{}
			switch err := tx.QueryRow(ctx, "SELECT addr FROM addresses WHERE addr BETWEEN $1 AND $2 ORDER BY addr DESC LIMIT 1", lo[:], hi[:]).Scan(&top); {
			case errors.Is(err, pgx.ErrNoRows):
			case err != nil:
				return err
			case len(top) != 16:
				return fmt.Errorf("stored address %x", top)
			default:
				highest = unmapIn(pool, netip.AddrFrom16([16]byte(top)))
			}
			taken, errp := takenIn(ctx, tx, pool)
			if addr, err = store.NextFree(pool, highest, taken); err != nil {
				return err
			}
			if err := *errp; err != nil {
				return err
			}
			k := addr.As16()
			if _, err := tx.Exec(ctx, "INSERT INTO addresses (addr, device) VALUES ($1, $2)", k[:], id); err != nil {
				return err
			}
		}
		if dev, err = issue(id, t, addr); err != nil {
			return err
		}
		dev.Role, dev.Segments, dev.Rev = t.Role, t.Segments, rev
		t.UsedBy = dev.ID
		raw, err := json.Marshal(t)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "UPDATE tokens SET data = $2 WHERE hash = $1", store.HashToken(tok), raw); err != nil {
			return err
		}
		if err := putDevice(ctx, tx, dev); err != nil {
			return err
		}
		if err := audit(ctx, tx, now, "device "+dev.ID, "enrolled", store.EnrolDetail(t, dev)); err != nil {
			return err
		}
		return notify(ctx, tx, store.Change{Kind: store.ChangeRoster, Device: dev.ID})
	})
	return dev, err
}

// unmapIn is a stored (16-byte) address as pool's family writes it.
func unmapIn(pool netip.Prefix, a netip.Addr) netip.Addr {
	if pool.Addr().Is4() {
		return a.Unmap()
	}
	return a
}

// takenIn yields the assigned addresses of pool in order; a failed read
// is left in *err.
func takenIn(ctx context.Context, tx pgx.Tx, pool netip.Prefix) (iter.Seq[netip.Addr], *error) {
	var failed error
	return func(yield func(netip.Addr) bool) {
		lo := pool.Addr().As16()
		rows, err := tx.Query(ctx, "SELECT addr FROM addresses WHERE addr >= $1 ORDER BY addr", lo[:])
		if err != nil {
			failed = err
			return
		}
		defer rows.Close()
		for rows.Next() {
			var k []byte
			if err := rows.Scan(&k); err != nil || len(k) != 16 {
				failed = fmt.Errorf("stored address %x: %v", k, err)
				return
			}
			a := unmapIn(pool, netip.AddrFrom16([16]byte(k)))
			if !pool.Contains(a) || !yield(a) {
				return
			}
		}
		failed = rows.Err()
	}, &failed
}

func (s *Store) Device(id string) (controlapi.Device, error) {
	ctx, cancel := op()
	defer cancel()
	return device(ctx, s.pool, id, false)
}

func (s *Store) Devices() ([]controlapi.Device, error) {
	ctx, cancel := op()
	defer cancel()
	return s.devices(ctx, "SELECT data, last_seen FROM devices ORDER BY id")
}

func (s *Store) DeviceClasses() (map[string]string, error) {
	ctx, cancel := op()
	defer cancel()
	rows, err := s.pool.Query(ctx, "SELECT id, class FROM devices")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id, class string
		if err := rows.Scan(&id, &class); err != nil {
			return nil, err
		}
		out[id] = class
	}
	return out, rows.Err()
}

func (s *Store) devices(ctx context.Context, sql string, args ...any) ([]controlapi.Device, error) {
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []controlapi.Device
	for rows.Next() {
		var raw []byte
		var seen *time.Time
		if err := rows.Scan(&raw, &seen); err != nil {
			return nil, err
		}
		dev, err := withSeen(raw, seen)
		if err != nil {
			return nil, err
		}
		out = append(out, dev)
	}
	return out, rows.Err()
}

func (s *Store) Roster(after uint64, limit int) (out []controlapi.Device, cursor uint64, more bool, err error) {
	ctx, cancel := op()
	defer cancel()
	out, err = s.devices(ctx, "SELECT data, last_seen FROM devices WHERE in_roster AND rev > $1 ORDER BY rev LIMIT $2", int64(after), limit+1)
	out, cursor, more = store.RosterPage(out, after, limit)
	return out, cursor, more, err
}

func (s *Store) Revoke(id, why, actor string, now time.Time) (controlapi.Device, error) {
	var dev controlapi.Device
	err := s.write(func(ctx context.Context, tx pgx.Tx) error {
		rev, err := next(ctx, tx, "rev")
		if err != nil {
			return err
		}
		already := false
		err = updateDevice(ctx, tx, id, func(d *controlapi.Device) {
			if already = !d.RevokedAt.IsZero(); !already {
				d.RevokedAt, d.RevokedWhy, d.Rev = now.UTC(), why, rev
			}
			dev = *d
		})
		if err != nil || already {
			return err
		}
		if err := audit(ctx, tx, now, actor, "device-revoked", store.RevokeDetail(dev, why)); err != nil {
			return err
		}
		return notify(ctx, tx, store.Change{Kind: store.ChangeRoster, Device: id})
	})
	return dev, err
}

func (s *Store) SetStates(states map[string]controlapi.DeviceState, now time.Time) error {
	// Most syncs repeat what is stored: those are found by a read, and
	// only the rest are locked (in id order, as every batch locks them)
	// and written, in one statement.
	differs := func(ctx context.Context, q querier, ids []string, lock string) ([]string, [][]byte, error) {
		rows, err := q.Query(ctx, "SELECT id, data FROM devices WHERE id = ANY($1) ORDER BY id"+lock, ids)
		if err != nil {
			return nil, nil, err
		}
		defer rows.Close()
		var changed []string
		var raws [][]byte
		for rows.Next() {
			var id string
			var raw []byte
			if err := rows.Scan(&id, &raw); err != nil {
				return nil, nil, err
			}
			dev, err := decode[controlapi.Device](raw, "device")
			if err != nil {
				return nil, nil, err
			}
			if st := states[id]; !store.SameState(dev.State, st) {
				dev.State = st
				if now.After(dev.LastSeen) {
					dev.LastSeen = now.UTC()
				}
				if raw, err = json.Marshal(dev); err != nil {
					return nil, nil, err
				}
				changed, raws = append(changed, id), append(raws, raw)
			}
		}
		return changed, raws, rows.Err()
	}
	if len(states) == 0 {
		return nil
	}
	ctx, cancel := op()
	defer cancel()
	changed, _, err := differs(ctx, s.pool, slices.Sorted(maps.Keys(states)), "")
	if err != nil || len(changed) == 0 {
		return err
	}
	return s.write(func(ctx context.Context, tx pgx.Tx) error {
		ids, raws, err := differs(ctx, tx, changed, " FOR UPDATE")
		if err != nil || len(ids) == 0 {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE devices d SET data = v.data
			FROM unnest($1::text[], $2::bytea[]) AS v(id, data) WHERE d.id = v.id`, ids, raws)
		return err
	})
}

func (s *Store) Touch(seen map[string]time.Time) error {
	if len(seen) == 0 {
		return nil
	}
	ids := slices.Sorted(maps.Keys(seen))
	times := make([]time.Time, len(ids))
	for i, id := range ids {
		times[i] = seen[id].UTC()
	}
	ctx, cancel := op()
	defer cancel()
	_, err := s.pool.Exec(ctx, `UPDATE devices d SET last_seen = v.t
		FROM unnest($1::text[], $2::timestamptz[]) AS v(id, t)
		WHERE d.id = v.id AND (d.last_seen IS NULL OR d.last_seen < v.t)`, ids, times)
	return err
}

func (s *Store) Rebind(id, wgKey string, der []byte, now time.Time) error {
	return s.write(func(ctx context.Context, tx pgx.Tx) error {
		rev, err := next(ctx, tx, "rev")
		if err != nil {
			return err
		}
		old := ""
		err = updateDevice(ctx, tx, id, func(dev *controlapi.Device) {
			old = dev.WireGuardKey
			dev.WireGuardKey, dev.Certificate, dev.Rev = wgKey, der, rev
		})
		if err != nil {
			return err
		}
		if old != wgKey {
			if err := audit(ctx, tx, now, "device "+id, "wireguard-key-changed", store.KeyChangeDetail(old, wgKey)); err != nil {
				return err
			}
		}
		return notify(ctx, tx, store.Change{Kind: store.ChangeRoster, Device: id})
	})
}

func (s *Store) PushBundle(version uint64, raw []byte, now time.Time, actor, target string) error {
	return s.pushVersioned("bundles", store.ChangeBundle, "bundle", version, raw, now, actor, "policy-pushed", fmt.Sprintf("version %d for %s", version, target))
}

func (s *Store) PushRoots(version uint64, raw []byte, now time.Time, actor string) error {
	return s.pushVersioned("roots", store.ChangeRoots, "trust-root rotation", version, raw, now, actor, "roots-pushed", fmt.Sprintf("version %d", version))
}

func (s *Store) pushVersioned(table string, kind store.ChangeKind, what string, version uint64, raw []byte, now time.Time, actor, action, detail string) error {
	return s.write(func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "INSERT INTO "+table+" (version, raw) VALUES ($1, $2) ON CONFLICT DO NOTHING", int64(version), raw)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("%s version %d: %w", what, version, store.ErrPushed)
		}
		if err := audit(ctx, tx, now, actor, action, detail); err != nil {
			return err
		}
		return notify(ctx, tx, store.Change{Kind: kind, Seq: version})
	})
}

func (s *Store) WithdrawBundle(version uint64, now time.Time, actor, why string) error {
	return s.write(func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "DELETE FROM bundles WHERE version = $1", int64(version))
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("%w: version %d", store.ErrNoBundle, version)
		}
		if err := audit(ctx, tx, now, actor, "policy-withdrawn", fmt.Sprintf("version %d: %s", version, why)); err != nil {
			return err
		}
		return notify(ctx, tx, store.Change{Kind: store.ChangeBundle, Seq: version})
	})
}

func (s *Store) Bundle(version uint64) ([]byte, error) {
	ctx, cancel := op()
	defer cancel()
	var raw []byte
	err := s.pool.QueryRow(ctx, "SELECT raw FROM bundles WHERE version = $1", int64(version)).Scan(&raw)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	return raw, err
}

// versioned calls fn with each row of a (version, raw) query until it
// returns false.
func (s *Store) versioned(sql string, arg uint64, fn func(version uint64, raw []byte) bool) error {
	ctx, cancel := op()
	defer cancel()
	rows, err := s.pool.Query(ctx, sql, int64(arg))
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var v int64
		var raw []byte
		if err := rows.Scan(&v, &raw); err != nil {
			return err
		}
		if !fn(uint64(v), raw) {
			return nil
		}
	}
	return rows.Err()
}

func (s *Store) Bundles(fn func(version uint64, raw []byte)) error {
	return s.versioned("SELECT version, raw FROM bundles WHERE version > $1 ORDER BY version", 0, func(v uint64, raw []byte) bool {
		fn(v, raw)
		return true
	})
}

func (s *Store) NewestBundle(have uint64, match func(version uint64, raw []byte) bool) ([]byte, error) {
	var out []byte
	err := s.versioned("SELECT version, raw FROM bundles WHERE version > $1 ORDER BY version DESC", have, func(v uint64, raw []byte) bool {
		if match(v, raw) {
			out = raw
			return false
		}
		return true
	})
	return out, err
}

func (s *Store) RootsAbove(have uint64, skip func(raw []byte) bool) ([][]byte, error) {
	var out [][]byte
	err := s.versioned("SELECT version, raw FROM roots WHERE version > $1 ORDER BY version", have, func(_ uint64, raw []byte) bool {
		if !skip(raw) {
			out = append(out, raw)
		}
		return true
	})
	return out, err
}

func (s *Store) AddOrder(o *store.Order, now time.Time, detail string) error {
	var seq uint64
	err := s.write(func(ctx context.Context, tx pgx.Tx) error {
		var err error
		if seq, err = next(ctx, tx, "orders"); err != nil {
			return err
		}
		stored := *o
		stored.Seq = seq
		raw, err := json.Marshal(&stored)
		if err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, "INSERT INTO orders (seq, id, data) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING", int64(seq), o.Command.ID, raw)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("%s: %w", o.Command.ID, store.ErrOrderGiven)
		}
		if err := audit(ctx, tx, now, o.By, string(o.Command.Kind), detail); err != nil {
			return err
		}
		return notify(ctx, tx, store.Change{Kind: store.ChangeOrder, Seq: seq})
	})
	if err == nil {
		o.Seq = seq
	}
	return err
}

func (s *Store) OrdersAfter(seq uint64) ([]*store.Order, error) {
	var out []*store.Order
	var bad error
	err := s.versioned("SELECT seq, data FROM orders WHERE seq > $1 ORDER BY seq", seq, func(n uint64, raw []byte) bool {
		o, err := decode[store.Order](raw, fmt.Sprint("order ", n))
		if err != nil {
			bad = err
			return false
		}
		out = append(out, &o)
		return true
	})
	return out, errors.Join(err, bad)
}

func (s *Store) AddReports(id string, req controlapi.ReportRequest, accepted func(controlapi.Event) []controlapi.ObservedFlow) (uint64, error) {
	var acked uint64
	err := s.write(func(ctx context.Context, tx pgx.Tx) error {
		acked = 0
		for _, e := range req.Events {
			raw, err := json.Marshal(e)
			if err != nil {
				return err
			}
			tag, err := tx.Exec(ctx, "INSERT INTO reports (device, seq, data) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", id, int64(e.Seq), raw)
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 1 && e.Kind == controlapi.EventFlows {
				if err := addFlows(ctx, tx, id, accepted(e)); err != nil {
					return err
				}
			}
			acked = max(acked, e.Seq)
		}
		// Keep the newest ReportsKept.
		_, err := tx.Exec(ctx, `DELETE FROM reports WHERE device = $1 AND seq <= (
			SELECT seq FROM reports WHERE device = $1 ORDER BY seq DESC OFFSET $2 LIMIT 1)`, id, store.ReportsKept)
		if err != nil || req.Dropped == 0 {
			return err
		}
		err = updateDevice(ctx, tx, id, func(dev *controlapi.Device) { dev.ReportsDropped += req.Dropped })
		if errors.Is(err, store.ErrNoDevice) {
			return nil
		}
		return err
	})
	return acked, err
}

func (s *Store) Reports(id string, n int) ([]controlapi.Event, error) {
	ctx, cancel := op()
	defer cancel()
	rows, err := s.pool.Query(ctx, "SELECT data FROM (SELECT seq, data FROM reports WHERE device = $1 ORDER BY seq DESC LIMIT $2) r ORDER BY seq", id, n)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []controlapi.Event
	for rows.Next() {
		var raw []byte
		if err := rows.Scan(&raw); err != nil {
			return nil, err
		}
		e, err := decode[controlapi.Event](raw, "report")
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// addFlows merges a device's flows-observed report into its class's
// observed flows.
func addFlows(ctx context.Context, tx pgx.Tx, id string, flows []controlapi.ObservedFlow) error {
	if len(flows) == 0 {
		return nil
	}
	dev, err := device(ctx, tx, id, true)
	if errors.Is(err, store.ErrNoDevice) {
		return nil
	}
	if err != nil {
		return err
	}
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM flows").Scan(&n); err != nil {
		return err
	}
	for _, f := range flows {
		key, err := json.Marshal(f.Flow, json.Deterministic(true))
		if err != nil {
			return err
		}
		var raw []byte
		err = tx.QueryRow(ctx, "SELECT data FROM flows WHERE class = $1 AND flow = $2 FOR UPDATE", dev.Class, key).Scan(&raw)
		found := err == nil
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		var have controlapi.ObservedFlow
		if found {
			if have, err = decode[controlapi.ObservedFlow](raw, "flow"); err != nil {
				return err
			}
		} else {
			if n >= store.FlowsKept || dev.FlowsAdded >= store.FlowsPerDevice {
				continue
			}
			n++
			dev.FlowsAdded++
		}
		if raw, err = json.Marshal(store.MergeFlow(have, found, f, id)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO flows (class, flow, data) VALUES ($1, $2, $3)
			ON CONFLICT (class, flow) DO UPDATE SET data = excluded.data`, dev.Class, key, raw); err != nil {
			return err
		}
	}
	return putDevice(ctx, tx, dev)
}

func (s *Store) Flows(class string) ([]controlapi.ObservedFlow, error) {
	out := []controlapi.ObservedFlow{}
	ctx, cancel := op()
	defer cancel()
	rows, err := s.pool.Query(ctx, "SELECT data FROM flows WHERE class = $1 ORDER BY flow", class)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var raw []byte
		if err := rows.Scan(&raw); err != nil {
			return nil, err
		}
		f, err := decode[controlapi.ObservedFlow](raw, "flow")
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, rows.Err()
}

func (s *Store) Audit(now time.Time, actor, action, detail string) error {
	return s.write(func(ctx context.Context, tx pgx.Tx) error { return audit(ctx, tx, now, actor, action, detail) })
}

func (s *Store) AuditPage(after uint64, limit int) ([]controlapi.AuditEntry, uint64, error) {
	var out []controlapi.AuditEntry
	var bad error
	more := false
	err := s.versioned(fmt.Sprintf("SELECT seq, data FROM audit WHERE seq > $1 ORDER BY seq LIMIT %d", limit+1), after, func(n uint64, raw []byte) bool {
		if len(out) == limit {
			more = true
			return false
		}
		e, err := decode[controlapi.AuditEntry](raw, fmt.Sprint("audit entry ", n))
		if err != nil {
			bad = err
			return false
		}
		out = append(out, e)
		return true
	})
	var next uint64
	if more {
		next = out[len(out)-1].Seq
	}
	return out, next, errors.Join(err, bad)
}

func (s *Store) Claim(name, value string) (string, error) {
	ctx, cancel := op()
	defer cancel()
	if value != "" {
		if _, err := s.pool.Exec(ctx, "INSERT INTO claims (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING", name, value); err != nil {
			return "", err
		}
	}
	var have string
	err := s.pool.QueryRow(ctx, "SELECT value FROM claims WHERE name = $1", name).Scan(&have)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil
	}
	return have, err
}

// Listen follows the changes other replicas commit, on a connection of
// its own; after each (re)connection it calls caughtUp, since changes
// made while it was away were not heard.
func (s *Store) Listen(ctx context.Context, changed func(store.Change), caughtUp func()) error {
	l := &pgxlisten.Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			return pgx.ConnectConfig(ctx, s.cfg.Copy())
		},
		LogError: func(ctx context.Context, err error) {
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("database change feed interrupted; reconnecting", "err", err)
			// The pool's idle connections most likely died with the feed's
			// (a restart, a failover): each would fail one device's sync
			// before being dropped, and each failure doubles that device's
			// backoff. Closing them now means the next call connects anew.
			s.pool.Reset()
		},
		ReconnectDelay: ReconnectDelay,
	}
	l.Handle(Channel, handler{changed: changed, caughtUp: caughtUp, log: s.log})
	err := l.Listen(ctx)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

type handler struct {
	changed  func(store.Change)
	caughtUp func()
	log      *slog.Logger
}

func (h handler) HandleNotification(_ context.Context, n *pgconn.Notification, _ *pgx.Conn) error {
	c, err := store.ParseChange(n.Payload)
	if err != nil {
		return err
	}
	h.changed(c)
	return nil
}

func (h handler) HandleBacklog(context.Context, string, *pgx.Conn) error {
	h.log.Info("following the database's change feed")
	h.caughtUp()
	return nil
}
