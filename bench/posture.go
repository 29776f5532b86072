package bench

import (
	"context"
	"testing"

	"github.com/bulkhead-edge/bulkhead/posture"
)

// benchPostureSample is what one posture sample costs the device: every
// fact the agent gathers each interval, on this machine's process table.
func benchPostureSample(b *testing.B) {
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := posture.Gather(ctx, "v1.0.0", posture.Wants{}); err != nil {
			b.Fatal(err)
		}
	}
}
