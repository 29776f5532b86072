package flowlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
)

// nfnetlink_log's messages and configuration (linux/netfilter/nfnetlink_log.h).
const (
	msgPacket = netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8 | 0) // NFULNL_MSG_PACKET
	msgConfig = netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8 | 1) // NFULNL_MSG_CONFIG
	cfgCmd    = 1                                                // NFULA_CFG_CMD
	cfgMode   = 2                                                // NFULA_CFG_MODE
	cmdBind   = 1                                                // NFULNL_CFG_CMD_BIND
	copyPkt   = 2                                                // NFULNL_COPY_PACKET
	// copyRange is what is copied of each packet: an IPv6 header and the
	// ports after it.
	copyRange = 64
)

// Reader is a socket bound to one NFLOG group.
type Reader struct {
	c      *netlink.Conn
	lost   atomic.Uint64
	closed atomic.Bool
}

// Lost counts the times the kernel dropped messages because the socket's
// buffer was full (a burst of new connections).
func (r *Reader) Lost() uint64 { return r.lost.Load() }

// Open binds NFLOG group in the network namespace open at netns (-1: the
// caller's), asking for the first bytes of each packet. Only one socket
// in a namespace may bind a group; another holding it (a second agent,
// ulogd) is an error naming the group.
func Open(netns int, group uint16) (*Reader, error) {
	cfg := &netlink.Config{}
	if netns >= 0 {
		cfg.NetNS = netns
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("nflog: %w", err)
	}
	mode := binary.BigEndian.AppendUint32(nil, copyRange)
	mode = append(mode, copyPkt, 0)
	for _, a := range []netlink.Attribute{{Type: cfgCmd, Data: []byte{cmdBind}}, {Type: cfgMode, Data: mode}} {
		attrs, err := netlink.MarshalAttributes([]netlink.Attribute{a})
		if err != nil {
			c.Close()
			return nil, err
		}
		// struct nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the group (big-endian).
		data := append([]byte{unix.AF_UNSPEC, 0}, binary.BigEndian.AppendUint16(nil, group)...)
		if _, err := c.Execute(netlink.Message{
			Header: netlink.Header{Type: msgConfig, Flags: netlink.Request | netlink.Acknowledge},
			Data:   append(data, attrs...),
		}); err != nil {
			c.Close()
			if errors.Is(err, unix.EPERM) { // what the kernel answers for both
				return nil, fmt.Errorf("nflog group %d is bound by another program (ulogd, a second agent), or this process lacks CAP_NET_ADMIN: %w", group, err)
			}
			return nil, fmt.Errorf("nflog group %d: %w", group, err)
		}
	}
	return &Reader{c: c}, nil
}

// Read calls fn for each flow logged until the Reader is closed.
func (r *Reader) Read(fn func(controlapi.Flow)) error {
	for {
		msgs, err := r.c.Receive()
		switch {
		case err == nil:
		case r.closed.Load(): // the poller's "use of closed file" is not exported
			return nil
		case errors.Is(err, unix.ENOBUFS):
			r.lost.Add(1)
			continue
		case err != nil:
			return fmt.Errorf("nflog: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != msgPacket {
				continue
			}
			if f, ok := Parse(m.Data); ok {
				fn(f)
			}
		}
	}
}

// Closed reports whether Close was called.
func (r *Reader) Closed() bool { return r.closed.Load() }

// Close unbinds the group (the kernel does it with the socket) and makes
// Read return.
func (r *Reader) Close() error {
	r.closed.Store(true)
	return r.c.Close()
}
