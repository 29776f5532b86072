package opscli

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/agent/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
	"github.com/bulkhead-edge/bulkhead/control/server"
)

// Where the CLI finds the server and an operator's credentials unless
// told otherwise.
const (
	DefaultData    = "/var/lib/bulkhead-control"
	DefaultControl = "https://127.0.0.1:8443"
)

// admin is a connection to the admin API as one operator.
type admin struct {
	url  string
	http *http.Client
}

// adminFlags declares --control and --admin and returns how to connect.
func adminFlags(fs *flag.FlagSet) func() (*admin, error) {
	url := fs.String("control", envOr("BULKHEAD_CONTROL", DefaultControl), "control server `URL` (env BULKHEAD_CONTROL)")
	dir := fs.String("admin", envOr("BULKHEAD_ADMIN", filepath.Join(DefaultData, server.AdminDir)),
		"operator credentials `DIR` holding ca.crt, admin.crt and admin.key (env BULKHEAD_ADMIN)")
	return func() (*admin, error) {
		ca, err := pki.ReadCert(filepath.Join(*dir, pki.CertFile))
		if err != nil {
			return nil, fmt.Errorf("operator credentials: %w (serve writes them to DATA/%s)", err, server.AdminDir)
		}
		cert, err := tls.LoadX509KeyPair(filepath.Join(*dir, server.AdminCert), filepath.Join(*dir, server.AdminKey))
		if err != nil {
			return nil, fmt.Errorf("operator credentials: %w", err)
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		return &admin{url: strings.TrimRight(*url, "/"), http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}},
		}}}, nil
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// call sends body (JSON-encoded unless it is []byte) and decodes the
// answer into out; a refusal comes back as the server's message.
func (a *admin) call(method, path string, body, out any) error {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, a.url+path, rd)
	if err != nil {
		return err
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return fmt.Errorf("control server %s: %w", a.url, err)
	}
	defer resp.Body.Close()
	return controlapi.ReadResponse(resp, out)
}
