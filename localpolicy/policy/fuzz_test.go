package policy

import (
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/examples"
)

func addExampleSeeds(f *testing.F) {
	all := examples.All()
	for _, name := range slices.Sorted(maps.Keys(all)) { // seeds in a fixed order
		data := all[name]
		f.Add(data)
	}
}

// FuzzParse: the strict parser never panics, and whatever it accepts
// survives a round trip through the encoder unchanged in meaning.
func FuzzParse(f *testing.F) {
	addExampleSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Parse(data)
		if err != nil {
			return
		}
		enc, err := json.Marshal(d)
		if err != nil {
			t.Fatalf("accepted document does not encode: %v", err)
		}
		again, err := Parse(enc)
		if err != nil {
			t.Fatalf("accepted document fails after a round trip: %v\n%s", err, enc)
		}
		if len(again.Segments) != len(d.Segments) || len(again.Classes) != len(d.Classes) {
			t.Fatal("round trip changed the document")
		}
	})
}

// FuzzValidate mutates one segment and one rule of the example and checks
// that every document Validate accepts keeps the invariants the evaluator
// relies on: no address shared by segments of different partners, rules and
// profiles only name known segments, profiles open nothing normal mode does
// not.
func FuzzValidate(f *testing.F) {
	base := examples.Site()
	f.Add(uint8(6), "10.70.0.10/32", "spotload-brokers", 3, uint8(1), "finance", "443", "wms")
	f.Add(uint8(2), "10.60.0.0/16", "", 0, uint8(0), "wms", "22-80", "finance")
	f.Add(uint8(0), "fd00:20:1::/48", "northline-freight", 1, uint8(2), "telemetry", "8883", "telemetry")
	f.Fuzz(func(t *testing.T, segIdx uint8, cidr, partner string, tier int, classIdx uint8, ruleSeg, port, profileSeg string) {
		var d Document
		if err := json.Unmarshal(base, &d); err != nil {
			t.Fatal(err)
		}
		seg := &d.Segments[int(segIdx)%len(d.Segments)]
		if p, err := netip.ParsePrefix(cidr); err == nil {
			seg.Destinations[0].CIDR = p
		}
		seg.Partner, seg.Tier = partner, tier
		names := sortedKeys(d.Classes)
		cname := names[int(classIdx)%len(names)]
		c := d.Classes[cname]
		r := Rule{Segment: ruleSeg}
		if pr, err := ParsePortRange(port); err == nil {
			r.Ports = []PortRange{pr}
		}
		c.Rules = append(c.Rules, r)
		c.Profiles.Restricted = append(c.Profiles.Restricted, profileSeg)
		d.Classes[cname] = c
		if d.Validate() != nil {
			return
		}
		checkInvariants(t, &d)
	})
}

func checkInvariants(t *testing.T, d *Document) {
	for i, a := range d.Segments {
		for _, b := range d.Segments[i+1:] {
			if a.Partner == b.Partner {
				continue
			}
			for _, x := range a.Destinations {
				for _, y := range b.Destinations {
					if x.CIDR.Overlaps(y.CIDR) {
						t.Fatalf("accepted: %s (%s) overlaps %s (%s) across partners", x.CIDR, a.Name, y.CIDR, b.Name)
					}
				}
			}
		}
	}
	for name, c := range d.Classes {
		var opened []string
		for _, r := range c.Rules {
			if _, ok := d.Segment(r.Segment); !ok {
				t.Fatalf("accepted: class %s rule names unknown segment %q", name, r.Segment)
			}
			opened = append(opened, r.Segment)
		}
		for _, p := range slices.Concat(c.Profiles.Restricted, c.Profiles.Offline, c.Profiles.Diagnostic) {
			if !slices.Contains(opened, p) {
				t.Fatalf("accepted: class %s profile opens %q beyond normal mode", name, p)
			}
		}
	}
}

// FuzzPortRange: UnmarshalText's fast path reads exactly what
// ParsePortRange reads, and refuses exactly what it refuses.
func FuzzPortRange(f *testing.F) {
	for _, s := range []string{"443", "8000-8099", "0", "65536", "1-65535", "00443", "9-8", "-", "4-", "+4", "1_0", "٣"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var got PortRange
		gotErr := got.UnmarshalText(b)
		want, wantErr := ParsePortRange(string(b))
		if (gotErr == nil) != (wantErr == nil) || (gotErr == nil && got != want) {
			t.Fatalf("%q: UnmarshalText = %v, %v; ParsePortRange = %v, %v", b, got, gotErr, want, wantErr)
		}
	})
}
