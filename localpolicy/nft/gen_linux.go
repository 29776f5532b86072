package nft

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"syscall"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The kernel numbers nftables transactions: every committed batch in a
// namespace, whoever sends it, advances the ruleset generation (what `nft
// list ruleset` prints as its generation). While the generation stands
// still, no table, chain, rule, set or element in the namespace can have
// changed, so a drift check that finds it where the last full comparison
// left it has nothing more to read. google/nftables decodes generation
// messages from its monitor but cannot ask for the current one, so this
// sends NFT_MSG_GETGEN itself.

const (
	getGen = netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN)
	newGen = netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWGEN)
)

// genSocket is the open socket generation asks on, with the buffer its
// answers are read into: twice a second for the agent's lifetime, so the
// answer is read into one reused buffer instead of a new one each time.
type genSocket struct {
	c   *netlink.Conn
	rc  syscall.RawConn
	seq uint32
	req [20]byte // struct nlmsghdr, then struct nfgenmsg
	buf [1024]byte
}

// generation returns the namespace's ruleset generation. An error closes
// the socket so the next call starts afresh. The caller holds e.mu.
func (e *Enforcer) generation() (uint32, error) {
	if e.gen == nil {
		g, err := dialGen(e.netns)
		if err != nil {
			return 0, fmt.Errorf("nftables: ruleset generation: %w", err)
		}
		e.gen = g
	}
	id, err := e.gen.ask()
	if err != nil {
		e.gen.c.Close()
		e.gen = nil
		return 0, fmt.Errorf("nftables: ruleset generation: %w", err)
	}
	return id, nil
}

func dialGen(netns int) (*genSocket, error) {
	cfg := &netlink.Config{}
	if netns >= 0 {
		cfg.NetNS = netns
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, err
	}
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	return &genSocket{c: c, rc: rc}, nil
}

// ask sends NFT_MSG_GETGEN and reads the answer. The request is written
// in place (nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, resource id
// 0) and the answer read into g.buf.
func (g *genSocket) ask() (uint32, error) {
	g.seq++
	binary.NativeEndian.PutUint32(g.req[0:], uint32(len(g.req)))
	binary.NativeEndian.PutUint16(g.req[4:], uint16(getGen))
	binary.NativeEndian.PutUint16(g.req[6:], uint16(netlink.Request))
	binary.NativeEndian.PutUint32(g.req[8:], g.seq)
	var werr error
	err := g.rc.Write(func(fd uintptr) bool {
		_, werr = unix.Write(int(fd), g.req[:])
		return werr != unix.EAGAIN
	})
	if err = cmp.Or(err, werr); err != nil {
		return 0, err
	}
	for {
		var n int
		var rerr error
		err := g.rc.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), g.buf[:])
			return rerr != unix.EAGAIN
		})
		if err = cmp.Or(err, rerr); err != nil {
			return 0, err
		}
		if id, done, err := parseGen(g.buf[:n], g.seq); done {
			return id, err
		}
	}
}

// parseGen looks through one read's messages for the answer to request
// seq: the NEWGEN message's NFTA_GEN_ID, or the error the kernel sent
// instead. done is false when the read held no answer to seq.
func parseGen(b []byte, seq uint32) (id uint32, done bool, err error) {
	const hdrLen = 16 // struct nlmsghdr
	for len(b) >= hdrLen {
		l := int(binary.NativeEndian.Uint32(b))
		if l < hdrLen || l > len(b) {
			return 0, true, fmt.Errorf("malformed netlink message")
		}
		m, typ, mseq := b[hdrLen:l], netlink.HeaderType(binary.NativeEndian.Uint16(b[4:])), binary.NativeEndian.Uint32(b[8:])
		b = b[min((l+3)&^3, len(b)):]
		if mseq != seq {
			continue
		}
		switch {
		case typ == netlink.Error && len(m) >= 4:
			if code := int32(binary.NativeEndian.Uint32(m)); code != 0 {
				return 0, true, syscall.Errno(-code)
			}
		case typ == newGen && len(m) >= 4:
			for a := m[4:]; len(a) >= 4; {
				al, at := int(binary.NativeEndian.Uint16(a)), binary.NativeEndian.Uint16(a[2:])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER)
				if al < 4 || al > len(a) {
					break
				}
				if at == unix.NFTA_GEN_ID && al >= 8 {
					return binary.BigEndian.Uint32(a[4:]), true, nil
				}
				a = a[min((al+3)&^3, len(a)):]
			}
			return 0, true, fmt.Errorf("no generation in the kernel's answer")
		}
	}
	return 0, false, nil
}
