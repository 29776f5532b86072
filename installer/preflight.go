package installer

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/google/nftables"
)

// TUNDevice is where the kernel's TUN driver is opened.
const TUNDevice = "/dev/net/tun"

// checkRoot is the first field mistake: installing is root's job.
func checkRoot(verb string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("bulkhead %s must run as root: it manages a system service, %s, %s and the firewall (try: sudo bulkhead %s ...)",
			verb, ConfigDir, StateDir, verb)
	}
	return nil
}

// checkNFTables asks the kernel for its nftables tables, which needs
// nf_tables and the right to use it.
func checkNFTables() error {
	c, err := nftables.New()
	if err == nil {
		defer c.CloseLasting()
		_, err = c.ListTables()
	}
	return nftError(err)
}

// nftError says what an nftables failure means on a device.
func nftError(err error) error {
	switch {
	case err == nil:
		return nil
	// No nfnetlink at all, or nfnetlink without its nf_tables subsystem
	// (which answers a request for it with EINVAL or EOPNOTSUPP).
	case errors.Is(err, syscall.EPROTONOSUPPORT), errors.Is(err, syscall.EAFNOSUPPORT),
		errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.EOPNOTSUPP):
		return fmt.Errorf("this kernel has no nf_tables support (%v): Bulkhead enforces with nftables and cannot run without it; "+
			"use a kernel built with CONFIG_NF_TABLES and CONFIG_NF_TABLES_INET, or load them (modprobe nf_tables)", err)
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return fmt.Errorf("not permitted to use nf_tables (%v): run as root with CAP_NET_ADMIN (in a container, add the NET_ADMIN capability)", err)
	default:
		return fmt.Errorf("nf_tables: %w", err)
	}
}

// checkTUN opens the TUN driver the way the tunnel will.
func checkTUN(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err == nil {
		return f.Close()
	}
	return tunError(path, err)
}

func tunError(path string, err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("no TUN device at %s: the agent's WireGuard tunnel needs it; load the driver (modprobe tun, or a kernel with CONFIG_TUN), "+
			"or create the node (mkdir -p /dev/net && mknod %s c 10 200); in a container, pass the device through", path, path)
	case errors.Is(err, syscall.ENODEV), errors.Is(err, syscall.ENXIO):
		return fmt.Errorf("%s exists but this kernel has no TUN driver (%v): modprobe tun, or use a kernel with CONFIG_TUN", path, err)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("not permitted to open %s (%v): run as root; in a container, allow the device", path, err)
	default:
		return fmt.Errorf("TUN device %s: %w", path, err)
	}
}
