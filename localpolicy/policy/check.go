package policy

import (
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"time"
)

// Check is a posture check: a fact about the device that must hold for it
// to keep normal access. The device judges it on itself at every sample;
// when it fails FailAfter samples in a row the device enters Profile, and
// it leaves again after RecoverAfter passing samples in a row.
//
// Exactly one of the fields after RecoverAfter says what is checked.
type Check struct {
	ID string `json:"id"`
	// Profile is the mode a failing check imposes: "restricted" (the
	// default), "diagnostic" or "quarantine".
	Profile      string `json:"profile,omitzero"`
	FailAfter    int    `json:"fail_after,omitzero"`    // default 1
	RecoverAfter int    `json:"recover_after,omitzero"` // default 1

	// Kernel bounds the running kernel's version ("6.1" means 6.1.0).
	Kernel *VersionRange `json:"kernel,omitzero"`
	// OS lists the allowed distributions, by os-release ID ("debian").
	OS []string `json:"os,omitzero"`
	// AgentVersion is the lowest agent release allowed ("v1.4.0").
	AgentVersion string `json:"agent_version,omitzero"`
	// Process must be running; ForbiddenProcess must not be.
	Process          *ProcessMatch `json:"process,omitzero"`
	ForbiddenProcess *ProcessMatch `json:"forbidden_process,omitzero"`
	// Listeners lists every port allowed to listen; any other fails.
	Listeners []Listener `json:"listeners,omitzero"`
	// File must exist with the given SHA-256.
	File *FileDigest `json:"file,omitzero"`
	// FreeDisk is a minimum of free space on a filesystem.
	FreeDisk *FreeDisk `json:"free_disk,omitzero"`
	// MaxUptime fails a device not rebooted (so not patched) for longer.
	MaxUptime Duration `json:"max_uptime,omitzero"`
	// MaxClockSkew bounds how far the device's wall clock may be from
	// control's time, as last received over the authenticated channel
	// and carried forward by the monotonic clock.
	MaxClockSkew Duration `json:"max_clock_skew,omitzero"`
	// TableIntact fails when anything but the agent changed its nftables
	// table since the previous sample (the agent restores the table
	// within a second; this makes the tampering cost the device access).
	TableIntact bool `json:"table_intact,omitzero"`
	// Geofence must contain the device's latest position (gpsd's, or the
	// static one in its configuration), however old that fix is.
	Geofence *Geofence `json:"geofence,omitzero"`
	// MaxFixAge bounds how long ago the latest position arrived: a stale
	// or missing fix is its own state, with this check's profile.
	MaxFixAge Duration `json:"max_fix_age,omitzero"`
	// Traffic bounds what moves through the tunnel to a segment's gateway
	// within a sliding window: a device suddenly moving ten times its
	// usual traffic fails it.
	Traffic *TrafficLimit `json:"traffic,omitzero"`
}

// TrafficLimit is at most MaxBytes, both directions together, through the
// tunnel to Segment's gateway within any Window. The tunnel's counters are
// per gateway: segments behind one gateway share them.
type TrafficLimit struct {
	Segment  string   `json:"segment"`
	MaxBytes uint64   `json:"max_bytes"`
	Window   Duration `json:"window"`
}

// VersionRange bounds a version: at least Min, below Below.
type VersionRange struct {
	Min   string `json:"min,omitzero"`
	Below string `json:"below,omitzero"`
}

// ProcessMatch names a process by its command name (as in ps -o comm, at
// most 15 characters) and, optionally, pins its executable's SHA-256.
type ProcessMatch struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256,omitzero"`
}

// Listener is a protocol and the ports allowed to listen on it.
type Listener struct {
	Protocol Protocol    `json:"protocol"`
	Ports    []PortRange `json:"ports"`
}

// FileDigest pins a file's content.
type FileDigest struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
}

// FreeDisk is the least free space allowed on the filesystem holding Path.
type FreeDisk struct {
	Path     string `json:"path"`
	MinBytes uint64 `json:"min_bytes"`
}

// Geofence is an area: a circle, or a polygon of at least three
// vertices (latitude, longitude in degrees, WGS 84), not crossing the
// antimeridian.
type Geofence struct {
	Circle  *Circle      `json:"circle,omitzero"`
	Polygon [][2]float64 `json:"polygon,omitzero"`
}

// Circle is a centre and a radius in metres.
type Circle struct {
	Lat     float64 `json:"lat"`
	Lon     float64 `json:"lon"`
	RadiusM float64 `json:"radius_m"`
}

// Kind names what the check tests, for messages ("process", "kernel").
func (c *Check) Kind() string {
	kinds := c.kinds()
	if len(kinds) != 1 {
		return ""
	}
	return kinds[0]
}

func (c *Check) kinds() []string {
	var k []string
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"kernel", c.Kernel != nil}, {"os", len(c.OS) > 0}, {"agent_version", c.AgentVersion != ""},
		{"process", c.Process != nil}, {"forbidden_process", c.ForbiddenProcess != nil},
		{"listeners", c.Listeners != nil}, {"file", c.File != nil}, {"free_disk", c.FreeDisk != nil},
		{"max_uptime", c.MaxUptime != 0}, {"traffic", c.Traffic != nil},
		{"max_clock_skew", c.MaxClockSkew != 0}, {"table_intact", c.TableIntact},
		{"geofence", c.Geofence != nil}, {"max_fix_age", c.MaxFixAge != 0},
	} {
		if f.set {
			k = append(k, f.name)
		}
	}
	return k
}

var (
	sha256RE  = regexp.MustCompile(`^[0-9a-f]{64}$`)
	versionRE = regexp.MustCompile(`^v?[0-9]+(\.[0-9]+){0,2}$`)
	commRE    = regexp.MustCompile(`^[^/\x00]{1,15}$`)
)

// Profiles a failing check may impose.
var checkProfiles = []string{"restricted", "diagnostic", "quarantine"}

func (v *validator) checkChecks(p string, checks []Check, d *Document) {
	seen := map[string]bool{}
	for i, c := range checks {
		cp := fmt.Sprintf("%s.checks[%d]", p, i)
		switch {
		case !nameRE.MatchString(c.ID):
			v.addf(cp+".id", "%q must be 1-32 characters of a-z, 0-9, '-' or '_'", c.ID)
		case seen[c.ID]:
			v.addf(cp+".id", "%q is used twice", c.ID)
		}
		seen[c.ID] = true
		if c.Profile != "" && !slices.Contains(checkProfiles, c.Profile) {
			v.addf(cp+".profile", "%q is not one of %v", c.Profile, checkProfiles)
		}
		if c.FailAfter < 0 || c.FailAfter > 100 {
			v.addf(cp+".fail_after", "%d is outside 1-100", c.FailAfter)
		}
		if c.RecoverAfter < 0 || c.RecoverAfter > 100 {
			v.addf(cp+".recover_after", "%d is outside 1-100", c.RecoverAfter)
		}
		switch kinds := c.kinds(); len(kinds) {
		case 0:
			v.addf(cp, "says nothing to check (one of kernel, os, agent_version, process, forbidden_process, listeners, file, free_disk, max_uptime, max_clock_skew, table_intact, geofence, max_fix_age, traffic)")
			continue
		case 1:
		default:
			v.addf(cp, "checks %v at once; one check tests one thing", kinds)
			continue
		}
		switch {
		case c.Kernel != nil:
			if c.Kernel.Min == "" && c.Kernel.Below == "" {
				v.addf(cp+".kernel", "needs min, below or both")
			}
			for _, s := range []struct{ f, v string }{{"min", c.Kernel.Min}, {"below", c.Kernel.Below}} {
				if s.v != "" && !versionRE.MatchString(s.v) {
					v.addf(cp+".kernel."+s.f, "%q is not a version such as \"6.1\" or \"5.10.209\"", s.v)
				}
			}
		case c.AgentVersion != "":
			if !versionRE.MatchString(c.AgentVersion) {
				v.addf(cp+".agent_version", "%q is not a version such as \"v1.4.0\"", c.AgentVersion)
			}
		case c.Process != nil || c.ForbiddenProcess != nil:
			m, f := c.Process, "process"
			if m == nil {
				m, f = c.ForbiddenProcess, "forbidden_process"
			}
			if !commRE.MatchString(m.Name) {
				v.addf(cp+"."+f+".name", "%q is not a command name (1-15 characters, no '/'; what ps -o comm shows)", m.Name)
			}
			if m.SHA256 != "" && !sha256RE.MatchString(m.SHA256) {
				v.addf(cp+"."+f+".sha256", "is not 64 lower-case hex digits")
			}
		case c.Listeners != nil:
			for j, l := range c.Listeners {
				if !l.Protocol.HasPorts() {
					v.addf(fmt.Sprintf("%s.listeners[%d].protocol", cp, j), "must be tcp or udp")
				}
			}
		case c.File != nil:
			if !filepath.IsAbs(c.File.Path) {
				v.addf(cp+".file.path", "%q is not an absolute path", c.File.Path)
			}
			if !sha256RE.MatchString(c.File.SHA256) {
				v.addf(cp+".file.sha256", "is not 64 lower-case hex digits")
			}
		case c.FreeDisk != nil:
			if !filepath.IsAbs(c.FreeDisk.Path) {
				v.addf(cp+".free_disk.path", "%q is not an absolute path", c.FreeDisk.Path)
			}
			if c.FreeDisk.MinBytes == 0 {
				v.addf(cp+".free_disk.min_bytes", "is missing or 0")
			}
		case c.MaxUptime < 0:
			v.addf(cp+".max_uptime", "must be positive")
		case c.MaxClockSkew < 0:
			v.addf(cp+".max_clock_skew", "must be positive")
		case c.MaxFixAge < 0:
			v.addf(cp+".max_fix_age", "must be positive")
		case c.Geofence != nil:
			v.checkGeofence(cp+".geofence", c.Geofence)
		case c.Traffic != nil:
			if _, ok := d.Segment(c.Traffic.Segment); !ok {
				v.addf(cp+".traffic.segment", "names unknown segment %q", c.Traffic.Segment)
			}
			if c.Traffic.MaxBytes == 0 {
				v.addf(cp+".traffic.max_bytes", "is missing or 0")
			}
			if w := time.Duration(c.Traffic.Window); w < time.Second || w > 24*time.Hour {
				v.addf(cp+".traffic.window", "%s is outside 1s-24h", w)
			}
		}
	}
}

func (v *validator) checkGeofence(p string, g *Geofence) {
	point := func(pp string, lat, lon float64) {
		if !(lat >= -90 && lat <= 90) || !(lon >= -180 && lon <= 180) {
			v.addf(pp, "(%g, %g) is not a latitude in -90..90 and a longitude in -180..180", lat, lon)
		}
	}
	switch {
	case (g.Circle != nil) == (g.Polygon != nil):
		v.addf(p, "needs exactly one of circle and polygon")
	case g.Circle != nil:
		point(p+".circle", g.Circle.Lat, g.Circle.Lon)
		if !(g.Circle.RadiusM > 0 && g.Circle.RadiusM <= 1e6) {
			v.addf(p+".circle.radius_m", "%g is outside 1 m-1000 km", g.Circle.RadiusM)
		}
	case len(g.Polygon) < 3:
		v.addf(p+".polygon", "has %d vertices; an area needs at least 3", len(g.Polygon))
	default:
		for i, pt := range g.Polygon {
			point(fmt.Sprintf("%s.polygon[%d]", p, i), pt[0], pt[1])
		}
	}
}
