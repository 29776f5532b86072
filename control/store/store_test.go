package store

import (
	"net/netip"
	"testing"
)

func TestLastOf(t *testing.T) {
	for p, want := range map[string]string{
		"100.64.0.0/29": "100.64.0.7", "10.0.0.0/8": "10.255.255.255", "10.0.0.0/23": "10.0.1.255",
		"10.1.2.3/32": "10.1.2.3", "fd00:b::/126": "fd00:b::3", "fd00::/64": "fd00::ffff:ffff:ffff:ffff",
	} {
		if got := LastOf(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("LastOf(%s) = %v, want %s", p, got, want)
		}
	}
}

// The next address follows the highest taken, and a pool filled to its
// end gives the lowest free below, or says it is exhausted.
func TestNextFree(t *testing.T) {
	pool := netip.MustParsePrefix("100.64.0.0/29")
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	taken := func(as ...string) func(func(netip.Addr) bool) {
		return func(yield func(netip.Addr) bool) {
			for _, s := range as {
				if !yield(a(s)) {
					return
				}
			}
		}
	}
	for _, tc := range []struct {
		highest netip.Addr
		taken   []string
		want    string // "" is exhausted
	}{
		{netip.Addr{}, nil, "100.64.0.1"},
		{a("100.64.0.3"), []string{"100.64.0.1", "100.64.0.2", "100.64.0.3"}, "100.64.0.4"},
		{a("100.64.0.6"), []string{"100.64.0.1", "100.64.0.3", "100.64.0.6"}, "100.64.0.2"},
		{a("100.64.0.6"), []string{"100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4", "100.64.0.5", "100.64.0.6"}, ""},
	} {
		got, err := NextFree(pool, tc.highest, taken(tc.taken...))
		if tc.want == "" {
			if err == nil {
				t.Errorf("after %v: %v, want exhausted", tc.highest, got)
			}
			continue
		}
		if err != nil || got != a(tc.want) {
			t.Errorf("after %v: %v (%v), want %s", tc.highest, got, err, tc.want)
		}
	}
}
