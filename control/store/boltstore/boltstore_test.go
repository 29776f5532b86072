package boltstore_test

import (
	"path/filepath"
	"testing"

	"github.com/bulkhead-edge/bulkhead/control/store"
	"github.com/bulkhead-edge/bulkhead/control/store/boltstore"
	"github.com/bulkhead-edge/bulkhead/control/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, storetest.Backend{Open: func(t *testing.T) store.Store {
		s, err := boltstore.Open(filepath.Join(t.TempDir(), "control.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}})
}
