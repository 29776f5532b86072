// Package wgbare is the bare tailscale/wireguard-go library as a daemon, the
// way its own main package runs it: a TUN device, the library's defaults
// (no pool bound, default queues), and the UAPI socket, configured from
// outside with `wg`. The lab uses it as a gateway and as the reference that
// the agent's data path is measured against: whatever the agent costs on
// top of the library shows up as the difference.
package wgbare

import (
	"context"
	"fmt"

	"github.com/tailscale/wireguard-go/conn"
	"github.com/tailscale/wireguard-go/device"
	"github.com/tailscale/wireguard-go/ipc"
	"github.com/tailscale/wireguard-go/tun"
)

// Run serves iface until ctx ends or the device closes.
func Run(ctx context.Context, iface string) error {
	tdev, err := tun.CreateTUN(iface, device.DefaultMTU)
	if err != nil {
		return fmt.Errorf("tun %s: %w", iface, err)
	}
	logger := device.NewLogger(device.LogLevelError, "("+iface+") ")
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), logger)
	defer dev.Close()
	f, err := ipc.UAPIOpen(iface)
	if err != nil {
		return fmt.Errorf("uapi %s: %w", iface, err)
	}
	l, err := ipc.UAPIListen(iface, f)
	f.Close()
	if err != nil {
		return fmt.Errorf("uapi %s: %w", iface, err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go dev.IpcHandle(c)
		}
	}()
	select {
	case <-ctx.Done():
	case <-dev.Wait():
	}
	return nil
}
