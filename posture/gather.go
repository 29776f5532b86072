package posture

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"time"

	"github.com/shirou/gopsutil/v3/disk"
	"github.com/shirou/gopsutil/v3/host"
	"github.com/shirou/gopsutil/v3/load"
	"github.com/shirou/gopsutil/v3/mem"
	psnet "github.com/shirou/gopsutil/v3/net"
	"github.com/shirou/gopsutil/v3/process"
)

// maxHashed caps what one file or executable costs to hash.
const maxHashed = 256 << 20

// Gather samples the host: what every sample has, plus what w asks for.
// A fact that cannot be read is left empty rather than failing the whole
// sample; the checks that need it then fail on their own terms.
func Gather(ctx context.Context, agentVersion string, w Wants) (*Facts, error) {
	f := &Facts{Time: time.Now(), AgentVersion: agentVersion, Arch: runtime.GOARCH, CPUs: runtime.NumCPU(), Self: int32(os.Getpid())}
	info, err := host.InfoWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("posture: host facts: %w", err)
	}
	f.Hostname, f.OS, f.OSVersion, f.Kernel = info.Hostname, info.Platform, info.PlatformVersion, info.KernelVersion
	f.BootTime = time.Unix(int64(info.BootTime), 0)
	f.Uptime = time.Duration(info.Uptime) * time.Second
	if l, err := load.AvgWithContext(ctx); err == nil {
		f.Load1 = l.Load1
	}
	if m, err := mem.VirtualMemoryWithContext(ctx); err == nil {
		f.MemTotal, f.MemAvailable = m.Total, m.Available
	}
	for _, p := range append([]string{"/"}, w.Disks...) {
		if slices.ContainsFunc(f.Disks, func(d Disk) bool { return d.Path == p }) {
			continue
		}
		if u, err := disk.UsageWithContext(ctx, p); err == nil {
			f.Disks = append(f.Disks, Disk{Path: p, Total: u.Total, Free: u.Free})
		}
	}
	if f.Processes, err = processes(ctx, w.HashNames); err != nil {
		f.Unread = append(f.Unread, "processes")
	}
	if f.Listeners, f.Established, err = sockets(ctx); err != nil {
		f.Unread = append(f.Unread, "sockets")
	}
	f.Interfaces = interfaces(ctx)
	for _, p := range w.Files {
		fl := File{Path: p}
		if sum, err := hashFile(p); err != nil {
			fl.Error = err.Error()
		} else {
			fl.SHA256 = sum
		}
		f.Files = append(f.Files, fl)
	}
	return f, nil
}

func processes(ctx context.Context, hashNames []string) ([]Process, error) {
	procs, err := process.ProcessesWithContext(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Process, 0, len(procs))
	for _, p := range procs {
		name, err := p.NameWithContext(ctx)
		if err != nil {
			continue // gone meanwhile
		}
		pr := Process{PID: p.Pid, Name: name}
		if slices.Contains(hashNames, name) {
			// /proc/PID/exe opens the very binary running, even when the
			// file at its path was replaced since.
			if exe, err := p.ExeWithContext(ctx); err == nil {
				pr.Exe = exe
			}
			if sum, err := hashFile(fmt.Sprintf("/proc/%d/exe", p.Pid)); err == nil {
				pr.SHA256 = sum
			}
		}
		out = append(out, pr)
	}
	return out, nil
}

// sockets lists the TCP and UDP sockets with their owning processes:
// listening ones (TCP LISTEN, UDP without a peer) and established TCP.
func sockets(ctx context.Context) (listen, established []Socket, err error) {
	conns, err := psnet.ConnectionsWithoutUidsWithContext(ctx, "inet")
	if err != nil {
		return nil, nil, err
	}
	for _, c := range conns {
		s := Socket{Protocol: "tcp", Local: addrPort(c.Laddr), Remote: addrPort(c.Raddr), PID: c.Pid}
		if c.Type == 2 { // SOCK_DGRAM
			s.Protocol = "udp"
		}
		switch {
		case s.Protocol == "tcp" && c.Status == "LISTEN", s.Protocol == "udp" && !s.Remote.IsValid():
			s.Remote = netip.AddrPort{}
			listen = append(listen, s)
		case s.Protocol == "tcp" && c.Status == "ESTABLISHED":
			established = append(established, s)
		}
	}
	return listen, established, nil
}

func addrPort(a psnet.Addr) netip.AddrPort {
	ip, err := netip.ParseAddr(a.IP)
	if err != nil || ip.IsUnspecified() && a.Port == 0 {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port))
}

func interfaces(ctx context.Context) []Interface {
	ifs, err := psnet.InterfacesWithContext(ctx)
	if err != nil {
		return nil
	}
	out := make([]Interface, 0, len(ifs))
	for _, i := range ifs {
		it := Interface{Name: i.Name, Up: slices.Contains(i.Flags, "up")}
		for _, a := range i.Addrs {
			if p, err := netip.ParsePrefix(a.Addr); err == nil {
				it.Addrs = append(it.Addrs, p)
			}
		}
		out = append(out, it)
	}
	return out
}

func hashFile(path string) (string, error) {
	fh, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%s is missing", path)
	}
	if err != nil {
		return "", err
	}
	defer fh.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(fh, maxHashed)); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
