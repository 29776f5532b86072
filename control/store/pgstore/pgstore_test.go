package pgstore_test

import (
	"context"
	"testing"

	"github.com/bulkhead-edge/bulkhead/control/store"
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
