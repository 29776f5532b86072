package lab

import (
	"encoding/json"
	"net/netip"
	"strconv"
)

// Iperf3Server runs `iperf3 -s` in ns on ap until the test ends.
func Iperf3Server(t T, ns *NS, ap netip.AddrPort) {
	t.Helper()
	srv := ns.Command("iperf3", "-s", "-B", ap.Addr().String(), "-p", strconv.Itoa(int(ap.Port())))
	if err := srv.Start(); err != nil {
		t.Fatalf("iperf3 server in %s: %v", ns.Name, err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
}

// Iperf3 runs one iperf3 TCP test of secs seconds from ns to the server
// at ap, with extra iperf3 options (-R: from the server to ns), and
// returns the rate the receiver saw, in bits per second.
func Iperf3(t T, ns *NS, ap netip.AddrPort, secs int, extra ...string) float64 {
	t.Helper()
	argv := append([]string{"iperf3", "-c", ap.Addr().String(), "-p", strconv.Itoa(int(ap.Port())), "-t", strconv.Itoa(secs), "-J"}, extra...)
	out, err := ns.Command(argv...).Output()
	if err != nil {
		t.Fatalf("iperf3 in %s: %v: %s", ns.Name, err, out)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &r); err != nil || r.Error != "" {
		t.Fatalf("iperf3 output: %v %s", err, r.Error)
	}
	return r.End.SumReceived.BitsPerSecond
}
