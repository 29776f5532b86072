// Command bulkhead is the device agent. See package cmd/bulkhead/cli.
package main

import (
	"os"

	"github.com/bulkhead-edge/bulkhead/cmd/bulkhead/cli"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"

	// Schedules name IANA zones; a gateway without a zoneinfo database must
	// still open and close shift windows at the right instant.
	_ "time/tzdata"
)

func main() { os.Exit(subcmd.Main(cli.Root())) }
