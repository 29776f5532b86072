package lab

import (
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Point is a latitude and longitude in degrees.
type Point struct{ Lat, Lon float64 }

// NMEA renders a track as a receiver would report it, one fix per second
// from start: an RMC and a GGA sentence per point, with checksums.
func NMEA(track []Point, start time.Time) []byte {
	var b strings.Builder
	for i, p := range track {
		at := start.Add(time.Duration(i) * time.Second).UTC()
		lat, ns := nmeaAngle(p.Lat, 2), "N"
		if p.Lat < 0 {
			ns = "S"
		}
		lon, ew := nmeaAngle(p.Lon, 3), "E"
		if p.Lon < 0 {
			ew = "W"
		}
		hms := at.Format("150405") + ".00"
		sentence(&b, fmt.Sprintf("GPRMC,%s,A,%s,%s,%s,%s,10.0,90.0,%s,,,A", hms, lat, ns, lon, ew, at.Format("020106")))
		sentence(&b, fmt.Sprintf("GPGGA,%s,%s,%s,%s,%s,1,08,0.9,180.0,M,-34.0,M,,", hms, lat, ns, lon, ew))
	}
	return []byte(b.String())
}

// nmeaAngle writes |deg| as NMEA's (d)ddmm.mmmm with digits degree digits.
func nmeaAngle(deg float64, digits int) string {
	deg = math.Abs(deg)
	d := math.Floor(deg)
	return fmt.Sprintf("%0*d%07.4f", digits, int(d), (deg-d)*60)
}

func sentence(b *strings.Builder, body string) {
	var sum byte
	for i := 0; i < len(body); i++ {
		sum ^= body[i]
	}
	fmt.Fprintf(b, "$%s*%02X\r\n", body, sum)
}

// GPSFake replays an NMEA log through a real gpsd (Debian's gpsfake
// starts one on a pty), one sentence every cycle, once. It returns
// gpsd's address; gpsd and gpsfake are stopped at cleanup.
func GPSFake(t T, log []byte, cycle time.Duration) string {
	t.Helper()
	port := freeTCPPort(t)
	GPSFakeIn(t, nil, port, log, cycle, true)
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// GPSFakeIn is GPSFake inside ns (nil: the test's own namespace), with
// gpsd on 127.0.0.1:port, playing the log once or in a loop. It returns
// a function that stops gpsfake and its gpsd early (a receiver
// unplugged); they are stopped at cleanup either way.
func GPSFakeIn(t T, ns *NS, port int, log []byte, cycle time.Duration, once bool) (stop func()) {
	t.Helper()
	RequirePrivileged(t, "gpsfake", "gpsd")
	dir := t.TempDir()
	file := filepath.Join(dir, "track.nmea")
	if err := os.WriteFile(file, log, 0o600); err != nil {
		t.Fatal(err)
	}
	// -1: play once; -c: seconds between sentences; -q: quiet;
	// -P: gpsd's port. gpsfake waits for a client before it feeds.
	argv := []string{"gpsfake", "-q", "-c", fmt.Sprintf("%.3f", cycle.Seconds()), "-P", fmt.Sprint(port), file}
	if once {
		argv = append(argv[:1], append([]string{"-1"}, argv[1:]...)...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	if ns != nil {
		cmd = ns.Command(argv...)
	}
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin:"+os.Getenv("PATH"))
	// Its own process group: gpsfake's gpsd is stopped with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := os.Create(filepath.Join(dir, "gpsfake.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var stopped sync.Once
	stop = func() {
		stopped.Do(func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			cmd.Wait()
			// gpsd is gpsfake's child: wait until it is gone too, so
			// the next gpsfake's gpsd finds the port free.
			for deadline := time.Now().Add(5 * time.Second); syscall.Kill(-cmd.Process.Pid, 0) == nil && time.Now().Before(deadline); {
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			b, _ := os.ReadFile(out.Name())
			t.Logf("gpsfake: %s", b)
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	dial := func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		err := dial()
		if ns != nil {
			err = ns.Do(dial)
		}
		if err == nil {
			return stop
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(out.Name())
			t.Fatalf("gpsd from gpsfake never listened on %s: %s", addr, b)
		}
	}
}

func freeTCPPort(t T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
