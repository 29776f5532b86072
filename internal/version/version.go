// Package version is the build's version, stamped by the linker (make
// build, make cross): -X github.com/bulkhead-edge/bulkhead/internal/version.Version=...
// Every binary and what it reports (the agent to control, `--version`)
// reads it here.
package version

// Version is the build's version; "dev" when built without a stamp.
var Version = "dev"
