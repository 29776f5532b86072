// Package tunnel owns the device's WireGuard microtunnels: one userspace
// tailscale/wireguard-go device on a TUN interface, the device key, the
// peers (exactly the gateways the Desired state authorizes, diffed so that
// unchanged peers are never touched), the routes through the interface, the
// standard UAPI socket for `wg`, and the peers' live counters.
//
// The pure half (Diff, Routes, RouteDiff, ParseState) decides; the Linux
// half (Tunnel) applies.
package tunnel

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
)

// Defaults for the fields a Config may leave out.
const (
	DefaultInterface = "bh0"
	// DefaultMTU leaves room for WireGuard over IPv6 on a 1500-byte link.
	DefaultMTU = 1420
	// DefaultBuffers caps each of wireguard-go's packet pools (elements and
	// 128 KiB batch buffers). wireguard-go's own default is unbounded; this
	// bound keeps a small device's memory finite under any load while a
	// batch of 128 packets per queue still fits several times over.
	DefaultBuffers = 1024
)

// Config is how the tunnel is set up; none of it comes from policy.
type Config struct {
	// Interface is the TUN interface name (at most 15 bytes).
	Interface string
	// Addresses are the device's own addresses inside the tunnel, the ones
	// gateways route back to it.
	Addresses []netip.Prefix
	// ListenPort is the UDP port; 0 picks a free one.
	ListenPort uint16
	MTU        int
	// KeyFile holds the private key (0600); created on first start.
	KeyFile string
	// Buffers caps each packet pool; 0 means DefaultBuffers.
	Buffers uint32
	Logger  *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Interface == "" {
		c.Interface = DefaultInterface
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.Buffers == 0 {
		c.Buffers = DefaultBuffers
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return c
}

// Check reports every problem with the configuration.
func (c Config) Check() error {
	var errs []error
	if n := c.Interface; n != "" && (len(n) > 15 || strings.ContainsAny(n, "/ \t\n%") || n == "." || n == "..") {
		errs = append(errs, fmt.Errorf("tunnel.interface: %q is not a usable interface name (at most 15 characters, no '/', '%%' or spaces)", n))
	}
	if c.MTU != 0 && (c.MTU < 1280 || c.MTU > 65515) {
		errs = append(errs, fmt.Errorf("tunnel.mtu: %d is outside 1280-65515", c.MTU))
	}
	if c.Buffers != 0 && c.Buffers < 512 {
		// wireguard-go takes a whole batch (128) of pool items per reader
		// up front; much less than a few batches can stall it for good.
		errs = append(errs, fmt.Errorf("tunnel.buffers: %d is below the safe minimum of 512", c.Buffers))
	}
	for _, a := range c.Addresses {
		if !a.IsValid() || a.Addr().IsUnspecified() {
			errs = append(errs, fmt.Errorf("tunnel.addresses: %v is not an address with a prefix length", a))
		}
	}
	if c.KeyFile == "" {
		errs = append(errs, errors.New("tunnel: no key file"))
	}
	return errors.Join(errs...)
}
