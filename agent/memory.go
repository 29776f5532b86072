package agent

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Freed heap an agent may keep mapped, and how often it looks.
const (
	retainedFree = 256 << 10
	trimEvery    = 500 * time.Millisecond
)

// startTrimmer hands freed heap pages back to the system whenever more
// than retainedFree of them are held, until ctx ends. Known bursts (a
// bundle install, a posture sample) release their own garbage at once;
// this catches what a collection frees between them. The runtime's own
// scavenger keeps freed pages up to its heap goal, and wireguard-go's
// offload tables (3.6 MiB allocated at start, untouched while idle)
// inflate that goal: left alone, an idle agent with 16 peers kept about a
// MiB of dead pages resident (15.1 MiB peak, 14.2 with the trimmer).
// Reading the metric costs microseconds; a release is a full collection
// of a small heap, run off the event loop so a command never waits for
// it. Under a full tunnel it runs every few seconds.
//
// A segment gateway runs none: it forwards a whole segment's traffic,
// whose garbage keeps more than retainedFree free between collections,
// so the trimmer forced a full collection and a page-fault storm every
// half second. With it the gateway bench read 0.86× the bare library's
// throughput; without it, and at the runtime's default GOGC, 0.95-0.99×.
func startTrimmer(ctx context.Context) {
	go func() {
		tick := time.NewTicker(trimEvery)
		defer tick.Stop()
		s := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}}
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			metrics.Read(s)
			if s[0].Value.Kind() == metrics.KindUint64 && s[0].Value.Uint64() > retainedFree {
				debug.FreeOSMemory()
			}
		}
	}()
}
