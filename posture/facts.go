// Package posture owns what a device says about itself: the host facts it
// gathers (through gopsutil), the policy's posture checks judged on those
// facts, and the hysteresis that turns a series of judgements into the
// check results the evaluator decides on. Judge, Want and Tracker are
// pure; Gather is the one edge that reads the host.
package posture

import (
	"net/netip"
	"time"
)

// Facts are one sample of the device.
type Facts struct {
	Time         time.Time     `json:"time"`
	Hostname     string        `json:"hostname"`
	OS           string        `json:"os"` // os-release ID: "debian"
	OSVersion    string        `json:"os_version,omitzero"`
	Kernel       string        `json:"kernel"`
	Arch         string        `json:"arch"`
	AgentVersion string        `json:"agent_version"`
	BootTime     time.Time     `json:"boot_time"`
	Uptime       time.Duration `json:"uptime"`
	CPUs         int           `json:"cpus"`
	Load1        float64       `json:"load1"`
	MemTotal     uint64        `json:"mem_total"`
	MemAvailable uint64        `json:"mem_available"`
	Disks        []Disk        `json:"disks"`
	Processes    []Process     `json:"processes"`
	Listeners    []Socket      `json:"listeners"`
	Established  []Socket      `json:"established"`
	Interfaces   []Interface   `json:"interfaces"`
	Files        []File        `json:"files,omitzero"`
	// Unread names the lists a sample could not read ("processes",
	// "sockets", "tunnel", "clock", "table"). An empty list then proves nothing, so the checks that
	// read it fail instead of passing.
	Unread []string `json:"unread,omitzero"`
	// Tunnel is what has moved through the tunnel to each open segment's
	// gateway since its peer was set up, received plus sent, by segment.
	// The agent fills it from the tunnel's counters at each sample.
	Tunnel map[string]uint64 `json:"tunnel,omitzero"`
	// ClockSkew is the wall clock minus control's time (as last received
	// over the authenticated channel, carried forward by the monotonic
	// clock): positive when the device runs ahead. The agent fills it;
	// "clock" in Unread means control's time is not known yet.
	ClockSkew time.Duration `json:"clock_skew,omitzero"`
	// Tampered lists the outside changes the agent found (and undid) in
	// its nftables table since the previous sample; "table" in Unread
	// means the table could not be read back.
	Tampered []string `json:"tampered,omitzero"`
	// Location is the latest position, filled by the agent; "location"
	// in Unread means there has been none.
	Location *Fix `json:"location,omitzero"`
	// Self is the agent's own process id: its sockets (the WireGuard
	// port) are the agent's business, not a posture finding.
	Self int32 `json:"self"`
}

// Disk is the filesystem holding Path.
type Disk struct {
	Path        string `json:"path"`
	Total, Free uint64
}

// Process is one running process. SHA256 is its executable's digest, set
// only for processes a check pins (hashing every binary every sample
// would cost more than the sample).
type Process struct {
	PID    int32  `json:"pid"`
	Name   string `json:"name"`
	Exe    string `json:"exe,omitzero"`
	SHA256 string `json:"sha256,omitzero"`
}

// Socket is a listening or connected socket.
type Socket struct {
	Protocol string         `json:"protocol"` // tcp or udp
	Local    netip.AddrPort `json:"local"`
	Remote   netip.AddrPort `json:"remote,omitzero"`
	PID      int32          `json:"pid,omitzero"`
}

// Interface is a network interface and its addresses.
type Interface struct {
	Name  string         `json:"name"`
	Up    bool           `json:"up"`
	Addrs []netip.Prefix `json:"addrs,omitzero"`
}

// File is a file a check pins: its digest, or why there is none.
type File struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256,omitzero"`
	Error  string `json:"error,omitzero"`
}
