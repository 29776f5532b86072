package lab

import (
	"context"
	"net/netip"

	"github.com/bulkhead-edge/bulkhead/internal/pgrun"
)

// Postgres is a PostgreSQL cluster serving replicas of control from a
// namespace of its own, over TCP: the database machine of a control
// plane.
type Postgres struct {
	NS *NS
	// URL is the database replicas use.
	URL     string
	cluster *pgrun.Cluster
}

// StartPostgres runs Debian's PostgreSQL in ns, listening on addr, with
// one database for control; it is removed when t ends.
func StartPostgres(t T, ns *NS, addr netip.AddrPort) *Postgres {
	t.Helper()
	c, err := pgrun.Start(context.Background(), "", pgrun.Options{Listen: addr.String(), Netns: ns.Name})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Logf("stop postgres: %v", err)
		}
	})
	if err := c.CreateDB(context.Background(), "control"); err != nil {
		t.Fatal(err)
	}
	return &Postgres{NS: ns, URL: c.TCPURL(addr.Addr().String(), "control"), cluster: c}
}

// Stop stops the database as a crash would (immediate shutdown).
func (p *Postgres) Stop(t T) {
	t.Helper()
	if err := p.cluster.Stop(context.Background(), true); err != nil {
		t.Fatal(err)
	}
}

// Start starts it again on the same data.
func (p *Postgres) Start(t T) {
	t.Helper()
	if err := p.cluster.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
}
