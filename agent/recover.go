package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/store"
)

// CacheFile is the policy cache's name in the state directory.
const CacheFile = "state.db"

// Recovery is what RecoverCache did.
type Recovery struct {
	// Kept is where the damaged cache was moved.
	Kept string
	// Damage is why the cache could not be trusted.
	Damage string
	// RefusedUpTo is the highest bundle version the new cache refuses
	// (0: none; rollback protection starts afresh).
	RefusedUpTo uint64
	// RootsPinned is how many ops keys the new cache trusts (the
	// configuration's), and their threshold.
	RootsPinned, Threshold int
}

// RecoverCache replaces a damaged policy cache with a fresh one, with the
// agent stopped: the damaged file is kept aside (state.db.damaged-TIME),
// the new cache trusts the ops keys the configuration pins, refuses
// bundles up to refuseUpTo (the version the device last ran, when ops
// know it, so an old bundle cannot be replayed into the empty cache), and
// its audit log starts with what was done. The device then enforces
// lockdown until a bundle arrives from control (its enrolment is kept)
// or by `bulkhead policy apply`; trust-root rotations since install are
// delivered again by control.
//
// It refuses a cache that is not damaged, and a running agent.
func RecoverCache(cfg *config.Config, refuseUpTo uint64, now time.Time) (Recovery, error) {
	if c, err := net.DialTimeout("unix", cfg.AdminSocket, time.Second); err == nil {
		c.Close()
		return Recovery{}, fmt.Errorf("the agent is running (its socket %s answers); stop it first (systemctl stop bulkhead)", cfg.AdminSocket)
	}
	path := filepath.Join(cfg.StateDir, CacheFile)
	st, err := store.Open(path)
	switch {
	case err == nil:
		defer st.Close()
		v, _ := st.Highest()
		return Recovery{}, fmt.Errorf("the policy cache %s is not damaged (it holds policy version %d); nothing to recover", path, v)
	case errors.Is(err, os.ErrNotExist):
		return Recovery{}, fmt.Errorf("there is no policy cache at %s", path)
	case !errors.Is(err, store.ErrCorrupt):
		return Recovery{}, err
	}
	damage := err
	roots, err := cfg.PinnedRoots()
	if err != nil {
		return Recovery{}, fmt.Errorf("the configuration's ops keys: %w", err)
	}
	r := Recovery{Damage: damage.Error(), Kept: path + ".damaged-" + now.UTC().Format("20060102T150405Z"),
		RefusedUpTo: refuseUpTo, RootsPinned: roots.Len(), Threshold: roots.Threshold}
	if err := os.Rename(path, r.Kept); err != nil {
		return Recovery{}, err
	}
	fresh, err := store.Open(path)
	if err != nil {
		return Recovery{}, err
	}
	defer fresh.Close()
	if _, err := fresh.SetRoots(bundle.NewRootSet(1, roots)); err != nil {
		return Recovery{}, err
	}
	if err := fresh.RefuseUpTo(refuseUpTo); err != nil {
		return Recovery{}, err
	}
	detail := fmt.Sprintf("damaged cache kept at %s; ops keys re-pinned from the configuration (%d, threshold %d); bundles up to version %d refused",
		r.Kept, r.RootsPinned, r.Threshold, refuseUpTo)
	return r, fresh.Audit(now, "cache-recovered", detail)
}
