package site

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// planned is a site with its gateways' keys and endpoints filled in, as
// Build leaves them, without a kernel.
func planned() *Site {
	s := &Site{SensorName: "edr-0a1b2c"}
	for i, p := range segmentPlan {
		seg := p
		key := make([]byte, 32)
		key[0] = byte(i + 1)
		seg.Key, seg.Endpoint = base64.StdEncoding.EncodeToString(key), netip.MustParseAddrPort(fmt.Sprintf("10.201.0.%d:51820", 4*i+2))
		s.Segments = append(s.Segments, &seg)
	}
	return s
}

// The policy the demo signs is valid, with and without a shift, and opens
// to each class exactly the segments the reachability matrix expects:
// the matrix is judged against the policy, not against itself.
func TestPolicyMatchesTheMatrix(t *testing.T) {
	s := planned()
	for _, shift := range []*[2]string{nil, {"09:00", "17:00"}} {
		doc, err := policy.Parse([]byte(s.policyJSON(shift)))
		if err != nil {
			t.Fatalf("shift %v: %v", shift, err)
		}
		for class, want := range classSegments {
			var got []string
			for _, r := range doc.Classes[class].Rules {
				if !slices.Contains(got, r.Segment) {
					got = append(got, r.Segment)
				}
			}
			slices.Sort(got)
			want = slices.Sorted(slices.Values(want))
			if !slices.Equal(got, want) {
				t.Errorf("class %s: the policy opens %v, the matrix expects %v", class, got, want)
			}
		}
		if shift != nil && doc.Classes["scanner"].Rules[0].Schedule != "shift" {
			t.Errorf("with a shift, the scanner's wms rule has no schedule: %+v", doc.Classes["scanner"].Rules[0])
		}
	}
}

func TestMissing(t *testing.T) {
	d := controlapi.Device{Reports: []controlapi.Event{{Seq: 3}, {Seq: 4}, {Seq: 6}, {Seq: 9}}}
	if got := missing(d, 3); !slices.Equal(got, []uint64{5, 7, 8}) {
		t.Errorf("missing after 3: %v, want [5 7 8]", got)
	}
	if got := missing(d, 1); !slices.Equal(got, []uint64{2, 5, 7, 8}) {
		t.Errorf("missing after 1: %v, want [2 5 7 8]", got)
	}
	if got := lastSeq(d); got != 9 {
		t.Errorf("lastSeq = %d", got)
	}
}
