package spool

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/boltfile"
)

func TestBoundedOutboxKeepsNewestAndCountsDrops(t *testing.T) {
	path := filepath.Join(t.TempDir(), "channel.db")
	s, err := Open(path, 5)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 24, 0, 0, 0, 0, time.UTC)
	for i := range 8 {
		if err := s.Add(now.Add(time.Duration(i)*time.Second), "e", ""); err != nil {
			t.Fatal(err)
		}
	}
	req, err := s.Pending(100)
	if err != nil {
		t.Fatal(err)
	}
	if len(req.Events) != 5 || req.Events[0].Seq != 4 || req.Events[4].Seq != 8 || req.Dropped != 3 {
		t.Fatalf("pending = %d events from seq %d, dropped %d; want 5 from 4, dropped 3", len(req.Events), req.Events[0].Seq, req.Dropped)
	}
	// Survives a restart, and an ack removes exactly what it covers.
	s.Close()
	if s, err = Open(path, 5); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Ack(6, req.Dropped); err != nil {
		t.Fatal(err)
	}
	s.Add(now, "later", "")
	req, _ = s.Pending(100)
	if len(req.Events) != 3 || req.Events[0].Seq != 7 || req.Events[2].Seq != 9 || req.Dropped != 0 {
		t.Errorf("after ack: %+v", req)
	}
	// Pending returns the oldest first, n at a time.
	if req, _ := s.Pending(1); len(req.Events) != 1 || req.Events[0].Seq != 7 {
		t.Errorf("Pending(1) = %+v", req)
	}
}

// A damaged outbox is an error wrapping boltfile.ErrDamaged, never a
// crash: the agent then keeps it aside and starts an empty one.
func TestDamagedSpoolIsAnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "channel.db")
	s, err := Open(path, 10)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := s.Add(time.Now(), "kind", strings.Repeat("detail ", 200)); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range min(len(raw), 2048) {
		raw[i] = 0xff
	}
	if err := os.WriteFile(path, raw[:len(raw)/2+100], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, 10); !errors.Is(err, boltfile.ErrDamaged) {
		t.Fatalf("Open(damaged) = %v, want ErrDamaged", err)
	}
}
