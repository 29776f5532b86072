package lab

import (
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
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
func GPSFake(t testing.TB, log []byte, cycle time.Duration) string {
	t.Helper()
	RequirePrivileged(t, "gpsfake", "gpsd")
	dir := t.TempDir()
	file := filepath.Join(dir, "track.nmea")
	if err := os.WriteFile(file, log, 0o600); err != nil {
		t.Fatal(err)
	}
	port := freeTCPPort(t)
	// -1: play once; -c: seconds between sentences; -q: quiet;
	// -P: gpsd's port. gpsfake waits for a client before it feeds.
	cmd := exec.Command("gpsfake", "-1", "-q", "-c", fmt.Sprintf("%.3f", cycle.Seconds()), "-P", fmt.Sprint(port), file)
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin:"+os.Getenv("PATH"))
	out, err := os.Create(filepath.Join(dir, "gpsfake.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(out.Name())
			t.Logf("gpsfake: %s", b)
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(out.Name())
			t.Fatalf("gpsd from gpsfake never listened on %s: %s", addr, b)
		}
	}
}

func freeTCPPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
