// Package pgtest gives tests a PostgreSQL cluster of their own (pgrun),
// removed when the test ends. Without Debian's postgresql package the
// test skips, or fails under BULKHEAD_REQUIRE_PRIVILEGED=1, as CI runs.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	"github.com/bulkhead-edge/bulkhead/internal/pgrun"
)

// requireEnv is lab.RequireEnv, which this package sits below.
const requireEnv = "BULKHEAD_REQUIRE_PRIVILEGED"

// Start runs a cluster for t.
func Start(t testing.TB, opts pgrun.Options) *pgrun.Cluster {
	t.Helper()
	if _, err := pgrun.BinDir(); err != nil {
		if os.Getenv(requireEnv) == "1" {
			t.Fatalf("%v, and %s=1 forbids skipping", err, requireEnv)
		}
		t.Skip(err)
	}
	c, err := pgrun.Start(context.Background(), "", opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil && !errors.Is(err, context.Canceled) {
			t.Logf("stop postgres: %v", err)
		}
	})
	return c
}

var dbs atomic.Int64

// DB creates a fresh database in c and returns its address.
func DB(t testing.TB, c *pgrun.Cluster) string {
	t.Helper()
	name := fmt.Sprintf("t%d", dbs.Add(1))
	if err := c.CreateDB(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	return c.URL(name)
}
