package opscli

import (
	"flag"
	"os"
	"path/filepath"

	"github.com/bulkhead-edge/bulkhead/control/opsclient"
	"github.com/bulkhead-edge/bulkhead/control/pki"
)

// Where the CLI finds the server and an operator's credentials unless
// told otherwise.
const (
	DefaultData    = "/var/lib/bulkhead-control"
	DefaultControl = "https://127.0.0.1:8443"
)

// admin is a connection to the admin API as one operator.
type admin = opsclient.Client

// adminFlags declares --control and --admin and returns how to connect.
func adminFlags(fs *flag.FlagSet) func() (*admin, error) {
	url := fs.String("control", envOr("BULKHEAD_CONTROL", DefaultControl), "control server `URL` (env BULKHEAD_CONTROL)")
	dir := fs.String("admin", envOr("BULKHEAD_ADMIN", filepath.Join(DefaultData, pki.AdminDir)),
		"operator credentials `DIR` holding ca.crt, admin.crt and admin.key (env BULKHEAD_ADMIN)")
	return func() (*admin, error) { return opsclient.New(*url, *dir, nil) }
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
