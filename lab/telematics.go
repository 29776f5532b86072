package lab

import (
	"net/netip"

	"github.com/bulkhead-edge/bulkhead/localpolicy"
	"github.com/bulkhead-edge/bulkhead/localpolicy/policy"
)

// Telematics is a truck's in-cab network: the vehicle safety controller,
// a host in a namespace of its own on a link from the device, answering
// TCP echo on the Modbus port. No policy names it. The agent's safety
// floor (device configuration, Floor) is the only thing that opens
// it, and it stays open in every mode, quarantine included.
type Telematics struct {
	NS         *NS
	Controller netip.AddrPort
	Net        netip.Prefix
}

// ModbusPort is where the safety controller listens.
const ModbusPort = 502

// StartTelematics links dev to a new namespace on network (at least a
// /30): the device takes its first address, the controller the second.
func StartTelematics(t T, dev *NS, network netip.Prefix) *Telematics {
	t.Helper()
	network = network.Masked()
	devAddr := network.Addr().Next()
	ctrl := devAddr.Next()
	if !network.Contains(ctrl) || network.Bits() > ctrl.BitLen()-2 {
		t.Fatalf("lab: telematics network %s has no room for two hosts", network)
	}
	tm := &Telematics{NS: NewNS(t, "truck"), Controller: netip.AddrPortFrom(ctrl, ModbusPort), Net: network}
	Link(t, dev, netip.PrefixFrom(devAddr, network.Bits()).String(), tm.NS, netip.PrefixFrom(ctrl, network.Bits()).String())
	Echo(t, tm.NS, tm.Controller)
	return tm
}

// Floor is the agent configuration's safety_floor entry that keeps the
// controller reachable.
func (tm *Telematics) Floor() localpolicy.FloorRule {
	return localpolicy.FloorRule{Name: "vehicle safety controller",
		Destination: policy.Destination{CIDR: tm.Net, Protocol: policy.TCP, Ports: []policy.PortRange{{First: ModbusPort, Last: ModbusPort}}}}
}
