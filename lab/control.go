package lab

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/bulkhead-edge/bulkhead/api/controlapi"
	"github.com/bulkhead-edge/bulkhead/control/opsclient"
	"github.com/bulkhead-edge/bulkhead/control/pki"
)

// Control is the real bulkhead-control server running in a namespace.
type Control struct {
	NS          *NS
	URL         string
	Fingerprint string
	Data        string
	addr        netip.AddrPort
	bin         string
	cmd         *exec.Cmd
	opts        ControlOptions
}

// ControlOptions are how a lab control server runs.
type ControlOptions struct {
	// KeepAlive is how long an idle sync is held; 0 keeps the default.
	KeepAlive time.Duration
	// OpsPub are ops.pub files it publishes to enrolling devices, for
	// their installer to pin.
	OpsPub []string
	// Args are further `serve` flags (--clock-offset, say).
	Args []string
	// Database is the PostgreSQL store replicas share (empty: the
	// server's own bbolt file).
	Database string
	// Names are further names in its certificate besides its address:
	// every replica carries the name devices enrolled with.
	Names []string
	// SecretsFrom is the data directory of the replica whose CA and
	// command key this one shares, copied in before its first start.
	SecretsFrom string
}

// StartControl runs `bulkhead-control serve` in ns on addr with its data
// in a fresh directory, and waits until it prints its CA fingerprint.
// keepAlive 0 keeps the server's default; opsPub are ops.pub files it
// publishes to enrolling devices, for their installer to pin.
func StartControl(t T, ns *NS, addr netip.AddrPort, keepAlive time.Duration, opsPub ...string) *Control {
	t.Helper()
	return StartControlWith(t, ns, addr, ControlOptions{KeepAlive: keepAlive, OpsPub: opsPub})
}

// StartControlWith is StartControl with every option.
func StartControlWith(t T, ns *NS, addr netip.AddrPort, o ControlOptions) *Control {
	t.Helper()
	c := &Control{NS: ns, URL: "https://" + addr.String(), Data: t.TempDir(), addr: addr,
		bin: Binary(t, "cmd/bulkhead-control"), opts: o}
	if o.SecretsFrom != "" {
		for _, name := range []string{pki.CertFile, pki.KeyFile, "command.key"} {
			raw, err := os.ReadFile(filepath.Join(o.SecretsFrom, name))
			if err == nil {
				err = os.WriteFile(filepath.Join(c.Data, name), raw, 0o600)
			}
			if err != nil {
				t.Fatalf("replica secrets: %v", err)
			}
		}
	}
	c.Start(t)
	t.Cleanup(c.Stop)
	return c
}

// Restart stops the server (as an operator does: SIGTERM, and it shuts
// down in order) and starts it again on the same data, with args in place
// of the further serve flags it ran with.
func (c *Control) Restart(t T, args ...string) {
	t.Helper()
	o := c.opts
	o.Args = args
	c.RestartWith(t, o)
}

// RestartWith is Restart with every option replaced: a server whose
// configuration an attacker changed (another --ops-pub), say.
func (c *Control) RestartWith(t T, o ControlOptions) {
	t.Helper()
	c.Terminate()
	c.opts = o
	c.Start(t)
}

// Options are the options the server runs with.
func (c *Control) Options() ControlOptions { return c.opts }

// Start (re)starts the server on the same data.
func (c *Control) Start(t T) {
	t.Helper()
	argv := []string{c.bin, "serve", "--data", c.Data, "--listen", c.addr.String(), "--name", c.addr.Addr().String()}
	for _, n := range c.opts.Names {
		argv = append(argv, "--name", n)
	}
	if c.opts.Database != "" {
		argv = append(argv, "--db", c.opts.Database)
	}
	if c.opts.KeepAlive > 0 {
		argv = append(argv, "--keepalive", c.opts.KeepAlive.String())
	}
	for _, f := range c.opts.OpsPub {
		argv = append(argv, "--ops-pub", f)
	}
	argv = append(argv, c.opts.Args...)
	c.cmd = c.NS.Command(argv...)
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(filepath.Join(c.Data, "serve.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	c.cmd.Stderr = logf
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start bulkhead-control: %v", err)
	}
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if fp, ok := strings.CutPrefix(sc.Text(), "CA fingerprint "); ok {
				found <- fp
			}
		}
	}()
	select {
	case c.Fingerprint = <-found:
	case <-time.After(10 * time.Second):
		log, _ := os.ReadFile(logf.Name())
		t.Fatalf("bulkhead-control printed no fingerprint: %s", log)
	}
	// It prints the fingerprint before it listens; wait for the port.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		err := c.NS.Do(func() error {
			conn, err := net.DialTimeout("tcp", c.addr.String(), 200*time.Millisecond)
			if err == nil {
				conn.Close()
			}
			return err
		})
		if err == nil {
			return
		}
	}
	t.Fatalf("bulkhead-control does not accept connections on %s", c.addr)
}

// HTTPClient is a client of the server from inside its namespace, under
// its pinned CA, presenting cert (nil: none, as an unenrolled caller).
func (c *Control) HTTPClient(t T, cert *tls.Certificate) *http.Client {
	t.Helper()
	caPEM, err := os.ReadFile(filepath.Join(c.Data, pki.CertFile))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: c.NS.DialContext, DisableKeepAlives: true, TLSClientConfig: cfg}}
}

// Pid is the running server's process id.
func (c *Control) Pid() int { return c.cmd.Process.Pid }

// Terminate stops the server with SIGTERM and waits for it to finish
// (killing it after 10 s).
func (c *Control) Terminate() {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
	c.cmd = nil
}

// Stop kills the server with SIGKILL, as a crash or a lost machine
// would, and waits for it to be gone.
func (c *Control) Stop() {
	if c.cmd != nil && c.cmd.Process != nil {
		c.cmd.Process.Kill()
		c.cmd.Wait()
		c.cmd = nil
	}
}

// CLI runs a bulkhead-control command as the first operator, from the
// server's namespace, and returns its output.
func (c *Control) CLI(args ...string) (string, error) {
	cmd := c.NS.Command(append([]string{c.bin}, args...)...)
	cmd.Env = append(os.Environ(), "BULKHEAD_CONTROL="+c.URL, "BULKHEAD_ADMIN="+filepath.Join(c.Data, "admin"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("bulkhead-control %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// MustCLI is CLI failing the test on error.
func (c *Control) MustCLI(t T, args ...string) string {
	t.Helper()
	out, err := c.CLI(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Ops is the ops API as the first operator, from inside the server's
// namespace.
func (c *Control) Ops(t T) *opsclient.Client {
	t.Helper()
	client, err := opsclient.New(c.URL, filepath.Join(c.Data, pki.AdminDir), c.NS.DialContext)
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// Deliver gives the server a signed command as the first operator: one
// signed elsewhere (an ops laptop), or one captured and replayed. It
// returns the server's refusal, if it refused.
func (c *Control) Deliver(t T, signed []byte) error {
	t.Helper()
	return c.Ops(t).Call("POST", controlapi.PathAdminCommands, controlapi.CommandRequest{Signed: signed}, nil)
}
