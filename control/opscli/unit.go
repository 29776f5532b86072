package opscli

// SystemdUnit is the unit the bulkhead-control package ships. The server
// needs no privilege at all: a port above 1024, its own state directory,
// and network access to devices and its database; so it runs as a
// dynamic user with nothing else. /etc/bulkhead-control/env sets
// BULKHEAD_DB (postgres://…; empty: the bbolt file in the state
// directory) and BULKHEAD_CONTROL_ARGS (--name, --ops-pub, --tunnel-pool,
// …). Many held polls need many descriptors: one per device.
const SystemdUnit = `[Unit]
Description=Bulkhead control server
Documentation=https://github.com/bulkhead-edge/bulkhead/blob/main/docs/control.md
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
EnvironmentFile=-/etc/bulkhead-control/env
ExecStart=/usr/bin/bulkhead-control serve --data /var/lib/bulkhead-control $BULKHEAD_CONTROL_ARGS
Restart=on-failure
RestartSec=2s
LimitNOFILE=1048576
DynamicUser=yes
StateDirectory=bulkhead-control
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
DevicePolicy=closed
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
`

// EnvFile is the package's /etc/bulkhead-control/env, kept on upgrade.
const EnvFile = `# Read by bulkhead-control.service.
# The PostgreSQL database replicas share (empty: one bbolt file in
# /var/lib/bulkhead-control). Put its password in a PGPASSFILE, not here.
BULKHEAD_DB=
# Further serve flags: the names devices reach this server by, the ops
# keys it publishes, the tunnel address pool. See bulkhead-control serve --help.
BULKHEAD_CONTROL_ARGS=--name control.example.invalid
`
