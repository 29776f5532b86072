package server

import (
	"fmt"
	"net/netip"
)

// CheckTunnelPool says what is wrong with a pool of tunnel addresses, or
// nil: a masked prefix with room for at least two devices.
func CheckTunnelPool(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("tunnel pool: not a prefix")
	case p.Masked() != p:
		return fmt.Errorf("tunnel pool %s: host bits set (did you mean %s?)", p, p.Masked())
	case p.Addr().Is4() && p.Bits() > 29, p.Addr().Is6() && p.Bits() > 126:
		return fmt.Errorf("tunnel pool %s: too small; IPv4 pools are /29 or larger, IPv6 /126 or larger", p)
	}
	return nil
}
