package lab

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
	keepAlive   time.Duration
	opsPub      []string // ops.pub files it publishes at enrolment
}

// StartControl runs `bulkhead-control serve` in ns on addr with its data
// in a fresh directory, and waits until it prints its CA fingerprint.
// keepAlive 0 keeps the server's default; opsPub are ops.pub files it
// publishes to enrolling devices, for their installer to pin.
func StartControl(t testing.TB, ns *NS, addr netip.AddrPort, keepAlive time.Duration, opsPub ...string) *Control {
	t.Helper()
	c := &Control{NS: ns, URL: "https://" + addr.String(), Data: t.TempDir(), addr: addr,
		bin: Binary(t, "cmd/bulkhead-control"), keepAlive: keepAlive, opsPub: opsPub}
	c.Start(t)
	t.Cleanup(c.Stop)
	return c
}

// Start (re)starts the server on the same data.
func (c *Control) Start(t testing.TB) {
	t.Helper()
	argv := []string{c.bin, "serve", "--data", c.Data, "--listen", c.addr.String(), "--name", c.addr.Addr().String()}
	if c.keepAlive > 0 {
		argv = append(argv, "--keepalive", c.keepAlive.String())
	}
	for _, f := range c.opsPub {
		argv = append(argv, "--ops-pub", f)
	}
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

// Stop kills the server (as a crash or power loss would).
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
func (c *Control) MustCLI(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.CLI(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
