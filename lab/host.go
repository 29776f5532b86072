package lab

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Host is a machine of its own inside a test, for what installs onto a
// device: it has ns's network, and mount and PID namespaces of its own.
// /etc, /usr/local and /var are copy-on-write over the real ones (the
// writes land in a test directory), /run starts empty, and every process
// started in it, daemons included, dies when the test ends. No init
// system runs in it, so kardianos/service installs SysV scripts there.
type Host struct {
	NS   *NS
	Dir  string // where the host's writes land: DIR/etc, DIR/var, ...
	init *exec.Cmd
	pid  int // the host's init (PID 1 inside), as the real system sees it
}

// overlaid are the directories a Host writes to copy-on-write.
var overlaid = []string{"/etc", "/usr/local", "/var"}

// NewHost starts a Host in ns.
func NewHost(t T, ns *NS) *Host {
	t.Helper()
	h := &Host{NS: ns, Dir: t.TempDir()}
	var setup strings.Builder
	setup.WriteString("set -e\n")
	for _, d := range overlaid {
		up, work := filepath.Join(h.Dir, d), filepath.Join(h.Dir, ".work", d)
		fmt.Fprintf(&setup, "mkdir -p %s %s\nmount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s\n", up, work, d, up, work, d)
	}
	setup.WriteString("mount -t tmpfs -o mode=0755 tmpfs /run\necho ready\nexec sleep infinity\n")
	h.init = ns.Command("unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "sh", "-c", setup.String())
	out, err := h.init.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	h.init.Stderr = &stderr
	if err := h.init.Start(); err != nil {
		t.Fatalf("start host: %v", err)
	}
	t.Cleanup(h.stop)
	ready := make(chan bool, 1)
	go func() { ready <- bufio.NewScanner(out).Scan() }()
	select {
	case ok := <-ready:
		if !ok {
			h.init.Wait()
			t.Fatalf("host setup failed: %s", stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("host setup did not finish: %s", stderr.String())
	}
	kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", h.init.Process.Pid, h.init.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if h.pid, err = strconv.Atoi(strings.TrimSpace(string(kids))); err != nil {
		t.Fatalf("host init: %q: %v", kids, err)
	}
	return h
}

// stop kills the host's init, and with it every process inside.
func (h *Host) stop() {
	syscall.Kill(h.pid, syscall.SIGKILL)
	h.init.Wait()
}

// Command prepares argv to run inside the host.
func (h *Host) Command(argv ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--target", strconv.Itoa(h.pid), "--mount", "--pid", "--net", "--"}, argv...)...)
}

// Run runs argv inside the host and returns its combined output.
func (h *Host) Run(argv ...string) (string, error) {
	out, err := h.Command(argv...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// MustRun is Run that fails t on error.
func (h *Host) MustRun(t T, argv ...string) string {
	t.Helper()
	out, err := h.Run(argv...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// HideTUN makes /dev/net/tun absent inside the host, as on a kernel or a
// container without it.
func (h *Host) HideTUN(t T) {
	t.Helper()
	h.MustRun(t, "mount", "-t", "tmpfs", "tmpfs", "/dev/net")
}
