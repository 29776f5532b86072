package lab

import (
	"context"
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

// GPS is a receiver the test drives: a real gpsd (Debian's) reading NMEA
// from a UDP port on loopback, and a feeder sending the receiver's
// current position there every cycle, stamped with the time it is sent.
// The test moves it or silences it and then waits for what the device
// makes of it, so no step depends on how fast a replay runs against how
// fast the device under test starts.
type GPS struct {
	Addr string // gpsd's, for the device to watch

	mu sync.Mutex
	at *Point // nil: silent, as a receiver without a fix
}

// StartGPS starts gpsd inside ns (nil: the test's own namespace),
// listening on 127.0.0.1:port (0: a free port), and feeds it the
// position at every cycle.
// gpsd and the feeder are stopped at cleanup.
func StartGPS(t T, ns *NS, port int, at Point, cycle time.Duration) *GPS {
	t.Helper()
	RequirePrivileged(t, "gpsd")
	g := &GPS{at: &at}
	dial := func(network, addr string) (net.Conn, error) {
		if ns != nil {
			return ns.DialContext(context.Background(), network, addr)
		}
		return net.Dial(network, addr)
	}
	if port == 0 {
		port = freePort(t, ns, "tcp")
	}
	g.Addr = fmt.Sprintf("127.0.0.1:%d", port)
	feed := freePort(t, ns, "udp")

	dir := t.TempDir()
	// -N: foreground; -n: open the source without waiting for a client;
	// -S: the port clients connect to. Its own process group, so
	// whatever it starts is stopped with it.
	argv := []string{"gpsd", "-N", "-n", "-S", fmt.Sprint(port), fmt.Sprintf("udp://127.0.0.1:%d", feed)}
	cmd := exec.Command(argv[0], argv[1:]...)
	if ns != nil {
		cmd = ns.Command(argv...)
	}
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin:"+os.Getenv("PATH"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := os.Create(filepath.Join(dir, "gpsd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	src, err := dial("udp", fmt.Sprintf("127.0.0.1:%d", feed))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	fed := make(chan struct{})
	go func() {
		defer close(fed)
		tick := time.NewTicker(cycle)
		defer tick.Stop()
		for {
			g.mu.Lock()
			at := g.at
			g.mu.Unlock()
			if at != nil {
				// Until gpsd has bound its port a datagram is refused;
				// the next cycle sends again.
				src.Write(NMEA([]Point{*at}, time.Now()))
			}
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		<-fed
		src.Close()
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(out.Name())
			t.Logf("gpsd: %s", b)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := dial("tcp", g.Addr)
		if err == nil {
			c.Close()
			return g
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(out.Name())
			t.Fatalf("gpsd never listened on %s: %v: %s", g.Addr, err, b)
		}
	}
}

// Move puts the receiver at p: its next fixes are there.
func (g *GPS) Move(p Point) {
	g.mu.Lock()
	g.at = &p
	g.mu.Unlock()
}

// Silence stops the fixes, as a receiver that has lost the sky: gpsd
// stays up and the last fix grows old.
func (g *GPS) Silence() {
	g.mu.Lock()
	g.at = nil
	g.mu.Unlock()
}

// freePort finds a port on loopback nobody in ns (nil: here) listens on.
func freePort(t T, ns *NS, network string) int {
	t.Helper()
	var port int
	find := func() error {
		if network == "udp" {
			c, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				return err
			}
			port = c.LocalAddr().(*net.UDPAddr).Port
			return c.Close()
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		port = l.Addr().(*net.TCPAddr).Port
		return l.Close()
	}
	do := find
	if ns != nil {
		do = func() error { return ns.Do(find) }
	}
	if err := do(); err != nil {
		t.Fatal(err)
	}
	return port
}
