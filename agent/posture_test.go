package agent

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/bulkhead-edge/bulkhead/posture"
)

// The inventory tells peers (who connected to a listener here) from
// destinations (where this device connected), leaves loopback out, and
// lists each once.
func TestInventoryObservedPeersAndDestinations(t *testing.T) {
	ap := netip.MustParseAddrPort
	f := &posture.Facts{
		Listeners: []posture.Socket{{Protocol: "tcp", Local: ap("0.0.0.0:22")}},
		Established: []posture.Socket{
			{Protocol: "tcp", Local: ap("10.0.0.5:22"), Remote: ap("10.50.0.3:50122")},
			{Protocol: "tcp", Local: ap("10.0.0.5:22"), Remote: ap("10.50.0.3:50123")},
			{Protocol: "tcp", Local: ap("100.64.0.2:41000"), Remote: ap("10.20.1.10:443")},
			{Protocol: "udp", Local: ap("100.64.0.2:41001"), Remote: ap("10.20.2.5:5683")},
			{Protocol: "tcp", Local: ap("127.0.0.1:41002"), Remote: ap("127.0.0.1:8080")},
		},
	}
	peers, dsts := observed(f)
	if want := []string{"10.50.0.3"}; !slices.Equal(peers, want) {
		t.Errorf("peers = %q, want %q", peers, want)
	}
	if want := []string{"tcp 10.20.1.10:443", "udp 10.20.2.5:5683"}; !slices.Equal(dsts, want) {
		t.Errorf("destinations = %q, want %q", dsts, want)
	}
}
