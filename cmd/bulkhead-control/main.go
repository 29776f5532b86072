// Command bulkhead-control is the security-operations tool and reference
// control server. See package control/opscli.
package main

import (
	"os"

	"github.com/bulkhead-edge/bulkhead/control/opscli"
	"github.com/bulkhead-edge/bulkhead/internal/subcmd"
)

func main() { os.Exit(subcmd.Main(opscli.Root())) }
