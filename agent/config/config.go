// Package config owns the device agent's local configuration: the file
// as written (Config, named types throughout, so installers and tests
// build it as data) and the effective settings Resolve derives from it,
// defaults filled in and every field checked.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/bulkhead-edge/bulkhead/internal/strictjson"
	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/bundle"
	"github.com/bulkhead-edge/bulkhead/localpolicy/opskey"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
	"github.com/bulkhead-edge/bulkhead/posture/gpsd"
	"github.com/bulkhead-edge/bulkhead/tunnel"
)

// Defaults for fields a configuration may leave out.
const (
	DefaultStateDir = "/var/lib/bulkhead"
	DefaultSocket   = "/run/bulkhead/admin.sock"
	// DefaultPostureInterval is how often the device samples itself.
	DefaultPostureInterval = 30 * time.Second
)

// Config is the agent's local configuration (docs/config.md), as written:
// Resolve gives the effective settings. It holds what no signed policy may
// change: who the device is, which keys it trusts, and its safety floor.
type Config struct {
	Device Device `json:"device"`
	// Trust pins the ops keys. It is read on first start; later rotations
	// live in the state store.
	Trust       Trust                   `json:"trust"`
	SafetyFloor []localpolicy.FloorRule `json:"safety_floor,omitzero"`
	Control     []policy.Endpoint       `json:"control,omitzero"`
	StateDir    string                  `json:"state_dir,omitzero"`
	DropDir     string                  `json:"drop_dir,omitzero"`
	AdminSocket string                  `json:"admin_socket,omitzero"`
	// DHCP keeps DHCP client traffic open in every mode (default true).
	DHCP *bool `json:"dhcp,omitzero"`
	// Tunnel is the WireGuard interface segment traffic must use. Its key
	// lives in the state directory (wg.key, 0600).
	Tunnel TunnelConfig `json:"tunnel,omitzero"`
	// Posture says how often the device samples itself for the policy's
	// posture checks (default 30s).
	Posture PostureConfig `json:"posture,omitzero"`
	// Location is where the device's position comes from, for the
	// policy's geofence and fix-age checks: gpsd (a moving device), or a
	// static position (a fixed site). Neither: those checks fail.
	Location LocationConfig `json:"location,omitzero"`
	// Gateway makes the agent a segment gateway of these segments: it
	// enrols with a gateway token for exactly them, and needs a fixed
	// tunnel.listen_port (the one the policy names).
	Gateway *GatewayConfig `json:"gateway,omitzero"`
}

// GatewayConfig is the segment-gateway role.
type GatewayConfig struct {
	Segments []string `json:"segments"`
}

// Device is who the device is: its class (what it enrols as) and, once
// enrolled, its id.
type Device struct {
	ID    string `json:"id"`
	Class string `json:"class"`
}

// Trust names the ops.pub files to pin and how many of those keys must
// sign (0: all of them).
type Trust struct {
	Keys      []string `json:"keys"`
	Threshold int      `json:"threshold,omitzero"`
}

// TunnelConfig is the WireGuard device's setup.
type TunnelConfig struct {
	Interface  string         `json:"interface,omitzero"`
	Addresses  []netip.Prefix `json:"addresses,omitzero"`
	ListenPort uint16         `json:"listen_port,omitzero"`
	MTU        int            `json:"mtu,omitzero"`
	Buffers    uint32         `json:"buffers,omitzero"`
}

// PostureConfig paces the device's samples of itself.
type PostureConfig struct {
	Interval policy.Duration `json:"interval,omitzero"`
}

// LocationConfig is where positions come from: gpsd's host:port (usually
// 127.0.0.1:2947), or a fixed position.
type LocationConfig struct {
	GPSD   string    `json:"gpsd,omitzero"`
	Static *Position `json:"static,omitzero"`
}

// Position is a latitude and longitude in degrees.
type Position struct {
	Lat float64 `json:"lat"`
	Lon float64 `json:"lon"`
}

// Load reads a configuration file and returns the effective settings.
// Errors name the line and the field.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(data, path)
}

// Parse reads a configuration as Load does, naming it path in errors, and
// returns the effective settings.
func Parse(data []byte, path string) (*Config, error) {
	var c Config
	if err := strictjson.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("config %s: %s", path, strictjson.Line(data, err))
	}
	eff, err := c.Resolve()
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return eff, nil
}

// Resolve checks the configuration and returns the effective settings:
// a copy with every default filled in. c itself is not changed, so what
// was written can be written back as it was.
func (c Config) Resolve() (*Config, error) {
	var errs []error
	if c.Device.Class == "" && c.Device.ID == "" {
		errs = append(errs, errors.New("device: give at least class (and id once enrolled)"))
	}
	if len(c.Trust.Keys) == 0 {
		errs = append(errs, errors.New("trust.keys: name at least one ops.pub file"))
	}
	for i, f := range c.SafetyFloor {
		if f.Name == "" {
			errs = append(errs, fmt.Errorf("safety_floor[%d].name: is missing", i))
		}
		if err := f.Destination.Check(); err != nil {
			errs = append(errs, fmt.Errorf("safety_floor[%d]: %w", i, err))
		}
	}
	for i, e := range c.Control {
		if !e.Address.IsValid() || e.Port == 0 {
			errs = append(errs, fmt.Errorf("control[%d]: needs address and port", i))
		}
	}
	c.StateDir = cmp.Or(c.StateDir, DefaultStateDir)
	c.DropDir = cmp.Or(c.DropDir, filepath.Join(c.StateDir, "inbox"))
	c.AdminSocket = cmp.Or(c.AdminSocket, DefaultSocket)
	if c.DHCP == nil {
		yes := true
		c.DHCP = &yes
	}
	switch iv := time.Duration(c.Posture.Interval); {
	case iv == 0:
		c.Posture.Interval = policy.Duration(DefaultPostureInterval)
	case iv < time.Second:
		errs = append(errs, fmt.Errorf("posture.interval: %s is below the 1s minimum", iv))
	}
	switch l := c.Location; {
	case l.GPSD != "" && l.Static != nil:
		errs = append(errs, errors.New("location: give gpsd or static, not both"))
	case l.GPSD != "":
		if _, _, err := net.SplitHostPort(l.GPSD); err != nil {
			errs = append(errs, fmt.Errorf("location.gpsd: %q is not host:port (gpsd listens on %s)", l.GPSD, gpsd.DefaultAddr))
		}
	case l.Static != nil:
		if !(l.Static.Lat >= -90 && l.Static.Lat <= 90 && l.Static.Lon >= -180 && l.Static.Lon <= 180) {
			errs = append(errs, fmt.Errorf("location.static: (%g, %g) is not a latitude in -90..90 and a longitude in -180..180", l.Static.Lat, l.Static.Lon))
		}
	}
	if g := c.Gateway; g != nil {
		if len(g.Segments) == 0 {
			errs = append(errs, errors.New("gateway.segments: name the segments this gateway fronts"))
		}
		if c.Tunnel.ListenPort == 0 {
			errs = append(errs, errors.New("tunnel.listen_port: a gateway listens on a fixed port, the one the policy's segments name"))
		}
	}
	c.Tunnel.Interface = cmp.Or(c.Tunnel.Interface, tunnel.DefaultInterface)
	if err := c.WireGuard().Check(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &c, nil
}

// WireGuard is the tunnel's setup; the key file is fixed inside the state
// directory so that backups and purges find it with the rest.
func (c *Config) WireGuard() tunnel.Config {
	return tunnel.Config{
		Interface: c.Tunnel.Interface, Addresses: c.Tunnel.Addresses, ListenPort: c.Tunnel.ListenPort,
		MTU: c.Tunnel.MTU, Buffers: c.Tunnel.Buffers, KeyFile: filepath.Join(c.StateDir, "wg.key"),
	}
}

// Identity is who bundles and commands are targeted at, before enrolment
// assigns an id.
func (c *Config) Identity() bundle.Device {
	return bundle.Device{ID: c.Device.ID, Class: c.Device.Class}
}

// PinnedRoots reads the trust keys the configuration names.
func (c *Config) PinnedRoots() (opskey.Roots, error) {
	keys, err := opskey.LoadPublicKeys(c.Trust.Keys)
	if err != nil {
		return opskey.Roots{}, err
	}
	return opskey.NewRoots(opskey.OrAll(c.Trust.Threshold, len(keys)), keys...)
}
