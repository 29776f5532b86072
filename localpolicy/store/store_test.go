package store

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/bulkhead-edge/bulkhead/examples"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/trustedtime"
)

var (
	t0      = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	scanner = bundle.Device{ID: "dev-1", Class: "scanner"}
)

type fixture struct {
	roots opskey.Roots
	key   ed25519.PrivateKey
	doc   policy.Document
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	_, priv, roots := newKeySet(t)
	doc, err := policy.Parse(examples.Site())
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{roots: roots, key: priv, doc: *doc}
}

func (f *fixture) bundle(t *testing.T, version uint64, validFor time.Duration) *bundle.Bundle {
	t.Helper()
	raw, err := bundle.Sign(bundle.Payload{
		Version: version, IssuedAt: t0, ExpiresAt: t0.Add(validFor),
		Target: bundle.Target{Classes: []string{"scanner"}}, Policy: f.doc,
	}, f.key)
	if err != nil {
		t.Fatal(err)
	}
	b, err := bundle.Verify(raw, f.roots)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// open opens the cache at path with the fixture's keys pinned, as the
// agent's first boot does.
func (f *fixture) open(t *testing.T, path string) *Store {
	t.Helper()
	s := open(t, path)
	if err := s.PinRoots(func() (opskey.Roots, error) { return f.roots, nil }); err != nil {
		t.Fatal(err)
	}
	return s
}

func open(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// rawEdit changes the file behind the store's back, as an attacker with
// disk access or a failing flash chip would.
func rawEdit(t *testing.T, path string, fn func(meta *bolt.Bucket, tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error { return fn(tx.Bucket(bucketMeta), tx) }); err != nil {
		t.Fatal(err)
	}
}

func TestAcceptKeepsOriginalBytes(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(t.TempDir(), "cache.db")
	s := f.open(t, path)
	b := f.bundle(t, 3, 7*24*time.Hour)
	if err := s.Accept(b, t0); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load(scanner)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if !bytes.Equal(got.Raw, b.Raw) {
		t.Error("cached bytes differ from the signed bytes accepted")
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("cache file mode %o, want 600", st.Mode().Perm())
	}
}

func TestFirstBootHasNoBundle(t *testing.T) {
	f := newFixture(t)
	s := f.open(t, filepath.Join(t.TempDir(), "cache.db"))
	if _, err := s.Load(scanner); !errors.Is(err, ErrNoBundle) {
		t.Fatalf("Load on a new cache = %v, want ErrNoBundle", err)
	}
}

func TestRollbackRefusedAcrossRestart(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(t.TempDir(), "cache.db")
	s := f.open(t, path)
	if err := s.Accept(f.bundle(t, 5, time.Hour), t0); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = f.open(t, path)
	old := f.bundle(t, 4, time.Hour)
	highest, err := s.Highest()
	if err != nil || highest != 5 {
		t.Fatalf("Highest after restart = %d, %v; want 5", highest, err)
	}
	if err := old.Admit(t0, highest, scanner); !errors.Is(err, bundle.ErrRollback) {
		t.Errorf("Admit(v4) after restart = %v, want ErrRollback", err)
	}
	if err := s.Accept(old, t0); !errors.Is(err, bundle.ErrRollback) {
		t.Errorf("Accept(v4) after restart = %v, want ErrRollback", err)
	}
	if err := s.Accept(f.bundle(t, 5, time.Hour), t0); !errors.Is(err, bundle.ErrRollback) {
		t.Errorf("Accept(v5 again) = %v, want ErrRollback", err)
	}
	if b, err := s.Load(scanner); err != nil || b.Version != 5 {
		t.Errorf("Load = v%v, %v; want v5", b, err)
	}
}

// Whatever is wrong with the cache, the device ends up in lockdown with the
// reason in its explanation, never with no rules at all.
func TestTamperedCacheMeansLockdown(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		name string
		edit func(t *testing.T, f *fixture, meta *bolt.Bucket, tx *bolt.Tx) error
	}{
		{"flipped byte in the bundle", func(t *testing.T, f *fixture, meta *bolt.Bucket, _ *bolt.Tx) error {
			raw := bytes.Clone(meta.Get(keyBundle))
			raw[len(raw)/2] ^= 0x04
			return meta.Put(keyBundle, raw)
		}},
		{"older signed bundle swapped in", func(t *testing.T, f *fixture, meta *bolt.Bucket, _ *bolt.Tx) error {
			return meta.Put(keyBundle, f.bundle(t, 2, time.Hour).Raw)
		}},
		{"bundle deleted", func(t *testing.T, f *fixture, meta *bolt.Bucket, _ *bolt.Tx) error {
			return meta.Delete(keyBundle)
		}},
		{"highest version garbled", func(t *testing.T, f *fixture, meta *bolt.Bucket, _ *bolt.Tx) error {
			return meta.Put(keyHighest, []byte("x"))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "cache.db")
			s := f.open(t, path)
			if err := s.Accept(f.bundle(t, 3, time.Hour), t0); err != nil {
				t.Fatal(err)
			}
			s.Close()
			rawEdit(t, path, func(meta *bolt.Bucket, tx *bolt.Tx) error { return tt.edit(t, f, meta, tx) })

			s = f.open(t, path)
			_, err := s.Load(scanner)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Load = %v, want ErrCorrupt", err)
			}
			d := localpolicy.Evaluate(localpolicy.Input{NoPolicy: err.Error(), Device: scanner, Now: t0})
			if d.Mode != localpolicy.Lockdown {
				t.Errorf("mode = %v, want lockdown", d.Mode)
			}
		})
	}
}

func TestDamagedFileIsCorrupt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	if err := os.WriteFile(path, bytes.Repeat([]byte("bulkhead"), 2048), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open(garbage) = %v, want ErrCorrupt", err)
	}
}

// Corruption patterns flash produces, on a cache that held a bundle: each
// opens as ErrCorrupt (or, for a file emptied, as a fresh cache: no
// policy), never a panic. 2 KB of 0xff over the first page made
// bolt.Open panic ("freepages") on every start before the guard covered
// it.
func TestCorruptionPatternsAreErrCorrupt(t *testing.T) {
	f := newFixture(t)
	patterns := []struct {
		name    string
		corrupt func(b []byte) []byte
	}{
		{"0xff over the first 2 KB", func(b []byte) []byte { return fill(b, 0, 2048, 0xff) }},
		{"0xff over both meta pages", func(b []byte) []byte { return fill(b, 0, 8192, 0xff) }},
		{"0xff over the second meta page", func(b []byte) []byte { return fill(b, 4096, 4096, 0xff) }},
		{"zeros over the data pages", func(b []byte) []byte { return fill(b, 8192, len(b)-8192, 0) }},
		{"0xff over the data pages", func(b []byte) []byte { return fill(b, 8192, len(b)-8192, 0xff) }},
		{"truncated to one page", func(b []byte) []byte { return b[:4096] }},
		{"truncated mid-page", func(b []byte) []byte { return b[:len(b)/2+100] }},
		{"every 512th byte flipped", func(b []byte) []byte {
			for i := 100; i < len(b); i += 512 {
				b[i] ^= 0x5a
			}
			return b
		}},
	}
	for _, p := range patterns {
		for _, oldFormat := range []bool{false, true} {
			name := p.name
			if oldFormat {
				name += ", written without a freelist (older agents)"
			}
			t.Run(name, func(t *testing.T) { corrupted(t, f, oldFormat, p.corrupt) })
		}
	}
}

// corrupted writes a cache that holds a bundle, damages it, and checks
// that opening it is ErrCorrupt (or a fresh cache), never a crash.
func corrupted(t *testing.T, f *fixture, oldFormat bool, corrupt func([]byte) []byte) {
	path := filepath.Join(t.TempDir(), "cache.db")
	s := f.open(t, path)
	if _, err := s.SetRoots(bundle.NewRootSet(1, f.roots)); err != nil {
		t.Fatal(err)
	}
	if err := s.Accept(f.bundle(t, 3, time.Hour), t0); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if oldFormat {
		db, err := bolt.Open(path, 0o600, &bolt.Options{NoFreelistSync: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put([]byte("x"), []byte("y")) }); err != nil {
			t.Fatal(err)
		}
		db.Close()
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, corrupt(raw), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path)
	if err == nil {
		// Damage bbolt's own checks missed must still not
		// yield a trusted policy.
		defer s.Close()
		_, err = s.Load(scanner)
	}
	// A damaged meta page is what the second one is for: a cache that
	// still yields the bundle it held is fine too.
	if err != nil && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNoBundle) {
		t.Fatalf("%v, want ErrCorrupt, or the cache as it was", err)
	}
}

func fill(b []byte, off, n int, v byte) []byte {
	for i := off; i < off+n && i < len(b); i++ {
		b[i] = v
	}
	return b
}

func TestSecondOpenIsLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	open(t, path)
	if s, err := Open(path); !errors.Is(err, ErrLocked) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
}

// A bundle that expired must stay expired after a restart with the wall
// clock set back before its expiry.
func TestClockSetBackwardsDoesNotReviveExpiredBundle(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(t.TempDir(), "cache.db")
	s := f.open(t, path)
	b := f.bundle(t, 3, 24*time.Hour)
	if err := s.Accept(b, t0); err != nil {
		t.Fatal(err)
	}
	// The agent ran past expiry (its monotonic clock counted the time)
	// and, as it does on every mode change, persisted the trusted time
	// at that moment.
	past := b.ExpiresAt.Add(time.Hour)
	wall := func() time.Time { return past }
	ran := time.Duration(0)
	clock := trustedtime.NewWithMonotonic(t0, wall, func() time.Duration { return ran })
	ran = past.Sub(t0)
	d := localpolicy.Evaluate(localpolicy.Input{Bundle: &b.Payload, Device: scanner, Now: clock.Now()})
	if d.Mode != localpolicy.Offline {
		t.Fatalf("mode after expiry = %v, want offline", d.Mode)
	}
	if err := s.AdvanceTrustedTime(clock.Floor()); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = f.open(t, path)
	floor, err := s.TrustedTime()
	if err != nil {
		t.Fatal(err)
	}
	setBack := func() time.Time { return t0.Add(time.Hour) } // before expiry
	clock = trustedtime.New(floor, setBack)
	cached, err := s.Load(scanner)
	if err != nil {
		t.Fatal(err)
	}
	d = localpolicy.Evaluate(localpolicy.Input{Bundle: &cached.Payload, Device: scanner, Now: clock.Now()})
	if d.Mode != localpolicy.Offline {
		t.Errorf("mode with the clock set back = %v, want offline (expired)", d.Mode)
	}
	if err := cached.CheckTime(clock.Now()); !errors.Is(err, bundle.ErrExpired) {
		t.Errorf("CheckTime with the clock set back = %v, want ErrExpired", err)
	}
}

// An idle agent re-asserting unchanged state must not write to flash.
func TestNoWriteWithoutChange(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(t.TempDir(), "cache.db")
	s := f.open(t, path)
	if err := s.Accept(f.bundle(t, 3, time.Hour), t0); err != nil {
		t.Fatal(err)
	}
	st := localpolicy.Sticky{Mode: localpolicy.Quarantine, Reason: "INC-1", RevokedPartners: map[string]string{"a": "x", "b": "y"}}
	if changed, err := s.SetSticky(st); err != nil || !changed {
		t.Fatalf("first SetSticky = %v, %v; want changed", changed, err)
	}
	if _, err := s.SetRoots(bundle.NewRootSet(1, f.roots)); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	writes := pageWrites(s)

	for range 20 {
		if changed, err := s.SetSticky(st); err != nil || changed {
			t.Fatalf("SetSticky(same) = %v, %v; want unchanged", changed, err)
		}
		if changed, err := s.SetRoots(bundle.NewRootSet(1, f.roots)); err != nil || changed {
			t.Fatalf("SetRoots(same) = %v, %v; want unchanged", changed, err)
		}
		if err := s.AdvanceTrustedTime(t0.Add(-time.Hour)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load(scanner); err != nil {
			t.Fatal(err)
		}
		if _, err := s.AuditLog(); err != nil {
			t.Fatal(err)
		}
	}
	if got := pageWrites(s); got != writes {
		t.Errorf("bbolt page writes went from %d to %d with nothing changed", writes, got)
	}
	s.Close()
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Error("cache file changed with nothing changed")
	}
}

func TestStickyRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	s := open(t, path)
	want := localpolicy.Sticky{Mode: localpolicy.Diagnostic, Reason: "INC-9", RevokedPartners: map[string]string{"spotload-brokers": "breach"}}
	if _, err := s.SetSticky(want); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, path)
	got, err := s.Sticky()
	if err != nil {
		t.Fatal(err)
	}
	if got.Mode != want.Mode || got.Reason != want.Reason || got.RevokedPartners["spotload-brokers"] != "breach" {
		t.Errorf("Sticky after restart = %+v, want %+v", got, want)
	}
}

func TestCommandReplay(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "cache.db"))
	quarantined := localpolicy.Sticky{Mode: localpolicy.Quarantine, Reason: "q"}
	if err := s.Obey("cmd-1", t0.Add(time.Minute), t0, quarantined); err != nil {
		t.Fatal(err)
	}
	// A replay is refused and changes nothing, the sticky state included.
	if err := s.Obey("cmd-1", t0.Add(time.Minute), t0.Add(time.Second), localpolicy.Sticky{}); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay = %v, want ErrReplay", err)
	}
	if st, _ := s.Sticky(); st.Mode != localpolicy.Quarantine {
		t.Errorf("sticky after a refused replay = %+v", st)
	}
	// Expired ids are pruned when another command arrives.
	if err := s.Obey("cmd-2", t0.Add(time.Hour), t0.Add(2*time.Minute), quarantined); err != nil {
		t.Fatal(err)
	}
	var n int
	s.view(func(_ *bolt.Bucket, tx *bolt.Tx) error { n = tx.Bucket(bucketCommands).Stats().KeyN; return nil })
	if n != 1 {
		t.Errorf("%d remembered ids, want 1 after pruning", n)
	}
}

func TestAuditChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	s := open(t, path)
	for i := range 5 {
		if err := s.Audit(t0.Add(time.Duration(i)*time.Second), "bundle-rejected", "rollback: version 1 is not above 3"); err != nil {
			t.Fatal(err)
		}
	}
	events, err := s.AuditLog()
	if err != nil || len(events) != 5 {
		t.Fatalf("AuditLog = %d events, %v; want 5", len(events), err)
	}
	s.Close()
	rawEdit(t, path, func(_ *bolt.Bucket, tx *bolt.Tx) error {
		log := tx.Bucket(bucketAudit)
		v := bytes.Replace(log.Get(u64(3)), []byte("rollback"), []byte("accepted"), 1)
		return log.Put(u64(3), v)
	})
	s = open(t, path)
	if _, err := s.AuditLog(); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("AuditLog after an edit = %v, want ErrCorrupt", err)
	}
}

func TestAuditIsBounded(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "cache.db"))
	for i := range MaxAudit + 10 {
		if err := s.Audit(t0.Add(time.Duration(i)), "k", "d"); err != nil {
			t.Fatal(err)
		}
	}
	events, err := s.AuditLog()
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != MaxAudit || events[0].Seq != 11 {
		t.Errorf("kept %d events from seq %d, want %d from 11", len(events), events[0].Seq, MaxAudit)
	}
}

func pageWrites(s *Store) int64 {
	st := s.db.Stats()
	return st.TxStats.GetWrite()
}

// OnAudit sees each committed event once, whichever method wrote it, and
// nothing from a transaction that rolled back.
func TestOnAuditSeesCommittedEvents(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "cache.db"))
	var seen []string
	s.OnAudit(func(e Event) { seen = append(seen, fmt.Sprintf("%d %s", e.Seq, e.Kind)) })
	if err := s.Audit(t0, "drift-repaired", "x"); err != nil {
		t.Fatal(err)
	}
	s.update(func(_ *bolt.Bucket, tx *bolt.Tx) error {
		if err := s.appendAudit(tx, t0, "rolled-back", ""); err != nil {
			return err
		}
		return errors.New("abort")
	})
	if err := s.Obey("cmd-00000001", t0.Add(time.Minute), t0, localpolicy.Sticky{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Audit(t0, "mode-changed", "y"); err != nil {
		t.Fatal(err)
	}
	if want := []string{"1 drift-repaired", "2 mode-changed"}; !slices.Equal(seen, want) {
		t.Errorf("OnAudit saw %v, want %v", seen, want)
	}
}
