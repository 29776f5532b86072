package agent

import (
	"errors"
	"log/slog"
	"strings"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/nft"
)

// table is the kernel table as the loop holds it: the Enforcer, the
// ruleset last built for it, and what became of it since: when it last
// changed, a failed apply, outside changes found and repaired, a table
// that could not be read back. Owned by the loop.
type table struct {
	kernel    Enforcer
	log       *slog.Logger
	wall      func() time.Time
	ruleset   nft.Ruleset
	lastApply time.Time
	repairs   int
	applyErr  string
	// tampered lists the outside changes found since the latest sample;
	// readErr is why the table could not be read back.
	tampered []string
	readErr  string
}

// apply makes the kernel's table rs and reports whether it changed; on
// failure the previous table stays in force, and the drift check applies
// rs again.
func (t *table) apply(rs nft.Ruleset) (changed bool, err error) {
	t.ruleset = rs
	changed, err = t.kernel.Apply(rs)
	if err != nil {
		t.applyErr = err.Error()
		return false, err
	}
	t.applyErr = ""
	if changed {
		t.lastApply = t.wall()
	}
	return changed, nil
}

// check compares the kernel's table with the ruleset (deep: the whole
// comparison; else the cheap one) and restores it after an outside
// change. It returns the drift found, if any, and whether it was
// repaired.
func (t *table) check(deep bool) (drift error, repaired bool) {
	compare := t.kernel.Verify
	if deep {
		compare = t.kernel.Check
	}
	err := compare(t.ruleset)
	switch {
	case err == nil:
		t.readErr = ""
		return nil, false
	case !errors.Is(err, nft.ErrDrift):
		t.log.Warn("cannot read the table back", "err", err)
		t.readErr = err.Error()
		return nil, false
	}
	t.log.Warn("table changed from outside; restoring", "drift", err)
	t.tampered = append(t.tampered, strings.TrimPrefix(err.Error(), nft.ErrDrift.Error()+": "))
	if rerr := t.kernel.Reapply(t.ruleset); rerr != nil {
		t.log.Error("restore failed", "err", rerr)
		return err, false
	}
	t.repairs++
	t.lastApply = t.wall()
	return err, true
}

// takeTampered returns the outside changes found since the last call.
func (t *table) takeTampered() []string {
	out := t.tampered
	t.tampered = nil
	return out
}
