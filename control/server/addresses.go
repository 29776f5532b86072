package server

import (
	"bytes"
	"fmt"
	"net/netip"

	bolt "go.etcd.io/bbolt"
)

// bucketAddresses records the tunnel addresses assigned: address (16
// bytes) -> device id.
var bucketAddresses = []byte("addresses")

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

// assignAddress takes the lowest free address of pool for the device id,
// inside tx (the enrolment's transaction: a failed enrolment assigns
// nothing). The pool's network address and, for IPv4, its broadcast
// address are never assigned.
func assignAddress(tx *bolt.Tx, pool netip.Prefix, id string) (netip.Addr, error) {
	b := tx.Bucket(bucketAddresses)
	want := pool.Addr().Next()
	c := b.Cursor()
	for k, _ := c.Seek(addrKey(want)); k != nil && bytes.Equal(k, addrKey(want)); k, _ = c.Next() {
		want = want.Next()
	}
	last := !pool.Contains(want.Next())
	if !want.IsValid() || !pool.Contains(want) || (want.Is4() && last) {
		return netip.Addr{}, fmt.Errorf("the tunnel address pool %s is exhausted; widen it (bulkhead-control serve --tunnel-pool)", pool)
	}
	return want, b.Put(addrKey(want), []byte(id))
}

func addrKey(a netip.Addr) []byte {
	k := a.As16()
	return k[:]
}
