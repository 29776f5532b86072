// Package gpsd owns the agent's link to gpsd: a client of its JSON
// protocol (https://gpsd.io/gpsd_json.html) over TCP that asks for
// reports and hands on every position fix. No maintained Go client is on
// the module proxy this project builds from; the protocol needed here is
// one request and one report class.
package gpsd

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"time"

	"github.com/go-json-experiment/json"
)

// DefaultAddr is where gpsd listens unless told otherwise.
const DefaultAddr = "127.0.0.1:2947"

// Position is one fix: where, gpsd's time for it, and when it arrived
// here (with the monotonic clock, so its age survives a clock change).
type Position struct {
	Lat, Lon float64
	Time     time.Time // the receiver's, as gpsd reports it (may be zero)
	Arrived  time.Time
}

// report is the part of a gpsd report this client reads. A TPV report
// with mode 2 (2D) or 3 (3D) carries a fix.
type report struct {
	Class string    `json:"class"`
	Mode  int       `json:"mode"`
	Lat   *float64  `json:"lat"`
	Lon   *float64  `json:"lon"`
	Time  time.Time `json:"time"`
}

// watchRequest asks gpsd to stream JSON reports.
const watchRequest = `?WATCH={"enable":true,"json":true};` + "\n"

// maxBackoff caps the wait between attempts. gpsd is a local daemon, so
// an attempt costs nothing, while every second without it is a second in
// which the position ages: a restarted gpsd missed by a 30 s backoff kept
// a truck back in its yard restricted for half a minute.
const maxBackoff = 4 * time.Second

// Watch connects to addr and calls fix with every position until ctx
// ends. A lost or refused connection is reported to lost (once per
// outage) and retried, backing off from 1 s to maxBackoff.
func Watch(ctx context.Context, addr string, fix func(Position), lost func(error)) {
	backoff := time.Second
	var said string
	for ctx.Err() == nil {
		err := session(ctx, addr, fix, func() { backoff, said = time.Second, "" })
		if ctx.Err() != nil {
			return
		}
		if err.Error() != said {
			lost(err)
			said = err.Error()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// session is one connection: it returns why it ended. up is called once
// the first report arrives.
func session(ctx context.Context, addr string, fix func(Position), up func()) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("gpsd at %s: %w", addr, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if _, err := conn.Write([]byte(watchRequest)); err != nil {
		return fmt.Errorf("gpsd at %s: %w", addr, err)
	}
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 4096), 64<<10) // a SKY report lists every satellite
	first := true
	for sc.Scan() {
		if first {
			up()
			first = false
		}
		if p, ok := parse(sc.Bytes()); ok {
			p.Arrived = time.Now()
			fix(p)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("gpsd at %s: %w", addr, err)
	}
	return fmt.Errorf("gpsd at %s closed the connection", addr)
}

// parse reads one report line; it reports whether it was a usable fix.
// Anything else (other classes, no fix, bad JSON) is not a position.
func parse(line []byte) (Position, bool) {
	var r report
	if err := json.Unmarshal(line, &r); err != nil || r.Class != "TPV" || r.Mode < 2 || r.Lat == nil || r.Lon == nil {
		return Position{}, false
	}
	if *r.Lat < -90 || *r.Lat > 90 || *r.Lon < -180 || *r.Lon > 180 {
		return Position{}, false
	}
	return Position{Lat: *r.Lat, Lon: *r.Lon, Time: r.Time}, true
}
