package agent

import (
	"context"
	"log/slog"
	"time"

	"github.com/bulkhead-edge/bulkhead/agent/config"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture"
	"github.com/bulkhead-edge/bulkhead/posture/gpsd"
)

// locator is the device's position as its checks see it: a configured
// static one, or gpsd's latest fix, followed by a goroutine (start) that
// hands every fix to the loop (fixes). The loop owns the rest: the fix,
// which geofences it lies in, and a timer (on stale) for the instant it
// grows too old for the strictest max_fix_age check.
type locator struct {
	static *config.Position
	gpsd   string
	fixes  chan gpsd.Position
	// fix is gpsd's latest position (none yet: zero Arrived), and sides
	// which of the policy's geofences it lies in.
	fix        gpsd.Position
	sides      uint64
	staleTimer *time.Timer
	stale      chan struct{}
}

func newLocator(c config.LocationConfig) locator {
	return locator{static: c.Static, gpsd: c.GPSD, fixes: make(chan gpsd.Position, 1), stale: make(chan struct{}, 1)}
}

// start follows gpsd, when configured, until ctx ends.
func (l *locator) start(ctx context.Context, log *slog.Logger) {
	if l.gpsd == "" {
		return
	}
	fixes := l.fixes
	go gpsd.Watch(ctx, l.gpsd, func(p gpsd.Position) {
		// Only the newest matters: one still waiting is replaced.
		select {
		case <-fixes:
		default:
		}
		fixes <- p // the only sender, and the buffer was just emptied
	}, func(err error) { log.Warn("no position from gpsd; retrying", "err", err) })
}

// update keeps the latest position, and says whether it must be judged
// at once: the first fix, or one on the other side of a geofence than
// the last. Others wait for the next sample, which sees the latest. The
// moment the fix grows too old for a max_fix_age check fires stale.
func (l *locator) update(p gpsd.Position, checks []policy.Check) (judge bool) {
	first := l.fix.Arrived.IsZero()
	l.fix = p
	var maxAge time.Duration
	for _, c := range checks {
		if age := time.Duration(c.MaxFixAge); age > 0 && (maxAge == 0 || age < maxAge) {
			maxAge = age
		}
	}
	if l.staleTimer != nil {
		l.staleTimer.Stop()
	}
	if maxAge > 0 {
		stale := l.stale
		l.staleTimer = time.AfterFunc(maxAge+time.Millisecond, func() {
			select {
			case stale <- struct{}{}:
			default:
			}
		})
	}
	fences := posture.Fences(checks)
	if len(fences) == 0 {
		return false
	}
	if sides := posture.Sides(fences, p.Lat, p.Lon); first || sides != l.sides {
		l.sides = sides
		return true
	}
	return false
}

// read adds the position to a sample, or names it unread.
func (l *locator) read(f *posture.Facts, now time.Time) {
	switch {
	case l.static != nil:
		f.Location = &posture.Fix{Lat: l.static.Lat, Lon: l.static.Lon, Source: "static"}
	case !l.fix.Arrived.IsZero():
		f.Location = &posture.Fix{Lat: l.fix.Lat, Lon: l.fix.Lon, Age: now.Sub(l.fix.Arrived), Source: "gpsd"}
	default:
		f.Unread = append(f.Unread, "location")
	}
}
