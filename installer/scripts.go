package installer

import (
	"strings"
)

// Capabilities is everything the agent keeps: the unit's bounding set.
// TestAgentNeedsItsCapabilities runs the agent with exactly these and
// shows each one is needed:
//   - CAP_NET_ADMIN: the nftables table, the TUN device and its routes,
//     the NFLOG group of monitor mode, and the process-event connector;
//   - CAP_SYS_PTRACE: reading /proc/PID/exe of other root processes, which
//     a process posture check hashes.
var Capabilities = []string{"CAP_NET_ADMIN", "CAP_SYS_PTRACE"}

// SystemdUnit is the hardened unit for the agent at binary.
//
// It is Type=notify: the agent says it is ready once its table is
// applied, and network-pre.target (so the network) waits for that. No
// ExecStop: stopping the agent leaves its table enforcing, and only
// `bulkhead uninstall --purge` or `bulkhead cleanup` removes it.
func SystemdUnit(binary string) string {
	caps := strings.Join(Capabilities, " ")
	return `# Written by bulkhead install; bulkhead uninstall removes it.
[Unit]
Description=Bulkhead zero-trust edge agent
Documentation=https://github.com/bulkhead-edge/bulkhead
# Enforcement before the network: the agent applies its cached policy (or
# lockdown) before network-pre.target, which network managers wait for.
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service
Before=network-pre.target shutdown.target
Wants=network-pre.target
Conflicts=shutdown.target
# Restart forever: the table keeps enforcing meanwhile, but nothing updates it.
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
# Stopping leaves the nftables table in place (fail closed).
ExecStart=` + binary + ` run --config ` + ConfigFile + `
Restart=always
RestartSec=1

CapabilityBoundingSet=` + caps + `
AmbientCapabilities=` + caps + `
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=` + StateDir + `
RuntimeDirectory=bulkhead wireguard
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
ProtectHome=yes
PrivateTmp=yes
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
ProtectKernelTunables=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# No SystemCallArchitectures=native: an armhf agent on a 64-bit kernel (a
# Raspberry Pi running 32-bit Raspberry Pi OS) would be killed by it.
UMask=0077

[Install]
WantedBy=sysinit.target
`
}

// OpenRCScript is the OpenRC service for the agent at binary:
// supervise-daemon restarts it, and it starts before the network.
func OpenRCScript(binary string) string {
	return `#!/sbin/openrc-run
# Written by bulkhead install; bulkhead uninstall removes it.
description="Bulkhead zero-trust edge agent"
command="` + binary + `"
command_args="run --config ` + ConfigFile + `"
supervisor=supervise-daemon
respawn_delay=1
respawn_max=0
output_log="/var/log/bulkhead.log"
error_log="/var/log/bulkhead.log"
umask=077

depend() {
	need localmount
	before net
}
`
}

// SysVScript is the SysV init script for the agent at binary. SysV does
// not restart a daemon that dies; its table keeps enforcing meanwhile.
func SysVScript(binary string) string {
	return `#!/bin/sh
# Written by bulkhead install; bulkhead uninstall removes it.
### BEGIN INIT INFO
# Provides:          bulkhead
# Required-Start:    $local_fs
# Required-Stop:     $local_fs
# X-Start-Before:    $network networking
# Default-Start:     S 2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Bulkhead zero-trust edge agent
### END INIT INFO

bin="` + binary + `"
pid_file=/run/bulkhead.pid
log=/var/log/bulkhead.log

running() {
	[ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

case "$1" in
start)
	if running; then
		echo "Running"
		exit 0
	fi
	umask 077
	setsid "$bin" run --config ` + ConfigFile + ` >>"$log" 2>&1 </dev/null &
	echo $! >"$pid_file"
	sleep 1
	if ! running; then
		echo "bulkhead did not start; see $log"
		exit 1
	fi
	echo "Running"
	;;
stop)
	# The table stays: the device keeps enforcing its last policy.
	if running; then
		kill "$(cat "$pid_file")"
		for i in 1 2 3 4 5 6 7 8 9 10; do
			running || break
			sleep 1
		done
	fi
	rm -f "$pid_file"
	echo "Stopped"
	;;
restart)
	"$0" stop && "$0" start
	;;
status)
	if running; then
		echo "Running"
	else
		echo "Stopped"
		exit 3
	fi
	;;
*)
	echo "Usage: $0 {start|stop|restart|status}"
	exit 2
	;;
esac
`
}
