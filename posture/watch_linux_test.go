package posture

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fired waits (generously: speed is not what is tested) for the watch to
// say something.
func fired(t *testing.T, ch <-chan string) string {
	t.Helper()
	select {
	case why := <-ch:
		return why
	case <-time.After(10 * time.Second):
		t.Fatal("the watch never fired")
		return ""
	}
}

// quiet asserts the watch has said nothing (for the moment: events
// already made are delivered well within the pause).
func quiet(t *testing.T, ch <-chan string) {
	t.Helper()
	select {
	case why := <-ch:
		t.Fatalf("the watch fired: %s", why)
	case <-time.After(200 * time.Millisecond):
	}
}

func sleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// A required process's exit fires the watch; other processes' do not.
func TestWatchProcessExit(t *testing.T) {
	watched, other := sleeper(t), sleeper(t)
	f := &Facts{Processes: []Process{
		{PID: int32(watched.Process.Pid), Name: "sleep"},
		{PID: int32(other.Process.Pid), Name: "other"},
	}}
	ch, stop := Watch(Wants{Required: []string{"sleep"}}, f)
	defer stop()
	other.Process.Kill()
	other.Wait()
	quiet(t, ch)
	watched.Process.Kill()
	watched.Wait()
	if why := fired(t, ch); !strings.Contains(why, "process sleep (pid ") || !strings.Contains(why, "exited") {
		t.Errorf("fired with %q", why)
	}
}

// A process that exited between the sample and the watch fires at once.
func TestWatchProcessAlreadyGone(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	ch, stop := Watch(Wants{Required: []string{"true"}}, &Facts{Processes: []Process{{PID: int32(cmd.Process.Pid), Name: "true"}}})
	defer stop()
	fired(t, ch)
}

// A pinned file fires the watch when written, replaced by a rename (the
// way packages and editors install files), or created when it was
// missing; other files in its directory do not.
func TestWatchFile(t *testing.T) {
	dir := t.TempDir()
	pinned := filepath.Join(dir, "edr.conf")
	write := func(p, s string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	watch := func() (<-chan string, func()) {
		ch, stop := Watch(Wants{Files: []string{pinned}}, &Facts{})
		t.Cleanup(stop)
		return ch, stop
	}
	want := "file " + pinned + " changed"

	ch, stop := watch() // missing: its creation fires
	write(filepath.Join(dir, "unrelated"), "x")
	quiet(t, ch)
	write(pinned, "v1")
	if why := fired(t, ch); why != want {
		t.Errorf("creation fired with %q, want %q", why, want)
	}
	stop()

	ch, _ = watch()
	write(pinned, "v2")
	if why := fired(t, ch); why != want {
		t.Errorf("a write fired with %q", why)
	}

	ch, _ = watch()
	write(filepath.Join(dir, "new"), "v3")
	if err := os.Rename(filepath.Join(dir, "new"), pinned); err != nil {
		t.Fatal(err)
	}
	if why := fired(t, ch); why != want {
		t.Errorf("a replacement fired with %q", why)
	}
}

// stop releases the watch: nothing fires after it, and it may be called
// again.
func TestWatchStop(t *testing.T) {
	cmd := sleeper(t)
	ch, stop := Watch(Wants{Required: []string{"sleep"}}, &Facts{Processes: []Process{{PID: int32(cmd.Process.Pid), Name: "sleep"}}})
	stop()
	stop()
	cmd.Process.Kill()
	cmd.Wait()
	quiet(t, ch)
}
