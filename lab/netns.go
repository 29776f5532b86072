package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// NS is a network namespace made for one test and deleted after it.
type NS struct {
	Name string
	fd   *os.File
}

// NewNS creates a fresh namespace with loopback up; it is removed when t
// ends, pass or fail.
func NewNS(t T, prefix string) *NS {
	t.Helper()
	suffix := make([]byte, 3)
	rand.Read(suffix)
	name := "bh-" + prefix + "-" + hex.EncodeToString(suffix)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	Note("ns", name)
	ns := &NS{Name: name}
	t.Cleanup(func() {
		// Whatever still runs inside (an agent a failed test never got to
		// stop, a server it started) goes with the namespace: a process
		// would otherwise keep the namespace, and its table, alive.
		if err := ns.killAll(); err != nil {
			t.Logf("namespace %s: %v", name, err)
		}
		if ns.fd != nil {
			ns.fd.Close()
		}
		exec.Command("ip", "netns", "del", name).Run()
	})
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	f, err := os.Open(filepath.Join("/run/netns", name))
	if err != nil {
		t.Fatalf("open namespace %s: %v", name, err)
	}
	ns.fd = f
	return ns
}

// FD is a file descriptor of the namespace, for netlink sockets inside it.
func (ns *NS) FD() int { return int(ns.fd.Fd()) }

// Command prepares argv to run inside the namespace.
func (ns *NS) Command(argv ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name}, argv...)...)
}

// Run runs argv inside the namespace and returns its combined output.
func (ns *NS) Run(argv ...string) (string, error) {
	var out bytes.Buffer
	cmd := ns.Command(argv...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s in %s: %w: %s", strings.Join(argv, " "), ns.Name, err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// MustRun is Run that fails t on error.
func (ns *NS) MustRun(t T, argv ...string) string {
	t.Helper()
	out, err := ns.Run(argv...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// killAll kills every process in the namespace with SIGKILL and waits
// until none is left (a zombie counts as gone: its parent reaps it).
func (ns *NS) killAll() error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := exec.Command("ip", "netns", "pids", ns.Name).Output()
		if err != nil {
			return fmt.Errorf("ip netns pids: %w", err)
		}
		var alive []int
		for _, f := range strings.Fields(string(out)) {
			pid, err := strconv.Atoi(f)
			if err != nil || pid == os.Getpid() {
				continue
			}
			if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !zombie(stat) {
				alive = append(alive, pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if len(alive) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v survive SIGKILL", alive)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// zombie reports whether a /proc/PID/stat line is a zombie's: the state
// follows the command name's closing parenthesis.
func zombie(stat []byte) bool {
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

// DialContext opens a connection from inside the namespace. An
// http.Transport dials on goroutines of its own, which Do alone would not
// reach: give it this.
func (ns *NS) DialContext(ctx context.Context, network, addr string) (conn net.Conn, err error) {
	err = ns.Do(func() error {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}
