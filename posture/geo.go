package posture

import (
	"fmt"
	"math"
	"time"

	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Fix is the device's latest position: from gpsd for a moving device, or
// the static one in its configuration for a fixed site.
type Fix struct {
	Lat    float64       `json:"lat"`
	Lon    float64       `json:"lon"`
	Age    time.Duration `json:"age"`    // since it arrived (0 for a static position)
	Source string        `json:"source"` // "gpsd" or "static"
}

func (f Fix) String() string { return fmt.Sprintf("(%.5f, %.5f)", f.Lat, f.Lon) }

// earthRadiusM is the mean Earth radius (IUGG), in metres.
const earthRadiusM = 6371008.8

// Distance is the great-circle distance in metres between two points
// (haversine; within 0.5% of WGS 84 everywhere).
func Distance(lat1, lon1, lat2, lon2 float64) float64 {
	rad := math.Pi / 180
	dLat, dLon := (lat2-lat1)*rad, (lon2-lon1)*rad
	h := math.Pow(math.Sin(dLat/2), 2) + math.Cos(lat1*rad)*math.Cos(lat2*rad)*math.Pow(math.Sin(dLon/2), 2)
	return 2 * earthRadiusM * math.Asin(math.Min(1, math.Sqrt(h)))
}

// Inside reports whether (lat, lon) lies within g, and says where it is
// relative to it.
func Inside(g policy.Geofence, lat, lon float64) (bool, string) {
	if c := g.Circle; c != nil {
		d := Distance(c.Lat, c.Lon, lat, lon)
		return d <= c.RadiusM, fmt.Sprintf("%.0f m from the centre", d)
	}
	// Ray casting on the plane of latitude and longitude: exact enough
	// for a yard or a depot, and polygons may not cross the antimeridian.
	in := false
	for i, j := 0, len(g.Polygon)-1; i < len(g.Polygon); j, i = i, i+1 {
		yi, xi, yj, xj := g.Polygon[i][0], g.Polygon[i][1], g.Polygon[j][0], g.Polygon[j][1]
		if (yi > lat) != (yj > lat) && lon < (xj-xi)*(lat-yi)/(yj-yi)+xi {
			in = !in
		}
	}
	if in {
		return true, "inside the polygon"
	}
	return false, "outside the polygon"
}

// Fences are the geofence checks among checks; the agent judges each new
// fix against them (cheaply) to notice a crossing between samples.
func Fences(checks []policy.Check) []policy.Geofence {
	var out []policy.Geofence
	for _, c := range checks {
		if c.Geofence != nil {
			out = append(out, *c.Geofence)
		}
	}
	return out
}

// Sides is, for each fence, whether (lat, lon) is inside: two fixes with
// equal Sides are the same as far as the checks are concerned.
func Sides(fences []policy.Geofence, lat, lon float64) uint64 {
	var s uint64
	for i, g := range fences[:min(len(fences), 64)] {
		if in, _ := Inside(g, lat, lon); in {
			s |= 1 << i
		}
	}
	return s
}
