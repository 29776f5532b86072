package pgstore_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/bulkhead-edge/bulkhead/control/store"
	"github.com/bulkhead-edge/bulkhead/control/store/boltstore"
	"github.com/bulkhead-edge/bulkhead/control/store/pgstore"
	"github.com/bulkhead-edge/bulkhead/control/store/storetest"
	"github.com/bulkhead-edge/bulkhead/internal/pgrun"
	"github.com/bulkhead-edge/bulkhead/internal/pgrun/pgtest"
)

func open(t *testing.T, url string) *pgstore.Store {
	t.Helper()
	s, err := pgstore.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	pg := pgtest.Start(t, pgrun.Options{})
	urls := map[store.Store]string{}
	storetest.Run(t, storetest.Backend{
		Open: func(t *testing.T) store.Store {
			url := pgtest.DB(t, pg)
			s := open(t, url)
			urls[s] = url
			return s
		},
		Share: func(t *testing.T, s store.Store) store.Store { return open(t, urls[s]) },
	})
}

// A bbolt store moved into PostgreSQL reads the same through every call,
// and goes on numbering, assigning and refusing where it left off.
func TestImportFromBolt(t *testing.T) {
	pg := pgtest.Start(t, pgrun.Options{})
	from, err := boltstore.Open(filepath.Join(t.TempDir(), "control.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer from.Close()
	f := storetest.Fill(t, from)
	to := open(t, pgtest.DB(t, pg))
	n, err := to.Import(context.Background(), from.Export)
	if err != nil {
		t.Fatal(err)
	}
	if n < 20 {
		t.Errorf("%d records moved", n)
	}
	// Into a database that holds a store already: refused, nothing added.
	if _, err := to.Import(context.Background(), from.Export); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("a second import: %v, want a refusal", err)
	}
	storetest.Same(t, from, to, f)
}

// A database a release older made (schema 1, devices without their class
// in a column) is brought up to date at start, its devices' classes read
// from their records.
func TestMigrationFromSchemaOne(t *testing.T) {
	pg := pgtest.Start(t, pgrun.Options{})
	url := pgtest.DB(t, pg)
	init, err := os.ReadFile("migrations/0001_init.sql")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{
		string(init),
		"CREATE TABLE schema_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
		"INSERT INTO schema_migrations (version) VALUES (1)",
		`INSERT INTO devices (id, rev, in_roster, data) VALUES ('dev-old', 1, true, '{"id":"dev-old","class":"truck"}')`,
	} {
		if _, err := conn.Exec(context.Background(), sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	conn.Close(context.Background())
	s := open(t, url)
	classes, err := s.DeviceClasses()
	if err != nil || classes["dev-old"] != "truck" || len(classes) != 1 {
		t.Errorf("after the migration: classes %v (%v), want dev-old in truck", classes, err)
	}
	if pgstore.Schema() < 2 {
		t.Errorf("schema %d", pgstore.Schema())
	}
}
