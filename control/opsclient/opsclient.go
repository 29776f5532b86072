// Package opsclient is the ops API's client: one operator's mutually
// authenticated connection to the control server's admin paths, under the
// server's pinned CA. The ops CLI, the lab, the demo and the bench call
// the server through it.
package opsclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/pki"
)

// Client is a connection to the admin API as one operator.
type Client struct {
	url  string
	http *http.Client
}

// Dial is how connections are made; nil is the host's network.
type Dial func(ctx context.Context, network, addr string) (net.Conn, error)

// New connects to the server at url with the operator credentials in
// dir (see pki.AdminDir).
func New(url, dir string, dial Dial) (*Client, error) {
	ca, err := pki.ReadCert(filepath.Join(dir, pki.CertFile))
	if err != nil {
		return nil, fmt.Errorf("operator credentials: %w (serve writes them to DATA/%s)", err, pki.AdminDir)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, pki.AdminCert), filepath.Join(dir, pki.AdminKey))
	if err != nil {
		return nil, fmt.Errorf("operator credentials: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	tr := &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}}}
	if dial != nil {
		tr.DialContext = dial
	}
	return &Client{url: strings.TrimRight(url, "/"), http: &http.Client{Timeout: 30 * time.Second, Transport: tr}}, nil
}

// Call sends body (JSON-encoded unless it is []byte) to path and decodes
// the answer into out (nil: ignored); a refusal comes back as an error
// carrying the server's message.
func (c *Client) Call(method, path string, body, out any) error {
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
	req, err := http.NewRequest(method, c.url+path, rd)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("control server %s: %w", c.url, err)
	}
	defer resp.Body.Close()
	return controlapi.ReadResponse(resp, out)
}
