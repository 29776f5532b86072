// Package agent owns the device daemon: its configuration, the boot
// sequence that enforces the cached policy before any network activity, the
// one event loop that owns all state, and the root-only admin socket that
// the CLI talks to.
package agent

import (
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
)

// Config is the agent's local configuration (docs/config.md). It holds what
// no signed policy may change: who the device is, which keys it trusts, and
// its safety floor.
type Config struct {
	Device struct {
		ID    string `json:"id"`
		Class string `json:"class"`
	} `json:"device"`
	// Trust pins the ops keys (ops.pub files) and how many must sign. It is
	// read on first start; later rotations live in the state store.
	Trust struct {
		Keys      []string `json:"keys"`
		Threshold int      `json:"threshold,omitzero"`
	} `json:"trust"`
	SafetyFloor []localpolicy.FloorRule `json:"safety_floor,omitzero"`
	Control     []policy.Endpoint       `json:"control,omitzero"`
	StateDir    string                  `json:"state_dir,omitzero"`
	DropDir     string                  `json:"drop_dir,omitzero"`
	AdminSocket string                  `json:"admin_socket,omitzero"`
	// DHCP keeps DHCP client traffic open in every mode (default true).
	DHCP *bool `json:"dhcp,omitzero"`
	// Tunnel is the WireGuard interface segment traffic must use. Its key
	// lives in the state directory (wg.key, 0600).
	Tunnel struct {
		Interface  string         `json:"interface,omitzero"`
		Addresses  []netip.Prefix `json:"addresses,omitzero"`
		ListenPort uint16         `json:"listen_port,omitzero"`
		MTU        int            `json:"mtu,omitzero"`
		Buffers    uint32         `json:"buffers,omitzero"`
	} `json:"tunnel,omitzero"`
	// Posture says how often the device samples itself for the policy's
	// posture checks (default 30s).
	Posture struct {
		Interval policy.Duration `json:"interval,omitzero"`
	} `json:"posture,omitzero"`
	// Location is where the device's position comes from, for the
	// policy's geofence and fix-age checks: gpsd (a moving device), or a
	// static position (a fixed site). Neither: those checks fail.
	Location struct {
		GPSD   string `json:"gpsd,omitzero"` // host:port, usually 127.0.0.1:2947
		Static *struct {
			Lat float64 `json:"lat"`
			Lon float64 `json:"lon"`
		} `json:"static,omitzero"`
	} `json:"location,omitzero"`
}

// LoadConfig reads and checks a configuration file. Errors name the line and
// the field.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return ParseConfig(data, path)
}

// ParseConfig checks a configuration as LoadConfig does, naming it path in
// errors; the installer checks what it is about to write with it.
func ParseConfig(data []byte, path string) (*Config, error) {
	var c Config
	if err := strictjson.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("config %s: %s", path, strictjson.Line(data, err))
	}
	if err := c.check(); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return &c, nil
}

func (c *Config) check() error {
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
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.DropDir == "" {
		c.DropDir = filepath.Join(c.StateDir, "inbox")
	}
	if c.AdminSocket == "" {
		c.AdminSocket = DefaultSocket
	}
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
	if c.Tunnel.Interface == "" {
		c.Tunnel.Interface = tunnel.DefaultInterface
	}
	if err := c.tunnel().Check(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// tunnel is the tunnel's setup; the key file is fixed inside the state
// directory so that backups and purges find it with the rest.
func (c *Config) tunnel() tunnel.Config {
	return tunnel.Config{
		Interface: c.Tunnel.Interface, Addresses: c.Tunnel.Addresses, ListenPort: c.Tunnel.ListenPort,
		MTU: c.Tunnel.MTU, Buffers: c.Tunnel.Buffers, KeyFile: filepath.Join(c.StateDir, "wg.key"),
	}
}

// device is the identity bundles are targeted at.
func (c *Config) device() bundle.Device {
	return bundle.Device{ID: c.Device.ID, Class: c.Device.Class}
}

// pinnedRoots reads the trust keys named in the configuration.
func (c *Config) pinnedRoots() (opskey.Roots, error) {
	keys, err := opskey.LoadPublicKeys(c.Trust.Keys)
	if err != nil {
		return opskey.Roots{}, err
	}
	k := c.Trust.Threshold
	if k == 0 {
		k = len(keys)
	}
	return opskey.NewRoots(k, keys...)
}
